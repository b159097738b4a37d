"""gVisor statefile transcoding: parsing hostile files, the presented form, real restores."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore import transcode
from snapstore.errors import SnapstoreError
from snapstore.export import export
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.transcode import Layout, NotAStatefile, StoredForm, memory_of, present
from tests.conftest import memory_like

BLOCK = 1 << 16


def make_statefile(memory: bytes, block: int = BLOCK, level: int = 6) -> bytes:
    meta = json.dumps({"timestamp": "now"}).encode()
    out = bytearray(transcode.MAGIC + struct.pack(">Q", len(meta)) + meta + bytes(32))
    out += struct.pack(">I", block)
    for i in range(0, len(memory), block):
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        data = c.compress(memory[i : i + block]) + c.flush()
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def stored_and_layout(data: bytes) -> tuple[bytes, Layout]:
    form = StoredForm(io.BytesIO(data))
    stored = form.read()
    return stored, form.layout()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5 * BLOCK + 17), st.integers(0, 2**16))
def test_presented_form_round_trips(size: int, seed: int) -> None:
    memory = memory_like(size + 4096, seed)[:size]
    stored, layout = stored_and_layout(make_statefile(memory))
    presented = b"".join(present(layout, iter([stored[i : i + 9999]
                                                for i in range(0, len(stored), 9999)])))
    assert len(presented) == layout.presented_size()
    again, layout2 = stored_and_layout(presented)
    assert again == stored and layout2 == layout
    assert stored[layout.header_size :] == memory


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_segments_match_the_presented_form(data: st.DataObject) -> None:
    memory = memory_like(3 * BLOCK + 100, 5)
    stored, layout = stored_and_layout(make_statefile(memory))
    presented = b"".join(present(layout, iter([stored])))
    offset = data.draw(st.integers(0, len(presented)))
    size = data.draw(st.integers(0, len(presented) + 10))
    parts = [s if isinstance(s, bytes) else stored[s[0] : s[0] + s[1]]
             for s in layout.segments(offset, size)]
    assert b"".join(parts) == presented[offset : offset + size]


def lying_statefiles() -> list[tuple[str, bytes]]:
    good = make_statefile(memory_like(3 * BLOCK, 7))
    meta_end = 16 + struct.unpack(">Q", good[8:16])[0] + 36
    first_len = struct.unpack(">I", good[meta_end : meta_end + 4])[0]
    bad_inflate = bytearray(good)
    bad_inflate[meta_end + 4 : meta_end + 12] = b"\xff" * 8
    bigger = zlib.compressobj(6, zlib.DEFLATED, -15)
    too_big = bigger.compress(bytes(BLOCK + 1)) + bigger.flush()
    return [
        ("truncated", good[:-100]),
        ("length past end", good[:meta_end] + struct.pack(">I", 1 << 20) + b"x" * 10),
        ("does not inflate", bytes(bad_inflate)),
        ("inflates past block",
         good[:meta_end] + struct.pack(">I", len(too_big)) + too_big),
        ("short block not last", good[:meta_end] + make_statefile(b"ab")[meta_end:]
         + good[meta_end : meta_end + 4 + first_len]),
        ("metadata not json", transcode.MAGIC + struct.pack(">Q", 3) + b"{{{" + bytes(36)),
        ("huge metadata", transcode.MAGIC + struct.pack(">Q", 1 << 40)),
        ("zero block size", good[: meta_end - 4] + bytes(4) + good[meta_end:]),
    ]


@pytest.mark.parametrize(("name", "data"), lying_statefiles())
def test_lying_statefiles_are_refused(name: str, data: bytes) -> None:
    with pytest.raises(NotAStatefile):
        StoredForm(io.BytesIO(data)).read()


@pytest.mark.parametrize(("name", "data"), lying_statefiles())
def test_lying_statefile_is_stored_exact(name: str, data: bytes, store: LocalStore,
                                         tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "img"
    src.mkdir()
    (src / "checkpoint.img").write_bytes(data)
    m = store.get_manifest(ingest(store, src, "x").snapshot)
    assert m.entries[0].form == "exact"
    assert "storing it byte-exact" in capsys.readouterr().err
    export(store, m, tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint.img").read_bytes() == data


def fields(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Where a well-formed statefile's block size field is, and each block's
    (length field offset, length)."""
    at = 16 + struct.unpack(">Q", data[8:16])[0] + 32
    blocks = []
    pos = at + 4
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        blocks.append((pos, n))
        pos += 4 + n
    return at, blocks


def memory_by_the_format(data: bytes) -> bytes | None:
    """The inflated blocks, read as the format (module docstring) defines them, written
    apart from the parser to check it; None where the file breaks a rule."""
    if len(data) < 16 or data[:8] != transcode.MAGIC:
        return None
    at = 16 + struct.unpack(">Q", data[8:16])[0]
    if len(data) < at + 36:
        return None
    try:
        json.loads(data[16:at])
    except ValueError:
        return None
    (block,) = struct.unpack(">I", data[at + 32 : at + 36])
    pos, out, short = at + 36, [], False
    while pos < len(data) and block:
        (n,) = struct.unpack(">I", data[pos : pos + 4].ljust(4, b"\xff"))
        body = data[pos + 4 : pos + 4 + n]
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(body) + d.flush()
        except zlib.error:
            return None
        if short or len(body) != n or not d.eof or d.unused_data or len(raw) > block:
            return None
        short = len(raw) < block
        out.append(raw)
        pos += 4 + n
    return b"".join(out) if block else None


