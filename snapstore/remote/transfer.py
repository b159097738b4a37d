"""Push and pull: move a snapshot's missing chunks, then its manifest, then its tag.

Both directions keep the store's write order (chunks, manifest, tag), so a reader that
sees a tag on either side can read everything under it, and a transfer killed at any
point is resumed by running it again: only what the other side still lacks moves.
Every chunk is hash-checked before it leaves the local store and before it enters it.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import trio

from snapstore import codec, manifest
from snapstore.errors import CorruptError, NotFoundError, SnapstoreError, UsageError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.progress import byte_progress
from snapstore.remote.settings import DEFAULT_JOBS
from snapstore.store.local import MAX_MANIFEST_BYTES, ChunkWriter, LocalStore, check_tag
from snapstore.store.s3 import (
    S3Store,
    access_key,
    chunk_id_of_key,
    chunk_key,
    manifest_key,
    tag_key,
)

T = TypeVar("T")

# A GET whose body fails its hash is fetched this often in all before it is reported.
HASH_ATTEMPTS = 3
# Above this many chunks, one LIST per id prefix (at most 256, in parallel) is cheaper than
# a HEAD each: each costs one request, and a prefix's listing is one page until the remote
# holds 256,000 chunks.
LIST_ABOVE_CHUNKS = 512


@dataclass(frozen=True, slots=True)
class TransferReport:
    snapshot: ChunkId
    tag: str | None
    tag_status: str
    chunks: int
    chunks_sent: int
    bytes_sent: int
    seconds: float


def cpu_limiter() -> trio.CapacityLimiter:
    """Threads for decompression and hashing: one per core (they release the GIL)."""
    return trio.CapacityLimiter(os.cpu_count() or 2)


async def fetch_chunk(s3: S3Store, cid: ChunkId, size: int,
                      cpu: trio.CapacityLimiter) -> tuple[bytes, bytes]:
    """GET a chunk object and check it: (stored object, raw bytes), or CorruptError.

    A body that fails its hash is fetched again (a flipped bit on the wire) before the
    remote copy is declared bad; bad bytes are never returned.
    """
    err: CorruptError | None = None
    for _ in range(HASH_ATTEMPTS):
        obj = await s3.get(chunk_key(cid))
        try:
            raw = await trio.to_thread.run_sync(codec.decode, obj, cid, size, limiter=cpu)
        except CorruptError as e:
            err = e
            continue
        return obj, raw
    raise CorruptError(f"chunk {cid} from {s3.url} failed its check {HASH_ATTEMPTS} times "
                       f"({err}); nothing was stored")


async def run_pool(items: Iterable[T], fn: Callable[[T], Awaitable[None]], jobs: int) -> None:
    """Run `fn` on every item, `jobs` at a time. After the first failure no new item
    starts; those in flight finish (cancelling a request mid-body leaves the HTTP
    client's streams half-consumed), then the failure is raised as itself, not in an
    exception group, so the CLI shows it as one line."""
    send, recv = trio.open_memory_channel[T](0)
    failures: list[Exception] = []

    async def worker(items_in: trio.MemoryReceiveChannel[T]) -> None:
        async with items_in:
            async for item in items_in:
                if failures:
                    continue
                try:
                    await fn(item)
                except Exception as e:
                    failures.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, jobs)):
            nursery.start_soon(worker, recv.clone())
        recv.close()
        async with send:
            for item in items:
                if failures:
                    break
                await send.send(item)
    if failures:
        raise failures[0]


async def remote_missing(s3: S3Store, cids: list[ChunkId], jobs: int,
                         method: str = "auto") -> set[ChunkId]:
    """The chunks of `cids` that the remote lacks: by one LIST page when the remote holds
    few chunks, else by HEAD per chunk (small snapshots) or LIST per id prefix (large)."""
    if method == "auto":
        page = await s3.list_page("chunks/")
        if page is not None:
            listed = {c for c in map(chunk_id_of_key, page) if c is not None}
            return {c for c in cids if c not in listed}
        method = "list" if len(cids) > LIST_ABOVE_CHUNKS else "head"
    missing: set[ChunkId] = set()
    if method == "head":
        async def head(cid: ChunkId) -> None:
            if await s3.head(chunk_key(cid)) is None:
                missing.add(cid)

        await run_pool(cids, head, jobs)
        return missing
    if method != "list":
        raise ValueError(f"unknown method {method!r}")
    present: set[ChunkId] = set()

    async def list_prefix(prefix: str) -> None:
        async for o in s3.list(f"chunks/{prefix}/"):
            cid = chunk_id_of_key(o.key)
            if cid is not None:
                present.add(cid)

    await run_pool(sorted({c.hex[:2] for c in cids}), list_prefix, jobs)
    return {c for c in cids if c not in present}


def _load_for_push(store: LocalStore, cid: ChunkId, size: int) -> bytes:
    obj = store.get_chunk_object(cid)
    try:
        codec.decode(obj, cid, size)
    except CorruptError as e:
        raise CorruptError(f"{e}: the local copy is bad, so it was not pushed; "
                           "run `snapstore verify`") from None
    return obj


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
               jobs: int = DEFAULT_JOBS, missing_by: str = "auto") -> TransferReport:
    """Send snapshot `ref` (a tag, which is then set remotely too, or an id) to `s3`."""
    start = time.monotonic()
    mid = store.resolve(ref)
    tag = _local_tag(store, ref)
    m = await trio.to_thread.run_sync(store.get_manifest, mid)
    sizes = m.chunk_sizes()
    missing = await remote_missing(s3, sorted(sizes), jobs, missing_by)
    on_disk = await trio.to_thread.run_sync(_sizes_on_disk, store, missing)
    cpu = cpu_limiter()
    sent = [0, 0]
    with byte_progress(f"push {ref}", sum(on_disk.values())) as advance:
        async def upload(cid: ChunkId) -> None:
            obj = await trio.to_thread.run_sync(_load_for_push, store, cid, sizes[cid],
                                                limiter=cpu)
            await s3.put(chunk_key(cid), obj)
            sent[0] += 1
            sent[1] += len(obj)
            advance(len(obj), 1)

        # Largest first: the long uploads start early, so the tail of the run is short.
        await run_pool(sorted(missing, key=lambda c: -on_disk[c]), upload, jobs)
    if await s3.head(manifest_key(mid)) is None:
        await s3.put(manifest_key(mid), store.get_manifest_object(mid))
    access = store.root / "access" / mid.hex
    if access.is_file():
        # Only a prefetch hint (the last recorded read order); the latest one wins.
        await s3.put(access_key(mid), _checked_access_list(access.read_bytes(), sizes))
    status = "none" if tag is None else await _set_remote_tag(s3, tag, mid, force)
    return TransferReport(mid, tag, status, len(sizes), sent[0], sent[1],
                          time.monotonic() - start)


def _checked_access_list(data: bytes, sizes: dict[ChunkId, int]) -> bytes:
    """Keep only lines naming chunks of this snapshot: the list is read by other hosts."""
    lines = [ln for ln in data.decode("ascii", "replace").split()
             if is_valid_hex_id(ln) and ChunkId.parse(ln) in sizes]
    return ("\n".join(lines) + "\n").encode() if lines else b""


async def _set_remote_tag(s3: S3Store, tag: str, mid: ChunkId, force: bool) -> str:
    body = (mid.hex + "\n").encode()
    if force:
        await s3.put(tag_key(tag), body)
        return "set"
    # Conditional create: of two hosts pushing one new tag, exactly one wins.
    if await s3.put_if_absent(tag_key(tag), body):
        return "created"
    current = await get_remote_tag(s3, tag)
    if current == mid:
        return "unchanged"
    raise SnapstoreError(
        f"remote tag {tag!r} already points at snapshot {current.short()}, not "
        f"{mid.short()} (pushed from elsewhere); use another tag, or --force to move it"
    )


async def get_remote_tag(s3: S3Store, tag: str) -> ChunkId:
    try:
        text = (await s3.get(tag_key(check_tag(tag)))).decode("ascii", "replace").strip()
    except NotFoundError:
        raise NotFoundError(f"no tag {tag!r} in {s3.url}") from None
    try:
        return ChunkId.parse(text)
    except CorruptError:
        raise CorruptError(f"remote tag {tag!r} in {s3.url} is not a snapshot id") from None


async def resolve_remote(s3: S3Store, ref: str) -> tuple[ChunkId, str | None]:
    """A remote tag name, or a full 64-hex-digit snapshot id: (snapshot, tag or None)."""
    if is_valid_hex_id(ref):
        return ChunkId.parse(ref), None
    return await get_remote_tag(s3, ref), ref


async def fetch_manifest(s3: S3Store, mid: ChunkId) -> tuple[bytes, manifest.Manifest]:
    """The manifest object of `mid` and its decoded form, both checked."""
    try:
        obj = await s3.get(manifest_key(mid))
    except NotFoundError:
        raise NotFoundError(f"snapshot {mid} is missing from {s3.url}") from None

    def check() -> manifest.Manifest:
        return manifest.decode(codec.decode_bounded(obj, mid, MAX_MANIFEST_BYTES))

    return obj, await trio.to_thread.run_sync(check)


def _store_chunk(store: LocalStore, writer: ChunkWriter, cid: ChunkId, obj: bytes) -> None:
    if writer.claim(cid):
        writer.put(cid, obj)
    store.delete_cache_object(cid)


def _cached_checked(store: LocalStore, cid: ChunkId, size: int) -> bytes | None:
    try:
        obj = store.get_cache_object(cid)
        codec.decode(obj, cid, size)
    except (NotFoundError, CorruptError):
        return None
    return obj


async def pull(store: LocalStore, ref: str, s3: S3Store, *, force: bool = False,
               jobs: int = DEFAULT_JOBS) -> TransferReport:
    """Fetch snapshot `ref` (a remote tag, then set locally too, or a full id) from `s3`."""
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
    cpu = cpu_limiter()
    got = [0, 0]
    # Chunks go through the same batched writer as an ingest: durable before they are
    # named, one syncfs per batch instead of an fsync per chunk.
    writer = store.chunk_writer()
    with store.writer_lock():
        missing = await trio.to_thread.run_sync(
            lambda: [c for c in sorted(sizes) if not store.has_chunk(c)])
        with byte_progress(f"pull {ref}", sum(sizes[c] for c in missing)) as advance:
            async def download(cid: ChunkId) -> None:
                # A chunk a remote mount already fetched moves from the cache, checked.
                data = await trio.to_thread.run_sync(_cached_checked, store, cid, sizes[cid],
                                                     limiter=cpu)
                if data is None:
                    data, _ = await fetch_chunk(s3, cid, sizes[cid], cpu)
                    got[1] += len(data)
                await trio.to_thread.run_sync(_store_chunk, store, writer, cid, data)
                got[0] += 1
                advance(sizes[cid], 1)

            try:
                await run_pool(missing, download, jobs)
            except BaseException:
                writer.abort()
                raise
        await trio.to_thread.run_sync(writer.close)
        if not (store.snapshots_dir / mid.hex).exists():
            await trio.to_thread.run_sync(store.put_manifest_object, mid, obj)
        status = "none"
        if tag is not None:
            status = "unchanged" if store.get_tag(tag) == mid else "set"
            store.set_tag(tag, mid)
    return TransferReport(mid, tag, status, len(sizes), got[0], got[1],
                          time.monotonic() - start)


async def list_chunk_objects(s3: S3Store) -> AsyncIterator[tuple[ChunkId, int]]:
    """Every chunk object in the remote with its stored size."""
    async for o in s3.list("chunks/"):
        cid = chunk_id_of_key(o.key)
        if cid is not None:
            yield cid, o.size
