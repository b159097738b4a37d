"""The narrow role a reader of chunks plays, shared by the mount and the transfers.

An implementation returns a chunk's raw bytes only after they hashed to the chunk's id;
otherwise it raises CorruptError (bad bytes) or NotFoundError (no such chunk).
It may be called concurrently from many trio tasks.
"""

from __future__ import annotations

from typing import Protocol

import trio

from snapstore.ids import ChunkId
from snapstore.store.local import LocalStore


class ChunkReader(Protocol):
    async def read_chunk(self, cid: ChunkId, size: int) -> bytes: ...


class LocalChunkReader:
    """Reads chunks of a local store in worker threads (decompression and hashing release
    the GIL), at most `limiter`'s tokens at once."""

    def __init__(self, store: LocalStore, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self._limiter = limiter

    async def read_chunk(self, cid: ChunkId, size: int) -> bytes:
        return await trio.to_thread.run_sync(
            self.store.get_chunk, cid, size, limiter=self._limiter
        )
