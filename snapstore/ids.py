"""Content ids: the BLAKE3 digest of a chunk's or manifest's bytes, as a value type."""

from __future__ import annotations

import re
from dataclasses import dataclass

import blake3

from snapstore.errors import CorruptError

ID_BYTES = 32
_HEX_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, order=True)
class ChunkId:
    """A 32-byte BLAKE3 digest. Its text form is 64 lowercase hex digits."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != ID_BYTES:
            raise ValueError(f"an id is {ID_BYTES} bytes, got {len(self.digest)}")

    @classmethod
    def parse(cls, text: str) -> ChunkId:
        """Parse the exact 64-hex-digit form; anything else is refused (ids become paths)."""
        if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
            raise CorruptError(f"not a valid id: {text!r:.80}")
        return cls(bytes.fromhex(text))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ChunkId:
        """Hash `data` (the GIL is released, so callers hash in parallel threads)."""
        return cls(blake3.blake3(data).digest())

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def short(self) -> str:
        return self.digest[:6].hex()

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"ChunkId({self.short()})"


def is_valid_hex_id(text: str) -> bool:
    return bool(_HEX_RE.fullmatch(text))
