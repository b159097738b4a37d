"""Pure logic: ids, the chunk codec, the chunker and manifest validation."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapstore import codec, manifest
from snapstore.chunker_params import PAGE, ChunkerParams
from snapstore.chunking import Data, Hole, split
from snapstore.errors import CorruptError, ManifestError
from snapstore.ids import ChunkId
from snapstore.manifest import Entry, Extent, Manifest
from tests.conftest import memory_like

SMALL = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536, hole_min=2 * PAGE)


def rebuild(pieces: list[Data | Hole]) -> bytes:
    return b"".join(p.data if isinstance(p, Data) else bytes(p.size) for p in pieces)


def test_id_forms() -> None:
    cid = ChunkId.of(b"abc")
    assert ChunkId.parse(cid.hex) == cid
    assert cid.hex.startswith(cid.short())
    for bad in ["", "0" * 63, "0" * 65, "G" * 64, "A" * 64, "../" + "0" * 61, 5]:
        with pytest.raises(CorruptError):
            ChunkId.parse(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"x", bytes(100_000), memory_like(300_000, seed=3)])
def test_codec_round_trip(data: bytes) -> None:
    cid = ChunkId.of(data)
    obj = codec.encode(data)
    assert codec.decode(obj, cid, len(data)) == data
    assert len(obj) <= len(data) + 1


def test_incompressible_is_stored_raw() -> None:
    data = os.urandom(1 << 16)
    assert codec.encode(data)[0] == codec.RAW


def test_codec_refuses_bad_objects() -> None:
    data = b"hello world" * 1000
    cid = ChunkId.of(data)
    obj = bytearray(codec.encode(data))
    obj[-3] ^= 0x40
    with pytest.raises(CorruptError):
        codec.decode(bytes(obj), cid, len(data))
    with pytest.raises(CorruptError):
        codec.decode(b"", cid, len(data))
    with pytest.raises(CorruptError):
        codec.decode(b"\x07" + data, cid, len(data))
    with pytest.raises(CorruptError, match="declares"):
        codec.decode(codec.encode(data), cid, len(data) - 1)
    with pytest.raises(CorruptError, match="expected"):
        codec.decode(codec.encode(data), cid, len(data) + 1)


def test_codec_refuses_a_bomb() -> None:
    bomb = bytes((codec.ZSTD,)) + zstandard.ZstdCompressor().compress(bytes(64 << 20))
    with pytest.raises(CorruptError, match="declares"):
        codec.decode(bomb, ChunkId.of(b""), 1 << 20)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 << 20))
    with pytest.raises(CorruptError):
        codec.decode(bytes((codec.ZSTD,)) + unsized, ChunkId.of(b""), 1 << 20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["zero", "rand", "same", "bytes"]),
                          st.integers(1, 40)), max_size=30), st.integers(0, 2**32))
def test_split_round_trips(runs: list[tuple[str, int]], seed: int) -> None:
    parts = []
    for kind, n in runs:
        if kind == "zero":
            parts.append(bytes(n * 1000))
        elif kind == "rand":
            parts.append(memory_like(n * 1000, seed=seed + n)[: n * 1000])
        elif kind == "same":
            parts.append(b"\x01" * (n * 1000))
        else:
            parts.append(bytes([n]) * n)
    blob = b"".join(parts)
    pieces = list(split(io.BytesIO(blob), SMALL))
    assert rebuild(pieces) == blob
    for p in pieces:
        if isinstance(p, Data):
            assert 0 < p.size <= SMALL.max_size
        else:
            assert p.size >= SMALL.hole_min


def test_split_finds_holes_and_respects_sizes() -> None:
    blob = memory_like(8 << 20, seed=5)
    pieces = list(split(io.BytesIO(blob), ChunkerParams()))
    assert rebuild(pieces) == blob
    holes = [p for p in pieces if isinstance(p, Hole)]
    assert holes and sum(h.size for h in holes) > (1 << 20)
    assert all(p.size <= 4 << 20 for p in pieces if isinstance(p, Data))


@pytest.mark.parametrize("shift", [1, 7, 4096, 12345])
def test_shifted_content_dedups(shift: int) -> None:
    blob = memory_like(12 << 20, seed=6)
    first = {ChunkId.of(p.data) for p in split(io.BytesIO(blob), ChunkerParams())
             if isinstance(p, Data)}
    second = [p for p in split(io.BytesIO(b"\xaa" * shift + blob), ChunkerParams())
              if isinstance(p, Data)]
    shared = sum(p.size for p in second if ChunkId.of(p.data) in first)
    assert shared / sum(p.size for p in second) > 0.8


def a_manifest(entries: tuple[Entry, ...]) -> Manifest:
    return Manifest("2026-01-01T00:00:00+00:00", ChunkerParams(), entries, {"k": "v"})


def test_manifest_round_trip() -> None:
    cid = ChunkId.of(b"x")
    m = a_manifest((
        Entry("d", "dir", 0o755, 1),
        Entry("d/f", "file", 0o644, 2, 11, (Extent(cid, 1), Extent(None, 10))),
        Entry("l", "symlink", 0o777, 3, target="d/f"),
    ))
    assert manifest.decode(m.encode()) == m


def doc_with(entries: list[object], **top: object) -> bytes:
    doc = {"format": "snapstore-manifest", "version": 1, "created": "x", "labels": {},
           "chunker": ChunkerParams().to_json(), "entries": entries}
    doc.update(top)
    return json.dumps(doc).encode()


def file_entry(path: str, size: int = 1, extents: object = None) -> dict[str, object]:
    return {"path": path, "type": "file", "mode": 0o644, "mtime_ns": 0, "size": size,
            "extents": extents if extents is not None else [[None, size]] if size else []}


@pytest.mark.parametrize(("bad", "message"), [
    (doc_with([file_entry("/etc/passwd")]), "absolute"),
    (doc_with([file_entry("../x")]), "'..'"),
    (doc_with([file_entry("a/../../x")]), "'..'"),
    (doc_with([file_entry("a\0b")]), "NUL"),
    (doc_with([file_entry("a"), file_entry("a")]), "duplicate"),
    (doc_with([file_entry("a", 10, [[None, 4]])]), "add up"),
    (doc_with([file_entry("a", 1, [["zz", 1]])]), "not a valid id"),
    (doc_with([file_entry("x/a")]), "parent"),
    (doc_with([], version=2), "version 2 is not supported"),
    (doc_with([], format="other"), "not a snapstore manifest"),
    (b'{"format": "snapstore-manifest", "ver', "not valid JSON"),
    (doc_with([{"path": "a", "type": "fifo", "mode": 0, "mtime_ns": 0}]), "unknown entry"),
    (doc_with([file_entry("a", -1)]), "bad size"),
])
def test_manifest_rejects(bad: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest.decode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_manifest_survives_garbage(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        manifest.decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(
    ["path", "type", "mode", "mtime_ns", "size", "extents", "target", "form"]), json_values),
    max_size=5))
def test_manifest_survives_hostile_entries(entries: list[dict[str, object]]) -> None:
    try:
        m = manifest.decode(doc_with(list(entries)))
    except ManifestError:
        return
    for e in m.entries:
        assert not e.path.startswith("/") and ".." not in e.path.split("/")
        assert sum(x.size for x in e.extents) == e.size


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000))
def test_truncated_manifest_is_refused(cut: int) -> None:
    cid = ChunkId.of(b"x")
    good = a_manifest(tuple(
        Entry(f"f{i}", "file", 0o644, 0, 2, (Extent(cid, 1), Extent(None, 1)))
        for i in range(40))).encode()
    if cut >= len(good):
        return
    with pytest.raises(ManifestError):
        manifest.decode(good[:cut])
