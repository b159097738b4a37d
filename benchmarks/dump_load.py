"""Benchmark of `gpu-load` from the store, end to end, against the ways it compares to.

A CPU process holds a memory-like image (40% zero, 30% random, 30% one repeated page) in
anonymous memory; it is dumped with `gpu-dump`'s code (no CUDA here) and ingested. Each
repeat then times, in one run, from the start of a command to the last data page installed
in a fresh process (the byte check after it is not counted):

- `snapstore gpu-load TAG`: the loader serves the page space straight from the store's
  chunks;
- materialise, then load: the segment files written from the store, then loaded by the
  loader (what gpu-load did before), as one command;
- `snapstore gpu-load DIR` of the exported dump (local segment files);
- `cat` of the exported segment files to /dev/null: reading the bytes, no restore at all.

The store and the exported files stay in the page cache (as right after a dump or a pull)
unless `--cold` drops it before every run. Run as root:

    python benchmarks/dump_load.py --workdir DIR [--size-mib 1024] [--repeats 3] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.common import drop_caches, gb, gbps, median, snapstore_cmd, table
from examples.workloads import memory_image
from snapstore.gpu.cuda import NoCuda
from snapstore.gpu.dump import After, dump_process, read_dump
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


OLD_PATH = r"""
import json, sys, time
from pathlib import Path
from snapstore.gpu.dump import read_dump
from snapstore.gpu.load_dump import load, materialize, process_start
from snapstore.store.local import LocalStore
started = process_start()
store = LocalStore.open(Path(sys.argv[1]), create=False)
work = Path(sys.argv[2])
m = store.get_manifest(store.resolve("dump"))
made = time.monotonic()
dump = materialize(store, m, work / "dump")
made = time.monotonic() - made
r = load(dump, work, verify=False, started=started)
print(json.dumps({"end_to_end_seconds": r.end_to_end, "materialize_seconds": made,
                  "first_fault_seconds": None}))
"""


def gpu_load(store: Path, ref: str) -> dict[str, float]:
    out = subprocess.run(snapstore_cmd(store, "gpu-load", ref, "--no-verify", "--json"),
                         check=True, capture_output=True, text=True).stdout
    doc = json.loads(out)
    return {"end_to_end_seconds": doc["end_to_end_seconds"],
            "first_fault_seconds": doc["stages"].get("first fault served after the handshake")}


def old_path(store: Path, work: Path) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", OLD_PATH, str(store), str(work)], check=True,
                         capture_output=True, text=True).stdout
    shutil.rmtree(work)
    doc: dict[str, float] = json.loads(out)
    return doc


def cat(files: list[Path]) -> dict[str, float]:
    start = time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], check=True, stdout=null)
    return {"end_to_end_seconds": time.monotonic() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = ap.parse_args()

    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    memory_image(work / "memory.raw", args.size_mib << 20, seed=3)
    dump_child(work / "memory.raw", work / "dump")
    (work / "memory.raw").unlink()
    store = LocalStore.open(work / "store", create=True)
    ingest(store, work / "dump", "dump")
    shutil.rmtree(work / "dump")
    subprocess.run(snapstore_cmd(work / "store", "export", "dump", str(work / "exported")),
                   check=True, stdout=subprocess.DEVNULL)
    # The first load checks every byte, so the timed ones can skip the check.
    subprocess.run(snapstore_cmd(work / "store", "gpu-load", "dump"), check=True)
    dump = read_dump(work / "exported")

    methods: dict[str, Callable[[], dict[str, float]]] = {
        "gpu-load from the store": partial(gpu_load, work / "store", "dump"),
        "materialise, then load": partial(old_path, work / "store", work / "mat"),
        "gpu-load of the exported dump": partial(gpu_load, work / "store",
                                                 str(work / "exported")),
        "cat of the exported files": partial(cat, dump.pages_paths),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            if args.cold:
                drop_caches()
            runs[name].append(fn())

    size = dump.pages_size
    rows = []
    for name, rs in runs.items():
        t = median([r["end_to_end_seconds"] for r in rs])
        first = [r["first_fault_seconds"] for r in rs if r.get("first_fault_seconds")]
        rows.append([name, f"{t:.3f} s", f"{gbps(size, t):.2f} GB/s",
                     f"{median(first) * 1000:.1f} ms" if first else "-"])
    cache = "cold" if args.cold else "warm"
    print(f"dump of a {args.size_mib} MiB memory-like process ({gb(size)} page space), "
          f"{cache} page cache, medians of {args.repeats}")
    print(table(["method", "end to end", "page space rate", "first fault after handshake"],
                rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
