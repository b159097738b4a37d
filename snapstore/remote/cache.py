"""What a host keeps of its remotes beside the local store: fetched chunks, index copies.

Both live in the store's directory (docs/format.md) and are written through its tmp/,
atomically but not durably: an entry torn by a crash fails its check when it is read, and
is then deleted and fetched again. Neither is part of the store: gc and verify of
chunks/ never see them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from snapstore.errors import NotFoundError
from snapstore.ids import ChunkId
from snapstore.store.local import LocalStore, StoredChunk, walk_fanout


class FetchCache:
    """`cache/ab/<62 hex>`: chunk objects a remote mount fetched, by chunk id. Apart from
    chunks/, so that evicting an entry never deletes a chunk that was ingested or pulled."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def path(self, cid: ChunkId) -> Path:
        h = cid.hex
        return self.store.cache_dir / h[:2] / h[2:]

    def put(self, cid: ChunkId, obj: bytes | memoryview) -> None:
        """Not durable: no fsync on the read path of a mount."""
        path = self.path(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.write_atomic(path, obj, durable=False)

    def get(self, cid: ChunkId) -> bytes:
        try:
            return self.path(cid).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"chunk {cid} is not in the cache") from None

    def touch(self, cid: ChunkId) -> None:
        """Mark an entry used now; its mtime orders the LRU across mounts."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(cid))

    def entries(self) -> Iterator[tuple[StoredChunk, float]]:
        """Every entry with its last use (mtime)."""
        for cid, st in walk_fanout(self.store.cache_dir):
            yield StoredChunk(cid, st.st_size), st.st_mtime

    def delete(self, cid: ChunkId) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(cid).unlink()


class PackIndexCopies:
    """`pack-index/<pack hex>`: the index objects of remote packs a push has read. A
    pack's index never changes, so each is fetched once per host (docs/remote.md)."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def path(self, pack: ChunkId) -> Path:
        return self.store.pack_index_dir / pack.hex

    def put(self, pack: ChunkId, data: bytes) -> None:
        path = self.path(pack)
        path.parent.mkdir(exist_ok=True)
        self.store.write_atomic(path, data, durable=False)

    def get(self, pack: ChunkId) -> bytes | None:
        try:
            return self.path(pack).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, pack: ChunkId) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(pack).unlink()
