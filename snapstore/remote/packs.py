"""The pack format of a remote: packs of stored chunks, their indexes, snapshot locators.

A pack is stored chunk objects back to back, named by the BLAKE3 of its bytes. An index
lists one pack's chunks; a locator maps every chunk of one snapshot to its place in a
pack. Indexes and locators come from the remote, so decoding them is hostile-input
validation: every count and size is bounded before anything is allocated for it, and a
bad object is refused whole with one line. docs/remote.md is the specification.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import blake3

from snapstore.errors import CorruptError
from snapstore.ids import ChunkId
from snapstore.manifest import MAX_CHUNK

# Push closes a pack at its target size (settings.DEFAULT_PACK_BYTES) or at this many
# chunks, which keeps an index under 3 MiB however small the chunks.
PACK_MAX_CHUNKS = 1 << 16
# A pack another writer made may be larger, but not beyond this.
MAX_PACK_BYTES = 1 << 30
# A stored chunk is its codec tag and at most its raw size (it is kept raw when zstd
# does not shrink it), and at least a tag and one byte.
MAX_STORED_CHUNK = MAX_CHUNK + 1
MIN_STORED_CHUNK = 2
# One ranged GET reads at most this much.
MAX_RANGE = 16 << 20

_INDEX_MAGIC = b"SNAPIDX\x01"
_INDEX_HEAD = struct.Struct(">8s32sQI")  # magic, pack id, pack size, chunk count
_INDEX_ENTRY = struct.Struct(">32sQI")  # chunk id, offset, length
_LOCATOR_MAGIC = b"SNAPLOC\x01"
_LOCATOR_HEAD = struct.Struct(">8s32sII")  # magic, snapshot id, pack count, chunk count
_LOCATOR_PACK = struct.Struct(">32sQ")  # pack id, pack size
_LOCATOR_ENTRY = struct.Struct(">32sIQI")  # chunk id, pack number, offset, length
_CHECKSUM = 32  # BLAKE3 of everything before it, at the end of an index or locator
MAX_INDEX_BYTES = _INDEX_HEAD.size + PACK_MAX_CHUNKS * _INDEX_ENTRY.size + _CHECKSUM


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a stored chunk lies: `length` bytes at `offset` of pack `pack`."""

    pack: ChunkId
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class PackIndex:
    """The chunks of one pack, in the order they lie in it, covering it exactly."""

    pack: ChunkId
    size: int
    chunks: tuple[tuple[ChunkId, Location], ...]


@dataclass(frozen=True, slots=True)
class Locator:
    """Every chunk of one snapshot and where it lies; `packs` maps pack ids to sizes."""

    snapshot: ChunkId
    packs: dict[ChunkId, int]
    chunks: dict[ChunkId, Location]


@dataclass(frozen=True, slots=True)
class Pack:
    """A pack built for upload: its id, bytes and index object."""

    pack: ChunkId
    data: bytes
    index: bytes
    chunks: tuple[tuple[ChunkId, Location], ...]


def plan_packs(items: Iterable[tuple[ChunkId, int]], target: int) -> list[list[ChunkId]]:
    """Cut (chunk, stored size) items, in their order, into packs of about `target` bytes."""
    packs: list[list[ChunkId]] = []
    current: list[ChunkId] = []
    size = 0
    for cid, n in items:
        current.append(cid)
        size += n
        if size >= target or len(current) >= PACK_MAX_CHUNKS:
            packs.append(current)
            current, size = [], 0
    if current:
        packs.append(current)
    return packs


def build_pack(objects: Sequence[tuple[ChunkId, bytes]]) -> Pack:
    """Concatenate stored chunk objects (already checked by the caller) into a pack."""
    data = b"".join(obj for _, obj in objects)
    pack = ChunkId.of(data)
    chunks: list[tuple[ChunkId, Location]] = []
    offset = 0
    for cid, obj in objects:
        chunks.append((cid, Location(pack, offset, len(obj))))
        offset += len(obj)
    index = PackIndex(pack, len(data), tuple(chunks))
    return Pack(pack, data, encode_index(index), index.chunks)


