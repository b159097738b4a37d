"""Chunk object encoding: a one-byte codec tag, then the raw or zstd-compressed bytes.

Decoding always checks the result against the chunk id, so no caller can receive bytes
whose hash was not checked.
"""

from __future__ import annotations

import threading

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
    raw = _inflate(obj, cid, size)
    if len(raw) != size:
        raise CorruptError(f"chunk {cid} holds {len(raw)} bytes, expected {size}")
    return _checked(raw, cid)


def decode_bounded(obj: bytes, cid: ChunkId, limit: int) -> bytes:
    """Like decode, for objects whose size is unknown but at most `limit` (manifests)."""
    return _checked(_inflate(obj, cid, limit), cid)


def _checked(raw: bytes, cid: ChunkId) -> bytes:
    if ChunkId.of(raw) != cid:
        raise CorruptError(f"object {cid} fails its hash check")
    return raw


def _inflate(obj: bytes | memoryview, cid: ChunkId, limit: int) -> bytes:
    if not obj:
        raise CorruptError(f"object {cid} is empty")
    tag, body = obj[0], memoryview(obj)[1:]
    if tag == RAW:
        if len(body) > limit:
            raise CorruptError(f"object {cid} is larger than {limit} bytes")
        return bytes(body)
    if tag != ZSTD:
        raise CorruptError(f"object {cid} has unknown codec tag {tag}")
    try:
        # The frame header's size is trusted over max_output_size: check it first.
        declared = zstandard.frame_content_size(body)
        if declared > limit:
            raise CorruptError(f"object {cid} declares {declared} bytes, more than {limit}")
        return _decompressor().decompress(body, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise CorruptError(f"object {cid} does not decompress: {e}") from None
