"""The pack format: building packs, and indexes and locators read as hostile input."""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapstore import codec
from snapstore.errors import CorruptError
from snapstore.ids import ChunkId
from snapstore.remote.packs import (
    MAX_INDEX_BYTES,
    Location,
    Locator,
    PackIndex,
    build_pack,
    coalesce,
    decode_index,
    decode_locator,
    encode_locator,
    locator_max_bytes,
    plan_packs,
)


def chunks(n: int) -> list[tuple[ChunkId, bytes]]:
    out = []
    for i in range(n):
        raw = bytes([i]) * (1000 + i) + i.to_bytes(4, "big")
        out.append((ChunkId.of(raw), codec.encode(raw)))
    return out


def seal(body: bytes) -> bytes:
    """A body with a valid checksum, to reach the checks behind it."""
    return body + blake3.blake3(body).digest()


def test_a_pack_is_its_chunks_back_to_back_and_its_index_reads_back() -> None:
    objs = chunks(5)
    pack = build_pack(objs)
    assert pack.data == b"".join(o for _, o in objs) and pack.pack == ChunkId.of(pack.data)
    index = decode_index(pack.index, pack.pack)
    assert index.size == len(pack.data) and index.chunks == pack.chunks
    for (cid, obj), (cid2, at) in zip(objs, index.chunks, strict=True):
        assert cid == cid2 and pack.data[at.offset : at.end] == obj


def test_plan_packs_closes_at_the_target_in_order() -> None:
    items = [(ChunkId.of(bytes([i])), 300) for i in range(10)]
    plan = plan_packs(items, 1000)
    assert [len(p) for p in plan] == [4, 4, 2]
    assert [c for p in plan for c in p] == [c for c, _ in items]
    assert plan_packs([], 1000) == []


def _index_body(pack: ChunkId, size: int, entries: list[tuple[bytes, int, int]],
                count: int | None = None, magic: bytes = b"SNAPIDX\x01") -> bytes:
    head = struct.pack(">8s32sQI", magic, pack.digest, size,
                       len(entries) if count is None else count)
    return head + b"".join(struct.pack(">32sQI", *e) for e in entries)


def _hostile_indexes() -> list[tuple[str, bytes, str]]:
    p = ChunkId.of(b"pack")
    a, b = ChunkId.of(b"a").digest, ChunkId.of(b"b").digest
    good = _index_body(p, 20, [(a, 0, 10), (b, 10, 10)])
    return [
        ("empty", b"", "truncated"),
        ("truncated", seal(good)[:-1], "checksum"),
        ("flipped", seal(good[:-1] + bytes([good[-1] ^ 1]))[:-32] + seal(good)[-32:],
         "checksum"),
        ("too large", b"\x00" * (MAX_INDEX_BYTES + 1), "more than"),
        ("magic", seal(_index_body(p, 20, [(a, 0, 20)], magic=b"SNAPLOC\x01")), "not a pack"),
        ("other pack", seal(_index_body(ChunkId.of(b"x"), 20, [(a, 0, 20)])), "another pack"),
        ("huge count", seal(_index_body(p, 20, [(a, 0, 20)], count=2**32 - 1)), "declares"),
        ("count short", seal(_index_body(p, 20, [(a, 0, 10), (b, 10, 10)], count=1)),
         "declares"),
        ("zero pack", seal(_index_body(p, 0, [])), "pack of 0 bytes"),
        ("gap", seal(_index_body(p, 20, [(a, 0, 9), (b, 10, 10)])), "gap or overlap"),
        ("overlap", seal(_index_body(p, 20, [(a, 0, 11), (b, 10, 10)])), "gap or overlap"),
        ("beyond", seal(_index_body(p, 20, [(a, 0, 10), (b, 10, 11)])), "covers 21"),
        ("short", seal(_index_body(p, 20, [(a, 0, 10)])), "covers 10"),
        ("tiny chunk", seal(_index_body(p, 1, [(a, 0, 1)])), "chunk of 1 bytes"),
        ("huge chunk", seal(_index_body(p, 1 << 25, [(a, 0, 1 << 25)])), "chunk of"),
        ("twice", seal(_index_body(p, 20, [(a, 0, 10), (a, 10, 10)])), "twice"),
    ]


@pytest.mark.parametrize(("name", "data", "message"), _hostile_indexes(),
                         ids=[c[0] for c in _hostile_indexes()])
def test_hostile_indexes_are_refused(name: str, data: bytes, message: str) -> None:
    with pytest.raises(CorruptError, match=message) as e:
        decode_index(data, ChunkId.of(b"pack"))
    assert "\n" not in str(e.value) and str(e.value).startswith("index of pack")


def _loc_body(snap: ChunkId, packs: list[tuple[bytes, int]],
              entries: list[tuple[bytes, int, int, int]], counts: tuple[int, int] | None = None
              ) -> bytes:
    npacks, count = counts or (len(packs), len(entries))
    return (struct.pack(">8s32sII", b"SNAPLOC\x01", snap.digest, npacks, count)
            + b"".join(struct.pack(">32sQ", *p) for p in packs)
            + b"".join(struct.pack(">32sIQI", *e) for e in entries))


