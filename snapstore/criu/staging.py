"""A lazy CRIU restore from the local store without a mount: the image directory CRIU
reads holds every file but the lazy pages, and the lazy-pages daemon reads those straight
from the store's chunks.

CRIU restores everything but private anonymous memory itself, so it needs the small
images and the pages that are not lazy. `stage` writes exactly that into a working
directory: each pages file as a sparse file of its full size whose lazy ranges are left
as holes (CRIU never reads them with `--lazy-pages`). `StorePages`
(`snapstore.criu.storepages`) gives the daemon the lazy ranges.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from snapstore.criu.images import PAGE_SIZE, read_pagemap
from snapstore.criu.storepages import StorePages
from snapstore.errors import CorruptError
from snapstore.export import export_file
from snapstore.fileio import pwrite_all
from snapstore.manifest import Entry, Manifest
from snapstore.store.local import LocalStore


def stage(store: LocalStore, snapshot: str, manifest: Manifest,
          dest: Path) -> dict[str, StorePages]:
    """Write what CRIU reads for a lazy restore into the new directory `dest`; the
    daemon's source for each pages file, by name."""
    files = {e.path: e for e in manifest.files()}
    if any("/" in name for name in files) or "inventory.img" not in files:
        raise CorruptError("the snapshot is not a CRIU image directory")
    dest.mkdir()
    pages = {name: e for name, e in files.items()
             if name.startswith("pages-") and name.endswith(".img")}
    for name, entry in files.items():
        if name not in pages:
            export_file(store, entry, dest / name)
    lazy: dict[str, list[tuple[int, int]]] = {name: [] for name in pages}
    for name in files:
        if name.startswith("pagemap-") and name.endswith(".img"):
            pm = read_pagemap(dest / name)
            if pm.pages_file in lazy:
                lazy[pm.pages_file] += [(e.offset, e.offset + e.nr_pages * PAGE_SIZE)
                                        for e in pm.lazy_extents()]
    sources = {}
    for name, entry in pages.items():
        source = StorePages(store, snapshot, entry)
        _write_eager_part(source, entry, sorted(lazy[name]), dest / name)
        sources[name] = source
    return sources


def _write_eager_part(source: StorePages, entry: Entry, lazy: list[tuple[int, int]],
                      path: Path) -> None:
    """The file with only its ranges outside `lazy` written; the rest are holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, entry.size)
        pos = 0
        buf = bytearray(4 << 20)
        for start, end in [*lazy, (entry.size, entry.size)]:
            while pos < start:
                n = source.read_into(memoryview(buf)[:min(len(buf), start - pos)], pos)
                if n == 0:
                    break
                pwrite_all(fd, memoryview(buf)[:n], pos)
                pos += n
            pos = max(pos, end)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
