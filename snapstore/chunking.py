"""Content-defined chunking of a byte stream into data chunks and zero holes.

Cut points are byte granular (FastCDC 2020 via pyfastcdc), so content shifted by any
number of bytes still dedups. Page-aligned runs of zero bytes of at least `hole_min`
bytes become holes and are never stored; shorter zero runs stay inside chunks, where
zstd shrinks a zero page to a few bytes (docs/format.md says why the threshold exists).
Memory stays bounded: at most one read window plus one max-size chunk is buffered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np
from pyfastcdc import FastCDC

PAGE = 4096
WINDOW = 16 << 20


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


@dataclass(frozen=True, slots=True)
class Hole:
    size: int


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


Piece = Hole | Data


class _Splitter:
    """Takes the stream as data runs and zero runs in file order; yields finished pieces.

    A zero run is only known to be a hole once it ends (or reaches the end of the
    stream), so its length is counted, not buffered.
    """

    def __init__(self, params: ChunkerParams) -> None:
        self._cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size)
        self._flush_at = WINDOW + params.max_size
        self._hole_min = params.hole_min
        self._pending = bytearray()
        self._zeros = 0

    def zeros(self, n: int) -> None:
        self._zeros += n

    def data(self, view: memoryview) -> Iterator[Piece]:
        if self._zeros >= self._hole_min:
            # Holes end at the exact first and last non-zero bytes, not at page edges,
            # so the data between two holes is the same bytes whatever its alignment.
            self._zeros += _strip_trailing_zeros(self._pending)
            yield from self._cut(final=True)
            lead = _leading_zeros(view)
            yield Hole(self._zeros + lead)
            view = view[lead:]
        elif self._zeros:
            self._pending += bytes(self._zeros)
        self._zeros = 0
        self._pending += view
        if len(self._pending) >= self._flush_at:
            yield from self._cut(final=False)

    def end(self) -> Iterator[Piece]:
        if self._zeros >= self._hole_min:
            self._zeros += _strip_trailing_zeros(self._pending)
            yield from self._cut(final=True)
            yield Hole(self._zeros)
        else:
            self._pending += bytes(self._zeros)
            yield from self._cut(final=True)
        self._zeros = 0

    def _cut(self, final: bool) -> Iterator[Piece]:
        if not self._pending:
            return
        with memoryview(self._pending) as buf:
            lengths = [c.length for c in self._cdc.cut_buf(buf)]
            if not final:
                # The last cut of a buffer may be forced by its end: redo it with more data.
                lengths.pop()
            pieces = []
            offset = 0
            for n in lengths:
                pieces.append(Data(bytes(buf[offset : offset + n])))
                offset += n
        del self._pending[:offset]
        yield from pieces


def _leading_zeros(view: memoryview) -> int:
    """Zero bytes at the start of a data run (fewer than a page: its first page is not zero)."""
    head = np.frombuffer(view[:PAGE], dtype=np.uint8)
    return int(np.argmax(head != 0))


def _strip_trailing_zeros(buf: bytearray) -> int:
    """Drop the zero bytes at the end of `buf` (fewer than a page) and return their count."""
    if not buf:
        return 0
    tail = np.frombuffer(memoryview(buf)[-PAGE:], dtype=np.uint8)
    n = int(np.argmax(tail[::-1] != 0))
    del tail
    if n:
        del buf[-n:]
    return n


def split(f: BinaryIO, params: ChunkerParams) -> Iterator[Piece]:
    """Split the rest of `f` into pieces whose sizes add up to its length."""
    splitter = _Splitter(params)
    buf = bytearray(WINDOW)
    view = memoryview(buf)
    while n := f.readinto(view):  # type: ignore[attr-defined]
        yield from _classify(splitter, view[:n])
    yield from splitter.end()


def _classify(splitter: _Splitter, window: memoryview) -> Iterator[Piece]:
    """Hand one window to the splitter as alternating runs of zero and non-zero pages."""
    full = len(window) // PAGE * PAGE
    pages = np.frombuffer(window[:full], dtype=np.uint64).reshape(-1, PAGE // 8)
    flags = [bool(x) for x in np.any(pages, axis=1).tolist()]
    if full < len(window):
        flags.append(any(window[full:]))
    nonzero = np.array(flags, dtype=np.int8)
    # Indices where the page kind flips give the run boundaries.
    edges: list[int] = (np.flatnonzero(np.diff(nonzero)) + 1).tolist()
    starts = [0, *edges]
    ends = [*edges, len(flags)]
    for s, e in zip(starts, ends, strict=True):
        lo, hi = s * PAGE, min(e * PAGE, len(window))
        if flags[s]:
            yield from splitter.data(window[lo:hi])
        else:
            splitter.zeros(hi - lo)