def _hostile_locators() -> list[tuple[str, bytes, str]]:
    s = ChunkId.of(b"snap")
    p, q = ChunkId.of(b"p").digest, ChunkId.of(b"q").digest
    a, b, c = (ChunkId.of(x).digest for x in (b"a", b"b", b"c"))
    good = _loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 0, 10, 10)])
    return [
        ("empty", b"", "truncated"),
        ("truncated", seal(good)[:-1], "checksum"),
        ("too large", b"\x00" * (locator_max_bytes(2) + 1), "more than"),
        ("other snapshot", seal(_loc_body(ChunkId.of(b"x"), [(p, 30)],
                                          [(a, 0, 0, 10), (b, 0, 10, 10)])), "another"),
        ("huge counts", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 0, 10, 10)],
                                       counts=(2**32 - 1, 2**32 - 1))), "declares"),
        ("fewer chunks", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10)])), "declares 1"),
        ("body short", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10)], counts=(1, 2))),
         "bytes for"),
        ("pack number", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 1, 10, 10)])),
         "pack number 1"),
        ("beyond pack", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 0, 25, 10)])),
         "beyond its pack"),
        ("offset wraps", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 0, 2**64 - 5, 10)])),
         "beyond its pack"),
        ("overlap", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (b, 0, 5, 10)])),
         "overlapping"),
        ("out of order", seal(_loc_body(s, [(p, 30)], [(a, 0, 10, 10), (b, 0, 0, 10)])),
         "out of order"),
        ("foreign chunk", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (c, 0, 10, 10)])),
         "not the snapshot's"),
        ("twice", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 10), (a, 0, 10, 10)])), "twice"),
        ("pack twice", seal(_loc_body(s, [(p, 30), (p, 30)],
                                      [(a, 0, 0, 10), (b, 1, 0, 10)])), "pack twice"),
        ("unused pack", seal(_loc_body(s, [(p, 30), (q, 30)],
                                       [(a, 0, 0, 10), (b, 0, 10, 10)])), "none of its"),
        ("zero pack", seal(_loc_body(s, [(p, 0)], [(a, 0, 0, 10), (b, 0, 10, 10)])),
         "pack of 0"),
        ("tiny chunk", seal(_loc_body(s, [(p, 30)], [(a, 0, 0, 1), (b, 0, 10, 10)])),
         "chunk of 1 bytes"),
    ]


@pytest.mark.parametrize(("name", "data", "message"), _hostile_locators(),
                         ids=[c[0] for c in _hostile_locators()])
def test_hostile_locators_are_refused(name: str, data: bytes, message: str) -> None:
    wanted = {ChunkId.of(b"a"), ChunkId.of(b"b")}
    with pytest.raises(CorruptError, match=message) as e:
        decode_locator(data, ChunkId.of(b"snap"), wanted)
    assert "\n" not in str(e.value) and str(e.value).startswith("locator of snapshot")


def test_a_locator_reads_back() -> None:
    objs = chunks(6)
    one, two = build_pack(objs[:4]), build_pack(objs[4:])
    where = dict(one.chunks[1:]) | dict(two.chunks)
    loc = Locator(ChunkId.of(b"snap"), {one.pack: len(one.data), two.pack: len(two.data)},
                  where)
    data = encode_locator(loc)
    assert len(data) <= locator_max_bytes(len(where))
    assert decode_locator(data, loc.snapshot, set(where)) == loc
    with pytest.raises(CorruptError, match="declares 5 chunks"):
        decode_locator(data, loc.snapshot, set(where) | {objs[0][0]})


@given(st.binary(max_size=400), st.integers(0, 400))
def test_mangled_objects_never_decode_to_anything_else(junk: bytes, cut: int) -> None:
    """Any bytes are either refused with CorruptError or decode to a consistent object."""
    objs = chunks(3)
    pack = build_pack(objs)
    attempts: list[Callable[[], object]] = [
        lambda: decode_index(pack.index[:cut] + junk, pack.pack),
        lambda: decode_index(seal(junk), pack.pack),
        lambda: decode_locator(seal(junk), pack.pack, {c for c, _ in objs}),
    ]
    for attempt in attempts:
        try:
            got = attempt()
        except CorruptError:
            continue
        assert isinstance(got, PackIndex) and got.chunks == pack.chunks


def test_coalesce_joins_neighbours_of_one_pack_within_bounds() -> None:
    p, q = ChunkId.of(b"p"), ChunkId.of(b"q")
    ids = [ChunkId.of(bytes([i])) for i in range(6)]
    items = [(ids[0], Location(p, 0, 10)), (ids[1], Location(p, 10, 10)),
             (ids[2], Location(p, 25, 10)), (ids[3], Location(q, 35, 10)),
             (ids[4], Location(q, 45, 10)), (ids[5], Location(q, 0, 10))]
    runs = coalesce(items, max_bytes=100)
    assert [[c for c, _ in r] for r in runs] == [ids[:2], [ids[2]], ids[3:5], [ids[5]]]
    assert [len(r) for r in coalesce(items, max_bytes=100, max_gap=5)] == [3, 2, 1]
    assert [len(r) for r in coalesce(items, max_bytes=15, max_gap=5)] == [1, 1, 1, 1, 1, 1]
