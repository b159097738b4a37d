"""RemoteChunkReader: chunks for a mount from the local store, a disk cache, else S3.

Where each chunk lies in the remote's packs comes from the snapshot's locator, read once
at mount time. Concurrency invariants (all state lives on the one trio thread, so no locks):
- a chunk is fetched by at most one task at a time (`_flights`, a SingleFlight); a demand
  read that finds a prefetch of the same chunk in flight waits for it instead of
  fetching again;
- a chunk to fetch is queued for one scheduling turn: the first of the queued chunks to
  run again takes its queued neighbours in the pack (`_take_run`) and fetches them with
  one ranged GET; the others wait for that run, and fetch alone if it was cancelled;
- requests to S3 hold a slot of one PriorityLimiter: a demand read takes the next free
  slot, a prefetch only a slot no demand read waits for, and never the last `reserved`;
  a prefetch registers its flights only once it holds a slot, so no demand read waits
  for a prefetch that waits for a slot;
- the cache index (`_cache`, LRU order) changes only on the trio thread; its files
  (`_disk`) change in worker threads, always after the index says so, so a file the
  index does not list may exist (swept at the next start) but the index never names a
  missing file for long (a read that finds it missing drops it and fetches again).
Cache entries live in STORE/cache/ (remote/cache.py), apart from chunks/, so eviction can
never delete a chunk that was ingested or pulled.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field

import trio
from trio.lowlevel import ParkingLot

from snapstore import codec
from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest, prefetch_order
from snapstore.remote.cache import FetchCache
from snapstore.remote.fetch import (
    cpu_limiter,
    fetch_access_order,
    fetch_locator,
    fetch_manifest,
    fetch_run,
    resolve_remote,
)
from snapstore.remote.packs import Location, Locator, coalesce
from snapstore.remote.pool import run_pool
from snapstore.remote.settings import DEFAULT_CACHE_BYTES, DEFAULT_CONNECTIONS
from snapstore.singleflight import SingleFlight
from snapstore.store.local import LocalStore
from snapstore.store.s3 import S3Store, endpoint_url, open_s3
from snapstore.store.url import RemoteURL

log = logging.getLogger(__name__)

# Slots a prefetch never takes, so a demand read finds one free without waiting.
RESERVED_FOR_DEMAND = 2
# A mount reads at most this much per GET: a chunk is served only once the whole GET that
# carries it is in, so a longer run makes the read that waits for its first chunk wait
# longer. A pull, which waits for everything anyway, reads up to packs.MAX_RANGE.
MOUNT_RANGE = 4 << 20

Slot = Callable[[], AbstractAsyncContextManager[None]]


class PriorityLimiter:
    """`tokens` slots; demand callers are served before background callers."""

    def __init__(self, tokens: int, reserved: int = RESERVED_FOR_DEMAND) -> None:
        self.tokens = tokens
        self._free = tokens
        self._reserved = min(reserved, tokens - 1)
        self._demand = ParkingLot()
        self._background = ParkingLot()

    @asynccontextmanager
    async def demand_slot(self) -> AsyncIterator[None]:
        if self._free > 0 and not self._demand:
            self._free -= 1
            await trio.lowlevel.checkpoint()
        else:
            await self._demand.park()  # woken by _release, which hands its slot over
        try:
            yield
        finally:
            self._release()

    @asynccontextmanager
    async def background_slot(self) -> AsyncIterator[None]:
        if self._free > self._reserved and not self._demand and not self._background:
            self._free -= 1
            await trio.lowlevel.checkpoint()
        else:
            await self._background.park()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._demand:
            self._demand.unpark()
        elif self._background and self._free >= self._reserved:
            self._background.unpark()
        else:
            self._free += 1


@dataclass(slots=True)
class ReaderStats:
    local_hits: int = 0
    cache_hits: int = 0
    fetches: int = 0
    requests: int = 0
    fetched_bytes: int = 0
    prefetched: int = 0
    prefetch_errors: int = 0
    cache_bytes: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Run:
    """One ranged GET's chunks: raw bytes or an error for each, once `done` is set. A
    chunk with neither was not fetched (its fetcher was cancelled)."""

    chunks: list[tuple[ChunkId, Location]]
    done: trio.Event = field(default_factory=trio.Event)
    raw: dict[ChunkId, bytes] = field(default_factory=dict)
    errors: dict[ChunkId, SnapstoreError] = field(default_factory=dict)


class RemoteChunkReader:
    """A ChunkReader over a local store and a remote; see the module's invariants."""

    def __init__(self, store: LocalStore, s3: S3Store, snapshot: RemoteSnapshot,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        self.store = store
        self._disk = FetchCache(store)
        self.s3 = s3
        self.cache_limit = cache_bytes
        self.limiter = PriorityLimiter(connections)
        self.stats = ReaderStats()
        self._where = snapshot.locator.chunks
        self._sizes = snapshot.manifest.chunk_sizes()
        # Neighbours: the chunk that lies right before and right after each in its pack.
        self._prev: dict[ChunkId, ChunkId] = {}
        self._next: dict[ChunkId, ChunkId] = {}
        placed = sorted(self._where.items(), key=lambda kv: kv[1])
        for (a, at), (b, bt) in itertools.pairwise(placed):
            if at.pack == bt.pack and at.end == bt.offset:
                self._next[a], self._prev[b] = b, a
        self._cpu = cpu_limiter()
        # Beside the mount's own single flight (fusefs.reader.ChunkCache): this one also
        # holds the chunks a prefetch run is fetching, so demand reads wait for those.
        self._flights: SingleFlight[ChunkId, bytes] = SingleFlight()
        self._queued: set[ChunkId] = set()
        self._taken: dict[ChunkId, _Run] = {}
        self._cache: OrderedDict[ChunkId, int] = OrderedDict()
        entries = sorted(self._disk.entries(), key=lambda e: e[1])
        for entry, _ in entries:
            self._cache[entry.cid] = entry.stored_size
        self.stats.cache_bytes = sum(self._cache.values())
        self._evict_now()

    async def read_chunk(self, cid: ChunkId, size: int) -> bytes:
        return await self._flights.run(cid, lambda: self._fetch(cid, size))

    async def _fetch(self, cid: ChunkId, size: int) -> bytes:
        if self.store.has_chunk(cid):
            self.stats.local_hits += 1
            return await trio.to_thread.run_sync(self.store.get_chunk, cid, size,
                                                 limiter=self._cpu)
        if cid in self._cache:
            raw = await trio.to_thread.run_sync(self._read_cached, cid, size, limiter=self._cpu)
            if raw is not None:
                self.stats.cache_hits += 1
                if cid in self._cache:
                    self._cache.move_to_end(cid)
                return raw
            self._forget(cid)
        if cid not in self._where:
            raise NotFoundError(f"chunk {cid} is not in the snapshot's locator")
        while True:
            self._queued.add(cid)
            try:
                # Read-ahead asks for the next chunks all at once: one scheduling turn lets
                # each of them queue, so that one ranged GET fetches neighbours together.
                await trio.lowlevel.checkpoint()
            finally:
                run = self._taken.pop(cid, None)
                self._queued.discard(cid)
            if run is None:
                run = self._take_run(cid)
                await self._fetch_run(run, self.limiter.demand_slot)
            else:
                await run.done.wait()
            if cid in run.raw:
                return run.raw[cid]
            if cid in run.errors:
                err = run.errors[cid]
                raise type(err)(*err.args)  # each reader raises its own
            # Whoever fetched the run was cancelled before this chunk: queue it again.

    def _take_run(self, cid: ChunkId) -> _Run:
        """`cid` and its queued neighbours in its pack, within MOUNT_RANGE; the neighbours'
        tasks then wait for this run instead of fetching."""
        first = last = cid
        span = self._where[cid].length
        while (p := self._prev.get(first)) is not None and p in self._queued:
            if span + self._where[p].length > MOUNT_RANGE:
                break
            first, span = p, span + self._where[p].length
        while (n := self._next.get(last)) is not None and n in self._queued:
            if span + self._where[n].length > MOUNT_RANGE:
                break
            last, span = n, span + self._where[n].length
        chunks = [(first, self._where[first])]
        while chunks[-1][0] != last:
            c = self._next[chunks[-1][0]]
            chunks.append((c, self._where[c]))
        run = _Run(chunks)
        for c, _ in chunks:
            if c != cid:
                self._queued.discard(c)
                self._taken[c] = run
        return run

    async def _fetch_run(self, run: _Run, slot: Slot) -> None:
        """Fetch `run` with one ranged GET in a slot of `slot`, fill in its results, and
        keep the checked chunks in the cache."""
        try:
            async with slot():
                got = await fetch_run(self.s3, run.chunks, self._sizes, self._cpu)
            run.raw = {c: raw for c, _, raw in got.good}
            run.errors = dict(got.bad)
        except SnapstoreError as e:
            run.errors = {c: e for c, _ in run.chunks}
            return
        finally:
            # Also when cancelled: the run's waiters then find no result and fetch alone.
            run.done.set()
        self.stats.requests += got.requests
        for cid, obj, _ in got.good:
            self.stats.fetches += 1
            self.stats.fetched_bytes += len(obj)
            await self._keep(cid, obj)

    def _read_cached(self, cid: ChunkId, size: int) -> bytes | None:
        try:
            raw = codec.decode(self._disk.get(cid), cid, size)
        except (NotFoundError, CorruptError):
            self._disk.delete(cid)
            return None
        self._disk.touch(cid)
        return raw

    async def _keep(self, cid: ChunkId, obj: bytes | memoryview) -> None:
        if len(obj) > self.cache_limit or cid in self._cache:
            return
        try:
            await trio.to_thread.run_sync(self._disk.put, cid, obj)
        except OSError as e:
            # The cache is an optimisation: a full disk must not fail the read.
            log.warning("cannot cache chunk %s: %s", cid.short(), e)
            return
        self._cache[cid] = len(obj)
        self.stats.cache_bytes += len(obj)
        self._evict_now()

    def _evict_now(self) -> None:
        victims: list[ChunkId] = []
        while self.stats.cache_bytes > self.cache_limit and self._cache:
            cid, n = self._cache.popitem(last=False)
            self.stats.cache_bytes -= n
            self.stats.evictions += 1
            victims.append(cid)
        # Small unlinks; doing them inline keeps the index and the files in step.
        for cid in victims:
            self._disk.delete(cid)

    def _forget(self, cid: ChunkId) -> None:
        n = self._cache.pop(cid, None)
        if n is not None:
            self.stats.cache_bytes -= n

    def _wanted(self, cid: ChunkId) -> bool:
        """Not loaded, loading, cached or in the store: a prefetch would fetch it."""
        return not (cid in self._flights or cid in self._cache or self.store.has_chunk(cid))

    async def prefetch(self, order: Sequence[tuple[ChunkId, int]]) -> None:
        """Load `order`'s chunks into the cache, behind demand reads, until the cache is
        full: neighbours in one pack that follow each other in `order` with one ranged
        GET. Failures are counted and logged: a demand read of that chunk reports them."""
        budget = [self.cache_limit]
        placed = [(cid, self._where[cid]) for cid, _ in order if cid in self._where]

        async def one(chunks: list[tuple[ChunkId, Location]]) -> None:
            if budget[0] <= 0:
                return
            async with self.limiter.background_slot():
                # Only now: what demand reads fetched while this waited is skipped, and
                # no demand read waits for a prefetch that has no slot yet.
                chunks = [(c, at) for c, at in chunks if self._wanted(c)]
                if not chunks:
                    return
                await self._prefetch_run(chunks)
            for cid, _ in chunks:
                budget[0] -= self._where[cid].length

        # The runs are taken one at a time as workers come free, so once the budget is
        # spent no further run starts.
        runs = itertools.takewhile(lambda _: budget[0] > 0, coalesce(placed, MOUNT_RANGE))
        await run_pool(runs, one, self.limiter.tokens)
        log.info("prefetch done: %s", self.stats.as_dict())

    async def _prefetch_run(self, chunks: list[tuple[ChunkId, Location]]) -> None:
        """Fetch a prefetch run (a slot already held) under flights of its own, so that
        demand reads of its chunks wait for it instead of fetching them again."""
        flights = {c: self._flights.begin(c) for c, _ in chunks}
        run = _Run(chunks)
        try:
            await self._fetch_run(run, _held)
        finally:
            for cid, flight in flights.items():
                flight.value = run.raw.get(cid)
                flight.error = run.errors.get(cid)
                self._flights.end(cid, flight)
        for cid, flight in flights.items():
            if flight.error is not None:
                self.stats.prefetch_errors += 1
                log.warning("prefetch of chunk %s failed: %s", cid.short(), flight.error)
            elif flight.value is not None:
                self.stats.prefetched += 1


@asynccontextmanager
async def _held() -> AsyncIterator[None]:
    """The slot of a caller that already holds one."""
    yield


@dataclass(frozen=True, slots=True)
class RemoteSnapshot:
    """What a remote mount needs before it mounts: the snapshot and its prefetch order."""

    snapshot: ChunkId
    manifest: Manifest
    locator: Locator
    order: list[tuple[ChunkId, int]]


async def open_remote_snapshot(s3: S3Store, ref: str) -> RemoteSnapshot:
    mid, _ = await resolve_remote(s3, ref)
    _, m = await fetch_manifest(s3, mid)
    locator = await fetch_locator(s3, mid, m.chunk_ids())
    recorded = await fetch_access_order(s3, mid, len(locator.chunks))
    return RemoteSnapshot(mid, m, locator, prefetch_order(m, recorded))


def load_remote_snapshot(ref: str, remote: str, endpoint: str | None,
                         read_timeout_s: float | None = None) -> RemoteSnapshot:
    """Resolve `ref` in `remote` before mounting, so a bad ref or remote fails in the
    foreground with one line."""
    async def main() -> RemoteSnapshot:
        async with open_s3(RemoteURL.parse(remote), endpoint_url(endpoint),
                           read_timeout_s=read_timeout_s) as s3:
            return await open_remote_snapshot(s3, ref)

    return trio.run(main)