# -- indexes ---------------------------------------------------------------------------


def encode_index(index: PackIndex) -> bytes:
    out = bytearray(_INDEX_HEAD.pack(_INDEX_MAGIC, index.pack.digest, index.size,
                                     len(index.chunks)))
    for cid, loc in index.chunks:
        out += _INDEX_ENTRY.pack(cid.digest, loc.offset, loc.length)
    return _sealed(out)


def decode_index(data: bytes, pack: ChunkId) -> PackIndex:
    """Parse the index object of `pack`; CorruptError, naming the problem, unless it lists
    distinct chunks that cover exactly the pack's bytes, in order."""
    what = f"index of pack {pack}"
    body = _unsealed(data, what, _INDEX_HEAD.size, MAX_INDEX_BYTES)
    magic, pack_id, size, count = _INDEX_HEAD.unpack_from(body)
    _require(magic == _INDEX_MAGIC, what, "is not a pack index of this version")
    _require(pack_id == pack.digest, what, "names another pack")
    _require(0 < size <= MAX_PACK_BYTES, what, f"declares a pack of {size} bytes")
    _require(count <= PACK_MAX_CHUNKS and
             len(body) == _INDEX_HEAD.size + count * _INDEX_ENTRY.size, what,
             f"declares {count} chunks in {len(body)} bytes")
    chunks: list[tuple[ChunkId, Location]] = []
    seen: set[bytes] = set()
    offset = 0
    for digest, at, length in _INDEX_ENTRY.iter_unpack(body[_INDEX_HEAD.size:]):
        _require(at == offset, what, f"has a gap or overlap at byte {at}")
        _require(MIN_STORED_CHUNK <= length <= MAX_STORED_CHUNK, what,
                 f"has a chunk of {length} bytes")
        _require(digest not in seen, what, "lists a chunk twice")
        seen.add(digest)
        chunks.append((ChunkId(digest), Location(pack, at, length)))
        offset += length
    _require(offset == size, what, f"covers {offset} of the pack's {size} bytes")
    return PackIndex(pack, size, tuple(chunks))


# -- locators --------------------------------------------------------------------------


def locator_max_bytes(chunks: int) -> int:
    """The largest locator a snapshot of `chunks` distinct chunks can have."""
    return (_LOCATOR_HEAD.size + chunks * (_LOCATOR_PACK.size + _LOCATOR_ENTRY.size)
            + _CHECKSUM)


def encode_locator(loc: Locator) -> bytes:
    packs = sorted(loc.packs)
    number = {p: i for i, p in enumerate(packs)}
    out = bytearray(_LOCATOR_HEAD.pack(_LOCATOR_MAGIC, loc.snapshot.digest, len(packs),
                                       len(loc.chunks)))
    for p in packs:
        out += _LOCATOR_PACK.pack(p.digest, loc.packs[p])
    for cid, at in sorted(loc.chunks.items(), key=lambda kv: (number[kv[1].pack],
                                                             kv[1].offset)):
        out += _LOCATOR_ENTRY.pack(cid.digest, number[at.pack], at.offset, at.length)
    return _sealed(out)


