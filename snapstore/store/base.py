"""The narrow role a reader of chunks plays, shared by the mount and the transfers.

An implementation returns a chunk's raw bytes, as bytes or a read-only mapping of them,
only after they hashed to the chunk's id; otherwise it raises CorruptError (bad bytes) or
NotFoundError (no such chunk).
It may be called concurrently from many trio tasks.
"""

from __future__ import annotations

import mmap
from typing import Protocol, TypeAlias

from snapstore.ids import ChunkId

Chunk: TypeAlias = bytes | mmap.mmap


class ChunkReader(Protocol):
    async def read_chunk(self, cid: ChunkId, size: int) -> Chunk: ...
