"""The parameters that decide where chunk cuts fall, recorded in each manifest.

Apart from the chunker itself (snapstore.chunking) so that reading a manifest does not
import numpy and pyfastcdc: every command that only reads snapshots starts faster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PAGE = 4096


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """Everything that decides where cuts fall; recorded in each manifest."""

    min_size: int = 256 << 10
    avg_size: int = 1 << 20
    max_size: int = 4 << 20
    hole_min: int = 64 << 10
    algorithm: str = "fastcdc2020"

    def __post_init__(self) -> None:
        if not 64 <= self.min_size <= self.avg_size <= self.max_size <= 16 << 20:
            raise ValueError("chunk sizes must satisfy 64 <= min <= avg <= max <= 16 MiB")
        if self.hole_min < PAGE or self.hole_min % PAGE:
            raise ValueError(f"hole_min must be a positive multiple of {PAGE}")

    def to_json(self) -> dict[str, int | str]:
        return asdict(self)