def deflate(raw: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush()


CHANGES = ["none", "metadata length", "metadata", "block size", "block length", "block byte",
           "block padded", "block swap", "block resized", "truncated", "appended"]


@pytest.mark.parametrize("change", CHANGES)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=st.integers(0, 5000), block=st.sampled_from([1, 7, 512, 4096]),
       seed=st.integers(0, 2**16))
def test_parser_survives_garbage(change: str, data: st.DataObject, size: int, block: int,
                                 seed: int) -> None:
    """A statefile runsc could write, changed in one of its fields: refused with
    NotAStatefile (nothing else escapes), or parsed into the header and the memory the
    format defines, with a presented form that parses back to the same."""
    memory = memory_like(size + 4096, seed)[:size]
    good = make_statefile(memory, block=block)
    at, blocks = fields(good)
    f = bytearray(good)
    draw = data.draw
    if change == "metadata length":
        f[8:16] = struct.pack(">Q", draw(st.sampled_from(
            [0, at - 48, at - 46, 2**64 - 1, (16 << 20) + 1])))
    elif change == "metadata":
        f[16:at - 32] = b"{" * (at - 48)
    elif change == "block size":
        f[at : at + 4] = struct.pack(">I", draw(st.sampled_from(
            [0, 1, block - 1, block + 1, 2**32 - 1, (64 << 20) + 1])))
    elif blocks and change in ("block length", "block byte", "block padded", "block resized"):
        pos, n = draw(st.sampled_from(blocks))
        if change == "block length":
            f[pos : pos + 4] = struct.pack(">I", draw(st.sampled_from(
                [0, n - 1 if n else 1, n + 1, 2**32 - 1])))
        elif change == "block byte" and n:
            f[pos + 4 + draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        elif change == "block padded":
            f[pos : pos + 4 + n] = (struct.pack(">I", n + 1) + good[pos + 4 : pos + 4 + n]
                                    + draw(st.binary(min_size=1, max_size=1)))
        elif change == "block resized":
            body = deflate(bytes(draw(st.sampled_from([0, block - 1, block + 1]))))
            f[pos : pos + 4 + n] = struct.pack(">I", len(body)) + body
    elif len(blocks) >= 2 and change == "block swap":
        (p1, n1), (p2, n2) = blocks[-2], blocks[-1]
        f[p1:] = good[p2 : p2 + 4 + n2] + good[p1 : p1 + 4 + n1]
    elif change == "truncated":
        del f[draw(st.integers(0, len(f) - 1)) :]
    elif change == "appended":
        f += draw(st.binary(min_size=1, max_size=20))
    try:
        stored, layout = stored_and_layout(bytes(f))
    except NotAStatefile:
        assert f != good
        return
    assert stored[: layout.header_size] == f[: layout.header_size]
    assert stored[layout.header_size :] == memory_by_the_format(bytes(f))
    assert layout.raw_size == len(stored)
    presented = b"".join(present(layout, iter([stored])))
    assert len(presented) == layout.presented_size()
    assert stored_and_layout(presented) == (stored, layout)
    if f == good:
        assert stored[layout.header_size :] == memory


def test_successive_statefiles_dedup(store: LocalStore, tmp_path: Path) -> None:
    memory = memory_like(4 << 20, 11)
    changed = memory[: 1 << 20] + b"\x01" * 4096 + memory[(1 << 20) + 4096 :]
    for name, mem in (("one", memory), ("two", changed)):
        d = tmp_path / name
        d.mkdir()
        (d / "checkpoint.img").write_bytes(make_statefile(mem, block=1 << 20))
    first = ingest(store, tmp_path / "one", "one")
    second = ingest(store, tmp_path / "two", "two")
    assert second.new_stored_bytes < first.new_stored_bytes * 0.5
    m = store.get_manifest(second.snapshot)
    assert m.entries[0].form == "transcoded"
    export(store, m, tmp_path / "out")
    assert memory_of(tmp_path / "out" / "checkpoint.img")[-len(changed) :] == changed


def test_exact_keeps_the_original_bytes(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "img"
    src.mkdir()
    data = make_statefile(memory_like(BLOCK * 2, 3))
    (src / "checkpoint.img").write_bytes(data)
    m = store.get_manifest(ingest(store, src, "x", transcode=False).snapshot)
    assert m.entries[0].form == "exact"
    export(store, m, tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint.img").read_bytes() == data


def test_not_a_statefile_error_is_a_snapstore_error() -> None:
    assert issubclass(NotAStatefile, SnapstoreError)
