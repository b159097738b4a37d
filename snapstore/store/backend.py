"""The store interface: a handful of verbs on named objects, one contract for every store.

An object is named by a `Handle`: its kind and its name (a tag's name for a tag, the hex
id for every other kind). A store holds some of the kinds (`kinds`): the local store
keeps chunks, the S3 store keeps packs of them and their indexes; both keep manifests and
tags. A handle of a kind the store does not hold is refused with UsageError.

Each verb's contract is its docstring below; every implementation keeps them, and
tests/test_store_suite.py checks them on each.

Every verb may be called concurrently from many trio tasks. Callers check what they read
against its id themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeAlias

from snapstore.errors import UsageError
from snapstore.ids import ChunkId

Kind: TypeAlias = Literal["chunk", "pack", "index", "locator", "manifest", "tag", "access"]


@dataclass(frozen=True, slots=True)
class Handle:
    kind: Kind
    name: str

    @classmethod
    def of(cls, kind: Kind, oid: ChunkId) -> Handle:
        return cls(kind, oid.hex)

    @property
    def id(self) -> ChunkId:
        """The id a handle of an id-named kind names; CorruptError for anything else."""
        return ChunkId.parse(self.name)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """A listed object: its handle's name, its size, and when it was last written (the
    store's clock: a file's mtime, an S3 object's LastModified; timezone-aware)."""

    name: str
    size: int
    modified: datetime

    @property
    def id(self) -> ChunkId:
        """The id an object of an id-named kind has."""
        return ChunkId.parse(self.name)


class Backend(Protocol):
    """The verbs every store has."""

    kinds: frozenset[Kind]

    async def save(self, h: Handle, data: bytes) -> None:
        """Store `data` as `h`, atomically: a reader sees the whole object or none, and a
        tag or another mutable object is replaced whole. For a content-addressed kind
        (chunk, pack, manifest) saving what is there already changes nothing. A store may
        check what it is given first (the local store decodes a manifest, and parses a
        tag's id): CorruptError if it fails."""
        ...

    async def create(self, h: Handle, data: bytes) -> bool:
        """Store `data` as `h` only if no object `h` exists, atomically as `save` does, and
        say whether it did: False leaves the object that was there as it was. Of several
        creates of one handle racing, from any number of hosts, exactly one gets True."""
        ...

    async def load(self, h: Handle, max_bytes: int) -> bytes:
        """The complete object: NotFoundError when it is absent (never empty bytes), and
        CorruptError, before it is read, when it is over `max_bytes`."""
        ...

    async def load_range(self, h: Handle, start: int, end: int) -> bytes:
        """The bytes [start, end) of the object, fewer when it ends before `end` (none when
        it ends before `start`); NotFoundError when it is absent."""
        ...

    async def stat(self, h: Handle) -> int | None:
        """The object's size, or None when it is absent."""
        ...

    async def remove(self, *hs: Handle) -> None:
        """Remove the objects; idempotent: removing an absent object is not an error. Not
        atomic across handles: a store may remove them in batches (S3: 1,000 a request),
        and when it fails some may be gone already."""
        ...

    def list(self, kind: Kind, strays: Callable[[str], object] | None = None
             ) -> AsyncIterator[ObjectInfo]:
        """Every object of `kind`, each once, in no set order. Strays, the files or keys
        in the kind's place whose name is no valid handle of it (someone else's objects),
        are left out; `strays`, when given, is called with the place of each: its key
        relative to the remote's prefix, or its path relative to the store's root."""
        ...


def check_kind(kinds: frozenset[Kind], kind: Kind) -> None:
    """Refuse a kind a store does not hold: asking for one is a caller's mistake."""
    if kind not in kinds:
        raise UsageError(f"this store keeps no objects of kind {kind!r}")
