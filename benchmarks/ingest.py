"""Ingest benchmark: snapstore vs `casync make`, side by side in one run.

Scenarios (issue: the store):
  a. a generated 1 GiB memory-like image (seeded: 40% zero, 30% random, 30% one repeated page)
  b. two successive runsc checkpoints of one Python process holding 64 MB of numpy data
  c. the image of (a) and a copy with one page inserted at the front and 5 MiB rewritten
  d. peak RSS of snapstore for a 4 GiB input
  e. 500 files of 2 KiB (a CRIU image directory holds hundreds of small files)
plus the load time of a manifest of 100k chunks.

Run as root from the repository: `python -m benchmarks.ingest [--quick]`;
`--only-small-files` runs (e) alone.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Run, du, gb, mb, median, snapstore_cmd, table, timed
from examples import workloads
from snapstore import manifest
from snapstore.chunker_params import ChunkerParams
from snapstore.ids import ChunkId
from snapstore.manifest import Entry, Extent, Manifest

PAGE = 4096


def casync_make(store: Path, src: Path, index: Path) -> Run:
    return timed(["casync", "make", f"--store={store}", str(index), str(src)])


def snapstore_ingest(store: Path, src: Path, tag: str) -> Run:
    return timed(snapstore_cmd(store, "ingest", str(src), "--tag", tag))


def repeat(n: int, fresh: Callable[[], None], run: Callable[[], Run]) -> list[Run]:
    runs = []
    for _ in range(n):
        fresh()
        runs.append(run())
    return runs


def scenario_a(work: Path, image_dir: Path, repeats: int) -> tuple[list[list[object]], int]:
    size = du(image_dir)
    sstore, cstore = work / "a-snap", work / "a-casync"

    def fresh() -> None:
        shutil.rmtree(sstore, ignore_errors=True)
        shutil.rmtree(cstore, ignore_errors=True)
        (work / "a.caidx").unlink(missing_ok=True)

    snap = repeat(repeats, fresh, lambda: snapstore_ingest(sstore, image_dir, "a"))
    snap_stored = du(sstore / "chunks")
    cas = repeat(repeats, fresh, lambda: casync_make(cstore, image_dir, work / "a.caidx"))
    cas_stored = du(cstore)
    snap_rate = size / median([r.seconds for r in snap])
    cas_rate = size / median([r.seconds for r in cas])
    rows: list[list[object]] = [
        ["(a) ingest throughput", f"{snap_rate / 1e9:.3f} GB/s", f"{cas_rate / 1e9:.3f} GB/s",
         f"{snap_rate / cas_rate:.2f}x", ">= 5x"],
        ["(a) stored bytes", mb(snap_stored), mb(cas_stored),
         f"{snap_stored / cas_stored:.2f}x", "<= 0.6x"],
        ["(a) peak RSS", mb(median([r.max_rss_bytes for r in snap])),
         mb(median([r.max_rss_bytes for r in cas])), "", ""],
    ]
    # Keep the snapstore store for (c): one more ingest to leave it holding (a).
    fresh()
    snapstore_ingest(sstore, image_dir, "a")
    return rows, du(sstore / "chunks")


def second_snapshot_growth(
    work: Path, name: str, first: Path, second: Path
) -> tuple[int, int, int, int]:
    """Stored bytes of the first snapshot and added by the second: snapstore, casync."""
    sstore, cstore = work / f"{name}-snap", work / f"{name}-casync"
    for d in (sstore, cstore):
        shutil.rmtree(d, ignore_errors=True)
    snapstore_ingest(sstore, first, "first")
    s1 = du(sstore / "chunks")
    snapstore_ingest(sstore, second, "second")
    s2 = du(sstore / "chunks")
    casync_make(cstore, first, work / f"{name}-1.caidx")
    c1 = du(cstore)
    casync_make(cstore, second, work / f"{name}-2.caidx")
    c2 = du(cstore)
    return s1, s2 - s1, c1, c2 - c1


def growth_rows(label: str, s1: int, sadd: int, c1: int, cadd: int,
                target: str) -> list[list[object]]:
    return [
        [f"{label} first snapshot stored", mb(s1), mb(c1), f"{s1 / c1:.2f}x", ""],
        [f"{label} added by the second", f"{mb(sadd)} ({sadd / s1:.1%})",
         f"{mb(cadd)} ({cadd / c1:.1%})", "", target],
    ]


def scenario_b(work: Path) -> list[list[object]]:
    first, second = workloads.two_python_checkpoints(work / "b-ckpt")
    return growth_rows("(b) python checkpoints", *second_snapshot_growth(work, "b", first, second),
                       "")


def scenario_c(work: Path, image: Path) -> list[list[object]]:
    edited = work / "c-edited"
    edited.mkdir(exist_ok=True)
    with image.open("rb") as src, (edited / image.name).open("wb") as dst:
        dst.write(os.urandom(PAGE))
        shutil.copyfileobj(src, dst, 16 << 20)
        dst.seek(PAGE + (image.stat().st_size // 3))
        dst.write(os.urandom(5 << 20))
    s1, sadd, c1, cadd = second_snapshot_growth(work, "c", image.parent, edited)
    return growth_rows("(c) page inserted + 5 MiB rewritten", s1, sadd, c1, cadd,
                       "<= 10% of first")


def scenario_d(work: Path, size: int) -> list[list[object]]:
    big = work / "d-image"
    big.mkdir(exist_ok=True)
    workloads.memory_image(big / "mem.img", size, seed=4)
    run = snapstore_ingest(work / "d-snap", big, "big")
    shutil.rmtree(big)
    return [[f"(d) peak RSS, {size >> 30} GiB input", mb(run.max_rss_bytes), "", "",
             "<= 300 MB"],
            [f"(d) throughput, {size >> 30} GiB input", f"{size / run.seconds / 1e9:.3f} GB/s",
             "", "", ""]]


def scenario_e(work: Path, repeats: int, files: int = 500, size: int = 2048
               ) -> list[list[object]]:
    src = work / "e-image"
    src.mkdir(exist_ok=True)
    rng = random.Random(5)
    for i in range(files):
        (src / f"f{i:04d}.img").write_bytes(rng.randbytes(size))
    sstore, cstore = work / "e-snap", work / "e-casync"

    def fresh() -> None:
        shutil.rmtree(sstore, ignore_errors=True)
        shutil.rmtree(cstore, ignore_errors=True)
        (work / "e.caidx").unlink(missing_ok=True)

    snap = median([r.seconds for r in repeat(repeats, fresh,
                                             lambda: snapstore_ingest(sstore, src, "e"))])
    cas = median([r.seconds for r in repeat(
        repeats, fresh, lambda: casync_make(cstore, src, work / "e.caidx"))])
    return [[f"(e) {files} files of {size} B: ingest time", f"{snap:.2f} s", f"{cas:.2f} s",
             f"{cas / snap:.2f}x", ""]]


def manifest_load_row() -> list[object]:
    cids = [ChunkId.of(i.to_bytes(8, "little")) for i in range(100_000)]
    m = Manifest("2026-01-01T00:00:00+00:00", ChunkerParams(), (
        Entry("checkpoint.img", "file", 0o644, 0, 100_000 << 20,
              tuple(Extent(c, 1 << 20) for c in cids)),))
    raw = m.encode()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        manifest.decode(raw)
        times.append(time.perf_counter() - t)
    return ["manifest of 100k chunks: load", f"{median(times) * 1000:.0f} ms", "", "",
            "well under 1 s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB image, 1 GiB for (d), 1 run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-python", action="store_true", help="skip (b), which needs runsc")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only-small-files", action="store_true", help="run (e) alone")
    args = ap.parse_args()
    size = (256 << 20) if args.quick else (1 << 30)
    big = (1 << 30) if args.quick else (4 << 30)
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="snapstore-bench-", dir=args.workdir))
    try:
        if args.only_small_files:
            print(table(["measure", "snapstore", "casync make", "ratio", "target"],
                        scenario_e(work, repeats)))
            return
        image_dir = work / "a-image"
        image_dir.mkdir()
        # The source stays in the page cache, as right after a checkpoint wrote it.
        workloads.memory_image(image_dir / "mem.img", size, seed=1)
        rows, _ = scenario_a(work, image_dir, repeats)
        if not args.skip_python:
            rows += scenario_b(work)
        rows += scenario_c(work, image_dir / "mem.img")
        rows += scenario_d(work, big)
        rows += scenario_e(work, repeats)
        rows.append(manifest_load_row())
        print(f"image {gb(size)}, {repeats} run(s) each, medians; {os.cpu_count()} cores\n")
        print(table(["measure", "snapstore", "casync make", "ratio", "target"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
