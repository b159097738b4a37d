"""Where the lazy-pages daemon reads a pages file's bytes: the file on a snapshot mount, or
the local store's chunks (`snapstore.criu.staging.StorePages`). Each source describes
itself (`spec`), so that the daemon's copy processes open the same one."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from snapstore.criu.storepages import StorePages
from snapstore.criu.uffdio import Buffer, CopyError, Installed, install
from snapstore.errors import CorruptError, SnapstoreError
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


class PagesError(SnapstoreError):
    """A range of a task's pages could not be read or installed; the message says which."""


def install_from(source: PageSource, pid: int, uffd: int, dst: int, offset: int,
                 length: int, buf: Buffer,
                 wanted: Callable[[], AbstractContextManager[bool]]) -> Installed:
    """Read `length` bytes of `source` from `offset` into `buf` and install them at `dst`
    of task `pid` (`uffdio.install`, `wanted` around each copy): the daemon's demand faults
    and its copy processes' ranges alike. A PagesError says what failed."""
    try:
        got = source.read_into(buf.view[:length], offset)
    except (OSError, SnapstoreError) as e:
        why = e.strerror or str(e) if isinstance(e, OSError) else str(e)
        raise PagesError(f"cannot read the pages of pid {pid} at offset {offset}: {why} "
                         "(snapshot damaged or remote unreachable)") from None
    if got < length:
        raise PagesError(f"the pages file of pid {pid} ends before offset {offset + length}")
    try:
        return install(uffd, dst, buf.address, length, wanted)
    except CopyError as e:
        raise PagesError(f"UFFDIO_COPY into pid {pid} failed: "
                         f"{os.strerror(e.errno or 0)}") from None
