"""Benchmark of restoring a memory working set: eager read, file mmap, uffd lazy, uffd prefetch.

Generates a memory-like image, records the working-set trace once through the loader, then
times how long a client takes to touch the working set with each method, cold (page cache
dropped) and warm, for anonymous and memfd targets. Prints a table of medians and ratios.
The loader runs with its defaults: it picks the page cache or O_DIRECT per prefetch read.

    python benchmarks/page_prefetch.py [--quick] [--image-dir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from snapstore.uffd import page_loader
from snapstore.uffd.client import PAGE_SIZE, Client

SEED = 20240611
SWEEPS = ("fault-around", "queue-depth", "threads")


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        values = [s[key] for s in self.stats]
        return statistics.median(values) if values else float("nan")

    def latency(self, q: str) -> float:
        """Median over runs that timed any demand read (faults on in-flight reads are not)."""
        values = [s["fault_latency_us"][q] for s in self.stats if s["fault_latency_us"]["samples"]]
        return statistics.median(values) if values else float("nan")


def write_image(path: Path, size: int) -> None:
    """Memory-like content: half random pages, a quarter zero, a quarter repeated patterns."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(SEED)
    patterns = np.frombuffer(rng.bytes(64 * PAGE_SIZE), dtype=np.uint8).reshape(64, PAGE_SIZE)
    chunk_pages = (64 << 20) // PAGE_SIZE
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for _ in range(size // PAGE_SIZE // chunk_pages):
            kinds = rng.choice(3, size=chunk_pages, p=[0.5, 0.25, 0.25])
            pages = np.zeros((chunk_pages, PAGE_SIZE), dtype=np.uint8)
            random = kinds == 0
            pages[random] = np.frombuffer(
                rng.bytes(int(random.sum()) * PAGE_SIZE), dtype=np.uint8
            ).reshape(-1, PAGE_SIZE)
            repeated = np.flatnonzero(kinds == 2)
            pages[repeated] = patterns[rng.integers(0, 64, size=repeated.size)]
            f.write(pages.tobytes())
    tmp.replace(path)


def working_set(npages: int, fraction: float, seed: int) -> list[int]:
    """Access order: half the accesses hit single pages, half start runs of 2-64 pages."""
    rng = np.random.default_rng(seed)
    target = int(npages * fraction)
    seen = np.zeros(npages, dtype=bool)
    order: list[int] = []
    while len(order) < target:
        start = int(rng.integers(0, npages))
        length = 1 if rng.random() < 0.5 else int(rng.integers(2, 65))
        for p in range(start, min(start + length, npages)):
            if not seen[p] and len(order) < target:
                seen[p] = True
                order.append(p)
    return order


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def touch(mm: mmap.mmap, pages: list[int]) -> None:
    for p in pages:
        mm[p * PAGE_SIZE]


def run_eager(image: Path, pages: list[int]) -> float:
    size = image.stat().st_size
    start = time.perf_counter()
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with image.open("rb", buffering=0) as f, memoryview(mm) as mv:
        for off in range(0, size, 16 << 20):
            f.readinto(mv[off : off + (16 << 20)])
    touch(mm, pages)
    elapsed = time.perf_counter() - start
    mm.close()
    return elapsed


def run_mmap(image: Path, pages: list[int]) -> float:
    start = time.perf_counter()
    with image.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        touch(mm, pages)
    elapsed = time.perf_counter() - start
    mm.close()
    return elapsed


@contextmanager
def loader_running(opts: page_loader.LoaderOptions) -> Iterator[None]:
    # The loader's stderr is ours: when it fails it kills its client, this process, so a
    # pipe read here would never show why.
    proc = page_loader.start(opts)
    try:
        yield
    finally:
        proc.wait(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"loader failed with status {proc.returncode} (its message is above)")


def run_uffd(
    image: Path, pages: list[int], work: Path, memfd: bool, hot: Path | None, **extra: Any
) -> tuple[float, dict[str, Any]]:
    sock, stats = work / "bench.sock", work / "stats.json"
    opts = page_loader.LoaderOptions(image, sock, hot=hot, memfd=memfd, stats_json=stats, **extra)
    size = image.stat().st_size
    with loader_running(opts):
        client = Client(sock, [(0, size)], memfd=memfd)
        start = time.perf_counter()
        client.connect()
        client.touch(pages)
        elapsed = time.perf_counter() - start
        client.close()
    result: dict[str, Any] = json.loads(stats.read_text())
    return elapsed, result


def install_rate(
    image: Path, hot: Path, work: Path, memfd: bool, **extra: Any
) -> tuple[float, dict[str, Any]]:
    """Prefetch alone from a warm page cache: the client connects and touches nothing."""
    sock, stats = work / "rate.sock", work / "rate.json"
    opts = page_loader.LoaderOptions(image, sock, hot=hot, memfd=memfd, stats_json=stats, **extra)
    with loader_running(opts), Client(sock, [(0, image.stat().st_size)], memfd=memfd):
        # Long enough for the whole list at well under the rates measured; stats time the copy.
        time.sleep(0.2 + hot.stat().st_size / 10 / 0.5e9 * PAGE_SIZE)
    result: dict[str, Any] = json.loads(stats.read_text())
    return result["prefetch_seconds"], result


def record_trace(image: Path, pages: list[int], work: Path, name: str) -> Path:
    record = work / f"{name}.hot"
    sock = work / "record.sock"
    opts = page_loader.LoaderOptions(image, sock, record=record, fault_around_kib=0)
    with loader_running(opts), Client(sock, [(0, image.stat().st_size)]) as client:
        client.touch(pages)
    return record


def measure(repeats: int, cold: bool, image: Path, fn: Callable[[], Any]) -> Result:
    """One untimed warm-up run (allocator, binary, Python code paths), then `repeats` runs."""
    result = Result()
    for i in range(repeats + 1):
        if cold:
            drop_caches()
        else:
            warm_cache(image)
        out = fn()
        if i == 0:
            continue
        if isinstance(out, tuple):
            result.seconds.append(out[0])
            result.stats.append(out[1])
        else:
            result.seconds.append(out)
    return result


def fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image-dir", type=Path, default=Path("bench-out"))
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--fractions", default="0.05,0.2,0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB image, 20%% only, 1 repeat")
    ap.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(SWEEPS),
        default="",
        help=f"also sweep these at 20%% (comma list; alone: all of {', '.join(SWEEPS)})",
    )
    ap.add_argument("--json", type=Path, help="write all measurements here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mib, args.fractions, args.repeats = 256, "0.2", 1

    args.image_dir.mkdir(parents=True, exist_ok=True)
    image = args.image_dir / f"image-{args.size_mib}m-{SEED}.raw"
    write_image(image, args.size_mib << 20)
    npages = (args.size_mib << 20) // PAGE_SIZE
    can_drop = drop_caches()
    print(f"image {image} ({args.size_mib} MiB), repeats {args.repeats}, cold runs: {can_drop}")

    report: dict[str, Any] = {"size_mib": args.size_mib, "repeats": args.repeats, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            pages = working_set(npages, fraction, seed=SEED + int(fraction * 1000))
            hot = record_trace(image, pages, work, f"ws{fraction}")
            for cold in [True, False] if can_drop else [False]:
                methods: dict[str, Callable[[], Any]] = {
                    "eager": partial(run_eager, image, pages),
                    "mmap": partial(run_mmap, image, pages),
                    "uffd-lazy": partial(run_uffd, image, pages, work, False, None),
                    "uffd-prefetch": partial(run_uffd, image, pages, work, False, hot),
                    "memfd-lazy": partial(run_uffd, image, pages, work, True, None),
                    "memfd-prefetch": partial(run_uffd, image, pages, work, True, hot),
                }
                key = f"{int(fraction * 100)}% {'cold' if cold else 'warm'}"
                results = {
                    name: measure(args.repeats, cold, image, fn) for name, fn in methods.items()
                }
                print_table(key, len(pages), results)
                report["runs"][key] = {
                    n: {"seconds": r.seconds, "stats": r.stats} for n, r in results.items()
                }
            rates = {
                target: measure(
                    args.repeats, False, image, partial(install_rate, image, hot, work, memfd)
                )
                for target, memfd in (("anonymous", False), ("memfd", True))
            }
            print(
                "\nprefetch install rate, warm page cache, no client activity: "
                + ", ".join(f"{t} {r.median('prefetch_gbps'):.2f} GB/s" for t, r in rates.items())
            )
            report["runs"][f"{int(fraction * 100)}% install rate"] = {
                t: {"seconds": r.seconds, "stats": r.stats} for t, r in rates.items()
            }
            if args.sweep and fraction == 0.2:
                which = set(args.sweep.split(","))
                report["sweep"] = sweep(image, pages, hot, work, args.repeats, which)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_table(key: str, npages: int, results: dict[str, Result]) -> None:
    mib = npages * PAGE_SIZE / 2**20
    print(f"\n## working set {key}: {npages} pages ({mib:.0f} MiB)")
    print("| method | time to WS (s) | demand faults | prefetch GB/s | read O_DIRECT "
          "| fault p50 / p99 (µs) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        direct = [s["direct_bytes"] / s["prefetch_bytes"] for s in r.stats if s["prefetch_bytes"]]
        print(
            f"| {name} | {statistics.median(r.seconds):.3f} "
            f"| {fmt(r.median('demand_faults'), '.0f')} "
            f"| {fmt(r.median('prefetch_gbps'), '.2f')} "
            f"| {f'{statistics.median(direct):.0%}' if direct else '-'} "
            f"| {fmt(r.latency('p50'), '.1f')} / {fmt(r.latency('p99'), '.1f')} |"
        )
    t = {name: statistics.median(r.seconds) for name, r in results.items()}
    print(
        f"\nprefetch vs lazy {t['uffd-lazy'] / t['uffd-prefetch']:.2f}x, "
        f"prefetch vs eager {t['eager'] / t['uffd-prefetch']:.2f}x, "
        f"memfd-prefetch vs prefetch {t['uffd-prefetch'] / t['memfd-prefetch']:.2f}x"
    )


def sweep(
    image: Path, pages: list[int], hot: Path, work: Path, repeats: int, which: set[str]
) -> dict[str, Any]:
    """The medians behind the loader's defaults: fault-around for warm uffd-lazy, queue depth
    for cold uffd-prefetch, prefetch threads for warm uffd-prefetch and the install rate."""
    unknown = which - set(SWEEPS)
    if unknown:
        raise SystemExit(f"unknown sweep {', '.join(sorted(unknown))}; known: {', '.join(SWEEPS)}")
    out: dict[str, Any] = {"fault_around_kib": {}, "queue_depth": {}, "prefetch_threads": {}}
    print(f"\n## sweep: {', '.join(s for s in SWEEPS if s in which)}")
    for kib in (4, 16, 64, 256) if "fault-around" in which else ():
        lazy = partial(run_uffd, image, pages, work, False, None, fault_around_kib=kib)
        r = measure(repeats, False, image, lazy)
        out["fault_around_kib"][kib] = statistics.median(r.seconds)
        print(
            f"fault-around {kib} KiB: {statistics.median(r.seconds):.3f} s, "
            f"p50 {r.latency('p50'):.1f} µs"
        )
    for qd in (4, 16, 32, 64, 128) if "queue-depth" in which else ():
        prefetch = partial(run_uffd, image, pages, work, False, hot, queue_depth=qd)
        r = measure(repeats, True, image, prefetch)
        out["queue_depth"][qd] = statistics.median(r.seconds)
        print(
            f"queue depth {qd}: {statistics.median(r.seconds):.3f} s, "
            f"{r.median('prefetch_gbps'):.2f} GB/s"
        )
    for n in (1, 2, 4, 8) if "threads" in which else ():
        warm = partial(run_uffd, image, pages, work, False, hot, prefetch_threads=n)
        r = measure(repeats, False, image, warm)
        rated = partial(install_rate, image, hot, work, False, prefetch_threads=n)
        rate = measure(repeats, False, image, rated)
        out["prefetch_threads"][n] = {
            "seconds": statistics.median(r.seconds),
            "install_gbps": rate.median("prefetch_gbps"),
        }
        print(
            f"prefetch threads {n}: warm uffd-prefetch {statistics.median(r.seconds):.3f} s, "
            f"install rate {rate.median('prefetch_gbps'):.2f} GB/s"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
