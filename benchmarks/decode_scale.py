"""What the chunk path of a restore can do on this host, step by step, with 1 to 2 x cores
threads: reading the chunk files (page cache warm, and cold from the disk), inflating them
(zstd), hashing the result (BLAKE3), and all three as a restore does them
(`LocalStore.get_chunk`). The data is what a model's memory is: bf16 weights drawn from a
normal distribution (seed 0), ingested into a fresh store.

Every step runs in threads of one process, as the lazy-pages daemon's copy threads did
(its copy processes each run one); each thread takes every n-th chunk. Rates are of the
raw bytes (what lands in memory), except the reads', which are of the stored bytes. Run
as root (the cold read drops the page cache):

    python -m benchmarks.decode_scale --workdir DIR [--size-mib 2048] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np
import zstandard

from benchmarks.common import drop_caches, gb, table
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore


def bf16_weights(path: Path, size_mib: int) -> None:
    rng = np.random.default_rng(0)
    with path.open("wb") as f:
        for _ in range(size_mib // 32):
            w = (rng.standard_normal(16 << 20, dtype=np.float32) * 0.02).view(np.uint32)
            f.write((w >> 16).astype(np.uint16).tobytes())


def rate(step: Callable[[int, int], None], threads: int, nbytes: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(step, range(threads), [threads] * threads))
    return nbytes / (time.perf_counter() - start) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()

    src = args.workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    if not (src / "weights.bin").exists():
        bf16_weights(src / "weights.bin", args.size_mib)
    store = LocalStore.open(args.workdir / "store")
    if "weights" not in store.tags():
        ingest(store, src, tag="weights")
    m = store.get_manifest(store.resolve("weights"))
    chunks: list[tuple[ChunkId, int]] = []
    for e in m.files():
        chunks += [(x.chunk, x.size) for x in e.extents if x.chunk is not None]
    raw_bytes = sum(size for _, size in chunks)
    objects = [store.get_chunk_object(cid) for cid, _ in chunks]
    stored_bytes = sum(len(o) for o in objects)
    print(f"{len(chunks)} chunks, {gb(raw_bytes)} raw, {gb(stored_bytes)} stored "
          f"({stored_bytes / raw_bytes:.0%}); {os.cpu_count()} cores", flush=True)

    def read(i: int, n: int) -> None:
        for cid, _ in chunks[i::n]:
            store.get_chunk_object(cid)

    def inflate(i: int, n: int) -> None:
        d = zstandard.ZstdDecompressor()
        for k in range(i, len(chunks), n):
            d.decompress(memoryview(objects[k])[1:], max_output_size=chunks[k][1])

    def hash_(i: int, n: int) -> None:
        raw = bytes(max(size for _, size in chunks))
        for _, size in chunks[i::n]:
            blake3.blake3(memoryview(raw)[:size]).digest()

    def whole(i: int, n: int) -> None:
        for cid, size in chunks[i::n]:
            store.get_chunk(cid, size)

    steps: dict[str, tuple[Callable[[int, int], None], int]] = {
        "read (warm)": (read, stored_bytes), "read (cold)": (read, stored_bytes),
        "inflate": (inflate, raw_bytes), "hash": (hash_, raw_bytes),
        "read + inflate + hash": (whole, raw_bytes)}
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= 2 * (os.cpu_count() or 1)]
    results: dict[str, dict[int, float]] = {}
    for name, (step, nbytes) in steps.items():
        results[name] = {}
        for n in counts:
            if name == "read (cold)":
                drop_caches()
            elif name == "read (warm)" and n == counts[0]:
                read(0, 1)
            results[name][n] = round(rate(step, n, nbytes), 2)
            print(f"{name}, {n} threads: {results[name][n]} GB/s", flush=True)
        read(0, 1)
    print(table(["step (GB/s)", *[f"{n} threads" for n in counts], "best vs 1 thread"],
                [[name, *r.values(), f"{max(r.values()) / r[counts[0]]:.1f}x"]
                 for name, r in results.items()]))
    if args.out:
        args.out.write_text(json.dumps({"chunks": len(chunks), "raw_bytes": raw_bytes,
                                        "stored_bytes": stored_bytes,
                                        "cores": os.cpu_count(), "rates": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
