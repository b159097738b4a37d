"""The local store through the store interface (store/backend.py).

LocalStore's own methods are synchronous and used as they are across the engine; this
adapter gives the same objects the interface's async verbs, so that code written against a
`Backend` (and the conformance suite) takes either store. Each verb runs in a worker
thread: the store's methods block on the disk and are safe to call from several threads.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import trio

from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ChunkId
from snapstore.store.backend import Handle, Kind, check_kind
from snapstore.store.local import LocalStore, check_tag

T = TypeVar("T")


class LocalBackend:
    """A LocalStore's chunks, manifests and tags as a `Backend`."""

    kinds: frozenset[Kind] = frozenset({"chunk", "manifest", "tag"})

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def _path(self, h: Handle) -> Path:
        check_kind(self.kinds, h.kind)
        if h.kind == "chunk":
            return self.store.chunk_path(h.id)
        if h.kind == "manifest":
            return self.store.snapshots_dir / h.id.hex
        return self.store.tags_dir / check_tag(h.name)

    async def save(self, h: Handle, data: bytes) -> None:
        """Through the store's own writers: a manifest is checked before it is written,
        and a tag must hold a snapshot id (CorruptError otherwise)."""
        check_kind(self.kinds, h.kind)
        if h.kind == "chunk":
            await _run(self.store.put_chunk, h.id, data)
        elif h.kind == "manifest":
            await _run(self.store.put_manifest_object, h.id, data)
        else:
            target = ChunkId.parse(data.decode("ascii", errors="replace").strip())
            await _run(self.store.set_tag, h.name, target)

    async def load(self, h: Handle, max_bytes: int) -> bytes:
        return await _run(_read, self._path(h), 0, max_bytes, True)

    async def load_range(self, h: Handle, start: int, end: int) -> bytes:
        return await _run(_read, self._path(h), start, end, False)

    async def stat(self, h: Handle) -> int | None:
        try:
            st = await _run(os.lstat, self._path(h))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    async def remove(self, h: Handle) -> None:
        check_kind(self.kinds, h.kind)
        if h.kind == "chunk":
            await _run(self.store.delete_chunk, h.id)
        elif h.kind == "manifest":
            await _run(self.store.delete_manifest, h.id)
        else:
            await _run(self.store.delete_tag, h.name)

    async def names(self, kind: Kind) -> AsyncIterator[str]:
        check_kind(self.kinds, kind)
        for name in await _run(self._names, kind):
            yield name

    def _names(self, kind: Kind) -> list[str]:
        if kind == "chunk":
            return [c.cid.hex for c in self.store.iter_chunks()]
        if kind == "manifest":
            return [m.hex for m in self.store.manifest_ids()]
        good, damaged = self.store.scan_tags()
        return [*good, *(d.name for d in damaged)]


async def _run(fn: Callable[..., T], *args: object) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def _read(path: Path, start: int, end: int, whole: bool) -> bytes:
    """Bytes [start, end) of the file at `path`, never through a link. `whole`: the file
    must be at most `end` bytes (CorruptError, before reading) and is read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptError(f"{path} is a symbolic link, not an object") from None
        raise
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptError(f"{path} is not a regular file")
        if whole and st.st_size > end:
            raise CorruptError(f"{path} is {st.st_size} bytes, more than the {end} it may have")
        return os.pread(fd, max(0, end - start), start) if not whole else f.read()
