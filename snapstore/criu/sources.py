"""Where the lazy-pages daemon reads a pages file's bytes: the file on a snapshot mount, or
the local store's chunks (`snapstore.criu.staging.StorePages`). Each source describes
itself (`spec`), so that the daemon's copy processes open the same one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from snapstore.criu.storepages import StorePages
from snapstore.errors import CorruptError
from snapstore.ids import ChunkId
from snapstore.store.local import LocalStore


class PageSource(Protocol):
    """Where a pages file's bytes come from: the file on a mount, or the store's chunks."""

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` from `offset`; fewer bytes only at the end of the file."""
        ...

    def spec(self) -> dict[str, str]:
        """What `open_source` opens this source again from, in another process."""
        ...


class FilePages:
    """A pages file read with pread (through the snapshot mount, which checks hashes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def read_into(self, view: memoryview, offset: int) -> int:
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def spec(self) -> dict[str, str]:
        return {"file": str(self.path)}

    def close(self) -> None:
        os.close(self.fd)


def open_source(spec: dict[str, Any]) -> PageSource:
    """The source `spec` describes (PageSource.spec)."""
    if set(spec) == {"file"}:
        return FilePages(Path(spec["file"]))
    if set(spec) == {"store", "snapshot", "file"}:
        store = LocalStore.open(Path(spec["store"]), create=False)
        for entry in store.get_manifest(ChunkId.parse(spec["snapshot"])).files():
            if entry.path == spec["file"]:
                return StorePages(store, spec["snapshot"], entry)
        raise CorruptError(f"snapshot {spec['snapshot'][:12]} has no file {spec['file']}")
    raise ValueError(f"not a page source: {spec!r}")
