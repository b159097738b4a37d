"""Benchmark of loading a memory dump back through the uffd loader, by where its pages are.

A CPU process holds a memory-like image (40% zero, 30% random, 30% one repeated page) in
anonymous memory; it is dumped with `gpu-dump`'s code (no CUDA here) and ingested. Then the
dump is loaded into a fresh process (snapstore.gpu.load: handshake until every data page is
installed, every byte checked afterwards), with the page cache dropped before each load:

- from the dump directory (local sparse segment files, O_DIRECT prefetch);
- from the store: materialise the segment files, then load them (end to end, and the load
  alone, which reads the files just written, from the page cache);
- from a FUSE mount of the snapshot (`snapstore mount`): the loader reads the segment files
  through the mount, so chunks are loaded, decompressed and checked as the prefetch asks.

The GPU machine has no libfuse, so this runs where the mount does. Run as root:

    python benchmarks/dump_load.py --workdir DIR [--size-mib 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import drop_caches, gb, gbps, median, snapstore_cmd, table
from snapstore.examples import memory_image
from snapstore.gpu.cuda import NoCuda
from snapstore.gpu.dump import After, dump_process, read_dump
from snapstore.gpu.load import LoadResult, load, materialize
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore

CHILD = r"""
import sys
import numpy as np
memory = np.fromfile(sys.argv[1], dtype=np.uint8)
print("ready", flush=True)
sys.stdin.read()
"""


def dump_child(image: Path, outdir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(image)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the memory process did not start")
        dump_process(child.pid, outdir, after=After.KILL, api=NoCuda("CPU benchmark"))
    finally:
        child.kill()
        child.wait()


def cold_load(dump_dir: Path, work: Path) -> LoadResult:
    drop_caches()
    work.mkdir(exist_ok=True)
    result = load(read_dump(dump_dir), work)
    if not result.verified:
        raise RuntimeError(f"the load from {dump_dir} did not verify")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    memory_image(work / "memory.raw", args.size_mib << 20, seed=3)
    dump_child(work / "memory.raw", work / "dump")
    (work / "memory.raw").unlink()
    store = LocalStore.open(work / "store", create=True)
    ingest(store, work / "dump", "dump")
    mnt = work / "mnt"
    mnt.mkdir()

    times: dict[str, list[float]] = {"dump dir": [], "store: load": [], "store: end to end": [],
                                     "FUSE mount": []}
    data: dict[str, int] = {}
    for _ in range(args.repeats):
        r = cold_load(work / "dump", work / "w-dir")
        times["dump dir"].append(r.load_seconds)
        data["dump dir"] = r.data_bytes

        drop_caches()
        shutil.rmtree(work / "mat", ignore_errors=True)
        start = time.perf_counter()
        m = store.get_manifest(store.resolve("dump"))
        materialize(store, m, work / "mat")
        materialized = time.perf_counter() - start
        (work / "w-mat").mkdir(exist_ok=True)
        r = load(read_dump(work / "mat"), work / "w-mat")
        times["store: load"].append(r.load_seconds)
        times["store: end to end"].append(materialized + r.load_seconds)
        data["store: load"] = data["store: end to end"] = r.data_bytes

        subprocess.run(snapstore_cmd(work / "store", "mount", "dump", str(mnt)), check=True,
                       stdout=subprocess.DEVNULL)
        try:
            r = cold_load(mnt, work / "w-fuse")
        finally:
            subprocess.run(snapstore_cmd(work / "store", "umount", str(mnt)), check=True,
                           stdout=subprocess.DEVNULL)
        times["FUSE mount"].append(r.load_seconds)
        data["FUSE mount"] = r.data_bytes

    rows = [[name, gb(data[name]), f"{median(ts):.3f} s",
             f"{gbps(data[name], median(ts)):.2f} GB/s"] for name, ts in times.items()]
    print(f"dump of a {args.size_mib} MiB memory-like process, cold page cache, "
          f"medians of {args.repeats}")
    print(table(["source", "pages loaded", "time", "rate"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
