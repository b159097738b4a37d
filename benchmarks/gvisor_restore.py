"""Restore time of a transcoded statefile: `runsc restore` from the original file vs from
the restorable form snapstore serves (from a mount and as an exported file).

Run as root from the repository: `python -m benchmarks.gvisor_restore [--runs N]`.
The cases take turns within each round, so they share the machine's noise; the page
cache is dropped before every restore.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import table
from benchmarks.fuse_read import python_checkpoint, restore_seconds, snapstore_mount
from snapstore.export import export
from snapstore.gvisor.runsc import Runsc
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gvisor-restore-", dir="/var/tmp"))
    # The sandbox reads the image as another user: it must reach the mounts.
    work.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        rs = cleanup.enter_context(Runsc.private(parent=work))
        bundle, original = python_checkpoint(work, rs)
        store = LocalStore.open(work / "store")
        transcoded = ingest(store, original, "transcoded").snapshot
        ingest(store, original, "exact", transcode=False)
        exported = work / "exported"
        export(store, store.get_manifest(transcoded), exported)
        size = (original / "checkpoint.img").stat().st_size
        served = (exported / "checkpoint.img").stat().st_size
        times: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for name, tag, extra in (
                ("transcoded mount", "transcoded", ()),
                ("transcoded mount, --prefetch", "transcoded", ("--prefetch",)),
                ("exact mount", "exact", ()),
            ):
                with snapstore_mount(store.root, tag, work / "mnt", "--allow-other",
                                     *extra) as mnt:
                    times.setdefault(name, []).append(restore_seconds(rs, bundle, mnt))
            for name, d in (("original file", original), ("transcoded file", exported)):
                times.setdefault(name, []).append(restore_seconds(rs, bundle, d))
    base = statistics.median(times["original file"])
    rows = [[name, f"{statistics.median(ts):.3f} s", f"{statistics.median(ts) / base:.2f}x",
             " ".join(f"{t:.3f}" for t in ts)] for name, ts in times.items()]
    print(f"Python checkpoint: {size / 1e6:.1f} MB original, restorable form "
          f"{served / 1e6:.1f} MB; {args.runs} rounds, medians\n")
    print(table(["runsc restore from", "median", "vs original file", "runs (s)"], rows))


if __name__ == "__main__":
    main()
