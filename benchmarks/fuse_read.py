"""Benchmark of reads through `snapstore mount` against casync mount, a plain file and runsc.

Measures, on one memory-like image with the page cache dropped before every cold run:
cold sequential read (snapstore mount, casync mount, the exported plain file), random 4 KiB
read latency, 8 parallel readers, and `runsc restore` time from the mount against a plain
directory. Prints a Markdown table of medians and the ratios the targets are stated in.

    sudo .venv/bin/python benchmarks/fuse_read.py [--size-mib 1024] [--runs 3] [--python]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from examples.workloads import (
    checkpoint_busybox,
    memory_image,
    python_numpy_bundle,
    read_status,
)
from fusefs.mount import is_mounted
from snapstore.export import export
from snapstore.gvisor.runsc import Runsc, new_container_id
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore

REPO = Path(__file__).resolve().parent.parent
BLOCK = 1 << 20
LIBFUSE_CEILING = 1.1e9  # C libfuse, low level, max_read 1 MiB, 4 threads (docs/DESIGN)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapstore(store: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store), *args],
                   check=True, env=env, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def snapstore_mount(store: Path, tag: str, mnt: Path, *options: str) -> Iterator[Path]:
    """A fresh daemon each time, so no run finds chunks cached by an earlier one."""
    mnt.mkdir(exist_ok=True)
    snapstore(store, "mount", tag, str(mnt), *options)
    try:
        yield mnt
    finally:
        snapstore(store, "umount", str(mnt))


@contextlib.contextmanager
def casync_mount(cstore: Path, index: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(["casync", "mount", f"--store={cstore}", str(index), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(mnt), "casync mount")
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=30)


def sequential_read(path: Path) -> float:
    """Bytes per second of one reader going through the whole file in 1 MiB reads."""
    buf = bytearray(BLOCK)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - start)


def parallel_read(path: Path, readers: int = 8) -> float:
    """Aggregate bytes per second of `readers` threads, each reading its own slice."""
    size = path.stat().st_size
    part = (size // readers + BLOCK - 1) // BLOCK * BLOCK

    def read_slice(i: int) -> int:
        buf = bytearray(BLOCK)
        fd = os.open(path, os.O_RDONLY)
        done = 0
        try:
            for off in range(i * part, min(size, (i + 1) * part), BLOCK):
                done += os.preadv(fd, [buf], off)
        finally:
            os.close(fd)
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        total = sum(pool.map(read_slice, range(readers)))
    return total / (time.perf_counter() - start)


def random_latency(path: Path, count: int = 2000, seed: int = 0) -> tuple[float, float]:
    """p50 and p99 seconds of cold 4 KiB reads at random page-aligned offsets."""
    pages = path.stat().st_size // 4096
    rng = random.Random(seed)
    times = []
    fd = os.open(path, os.O_RDONLY)
    try:
        # Kernel read-ahead would turn each 4 KiB read into a large one.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(count):
            off = rng.randrange(pages) * 4096
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def cold(measure: Callable[[], Any], setup: Callable[[], contextlib.AbstractContextManager[Path]],
         runs: int) -> list[Any]:
    out = []
    for _ in range(runs):
        with setup():
            drop_caches()
            out.append(measure())
    return out


def restore_seconds(rs: Runsc, bundle: Path, image_dir: Path) -> float:
    """`runsc restore -detach` wall time: it returns once the image is loaded and runs."""
    cid = new_container_id("bench")
    drop_caches()
    start = time.perf_counter()
    try:
        rs.restore(cid, bundle, image_dir)
        return time.perf_counter() - start
    finally:
        rs.destroy(cid)


def python_checkpoint(work: Path, rs: Runsc, mbytes: int = 64) -> tuple[Path, Path]:
    bundle = python_numpy_bundle(work / "python-bundle", mbytes=mbytes)
    image = work / "python-image"
    with rs.container(bundle) as cid:
        wait_for(lambda: read_status(bundle) is not None, "the Python workload", 120)
        rs.checkpoint(cid, image)
    return bundle, image


def bench_restore(parent: Path, store: Path, runs: int, with_python: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # runsc refuses to overwrite a checkpoint, so every run checkpoints into a fresh dir.
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=parent))
    # The sandbox reads the image as another user: it must be able to reach the mount.
    work.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        rs = cleanup.enter_context(Runsc.private(parent=work))
        busybox = checkpoint_busybox(work / "busybox", runsc=rs)
        cases = [("busybox", busybox.bundle, busybox.image_dir)]
        if with_python:
            bundle, image = python_checkpoint(work, rs)
            cases.append(("python", bundle, image))
        for name, bundle, image in cases:
            ingest(LocalStore.open(store), image, f"restore-{name}")
            size = (image / "checkpoint.img").stat().st_size
            plain = [restore_seconds(rs, bundle, image) for _ in range(runs)]
            mounted = []
            for _ in range(runs):
                with snapstore_mount(store, f"restore-{name}", work / "rmnt",
                                     "--allow-other") as mnt:
                    mounted.append(restore_seconds(rs, bundle, mnt))
            results[name] = {"image_bytes": size, "plain_s": plain, "mount_s": mounted}
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="keep inputs here (default: a temp dir)")
    p.add_argument("--python", action="store_true", help="also restore a ~71 MB Python image")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root: it drops the page cache and mounts", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fuse-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src, store, plain_dir = work / "image", work / "store", work / "plain"
    src.mkdir(exist_ok=True)
    image = src / "checkpoint.img"
    if not image.exists():
        memory_image(image, args.size_mib << 20, seed=1)
    if not (store / "refs/tags/bench").exists():
        ingest(LocalStore.open(store), src, "bench")
    if not plain_dir.exists():
        s = LocalStore.open(store)
        export(s, s.get_manifest(s.resolve("bench")), plain_dir)
    cstore, index = work / "casync-store", work / "image.caidx"
    if not index.exists():
        subprocess.run(["casync", "make", f"--store={cstore}", str(index), str(src)],
                       check=True, stdout=subprocess.DEVNULL)
    size = image.stat().st_size
    runs = args.runs
    mnt, cmnt = work / "mnt", work / "cmnt"

    def ours() -> contextlib.AbstractContextManager[Path]:
        return snapstore_mount(store, "bench", mnt)

    def theirs() -> contextlib.AbstractContextManager[Path]:
        return casync_mount(cstore, index, cmnt)

    def plain() -> contextlib.AbstractContextManager[Path]:
        return contextlib.nullcontext(plain_dir)

    fig: dict[str, Any] = {"image_bytes": size, "runs": runs}
    fig["seq_snapstore"] = cold(lambda: sequential_read(mnt / image.name), ours, runs)
    fig["seq_casync"] = cold(lambda: sequential_read(cmnt / image.name), theirs, runs)
    fig["seq_plain"] = cold(lambda: sequential_read(plain_dir / image.name), plain, runs)
    fig["par8_snapstore"] = cold(lambda: parallel_read(mnt / image.name), ours, runs)
    fig["par8_plain"] = cold(lambda: parallel_read(plain_dir / image.name), plain, runs)
    fig["rand_snapstore"] = cold(lambda: random_latency(mnt / image.name), ours, runs)
    fig["rand_plain"] = cold(lambda: random_latency(plain_dir / image.name), plain, runs)
    fig["restore"] = bench_restore(work, store, runs, args.python)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    print(report(fig))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(fig: dict[str, Any]) -> str:
    med = statistics.median

    def gbs(key: str) -> str:
        return f"{med(fig[key]) / 1e9:.2f} GB/s"

    def ms(key: str, i: int) -> str:
        return f"{med(r[i] for r in fig[key]) * 1e3:.3f} ms"

    seq = med(fig["seq_snapstore"])
    rows = [
        f"| measurement (median of {fig['runs']}, cold) | snapstore mount | reference | ratio |",
        "| --- | --- | --- | --- |",
        f"| sequential read, 1 reader | {gbs('seq_snapstore')} | casync mount "
        f"{gbs('seq_casync')} | {seq / med(fig['seq_casync']):.1f}x |",
        f"| sequential read, 1 reader | {gbs('seq_snapstore')} | C libfuse ceiling 1.10 GB/s "
        f"| {seq / LIBFUSE_CEILING:.2f}x |",
        f"| sequential read, 1 reader | {gbs('seq_snapstore')} | plain file "
        f"{gbs('seq_plain')} | {seq / med(fig['seq_plain']):.2f}x |",
        f"| 8 parallel readers | {gbs('par8_snapstore')} | plain file {gbs('par8_plain')} | "
        f"{med(fig['par8_snapstore']) / med(fig['par8_plain']):.2f}x |",
        f"| random 4 KiB read p50 | {ms('rand_snapstore', 0)} | plain file "
        f"{ms('rand_plain', 0)} | |",
        f"| random 4 KiB read p99 | {ms('rand_snapstore', 1)} | plain file "
        f"{ms('rand_plain', 1)} | |",
    ]
    for name, r in fig["restore"].items():
        m, pl = med(r["mount_s"]), med(r["plain_s"])
        rows.append(f"| runsc restore, {name} ({r['image_bytes'] / 1e6:.1f} MB) | {m:.3f} s "
                    f"| plain dir {pl:.3f} s | {m / pl:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
