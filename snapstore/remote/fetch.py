"""Reading a remote: tags, manifests, locators, pack indexes and chunks, each checked.

Everything in a bucket is untrusted: ids are parsed before they become keys, sizes are
bounded before a body is read, indexes and locators are validated whole, and a chunk's
bytes reach no caller before they hashed to its id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

from snapstore import codec, manifest
from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ID_BYTES, ChunkId, is_valid_hex_id
from snapstore.remote.cache import PackIndexCopies
from snapstore.remote.packs import (
    MAX_INDEX_BYTES,
    Location,
    Locator,
    PackIndex,
    decode_index,
    decode_locator,
    locator_max_bytes,
)
from snapstore.store.backend import Handle
from snapstore.store.local import MAX_MANIFEST_BYTES, tag_target
from snapstore.store.s3 import RemoteError, S3Store

log = logging.getLogger(__name__)

# A chunk whose bytes fail their hash is fetched this often in all before it is reported.
HASH_ATTEMPTS = 3

Run = Sequence[tuple[ChunkId, Location]]


def cpu_limiter() -> trio.CapacityLimiter:
    """Threads for decompression and hashing: one per core (they release the GIL)."""
    return trio.CapacityLimiter(os.cpu_count() or 2)


async def get_remote_tag(s3: S3Store, tag: str) -> ChunkId:
    try:
        data = await s3.load(Handle("tag", tag), max_bytes=4096)
    except NotFoundError:
        raise NotFoundError(f"no tag {tag!r} in {s3.url}") from None
    try:
        return tag_target(data)
    except CorruptError:
        raise CorruptError(f"remote tag {tag!r} in {s3.url} is not a snapshot id") from None


async def list_remote_tags(s3: S3Store) -> tuple[list[str], list[str]]:
    """The remote's tag names, and the keys under refs/tags/ that name no tag (an S3
    console's zero-byte folder marker, a nested key): someone else's objects, which a
    listing skips and reports instead of failing on."""
    foreign: list[str] = []
    names = [o.name async for o in s3.list("tag", foreign.append)]
    return names, foreign


def access_list_max_bytes(chunks: int) -> int:
    """The largest access list a snapshot of `chunks` distinct chunks has: one id and a
    newline per chunk (push writes each once)."""
    return chunks * (2 * ID_BYTES + 1)


async def fetch_access_order(s3: S3Store, mid: ChunkId, chunks: int) -> list[str]:
    """The lines of snapshot `mid`'s access list, unchecked (callers keep only the ids
    they know); none when it is absent or over its bound: it is only a prefetch hint."""
    try:
        data = await s3.load(Handle.of("access", mid),
                             max_bytes=access_list_max_bytes(chunks))
    except NotFoundError:
        return []
    except (CorruptError, RemoteError) as e:
        log.warning("ignoring the access list: %s", e)
        return []
    return data.decode("ascii", "replace").splitlines()


async def resolve_remote(s3: S3Store, ref: str) -> tuple[ChunkId, str | None]:
    """A remote tag name, or a full 64-hex-digit snapshot id: (snapshot, tag or None)."""
    if is_valid_hex_id(ref):
        return ChunkId.parse(ref), None
    return await get_remote_tag(s3, ref), ref


async def fetch_manifest(s3: S3Store, mid: ChunkId) -> tuple[bytes, manifest.Manifest]:
    """The manifest object of `mid` and its decoded form, both checked."""
    try:
        obj = await s3.load(Handle.of("manifest", mid), max_bytes=MAX_MANIFEST_BYTES + 1)
    except NotFoundError:
        raise NotFoundError(f"snapshot {mid} is missing from {s3.url}") from None

    def check() -> manifest.Manifest:
        return manifest.decode(codec.decode_bounded(obj, mid, MAX_MANIFEST_BYTES))

    return obj, await trio.to_thread.run_sync(check)


async def fetch_locator(s3: S3Store, mid: ChunkId, chunk_ids: set[ChunkId]) -> Locator:
    """Where every chunk of snapshot `mid` (whose manifest holds `chunk_ids`) lies."""
    try:
        data = await s3.load(Handle.of("locator", mid),
                             max_bytes=locator_max_bytes(len(chunk_ids)))
    except NotFoundError:
        raise NotFoundError(f"snapshot {mid.short()} has no locator in {s3.url}; push it "
                            "again") from None
    return await trio.to_thread.run_sync(decode_locator, data, mid, chunk_ids)


async def fetch_index(s3: S3Store, copies: PackIndexCopies | None, pack: ChunkId
                      ) -> PackIndex:
    """The index of `pack`: the copy in `copies` when it is intact, else fetched (and
    kept there, if given)."""
    kept = copies.get(pack) if copies is not None else None
    if kept is not None and copies is not None:
        try:
            return decode_index(kept, pack)
        except CorruptError:
            copies.delete(pack)
    data = await s3.load(Handle.of("index", pack), max_bytes=MAX_INDEX_BYTES)
    index = await trio.to_thread.run_sync(decode_index, data, pack)
    if copies is not None:
        copies.put(pack, data)
    return index


@dataclass(slots=True)
class Fetched:
    """The chunks of a run: (id, stored object, raw bytes) of each that checked, the
    error of each that failed every attempt, and the GETs it took."""

    requests: int = 1
    good: list[tuple[ChunkId, memoryview, bytes]] = field(default_factory=list)
    bad: dict[ChunkId, CorruptError] = field(default_factory=dict)


async def fetch_run(s3: S3Store, run: Run, sizes: Mapping[ChunkId, int],
                    cpu: trio.CapacityLimiter) -> Fetched:
    """Read a run of chunks of one pack (coalesce's output) with one ranged GET and check
    each chunk. A chunk that fails its check is fetched again on its own (a flipped bit
    on the wire) before it is declared bad.

    A missing pack or a failed request fails the whole run (NotFoundError, RemoteError);
    a pack shorter than the run fails the chunks it cuts off.
    """
    pack = run[0][1].pack
    out = Fetched()

    async def check(start: int, chunks: Run) -> None:
        data = await s3.load_range(Handle.of("pack", pack), start, chunks[-1][1].end)
        results = await trio.to_thread.run_sync(_check, data, start, chunks, sizes,
                                                limiter=cpu)
        for cid, result in results:
            if isinstance(result, CorruptError):
                out.bad[cid] = result
            else:
                out.bad.pop(cid, None)
                out.good.append((cid, *result))

    await check(run[0][1].offset, run)
    for _ in range(1, HASH_ATTEMPTS):
        if not out.bad:
            break
        for cid in sorted(out.bad):
            loc = next(at for c, at in run if c == cid)
            out.requests += 1
            await check(loc.offset, [(cid, loc)])
    for cid, err in out.bad.items():
        out.bad[cid] = CorruptError(f"chunk {cid} in pack {pack.short()} of {s3.url} failed "
                                    f"its check {HASH_ATTEMPTS} times ({err})")
    return out


def _check(data: bytes, start: int, chunks: Run, sizes: Mapping[ChunkId, int]
           ) -> list[tuple[ChunkId, tuple[memoryview, bytes] | CorruptError]]:
    """Split `data` (the pack's bytes from `start`) into its chunks and check each: the
    stored object (a view into `data`, not a copy) and raw bytes of each, or why it
    failed."""
    view = memoryview(data)
    out: list[tuple[ChunkId, tuple[memoryview, bytes] | CorruptError]] = []
    for cid, loc in chunks:
        obj = view[loc.offset - start : loc.end - start]
        try:
            if len(obj) != loc.length:
                raise CorruptError(f"the pack ends before the chunk's {loc.length} bytes at "
                                   f"{loc.offset}")
            out.append((cid, (obj, codec.decode(obj, cid, sizes[cid]))))
        except CorruptError as e:
            out.append((cid, e))
    return out
