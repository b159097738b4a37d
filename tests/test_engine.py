"""Pure logic: ids, the chunk codec, the chunker and manifest validation."""

from __future__ import annotations

import copy
import io
import json
import os
from typing import Any

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
from snapstore.transcode import Layout
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


names = st.text(st.sampled_from("ab.-_\u00e9 "), min_size=1, max_size=3).filter(
    lambda n: n not in (".", ".."))


@st.composite
def valid_manifests(draw: st.DrawFn) -> Manifest:
    """Any manifest a writer could make: nested directories, files (exact, sparse,
    transcoded), symlinks, any mtime a file can have, labels. At least one entry of
    each kind, so that a change aimed at one always finds one."""
    cid = ChunkId.of(b"chunk")
    entries: dict[str, Entry] = {}
    wanted = [(["~" + k], k) for k in ("file", "dir", "symlink", "transcoded")]
    drawn = draw(st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.sampled_from(
        ["file", "dir", "symlink", "transcoded"])), max_size=6))
    for parts, kind in drawn + wanted:
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if entries.get(d, Entry(d, "dir", 0, 0)).kind != "dir":
                break
            entries.setdefault(d, Entry(d, "dir", draw(st.integers(0, 0o7777)), 0))
        else:
            path = "/".join(parts)
            if path in entries:
                continue
            mode = draw(st.integers(0, 0o7777))
            mtime = draw(st.integers(manifest.MIN_MTIME_NS, manifest.MAX_MTIME_NS))
            if kind == "file":
                extents = tuple(Extent(cid if data else None, n) for data, n in draw(
                    st.lists(st.tuples(st.booleans(), st.integers(1, manifest.MAX_CHUNK)),
                             min_size=1, max_size=3)))
                size = sum(x.size for x in extents)
                entries[path] = Entry(path, "file", mode, mtime, size, extents)
            elif kind == "transcoded":
                head = draw(st.integers(0, 100))
                layout = Layout(head, draw(st.integers(1, 1 << 20)),
                                head + draw(st.integers(0, 3 << 20)))
                extents = (Extent(None, layout.raw_size),) if layout.raw_size else ()
                entries[path] = Entry(path, "file", mode, mtime, layout.presented_size(),
                                      extents, form="transcoded", layout=layout)
            elif kind == "symlink":
                entries[path] = Entry(path, "symlink", mode, mtime,
                                      target=draw(st.text(min_size=1, max_size=9).filter(
                                          lambda t: "\0" not in t)))
            else:
                entries[path] = Entry(path, "dir", mode, mtime)
    labels = draw(st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5),
                                  max_size=4))
    return Manifest("2026-01-01T00:00:00+00:00", ChunkerParams(),
                    tuple(sorted(entries.values(), key=lambda e: e.path.split("/"))), labels)


def assert_sound(m: Manifest) -> None:
    """What every reader relies on in a manifest that decoded."""
    kinds: dict[str, str] = {}
    for e in m.entries:
        parts = e.path.split("/")
        assert e.path not in kinds and "\0" not in e.path and len(e.path) <= manifest.MAX_TEXT
        assert all(p not in ("", ".", "..") for p in parts)
        parent = e.path.rpartition("/")[0]
        assert not parent or kinds.get(parent) == "dir"
        kinds[e.path] = e.kind
        assert type(e.mode) is int and 0 <= e.mode <= 0o7777
        assert type(e.mtime_ns) is int
        assert manifest.MIN_MTIME_NS <= e.mtime_ns <= manifest.MAX_MTIME_NS
        assert e.kind in ("file", "dir", "symlink")
        assert all(type(x.size) is int and x.size > 0 for x in e.extents)
        assert all(x.size <= manifest.MAX_CHUNK for x in e.extents if x.chunk is not None)
        stored = sum(x.size for x in e.extents)
        if e.form == "transcoded":
            assert e.layout is not None and e.layout.block_size > 0
            assert 0 <= e.layout.header_size <= e.layout.raw_size
            assert stored == e.layout.raw_size and e.size == e.layout.presented_size()
        else:
            assert e.form == "exact" and e.layout is None and stored == e.size
        if e.kind == "symlink":
            assert e.target and "\0" not in e.target and len(e.target) <= manifest.MAX_TEXT
        if e.kind != "file":
            assert not e.extents
    assert len(m.labels) <= manifest.MAX_LABELS
    assert all(type(k) is str and 0 < len(k) <= manifest.MAX_TEXT and type(v) is str
               and len(v) <= manifest.MAX_TEXT for k, v in m.labels.items())


HOSTILE_PATH: list[object] = ["", "/abs", "..", ".", "../x", "a/..", "a/./b", "a//b", "a/",
                              "a\0b", "x" * 5000, None, 7]
