"""Benchmark of the remote layer against one moto server: push, pull, lazy mount, restore.

Compares with `rclone copy` of the raw files to the same server, measures what moto itself
sustains (the ceiling of every figure here), and prints ratios. Needs root, /dev/fuse and
rclone; the runsc figures also need runsc. Usage:

    python benchmarks/remote.py [--size-mib 1024] [--reps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from examples.workloads import memory_image, two_python_checkpoints
from snapstore.gvisor.runsc import Runsc, new_container_id
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.remote.transfer import remote_chunks
from snapstore.store.backend import Handle
from snapstore.store.local import LocalStore
from snapstore.store.s3 import open_s3
from snapstore.store.url import RemoteURL
from tests.s3proxy import make_bucket, moto_server, s3_env

ROOT = Path(__file__).resolve().parents[1]
_buckets = iter(range(1_000_000))


def snapstore(store: Path, *args: str) -> dict[str, Any]:
    """Run the CLI as users do (a fresh process, imports included); its --json result."""
    proc = subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store), *args],
                          capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"snapstore {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def new_bucket(port: int) -> str:
    name = f"bench-{next(_buckets)}"
    make_bucket(port, name)
    return name


def rclone(port: int, *args: str) -> None:
    # rclone refuses to start with AWS_CA_BUNDLE set on a plain-http endpoint.
    env = {k: v for k, v in _env().items() if k != "AWS_CA_BUNDLE"}
    env |= {"RCLONE_CONFIG_MOTO_TYPE": "s3", "RCLONE_CONFIG_MOTO_PROVIDER": "Other",
           "RCLONE_CONFIG_MOTO_ENDPOINT": f"http://127.0.0.1:{port}",
           "RCLONE_CONFIG_MOTO_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
           "RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
           "RCLONE_CONFIG_MOTO_REGION": "us-east-1"}
    subprocess.run(["rclone", *args], check=True, env=env, capture_output=True)


def evict(*roots: Path) -> None:
    """Drop these trees' files from the page cache, so every read starts cold (only these
    files: the interpreters' and rclone's binaries stay cached, as on a warm host)."""
    os.sync()
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


async def moto_ceiling(port: int, mib: int = 256, parallel: int = 16) -> tuple[float, float]:
    """MB/s that moto takes and gives for 4 MiB objects at `parallel` requests."""
    bucket = new_bucket(port)
    data = os.urandom(4 << 20)
    n = mib // 4
    async with open_s3(RemoteURL(bucket), f"http://127.0.0.1:{port}", parallel + 4) as s3:
        limiter = trio.CapacityLimiter(parallel)

        def blob(i: int) -> Handle:
            return Handle.of("pack", ChunkId.of(b"%d" % i))

        async def put(i: int) -> None:
            async with limiter:
                await s3.save(blob(i), data)

        async def get(i: int) -> None:
            async with limiter:
                await s3.load(blob(i), len(data))

        times = []
        for op in (put, get):
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(op, i)
            times.append(n * 4 * 2**20 / (time.perf_counter() - start) / 1e6)
    return times[0], times[1]


async def index_loading(port: int, bucket: str, store: LocalStore) -> dict[str, float]:
    """Seconds a push takes to learn what the remote holds: with no copies of the pack
    indexes (a host's first push), and with the copies the pushing store kept."""
    out = {}
    async with open_s3(RemoteURL(bucket, "s"), f"http://127.0.0.1:{port}", 20) as s3:
        for name, copies in (("cold", None), ("warm", store)):
            start = time.perf_counter()
            known = await remote_chunks(s3, copies)
            out[name] = time.perf_counter() - start
        out["packs"] = len(known.pack_sizes)
    return out


@contextmanager
def mounted(store: Path, ref: str, mnt: Path, *extra: str) -> Iterator[None]:
    mnt.mkdir(exist_ok=True)
    snapstore(store, "mount", ref, str(mnt), "--allow-other", *extra)
    try:
        yield
    finally:
        snapstore(store, "umount", str(mnt))


def read_all(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--skip-runsc", action="store_true")
    args = p.parse_args()
    os.environ.update(s3_env())
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.workdir))
    results: dict[str, Any] = {}
    try:
        with moto_server() as port:
            endpoint = f"http://127.0.0.1:{port}"
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            run_all(port, endpoint, work, args, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


def run_all(port: int, endpoint: str, work: Path, args: argparse.Namespace,
            results: dict[str, Any]) -> None:
    up, down = trio.run(moto_ceiling, port)
    results["moto_ceiling_MBps"] = {"put_4MiB_x16": round(up), "get_4MiB_x16": round(down)}
    print(f"moto alone: PUT {up:.0f} MB/s, GET {down:.0f} MB/s (4 MiB objects, 16 parallel)")

    image = work / "image"
    image.mkdir()
    size = args.size_mib << 20
    memory_image(image / "pages.img", size, seed=7)
    src_root = work / "src"
    src = LocalStore.open(src_root)
    ingest(src, image, "mem")

    push_s, pull_s, rc_push, rc_pull = [], [], [], []
    last_bucket = ""
    packs = 0
    for rep in range(args.reps):
        bucket = new_bucket(port)
        last_bucket = bucket
        evict(work)
        rc_push.append(timed(rclone, port, "copy", str(image), f"moto:{bucket}/raw"))
        evict(work)
        out = work / f"rclone-out-{rep}"
        rc_pull.append(timed(rclone, port, "copy", f"moto:{bucket}/raw", str(out)))
        shutil.rmtree(out)
        evict(work)
        start = time.perf_counter()
        packs = snapstore(src_root, "push", "mem", f"s3://{bucket}/s", "--json")["packs"]
        push_s.append(time.perf_counter() - start)
        dst = work / f"dst-{rep}"
        evict(work)
        pull_s.append(timed(snapstore, dst, "pull", "mem", f"s3://{bucket}/s", "--json"))
        if rep < args.reps - 1:
            shutil.rmtree(dst)
    med = statistics.median
    stored = sum(c.stored_size for c in src.iter_chunks())
    results["memory_image"] = {
        "logical_bytes": size, "stored_bytes": stored, "packs": packs,
        "push_s": [round(x, 2) for x in push_s], "pull_s": [round(x, 2) for x in pull_s],
        "rclone_push_s": [round(x, 2) for x in rc_push],
        "rclone_pull_s": [round(x, 2) for x in rc_pull],
        "push_speedup": round(med(rc_push) / med(push_s), 2),
        "pull_speedup": round(med(rc_pull) / med(pull_s), 2),
    }
    print(f"memory image {size >> 20} MiB ({stored / 1e6:.0f} MB stored, {packs} packs): push "
          f"{med(push_s):.2f}s vs rclone {med(rc_push):.2f}s = "
          f"{med(rc_push) / med(push_s):.1f}x; pull {med(pull_s):.2f}s vs rclone "
          f"{med(rc_pull):.2f}s = {med(rc_pull) / med(pull_s):.1f}x")

    results["push_jobs_s"] = {}
    for jobs in (4, 8, 16, 32):
        bucket = new_bucket(port)
        t = timed(snapstore, src_root, "push", "mem", f"s3://{bucket}/s", "--jobs", str(jobs),
                  "--json")
        results["push_jobs_s"][jobs] = round(t, 2)
    print(f"push time by --jobs: {results['push_jobs_s']}")
    results["index_loading_s"] = {k: round(v, 3) for k, v in
                                  trio.run(index_loading, port, last_bucket, src).items()}
    print(f"loading the pack indexes of the pushed image: {results['index_loading_s']}")
    results["pack_size_s"] = {}
    for mib in (8, 16, 32):
        pushes, pulls = [], []
        for rep in range(args.reps):
            bucket = new_bucket(port)
            evict(work)
            pushes.append(timed(snapstore, src_root, "push", "mem", f"s3://{bucket}/s",
                                "--pack-size", f"{mib}M", "--json"))
            dst = work / f"pack-{mib}-{rep}"
            evict(work)
            pulls.append(timed(snapstore, dst, "pull", "mem", f"s3://{bucket}/s", "--json"))
            shutil.rmtree(dst)
        results["pack_size_s"][mib] = {"push": round(med(pushes), 2),
                                       "pull": round(med(pulls), 2)}
    print(f"push and pull by --pack-size (MiB, medians): {results['pack_size_s']}")

    # Cold lazy reads of the whole image, from an empty store each time.
    lazy: dict[str, float] = {}
    for name, extra in (("remote", ()), ("remote_prefetch", ("--prefetch",))):
        empty = work / f"lazy-{name}"
        evict(work)
        with mounted(empty, "mem", work / "mnt", "--remote", f"s3://{last_bucket}/s", *extra):
            lazy[name] = timed(read_all, work / "mnt" / "pages.img")
    dst = work / f"dst-{args.reps - 1}"
    evict(work)
    lazy["pull_then_local"] = timed(snapstore, work / "lazy-pull", "pull", "mem",
                                     f"s3://{last_bucket}/s", "--json")
    with mounted(work / "lazy-pull", "mem", work / "mnt"):
        lazy["pull_then_local"] += timed(read_all, work / "mnt" / "pages.img")
    evict(work)
    with mounted(dst, "mem", work / "mnt"):
        lazy["local_mount"] = timed(read_all, work / "mnt" / "pages.img")
    results["read_whole_image_s"] = {k: round(v, 2) for k, v in lazy.items()}
    print(f"cold read of the whole image: {results['read_whole_image_s']}")

    if not args.skip_runsc:
        runsc_part(port, work, results)


def runsc_part(port: int, work: Path, results: dict[str, Any]) -> None:
    try:
        first, second = two_python_checkpoints(work / "py")
    except Exception as e:
        results["python_checkpoints"] = f"not run: {e}"
        print(f"python checkpoints not run: {e}")
        return
    store = work / "py-store"
    st = LocalStore.open(store)
    ingest(st, first, "py1")
    ingest(st, second, "py2")
    bucket = new_bucket(port)
    remote = f"s3://{bucket}/s"
    one = snapstore(store, "push", "py1", remote, "--json")
    two = snapstore(store, "push", "py2", remote, "--json")
    raw2 = (second / "checkpoint.img").stat().st_size
    results["python_checkpoints"] = {
        "checkpoint_bytes": raw2, "first_push_bytes": one["bytes_sent"],
        "second_push_bytes": two["bytes_sent"],
        "second_push_fraction": round(two["bytes_sent"] / raw2, 4)}
    print(f"second Python checkpoint after the first: {two['bytes_sent']} bytes sent "
          f"({two['bytes_sent'] / raw2:.2%} of its {raw2} bytes)")
    bundle = work / "py" / "python-bundle"
    restore: dict[str, float] = {}
    cases: list[tuple[str, Path, tuple[str, ...]]] = [
        ("local_mount", store, ()),
        ("remote_mount", work / "rs-remote", ("--remote", remote)),
        ("remote_mount_prefetch", work / "rs-prefetch", ("--remote", remote, "--prefetch")),
    ]
    with Runsc.private(parent=work) as rs:
        for name, st_dir, extra in cases:
            mnt = work / f"mnt-{name}"
            evict(work)
            with mounted(st_dir, "py2", mnt, *extra):
                cid = new_container_id()
                restore[name] = timed(rs.restore, cid, bundle, mnt)
                rs.destroy(cid)
            if name == "local_mount":
                # The unmount recorded the restore's read order: push sends it along.
                snapstore(store, "push", "py2", remote, "--json")
    results["runsc_restore_s"] = {k: round(v, 2) for k, v in restore.items()}
    results["runsc_restore_remote_vs_local"] = round(
        restore["remote_mount"] / restore["local_mount"], 2)
    print(f"runsc restore: {results['runsc_restore_s']}")


if __name__ == "__main__":
    sys.exit(main())
