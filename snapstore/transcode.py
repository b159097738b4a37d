"""gVisor statefiles: see through their compression on ingest, rebuild them on read.

The Debian runsc writes `checkpoint.img` as
  "gVisorSF" | metadata length (8 B BE) | JSON metadata | 32-byte HMAC |
  block size (4 B BE) | repeated [length (4 B BE) | raw deflate of one block]
where every block but the last inflates to exactly the block size. Deflated blocks of two
checkpoints of one process share almost no bytes, while the memory inside them does.

snapstore stores such a file *transcoded*: its stored form is the header (everything up to
and including the block size field) followed by the inflated blocks, which the chunker
dedups like raw memory. What a reader gets back is the *presented* form: the same header,
then each block as [length | the block in deflate "stored" (uncompressed) blocks]. This
runsc restores from that form; it is a pure function of the stored form, so any byte range
of it can be computed from a byte range of the stored form (`segments`).

This is a stored form of the engine, not gVisor runtime code: every reader of a store (a
mount, `export`) rebuilds the presented form whatever runtime wrote the snapshot, and
`ingest` transcodes any statefile it meets.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from snapstore.errors import SnapstoreError

MAGIC = b"gVisorSF"
KIND = "gvisor-statefile"
_MAX_METADATA = 16 << 20
_MAX_BLOCK = 64 << 20
_STORED_MAX = 0xFFFF  # largest deflate stored block
_STORED_HEADER = 5


class NotAStatefile(SnapstoreError):
    """The bytes are not a statefile this code can transcode (or they lie about it)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """What a transcoded file's manifest entry records to rebuild the presented form."""

    header_size: int
    block_size: int
    raw_size: int  # bytes of the stored form: header + inflated blocks

    @property
    def data_size(self) -> int:
        return self.raw_size - self.header_size

    def block_count(self) -> int:
        return -(-self.data_size // self.block_size)

    def presented_size(self) -> int:
        full, last = divmod(self.data_size, self.block_size)
        size = self.header_size + full * _framed(self.block_size)
        return size + (_framed(last) if last else 0)

    def to_json(self) -> dict[str, int | str]:
        return {"kind": KIND, "header_size": self.header_size, "block_size": self.block_size,
                "raw_size": self.raw_size}

    def segments(self, offset: int, size: int) -> Iterator[bytes | tuple[int, int]]:
        """The presented bytes [offset, offset+size) as literal bytes and (stored offset,
        length) ranges of the stored form, in order; the ranges are ascending and
        contiguous, so a sequential reader of the stored form can serve them."""
        end = min(offset + size, self.presented_size())
        head = self.header_size
        if offset < head and end > offset:
            yield (offset, min(end, head) - offset)
        framed = _framed(self.block_size)
        index = max(0, offset - head) // framed
        while True:
            block_start = head + index * framed
            raw_start = head + index * self.block_size
            if block_start >= end or raw_start >= self.raw_size:
                return
            block_len = min(self.block_size, self.raw_size - raw_start)
            for is_literal, at, length, value in _frame_map(block_len):
                lo = block_start + at
                hi = lo + length
                if hi <= offset or lo >= end:
                    continue
                a, b = max(lo, offset) - lo, min(hi, end) - lo
                if is_literal:
                    yield value[a:b]  # type: ignore[index]
                else:
                    yield (raw_start + int(value) + a, b - a)
            index += 1


def _framed(n: int) -> int:
    """Size of one presented block holding n inflated bytes: length field + stored deflate."""
    pieces = max(1, -(-n // _STORED_MAX))
    return 4 + n + _STORED_HEADER * pieces


@functools.lru_cache(maxsize=8)
def _frame_map(n: int) -> tuple[tuple[bool, int, int, bytes | int], ...]:
    """The layout of one presented block: (literal?, position in the presented block,
    length, literal bytes or offset into the inflated block)."""
    out: list[tuple[bool, int, int, bytes | int]] = []
    out.append((True, 0, 4, struct.pack(">I", _framed(n) - 4)))
    at, done = 4, 0
    while True:
        m = min(_STORED_MAX, n - done)
        final = done + m >= n
        header = bytes((1 if final else 0,)) + struct.pack("<HH", m, m ^ 0xFFFF)
        out.append((True, at, _STORED_HEADER, header))
        at += _STORED_HEADER
        if m:
            out.append((False, at, m, done))
        at += m
        done += m
        if final:
            return tuple(out)


def read_header(f: BinaryIO) -> tuple[bytes, int]:
    """Parse the header at the start of `f`; returns its bytes and the block size."""
    start = f.read(16)
    if len(start) < 16 or start[:8] != MAGIC:
        raise NotAStatefile("no gVisor statefile magic")
    (meta_len,) = struct.unpack(">Q", start[8:16])
    if meta_len > _MAX_METADATA:
        raise NotAStatefile(f"metadata length {meta_len} is implausible")
    rest = f.read(meta_len + 32 + 4)
    if len(rest) != meta_len + 36:
        raise NotAStatefile("truncated header")
    try:
        json.loads(rest[:meta_len])
    except ValueError:
        raise NotAStatefile("metadata is not JSON") from None
    (block,) = struct.unpack(">I", rest[-4:])
    if not 0 < block <= _MAX_BLOCK:
        raise NotAStatefile(f"block size {block} is implausible")
    return start + rest, block


def inflate_blocks(f: BinaryIO, block: int) -> Iterator[bytes]:
    """Yield the inflated blocks that follow the header, checking every claim on the way:
    lengths inside the file, each block a complete deflate stream of exactly `block` bytes
    (the last at most that), nothing after the last."""
    short_seen = False
    while True:
        field = f.read(4)
        if not field:
            return
        if len(field) != 4:
            raise NotAStatefile("truncated block length")
        (length,) = struct.unpack(">I", field)
        if length > block + (block >> 4) + 1024:
            raise NotAStatefile(f"block length {length} is implausible")
        data = f.read(length)
        if len(data) != length:
            raise NotAStatefile("block runs past the end of the file")
        if short_seen:
            raise NotAStatefile("a short block is not the last one")
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(data, block + 1)
        except zlib.error as e:
            raise NotAStatefile(f"block does not inflate: {e}") from None
        if len(raw) > block or d.unconsumed_tail or not d.eof or d.unused_data:
            raise NotAStatefile("block inflates past the block size or is not one stream")
        if len(raw) < block:
            short_seen = True
        yield raw


class StoredForm(io.RawIOBase):
    """The stored form of a statefile as a readable stream: header, then inflated blocks.
    Any inconsistency raises NotAStatefile from `readinto`."""

    def __init__(self, f: BinaryIO) -> None:
        self.header, self.block_size = read_header(f)
        self._blocks = inflate_blocks(f, self.block_size)
        self._buf = memoryview(self.header)
        self.raw_size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._blocks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.raw_size += n
        return n

    def layout(self) -> Layout:
        return Layout(len(self.header), self.block_size, self.raw_size)


def memory_of(path: Path) -> bytes:
    """The stored form of a statefile: what two restorable forms of it have in common."""
    with path.open("rb") as f:
        return StoredForm(f).read()


def present(layout: Layout, stored: Iterator[bytes], window: int = 4 << 20) -> Iterator[bytes]:
    """The presented form, given the stored form as consecutive byte strings."""
    source = _Concat(stored)
    total = layout.presented_size()
    for pos in range(0, total, window):
        parts = [seg if isinstance(seg, bytes) else source.read(seg[1])
                 for seg in layout.segments(pos, window)]
        yield b"".join(parts)


class _Concat:
    """Exact-size reads from a sequence of byte strings."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts = parts
        self._buf = memoryview(b"")

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if not self._buf:
                nxt = next(self._parts, None)
                if nxt is None:
                    raise NotAStatefile("stored form is shorter than its layout says")
                self._buf = memoryview(nxt)
            take = min(n - len(out), len(self._buf))
            out += self._buf[:take]
            self._buf = self._buf[take:]
        return bytes(out)
