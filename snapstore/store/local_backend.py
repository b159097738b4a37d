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
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import trio

from snapstore.errors import CorruptError, NotFoundError, UsageError
from snapstore.ids import is_valid_hex_id
from snapstore.store.backend import Handle, Kind, ObjectInfo, check_kind
from snapstore.store.local import (
    LocalStore,
    check_manifest_object,
    check_tag,
    list_dir,
    tag_target,
)

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
            await _run(self.store.set_tag, h.name, tag_target(data))

    async def create(self, h: Handle, data: bytes) -> bool:
        """Checked as `save` checks; written to tmp/, then linked to its name."""
        return await _run(self._create, h, data)

    def _create(self, h: Handle, data: bytes) -> bool:
        path = self._path(h)
        if h.kind == "tag":
            return self.store.create_tag(h.name, tag_target(data))
        if h.kind == "manifest":
            check_manifest_object(h.id, data)
        # A store made before its fan-out directories were created up front.
        path.parent.mkdir(exist_ok=True)
        return self.store.write_new(path, data)

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

    async def remove(self, *hs: Handle) -> None:
        for h in hs:
            check_kind(self.kinds, h.kind)
        for h in hs:
            if h.kind == "chunk":
                await _run(self.store.delete_chunk, h.id)
            elif h.kind == "manifest":
                await _run(self.store.delete_manifest, h.id)
            else:
                await _run(self.store.delete_tag, h.name)

    async def list(self, kind: Kind, strays: Callable[[str], object] | None = None
                   ) -> AsyncIterator[ObjectInfo]:
        """The regular files of the kind's directory with valid names; anything else
        there (a link, a directory, a misnamed file) is a stray."""
        check_kind(self.kinds, kind)
        found, other = await _run(_listing, self.store, kind)
        if strays is not None:
            for place in other:
                strays(place)
        for info in found:
            yield info


def _listing(store: LocalStore, kind: Kind) -> tuple[list[ObjectInfo], list[str]]:
    """The objects of `kind` in `store`, and the places of the strays beside them."""
    found: list[ObjectInfo] = []
    other: list[Path] = []
    if kind == "chunk":
        for sub in list_dir(store.chunks_dir):
            if len(sub.name) == 2 and sub.is_dir(follow_symlinks=False):
                _scan(Path(sub.path), sub.name, is_valid_hex_id, found, other)
            else:
                other.append(Path(sub.path))
    elif kind == "manifest":
        _scan(store.snapshots_dir, "", is_valid_hex_id, found, other)
    else:
        _scan(store.tags_dir, "", _is_tag_name, found, other)
    return found, [str(p.relative_to(store.root)) for p in other]


def _scan(d: Path, head: str, valid: Callable[[str], bool], found: list[ObjectInfo],
          other: list[Path]) -> None:
    """Add the objects in `d` (named `head` and their file name) to `found`, and what
    else is there to `other`."""
    for e in list_dir(d):
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and valid(head + e.name):
            found.append(ObjectInfo(head + e.name, st.st_size,
                                    datetime.fromtimestamp(st.st_mtime, UTC)))
        else:
            other.append(Path(e.path))


def _is_tag_name(name: str) -> bool:
    try:
        check_tag(name)
    except UsageError:
        return False
    return True


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