HOSTILE_SIZE: list[object] = [-1, 0, 1, 2**62 + 1, manifest.MAX_CHUNK + 1, 2**200, True, 1.5,
                              "1", None]
HOSTILE_OTHER: list[object] = [None, [], {}, [None, 1], ["z" * 64, 1], {"kind": "x"}, 0, -1,
                               "", "x" * 5000, True]
# Each place a change is aimed at, and what it may become there.
HOSTILE_AT: dict[str, list[object]] = {
    "path": HOSTILE_PATH,
    "target": HOSTILE_PATH,
    "mtime_ns": [manifest.MIN_MTIME_NS - 1, manifest.MAX_MTIME_NS + 1, -(2**200), 1.5, True,
                 "0", None],
    "mode": [-1, 0o10000, True, 1.5, "420", None],
    "type": ["fifo", "File", "", "file", "dir", "symlink", None],
    "form": ["exact", "transcoded", "", "raw", None],
    "size": HOSTILE_SIZE,
    "extent size": HOSTILE_SIZE,
    "extent id": ["z" * 64, "A" * 64, "0" * 63, "", "../" + "0" * 61, 5, [], None],
    "extent": [*HOSTILE_OTHER, [None, 1, 2], [None], []],
    "transcode": ["header_size", "block_size", "raw_size", "kind"],
    "labels": ["too many", "long key", "long value", "empty key", "not text"],
    "order": ["repeat", "first", "last"],
    "top": ["format", "version", "created", "chunker", "entries", "labels"],
}


def aim(doc: dict[str, Any], at: str, data: st.DataObject) -> None:
    """Change `doc` at one place of the kind `at` (a key of HOSTILE_AT)."""
    entries: list[dict[str, Any]] = doc["entries"]
    pick = copy.deepcopy(data.draw(st.sampled_from(HOSTILE_AT[at])))
    if at in ("path", "mtime_ns", "mode", "type"):
        data.draw(st.sampled_from(entries))[at] = pick
    elif at == "target":
        data.draw(st.sampled_from([e for e in entries if e["type"] == "symlink"]))[at] = pick
    elif at in ("form", "size"):
        data.draw(st.sampled_from([e for e in entries if e["type"] == "file"]))[at] = pick
    elif at.startswith("extent"):
        files = [e for e in entries if e["type"] == "file" and e["extents"]]
        file = data.draw(st.sampled_from(files))
        extents = file["extents"]
        i = data.draw(st.integers(0, len(extents) - 1))
        if at == "extent":
            extents[i] = pick
        elif at == "extent id":
            extents[i][0] = pick
        else:
            if type(pick) is int and file["form"] == "exact":
                # The size follows, so that the extent's own check is what must refuse it.
                file["size"] += pick - extents[i][1]
            extents[i][1] = pick
    elif at == "transcode":
        layout = data.draw(st.sampled_from([e for e in entries if "transcode" in e]))
        layout["transcode"][pick] = data.draw(st.sampled_from(
            ["gvisor-statefile2", "", None] if pick == "kind" else HOSTILE_SIZE))
    elif at == "labels":
        key = "" if pick == "empty key" else "k" * 4097 if pick == "long key" else "k"
        doc["labels"][key] = 5 if pick == "not text" else "v" * 4097 \
            if pick == "long value" else "v"
        if pick == "too many":
            doc["labels"].update({f"k{i}": "" for i in range(manifest.MAX_LABELS + 1)})
    elif at == "order":
        i = data.draw(st.integers(0, len(entries) - 1))
        if pick == "repeat":
            entries.insert(i, copy.deepcopy(entries[i]))
        else:
            entries.insert(0 if pick == "first" else len(entries), entries.pop(i))
    else:
        doc[str(pick)] = copy.deepcopy(data.draw(st.sampled_from(HOSTILE_OTHER)))


@pytest.mark.parametrize("at", sorted(HOSTILE_AT))
@settings(max_examples=60, deadline=None)
@given(m=valid_manifests(), data=st.data())
def test_manifest_survives_garbage(at: str, m: Manifest, data: st.DataObject) -> None:
    """Every manifest a writer makes reads back equal; one changed (at each kind of
    place in turn) is refused with a ManifestError, or decodes to a sound manifest that
    re-encodes to itself."""
    raw = m.encode()
    assert manifest.decode(raw) == m
    doc = json.loads(raw)
    aim(doc, at, data)
    try:
        got = manifest.decode(json.dumps(doc).encode())
    except ManifestError:
        return
    assert_sound(got)
    assert manifest.decode(got.encode()) == got


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
