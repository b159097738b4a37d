"""Push and pull: move a snapshot's missing chunks in packs, then its locator, manifest, tag.

Both directions keep the write order (chunks, then what names them), so a reader that
sees a tag on either side can read everything under it, and a transfer killed at any
point is resumed by running it again: only what the other side still lacks moves.
Every chunk is hash-checked before it leaves the local store and before it enters it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from snapstore import codec
from snapstore.errors import CorruptError, NotFoundError, SnapstoreError, UsageError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.progress import byte_progress
from snapstore.remote.cache import FetchCache, PackIndexCopies
from snapstore.remote.fetch import (
    cpu_limiter,
    fetch_index,
    fetch_locator,
    fetch_manifest,
    fetch_run,
    get_remote_tag,
    resolve_remote,
)
from snapstore.remote.packs import (
    MAX_RANGE,
    Location,
    Locator,
    Pack,
    build_pack,
    coalesce,
    encode_locator,
    plan_packs,
)
from snapstore.remote.pool import run_pool
from snapstore.remote.settings import DEFAULT_JOBS, DEFAULT_PACK_BYTES
from snapstore.store.backend import Handle
from snapstore.store.local import ChunkWriter, LocalStore, tag_file
from snapstore.store.s3 import S3Store

# Rounds of a push whose objects a concurrent remote gc deleted before it gives up.
PUSH_ROUNDS = 3
# Threads that write pulled chunks into the store.
WRITE_THREADS = 4
# Pull reads up to this many bytes it does not need to join two runs into one GET: less
# than a request costs, on moto and on S3 alike.
PULL_MAX_GAP = 1 << 20


@dataclass(frozen=True, slots=True)
class TransferReport:
    snapshot: ChunkId
    tag: str | None
    tag_status: str
    chunks: int
    chunks_sent: int
    bytes_sent: int
    packs: int
    seconds: float
    # Pull: local copies that failed their check and were fetched again.
    chunks_repaired: int = 0


@dataclass(frozen=True, slots=True)
class RemoteChunks:
    """What a remote holds, by its pack indexes: each chunk's place, each pack's size."""

    where: dict[ChunkId, Location]
    pack_sizes: dict[ChunkId, int]


async def remote_chunks(s3: S3Store, store: LocalStore | None, jobs: int = DEFAULT_JOBS
                        ) -> RemoteChunks:
    """The union of the remote's pack indexes (one LIST of index/ and one of packs/, and a
    GET for each index `store` has no copy of). An index whose pack is missing or has
    another size is left out, so its chunks are pushed again. A damaged index stops the
    push with one line: the remote is not what it should be, and working around it
    silently would hide that."""
    copies = PackIndexCopies(store) if store is not None else None
    indexed = [o.id async for o in s3.list("index")]
    sizes = {o.id: o.size async for o in s3.list("pack")}
    found: dict[ChunkId, tuple[tuple[ChunkId, Location], ...]] = {}

    async def load(pack: ChunkId) -> None:
        try:
            index = await fetch_index(s3, copies, pack)
        except CorruptError as e:
            damaged = s3.where(Handle.of("index", pack))
            raise CorruptError(f"{e}; delete {damaged} and push again "
                               "(that pack's chunks are then sent again)") from None
        if index.size == sizes[pack]:
            found[pack] = index.chunks

    await run_pool([p for p in indexed if p in sizes], load, jobs)
    where: dict[ChunkId, Location] = {}
    for pack in sorted(found):
        for cid, loc in found[pack]:
            where.setdefault(cid, loc)
    return RemoteChunks(where, {p: sizes[p] for p in found})


def _load_pack(store: LocalStore, cids: Sequence[ChunkId], sizes: dict[ChunkId, int]) -> Pack:
    objects = []
    for cid in cids:
        obj = store.get_chunk_object(cid)
        try:
            codec.decode(obj, cid, sizes[cid])
        except CorruptError as e:
            raise CorruptError(f"{e}: the local copy is bad, so it was not pushed; "
                               "run `snapstore verify`") from None
        objects.append((cid, obj))
    return build_pack(objects)


def _sizes_on_disk(store: LocalStore, cids: Iterable[ChunkId]) -> dict[ChunkId, int]:
    out: dict[ChunkId, int] = {}
    for cid in cids:
        try:
            out[cid] = store.chunk_path(cid).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"chunk {cid} is missing from the local store; "
                                "run `snapstore verify`") from None
    return out


def _local_tag(store: LocalStore, ref: str) -> str | None:
    try:
        return ref if store.get_tag(ref) is not None else None
    except UsageError:
        return None


async def push(store: LocalStore, ref: str, s3: S3Store, *, force: bool = False,
               jobs: int = DEFAULT_JOBS, pack_size: int = DEFAULT_PACK_BYTES) -> TransferReport:
    """Send snapshot `ref` (a tag, which is then set remotely too, or an id) to `s3`.

    After the tag, everything it reaches (manifest, locator, each pack the locator names)
    is checked to be there: a remote gc running beside the push (with a grace it outlived,
    or forced) may have deleted some of it. What is lost is sent again, up to PUSH_ROUNDS
    times; a push that cannot keep its snapshot whole fails instead of exiting 0."""
    start = time.monotonic()
    mid = store.resolve(ref)
    tag = _local_tag(store, ref)
    m = await trio.to_thread.run_sync(store.get_manifest, mid)
    sizes = m.chunk_sizes()  # in manifest order: neighbours in a file share a pack
    sent = [0, 0, 0]
    status = "none"
    for attempt in range(PUSH_ROUNDS):
        locator = await _send(store, ref, mid, sizes, s3, sent, jobs, pack_size)
        # Checked after the tag: a gc that lists the tags from then on keeps the snapshot,
        # so only one that listed before can take anything, and what it took by now is
        # sent again (docs/remote.md: what is left).
        if tag is not None and attempt == 0:
            status = await _set_remote_tag(s3, tag, mid, force)
        lost = await _lost(s3, mid, locator, jobs)
        if not lost:
            return TransferReport(mid, tag, status, len(sizes), sent[0], sent[1], sent[2],
                                  time.monotonic() - start)
    raise SnapstoreError(
        f"{lost[0]} (and {len(lost) - 1} more objects) of snapshot {mid.short()} "
        f"vanished after the push wrote them, {PUSH_ROUNDS} times: a remote gc with a "
        "short --grace is running; push again when it is done")


async def _send(store: LocalStore, ref: str, mid: ChunkId, sizes: dict[ChunkId, int],
                s3: S3Store, sent: list[int], jobs: int, pack_size: int) -> Locator:
    """Send what the remote lacks of snapshot `mid`: packs of its missing chunks, then its
    locator, manifest and access list; add to `sent` (chunks, bytes, packs)."""
    remote = await remote_chunks(s3, store, jobs)
    where = {c: remote.where[c] for c in sizes if c in remote.where}
    pack_sizes = {loc.pack: remote.pack_sizes[loc.pack] for loc in where.values()}
    missing = [c for c in sizes if c not in where]
    on_disk = await trio.to_thread.run_sync(_sizes_on_disk, store, missing)
    copies = PackIndexCopies(store)
    cpu = cpu_limiter()
    with byte_progress(f"push {ref}", sum(on_disk.values())) as advance:
        async def upload(cids: list[ChunkId]) -> None:
            pack = await trio.to_thread.run_sync(_load_pack, store, cids, sizes, limiter=cpu)
            # The index after its pack: an index always names a whole pack.
            await s3.save(Handle.of("pack", pack.pack), pack.data)
            await s3.save(Handle.of("index", pack.pack), pack.index)
            # The next push from this store needs no GET for it.
            await trio.to_thread.run_sync(copies.put, pack.pack, pack.index)
            where.update(pack.chunks)
            pack_sizes[pack.pack] = len(pack.data)
            sent[0] += len(cids)
            sent[1] += len(pack.data)
            sent[2] += 1
            advance(len(pack.data), len(cids))

        await run_pool(plan_packs(((c, on_disk[c]) for c in missing), pack_size), upload,
                       jobs)
    used = {loc.pack for loc in where.values()}
    locator = Locator(mid, {p: pack_sizes[p] for p in used}, where)
    await s3.save(Handle.of("locator", mid), encode_locator(locator))
    if await s3.stat(Handle.of("manifest", mid)) is None:
        await s3.save(Handle.of("manifest", mid), store.get_manifest_object(mid))
    access = store.root / "access" / mid.hex
    if access.is_file():
        # Only a prefetch hint (the last recorded read order); the latest one wins.
        await s3.save(Handle.of("access", mid),
                      _checked_access_list(access.read_bytes(), sizes))
    return locator


async def _lost(s3: S3Store, mid: ChunkId, locator: Locator, jobs: int) -> list[str]:
    """The objects snapshot `mid` needs (its manifest, its locator, the packs the locator
    names, at their sizes) that the remote lacks now, by their URLs."""
    lost: list[str] = []

    async def check(wanted: tuple[Handle, int | None]) -> None:
        h, size = wanted
        found = await s3.stat(h)
        if found is None or (size is not None and found != size):
            lost.append(s3.where(h))

    wanted: list[tuple[Handle, int | None]] = [(Handle.of("manifest", mid), None),
                                               (Handle.of("locator", mid), None)]
    wanted += [(Handle.of("pack", p), n) for p, n in sorted(locator.packs.items())]
    await run_pool(wanted, check, jobs)
    return sorted(lost)


def _checked_access_list(data: bytes, sizes: dict[ChunkId, int]) -> bytes:
    """Keep only lines naming chunks of this snapshot, each once: the list is read by
    other hosts, which refuse one longer than a line per chunk."""
    lines = list(dict.fromkeys(ln for ln in data.decode("ascii", "replace").split()
                               if is_valid_hex_id(ln) and ChunkId.parse(ln) in sizes))
    return ("\n".join(lines) + "\n").encode() if lines else b""


async def _set_remote_tag(s3: S3Store, tag: str, mid: ChunkId, force: bool) -> str:
    h, body = Handle("tag", tag), tag_file(mid)
    if force:
        await s3.save(h, body)
        return "set"
    # Conditional create: of two hosts pushing one new tag, exactly one wins.
    if await s3.create(h, body):
        return "created"
    current = await get_remote_tag(s3, tag)
    if current == mid:
        return "unchanged"
    raise SnapstoreError(
        f"remote tag {tag!r} already points at snapshot {current.short()}, not "
        f"{mid.short()} (pushed from elsewhere); use another tag, or --force to move it"
    )


def _store_chunks(writer: ChunkWriter,
                  chunks: Iterable[tuple[ChunkId, bytes | memoryview]]) -> None:
    for cid, obj in chunks:
        if writer.claim(cid):
            writer.put(cid, obj)


def _intact(store: LocalStore, cid: ChunkId, size: int) -> bool:
    try:
        store.get_chunk(cid, size)
    except (CorruptError, NotFoundError):
        return False
    return True


def _from_cache(cache: FetchCache, writer: ChunkWriter, cid: ChunkId, size: int) -> bool:
    """Move a chunk a remote mount fetched into the store, checked; False if the cache has
    none (a bad cache entry is of no use: it goes)."""
    try:
        obj = cache.get(cid)
        codec.decode(obj, cid, size)
    except NotFoundError:
        return False
    except CorruptError:
        cache.delete(cid)
        return False
    _store_chunks(writer, [(cid, obj)])
    cache.delete(cid)
    return True


async def pull(store: LocalStore, ref: str, s3: S3Store, *, force: bool = False,
               jobs: int = DEFAULT_JOBS) -> TransferReport:
    try:
        return await _pull(store, ref, s3, force, jobs)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A writer thread's error names no file; the user needs the store and the cause.
        raise SnapstoreError(f"the disk of the store {store.root} is full ({e.strerror}): "
                             "nothing was tagged; free space and pull again (it resumes)"
                             ) from None


def _set_local_tag(store: LocalStore, tag: str, mid: ChunkId, force: bool) -> str:
    """Point the local `tag` at `mid`. Unless forced, a tag is created, never moved: not
    even one that came to name another snapshot while the pull ran (an ingest beside it),
    which the check before the pull could not see."""
    if force:
        status = "unchanged" if store.get_tag(tag) == mid else "set"
        store.set_tag(tag, mid)
        return status
    while not store.create_tag(tag, mid):
        local = store.get_tag(tag)
        if local == mid:
            return "unchanged"
        if local is not None:
            raise SnapstoreError(
                f"local tag {tag!r} came to point at snapshot {local.short()} while the "
                f"pull ran; snapshot {mid.short()} is stored, untagged: use --force to move "
                "the local tag")
    return "set"


async def _pull(store: LocalStore, ref: str, s3: S3Store, force: bool,
                jobs: int) -> TransferReport:
    """Fetch snapshot `ref` (a remote tag, then set locally too, or a full id) from `s3`:
    the chunks the store lacks, and those whose local copy fails its check (a damaged
    copy is deleted, then fetched like a missing one), so that the snapshot is whole
    and intact locally once pull returns."""
    start = time.monotonic()
    mid, tag = await resolve_remote(s3, ref)
    if tag is not None:
        local = store.get_tag(tag)
        if local is not None and local != mid and not force:
            raise SnapstoreError(
                f"local tag {tag!r} points at snapshot {local.short()}, the remote one at "
                f"{mid.short()}; use --force to move the local tag"
            )
    obj, m = await fetch_manifest(s3, mid)
    sizes = m.chunk_sizes()
    locator = await fetch_locator(s3, mid, set(sizes))
    cpu = cpu_limiter()
    # Writes get threads of their own: one that waits for the journal (each batch ends
    # with a syncfs) must not hold up the checks.
    disk = trio.CapacityLimiter(WRITE_THREADS)
    got = [0, 0]
    packs: set[ChunkId] = set()
    # Chunks go through the same batched writer as an ingest: durable before they are
    # named, one syncfs per batch instead of an fsync per chunk.
    writer = store.chunk_writer()
    cache = FetchCache(store)
    with store.writer_lock():
        missing = await trio.to_thread.run_sync(
            lambda: [c for c in sizes if not store.has_chunk(c)])
        damaged: list[ChunkId] = []

        async def check_local(cid: ChunkId) -> None:
            if not await trio.to_thread.run_sync(_intact, store, cid, sizes[cid],
                                                 limiter=cpu):
                damaged.append(cid)

        absent = set(missing)
        await run_pool([c for c in sizes if c not in absent], check_local,
                       int(cpu.total_tokens))
        for cid in damaged:
            store.delete_chunk(cid)
        missing += damaged
        total = sum(locator.chunks[c].length for c in missing)
        with byte_progress(f"pull {ref}", total) as advance:
            cached: set[ChunkId] = set()

            async def from_cache(cid: ChunkId) -> None:
                if await trio.to_thread.run_sync(_from_cache, cache, writer, cid, sizes[cid],
                                                 limiter=cpu):
                    cached.add(cid)
                    got[0] += 1
                    advance(locator.chunks[cid].length, 1)

            async def download(run: list[tuple[ChunkId, Location]]) -> None:
                pack = run[0][1].pack
                f = await fetch_run(s3, run, sizes, cpu)
                if f.bad:
                    raise next(iter(f.bad.values()))
                await trio.to_thread.run_sync(
                    _store_chunks, writer, [(c, o) for c, o, _ in f.good], limiter=disk)
                got[0] += len(f.good)
                got[1] += sum(len(o) for _, o, _ in f.good)
                packs.add(pack)
                advance(sum(len(o) for _, o, _ in f.good), len(f.good))

            try:
                # A chunk a remote mount already fetched moves from the cache, checked.
                await run_pool([c for c in missing if cache.path(c).exists()],
                               from_cache, jobs)
                wanted = sorted((locator.chunks[c], c) for c in missing if c not in cached)
                runs = coalesce([(c, loc) for loc, c in wanted], MAX_RANGE, PULL_MAX_GAP)
                await run_pool(runs, download, jobs)
            except BaseException:
                writer.abort()
                raise
        await trio.to_thread.run_sync(writer.close)
        if not (store.snapshots_dir / mid.hex).exists():
            await trio.to_thread.run_sync(store.put_manifest_object, mid, obj)
        status = "none" if tag is None else _set_local_tag(store, tag, mid, force)
    return TransferReport(mid, tag, status, len(sizes), got[0], got[1], len(packs),
                          time.monotonic() - start, len(damaged))