def decode_locator(data: bytes, snapshot: ChunkId, chunk_ids: set[ChunkId]) -> Locator:
    """Parse the locator of `snapshot`, whose manifest holds `chunk_ids`; CorruptError,
    naming the problem, unless it places exactly those chunks in distinct,
    non-overlapping ranges inside the packs it lists (each of which it uses)."""
    what = f"locator of snapshot {snapshot}"
    body = _unsealed(data, what, _LOCATOR_HEAD.size, locator_max_bytes(len(chunk_ids)))
    magic, snap, npacks, count = _LOCATOR_HEAD.unpack_from(body)
    _require(magic == _LOCATOR_MAGIC, what, "is not a locator of this version")
    _require(snap == snapshot.digest, what, "names another snapshot")
    _require(count == len(chunk_ids) and npacks <= count, what,
             f"declares {count} chunks in {npacks} packs, the snapshot has "
             f"{len(chunk_ids)} chunks")
    entries_at = _LOCATOR_HEAD.size + npacks * _LOCATOR_PACK.size
    _require(len(body) == entries_at + count * _LOCATOR_ENTRY.size, what,
             f"has {len(body)} bytes for {npacks} packs and {count} chunks")
    pack_list: list[tuple[ChunkId, int]] = []
    for digest, size in _LOCATOR_PACK.iter_unpack(body[_LOCATOR_HEAD.size:entries_at]):
        _require(0 < size <= MAX_PACK_BYTES, what, f"declares a pack of {size} bytes")
        pack_list.append((ChunkId(digest), size))
    packs = dict(pack_list)
    _require(len(packs) == npacks, what, "lists a pack twice")
    chunks: dict[ChunkId, Location] = {}
    used: set[int] = set()
    last = (-1, 0)  # (pack number, end) of the previous entry
    for digest, number, offset, length in _LOCATOR_ENTRY.iter_unpack(body[entries_at:]):
        _require(number < npacks, what, f"names pack number {number} of {npacks}")
        pack, size = pack_list[number]
        _require(MIN_STORED_CHUNK <= length <= MAX_STORED_CHUNK, what,
                 f"has a chunk of {length} bytes")
        _require(offset + length <= size, what,
                 f"places a chunk at {offset}+{length}, beyond its pack's {size} bytes")
        _require((number, offset) >= last, what,
                 "has chunks out of order or overlapping in a pack")
        cid = ChunkId(digest)
        _require(cid in chunk_ids, what, f"lists chunk {cid}, which is not the snapshot's")
        _require(cid not in chunks, what, "lists a chunk twice")
        chunks[cid] = Location(pack, offset, length)
        used.add(number)
        last = (number, offset + length)
    _require(len(used) == npacks, what, "lists a pack that holds none of its chunks")
    return Locator(snapshot, packs, chunks)


# -- ranges ----------------------------------------------------------------------------


def coalesce(items: Iterable[tuple[ChunkId, Location]], max_bytes: int = MAX_RANGE,
             max_gap: int = 0) -> list[list[tuple[ChunkId, Location]]]:
    """Group items, in their order, into runs that one ranged GET reads: an item joins the
    run before it when it lies in the same pack, at most `max_gap` bytes after it, and
    the run stays within `max_bytes`."""
    runs: list[list[tuple[ChunkId, Location]]] = []
    for cid, loc in items:
        if runs:
            run = runs[-1]
            first, prev = run[0][1], run[-1][1]
            if (loc.pack == prev.pack and 0 <= loc.offset - prev.end <= max_gap
                    and loc.end - first.offset <= max_bytes):
                run.append((cid, loc))
                continue
        runs.append([(cid, loc)])
    return runs


def _sealed(body: bytearray) -> bytes:
    body += blake3.blake3(body).digest()
    return bytes(body)


def _unsealed(data: bytes, what: str, head: int, limit: int) -> memoryview:
    """The body of an index or locator whose trailing checksum matches, else CorruptError."""
    _require(len(data) <= limit, what, f"is {len(data)} bytes, more than its {limit}")
    _require(len(data) >= head + _CHECKSUM, what, f"is truncated ({len(data)} bytes)")
    body = memoryview(data)[:-_CHECKSUM]
    _require(blake3.blake3(body).digest() == data[-_CHECKSUM:], what,
             "fails its checksum (damaged or truncated)")
    return body


def _require(ok: bool, what: str, problem: str) -> None:
    if not ok:
        raise CorruptError(f"{what} {problem}")
