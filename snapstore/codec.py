"""Chunk object encoding: a one-byte codec tag, then the raw or zstd-compressed bytes.

Decoding always checks the result against the chunk id, so no caller can receive bytes
whose hash was not checked.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import zstandard

from snapstore.errors import CorruptError
from snapstore.ids import ChunkId

RAW = 0
ZSTD = 1
ZSTD_LEVEL = 1
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # Compressor objects are not thread safe; one per thread keeps their buffers warm.
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        _local.c = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.d = d
    return d


def encode(raw: bytes | memoryview) -> bytes:
    """Compress `raw`; keep it raw when compression does not shrink it."""
    packed = _compressor().compress(raw)
    if len(packed) < len(raw):
        return bytes((ZSTD,)) + packed
    return bytes((RAW,)) + bytes(raw)


def decode(obj: bytes | memoryview, cid: ChunkId, size: int) -> bytes:
    """Return the raw bytes of chunk `cid`, which must be `size` bytes, or raise CorruptError.

    Decompression is bounded by `size`, so a hostile object cannot inflate without limit.
    """
    return decode_body(tag_of(obj, cid), memoryview(obj)[1:], cid, size)


def decode_body(tag: int, body: bytes | memoryview, cid: ChunkId, size: int) -> bytes:
    """`decode` of an object read as its tag byte and its body: a raw body given as bytes
    is the chunk itself, not copied (a copy that holds the GIL for the whole chunk)."""
    raw = _inflate(tag, body, cid, size)
    if len(raw) != size:
        raise CorruptError(f"chunk {cid} holds {len(raw)} bytes, expected {size}")
    return _checked(raw, cid)


def inflate_into(tag: int, body: bytes | memoryview, cid: ChunkId, out: memoryview) -> None:
    """`decode_body` of a compressed object into `out`, which is as long as the chunk: the
    bytes are inflated in place and hash-checked there, with no chunk-sized allocation and
    no copy after. (A raw object's body is the chunk: read it into place and `check` it.)
    On CorruptError `out` holds bytes that failed the check, or only some bytes: the
    caller must not use them."""
    if tag != ZSTD:
        raise CorruptError(f"object {cid} has unknown codec tag {tag}")
    size = len(out)
    done = 0
    with _zstd_errors(body, cid, size), _decompressor().stream_reader(body) as reader:
        while done < size and (n := reader.readinto(out[done:])):
            done += n
    if done != size:
        raise CorruptError(f"chunk {cid} holds {done} bytes, expected {size}")
    check(out, cid)


def decode_bounded(obj: bytes, cid: ChunkId, limit: int) -> bytes:
    """Like decode, for objects whose size is unknown but at most `limit` (manifests)."""
    return _checked(_inflate(tag_of(obj, cid), memoryview(obj)[1:], cid, limit), cid)


def _checked(raw: bytes, cid: ChunkId) -> bytes:
    check(raw, cid)
    return raw


def check(data: bytes | memoryview, cid: ChunkId) -> None:
    """CorruptError unless `data` hashes to `cid`."""
    if ChunkId.of(data) != cid:
        raise CorruptError(f"object {cid} fails its hash check")


def tag_of(obj: bytes | memoryview, cid: ChunkId) -> int:
    """The codec tag of an object (its first byte); CorruptError for an empty one."""
    if not obj:
        raise CorruptError(f"object {cid} is empty")
    return obj[0]


def _inflate(tag: int, body: bytes | memoryview, cid: ChunkId, limit: int) -> bytes:
    if tag == RAW:
        if len(body) > limit:
            raise CorruptError(f"object {cid} is larger than {limit} bytes")
        return body if isinstance(body, bytes) else bytes(body)
    if tag != ZSTD:
        raise CorruptError(f"object {cid} has unknown codec tag {tag}")
    with _zstd_errors(body, cid, limit):
        return _decompressor().decompress(body, max_output_size=limit)


@contextlib.contextmanager
def _zstd_errors(body: bytes | memoryview, cid: ChunkId, limit: int) -> Iterator[None]:
    """Around the inflating of a zstd body: first refuse a frame whose header declares more
    than `limit` bytes (the header's size is trusted over any output bound), and turn
    zstd's errors into CorruptError."""
    try:
        declared = zstandard.frame_content_size(body)
        if declared > limit:
            raise CorruptError(f"object {cid} declares {declared} bytes, more than {limit}")
        yield
    except zstandard.ZstdError as e:
        raise CorruptError(f"object {cid} does not decompress: {e}") from None
