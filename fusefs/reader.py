"""Byte ranges of snapshot files, served from a single-flight LRU of checked chunks.

The invariants (docs/concurrency.md): everything here runs on the one trio thread, so
the cache, the loads in flight and the stats need no locks; the only awaits are on the
ChunkReader (which decompresses and hashes in worker threads) and on a load's Event.
A chunk is loaded by at most one task at a time; a failed load is not remembered, so a
chunk that turns up later (a remote store catching up) is served on the next read.
`access_order` lists chunks in the order they were first asked for, by a read or by
read-ahead.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from fusefs.inodes import Node
from snapstore.errors import CorruptError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.singleflight import SingleFlight
from snapstore.store.base import Chunk, ChunkReader

log = logging.getLogger(__name__)

_LATENCY_SAMPLES = 1 << 16
# Holes are served as views of one immutable run of zeros instead of a fresh allocation
# per read; no request is larger than the kernel's 1 MiB max_pages.
_ZEROS = memoryview(bytes(1 << 20))


class ChunkError(SnapstoreError):
    """A chunk could not be loaded: missing, corrupt, or its source failed."""

    def __init__(self, cid: ChunkId, cause: BaseException) -> None:
        super().__init__(f"chunk {cid}: {cause}")
        self.cid = cid


@dataclass(slots=True)
class MountStats:
    """Counters of one mount; `as_dict` is what mount-stats and the metrics endpoint show."""

    reads: int = 0
    bytes_served: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0
    chunk_loads: int = 0
    bytes_loaded: int = 0
    load_errors: int = 0
    prefetches: int = 0
    read_errors: int = 0
    cache_bytes: int = 0
    cache_chunks: int = 0
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))

    def as_dict(self) -> dict[str, Any]:
        samples = sorted(self.load_seconds)
        doc: dict[str, Any] = {
            k: getattr(self, k) for k in self.__slots__ if k != "load_seconds"
        }
        doc["load_latency_p50_ms"] = round(_quantile(samples, 0.50) * 1e3, 3)
        doc["load_latency_p99_ms"] = round(_quantile(samples, 0.99) * 1e3, 3)
        return doc


def _quantile(sorted_samples: list[float], q: float) -> float:
    if not sorted_samples:
        return 0.0
    return sorted_samples[min(len(sorted_samples) - 1, int(q * len(sorted_samples)))]


class ChunkCache:
    """Decompressed, hash-checked chunks, at most `capacity` bytes (or the one chunk last
    loaded, if it alone is larger), least recently used out.

    Any number of tasks may ask for the same chunk at once: one loads it, the others wait
    for that load's Event and share its bytes or its error.
    """

    def __init__(self, reader: ChunkReader, capacity: int, stats: MountStats) -> None:
        self._reader = reader
        self._capacity = capacity
        self._stats = stats
        self._lru: OrderedDict[ChunkId, Chunk] = OrderedDict()
        self._bytes = 0
        self._loading: SingleFlight[ChunkId, Chunk] = SingleFlight()
        self._seen: set[ChunkId] = set()
        self.access_order: list[ChunkId] = []
        # Chunks read ahead that no read has asked for yet: their sizes from the moment
        # they are reserved, their bytes once loaded. Those bytes stay out of the LRU
        # until a read asks for them, so that nothing read ahead is evicted before its
        # read (and then loaded again).
        self._ahead: dict[ChunkId, int] = {}
        self._ahead_data: dict[ChunkId, Chunk] = {}
        self._ahead_bytes = 0

    def record(self, cid: ChunkId) -> None:
        """Note that `cid` is wanted, if it is the first time. Callers record before any
        await (loads finish, and tasks start, in no fixed order)."""
        if cid not in self._seen:
            self._seen.add(cid)
            self.access_order.append(cid)

    def present(self, cid: ChunkId) -> bool:
        """Cached or being loaded: asking for it now would start no new load."""
        return cid in self._lru or cid in self._loading or cid in self._ahead_data

    def reserved(self, cid: ChunkId) -> bool:
        return cid in self._ahead

    def reserve_ahead(self, cid: ChunkId, size: int, serving: int) -> bool:
        """Claim room to read `cid` ahead of the reads, if what is read ahead and not yet
        read fits in the cache beside what reads are using: half the cache, or the
        `serving` bytes of the chunk a read is in the middle of if that is more, so that
        the chunk being read is not evicted for what is read ahead of it either."""
        if self._ahead_bytes + size > self._capacity - max(serving, self._capacity // 2):
            return False
        self._ahead[cid] = size
        self._ahead_bytes += size
        return True

    def release_ahead(self, cid: ChunkId, used: bool) -> None:
        """End the reservation of `cid`: a read asks for it (`used`), and it becomes the
        chunk used last; or no read will (its load failed, the stream that read it ahead
        went elsewhere or was closed), and it becomes the next chunk to evict."""
        size = self._ahead.pop(cid, None)
        if size is None:
            return
        self._ahead_bytes -= size
        data = self._ahead_data.pop(cid, None)
        if data is None:
            return
        self._lru[cid] = data
        if not used:
            self._lru.move_to_end(cid, last=False)
        self._evict()

    async def get(self, cid: ChunkId, size: int, counted: bool = True) -> Chunk:
        self.record(cid)
        if counted:
            self.release_ahead(cid, used=True)
        data = self._lru.get(cid)
        if data is not None:
            self._lru.move_to_end(cid)
            if counted:
                self._stats.cache_hits += 1
            return data
        if counted:
            self._stats.cache_misses += 1
        return await self._loading.run(cid, lambda: self._load(cid, size),
                                       self._count_coalesced if counted else None)

    def _count_coalesced(self) -> None:
        self._stats.coalesced += 1

    async def _load(self, cid: ChunkId, size: int) -> Chunk:
        """Load `cid` into the cache; run only as the one load of its flight."""
        started = time.perf_counter()
        try:
            data = await self._reader.read_chunk(cid, size)
            if len(data) != size:
                raise CorruptError(f"source returned {len(data)} bytes, expected {size}")
        except Exception as e:
            self._stats.load_errors += 1
            raise ChunkError(cid, e) from e
        self._stats.load_seconds.append(time.perf_counter() - started)
        self._stats.chunk_loads += 1
        self._stats.bytes_loaded += size
        if cid in self._ahead:
            self._ahead_data[cid] = data
        else:
            self._lru[cid] = data
        self._bytes += len(data)
        self._evict()
        return data

    async def warm(self, order: Sequence[tuple[ChunkId, int]], parallel: int = 2) -> None:
        """Load chunks in `order` before anyone reads them, as many as the cache holds,
        `parallel` at a time so that demand reads keep most of the loaders. Warm
        loads are not accesses: the recorded order stays the readers'."""
        budget = self._capacity
        gate = trio.Semaphore(parallel)
        async with trio.open_nursery() as nursery:
            for cid, size in order:
                if size > budget:
                    break
                budget -= size
                await gate.acquire()
                nursery.start_soon(self._warm_one, cid, size, gate)

    async def _warm_one(self, cid: ChunkId, size: int, gate: trio.Semaphore) -> None:
        try:
            if not self.present(cid):
                await self._loading.run(cid, lambda: self._load(cid, size))
        except ChunkError as e:
            # The read that needs the chunk reports it.
            log.debug("warming skipped %s", e)
        finally:
            gate.release()

    def _evict(self) -> None:
        # The chunk used last stays even when it alone is larger than the cache: the next
        # requests of a sequential read are most likely in it, and without it each would
        # load the whole chunk again.
        while self._bytes > self._capacity and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._bytes -= len(old)
        self._stats.cache_bytes = self._bytes
        self._stats.cache_chunks = len(self._lru) + len(self._ahead_data)


@dataclass(slots=True)
class Stream:
    """Per open file: the furthest a sequential run has read, how far read-ahead has
    been issued (an extent index), and the chunks it read ahead that may still hold a
    reservation in the cache."""

    next_offset: int = 0
    ahead_until: int = 0
    ahead: set[ChunkId] = field(default_factory=set)


class SnapshotReader:
    """Reads byte ranges of files; sequential streams get the next chunks prefetched.

    "Sequential" allows for the kernel's own read-ahead, which sends several requests of
    one stream at once, so they arrive a little out of order: a read within
    `read_ahead_bytes` of where the stream got to continues it. Prefetch covers the next
    `read_ahead_bytes` after the read; its tasks run in `nursery` (the mount's), at most
    `max_prefetch` at once. A prefetch that fails is dropped quietly, since the read that
    needs the chunk reports it.
    """

    def __init__(
        self,
        cache: ChunkCache,
        stats: MountStats,
        nursery: trio.Nursery | None,
        read_ahead_bytes: int = 32 << 20,
        max_prefetch: int = 16,
    ) -> None:
        self.cache = cache
        self._stats = stats
        self._nursery = nursery
        self._read_ahead = read_ahead_bytes
        self._max_prefetch = max_prefetch
        self._prefetching = 0

    async def read(
        self, node: Node, offset: int, size: int, stream: Stream
    ) -> bytes | memoryview:
        """Up to `size` bytes at `offset` (fewer at the end of the file), holes as zeros.

        Offsets are those of the file as presented; for a transcoded file the layout maps
        them to literal bytes and ranges of the stored form, which the extents hold.
        """
        self._stats.reads += 1
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if node.layout is None:
            segments: list[bytes | tuple[int, int]] = [(offset, end - offset)]
        else:
            segments = list(node.layout.segments(offset, end - offset))
        ranges = [s for s in segments if isinstance(s, tuple)]
        sequential = False
        if ranges:
            lo, hi = ranges[0][0], ranges[-1][0] + ranges[-1][1]
            sequential = abs(lo - stream.next_offset) <= self._read_ahead
            stream.next_offset = max(stream.next_offset, hi) if sequential else hi
            if not sequential:
                stream.ahead_until = node.extent_at(lo)
                self.forget(stream)
        pieces: list[bytes | memoryview] = []
        for seg in segments:
            if isinstance(seg, tuple):
                await self._stored(node, seg[0], seg[0] + seg[1], pieces)
            else:
                pieces.append(seg)
        if sequential and self._nursery is not None:
            self._prefetch_until(node, stream)
        self._stats.bytes_served += end - offset
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _stored(
        self, node: Node, offset: int, end: int, pieces: list[bytes | memoryview]
    ) -> None:
        """Append the stored bytes [offset, end) to `pieces`."""
        i = node.extent_at(offset)
        pos = offset
        while pos < end:
            x = node.extents[i]
            start = node.starts[i]
            lo, hi = pos - start, min(end, start + x.size) - start
            if x.chunk is None:
                n = hi - lo
                pieces.append(_ZEROS[:n] if n <= len(_ZEROS) else bytes(n))
            else:
                try:
                    data = await self.cache.get(x.chunk, x.size)
                except ChunkError as e:
                    self._stats.read_errors += 1
                    raise SnapstoreError(f"read of {node.path} at {pos}: {e}") from e
                pieces.append(memoryview(data)[lo:hi])
            pos = start + hi
            i += 1

    def _prefetch_until(self, node: Node, stream: Stream) -> None:
        assert self._nursery is not None
        limit = stream.next_offset + self._read_ahead
        last = node.extents[node.extent_at(max(min(stream.next_offset, node.stored_size) - 1, 0))]
        serving = last.size if last.chunk is not None else 0
        stream.ahead = {c for c in stream.ahead if self.cache.reserved(c)}
        i = max(node.extent_at(min(stream.next_offset, node.stored_size - 1)),
                stream.ahead_until)
        while (i < len(node.extents) and node.starts[i] < limit
               and self._prefetching < self._max_prefetch):
            x = node.extents[i]
            if x.chunk is not None and not self.cache.present(x.chunk):
                if not self.cache.reserve_ahead(x.chunk, x.size, serving):
                    break
                stream.ahead.add(x.chunk)
                self._prefetching += 1
                self._stats.prefetches += 1
                self.cache.record(x.chunk)
                self._nursery.start_soon(self._prefetch, x.chunk, x.size)
            i += 1
        stream.ahead_until = i

    def forget(self, stream: Stream) -> None:
        """Give up what `stream` read ahead and no read has asked for: it went elsewhere,
        or its file was closed. Those chunks stay cached, first in line for eviction."""
        for cid in stream.ahead:
            self.cache.release_ahead(cid, used=False)
        stream.ahead.clear()

    async def _prefetch(self, cid: ChunkId, size: int) -> None:
        try:
            await self.cache.get(cid, size, counted=False)
        except ChunkError as e:
            self.cache.release_ahead(cid, used=False)
            log.debug("prefetch failed: %s", e)
        finally:
            self._prefetching -= 1
