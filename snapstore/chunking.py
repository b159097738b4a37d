"""Content-defined chunking of a byte stream into data chunks and zero holes.

Cut points are byte granular (FastCDC 2020 via pyfastcdc), so content shifted by any
number of bytes still dedups. Page-aligned runs of zero bytes of at least `hole_min`
bytes become holes and are never stored; shorter zero runs stay inside chunks, where
zstd shrinks a zero page to a few bytes (docs/format.md says why the threshold exists).
Memory stays bounded: at most one read window plus one max-size chunk is buffered, and
no more than the file holds: a small file costs buffers of its size, not the 52 MiB a
large one gets.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pyfastcdc import FastCDC

from snapstore.chunker_params import PAGE, ChunkerParams

WINDOW = 16 << 20


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

    def __init__(self, params: ChunkerParams, window: int, size: int | None) -> None:
        self._cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size)
        self._flush_at = WINDOW + params.max_size
        self._hole_min = params.hole_min
        self.hole_pages = params.hole_min // PAGE
        # One buffer for the whole stream: growing a bytearray would fault in fresh
        # pages on every resize, and first-touch page faults cost more than the copy.
        # It never holds more than the stream, so a known size bounds it; a stream that
        # outgrows its size only makes the bytearray grow.
        capacity = self._flush_at + window + PAGE
        if size is not None:
            capacity = min(capacity, _round_up(size) + PAGE)
        self._buf = bytearray(capacity)
        self._len = 0
        self._zeros = 0

    def zeros(self, n: int) -> None:
        self._zeros += n

    def data(self, view: memoryview) -> Iterator[Piece]:
        if self._zeros >= self._hole_min:
            # Holes end at the exact first and last non-zero bytes, not at page edges,
            # so the data between two holes is the same bytes whatever its alignment.
            self._zeros += self._strip_trailing_zeros()
            yield from self._cut(final=True)
            lead = _leading_zeros(view)
            yield Hole(self._zeros + lead)
            view = view[lead:]
        elif self._zeros:
            self._append_zeros(self._zeros)
        self._zeros = 0
        self._buf[self._len : self._len + len(view)] = view
        self._len += len(view)
        if self._len >= self._flush_at:
            yield from self._cut(final=False)

    def end(self) -> Iterator[Piece]:
        if self._zeros >= self._hole_min:
            self._zeros += self._strip_trailing_zeros()
            yield from self._cut(final=True)
            yield Hole(self._zeros)
        else:
            self._append_zeros(self._zeros)
            yield from self._cut(final=True)
        self._zeros = 0

    def _append_zeros(self, n: int) -> None:
        """Short zero runs are data. They are shorter than hole_min, so they fit."""
        self._buf[self._len : self._len + n] = bytes(n)
        self._len += n

    def _strip_trailing_zeros(self) -> int:
        """Drop the zero bytes ending the buffered data (fewer than a page)."""
        tail = np.frombuffer(self._buf, dtype=np.uint8, count=min(self._len, PAGE),
                             offset=max(self._len - PAGE, 0))
        n = int(np.argmax(tail[::-1] != 0)) if self._len else 0
        self._len -= n
        return n

    def _cut(self, final: bool) -> Iterator[Piece]:
        if not self._len:
            return
        with memoryview(self._buf) as whole:
            buf = whole[: self._len]
            lengths = [c.length for c in self._cdc.cut_buf(buf)]
            if not final:
                # The last cut of a buffer may be forced by its end: redo it with more data.
                lengths.pop()
            pieces = []
            offset = 0
            for n in lengths:
                pieces.append(Data(bytes(buf[offset : offset + n])))
                offset += n
            rest = self._len - offset
            whole[:rest] = bytes(buf[offset:])
            buf.release()
        self._len = rest
        yield from pieces


def _leading_zeros(view: memoryview) -> int:
    """Zero bytes at the start of a data run (fewer than a page: its first page is not zero)."""
    head = np.frombuffer(view[:PAGE], dtype=np.uint8)
    return int(np.argmax(head != 0))


class Readable(Protocol):
    def readinto(self, b: memoryview, /) -> int | None: ...


def split(f: Readable, params: ChunkerParams) -> Iterator[Piece]:
    """Split the rest of `f` into pieces whose sizes add up to its length."""
    size = _size_left(f)
    window = WINDOW if size is None else min(WINDOW, _round_up(size))
    splitter = _Splitter(params, window, size)
    buf = bytearray(window)
    view = memoryview(buf)
    while n := f.readinto(view):
        yield from _classify(splitter, view[:n])
    yield from splitter.end()


def _size_left(f: Readable) -> int | None:
    """The bytes left in `f` if it is a regular file, else None (no bound known)."""
    fileno = getattr(f, "fileno", None)
    tell = getattr(f, "tell", None)
    if fileno is None or tell is None:
        return None
    try:
        st = os.fstat(fileno())
        return max(st.st_size - tell(), 0) if stat.S_ISREG(st.st_mode) else None
    except (OSError, ValueError):
        return None


def _round_up(n: int) -> int:
    """`n` up to whole pages, at least one: windows are read and classified by page."""
    return max(-(-n // PAGE), 1) * PAGE


def _classify(splitter: _Splitter, window: memoryview) -> Iterator[Piece]:
    """Hand one window to the splitter as data runs and zero runs.

    Only zero runs that could become holes are handed over as such: long ones, and
    those touching the window's edges (they may continue in the next window). Shorter
    zero runs stay inside the data run around them, so the Python loop below runs once
    per candidate hole, not once per zero page.
    """
    full = len(window) // PAGE * PAGE
    pages = np.frombuffer(window[:full], dtype=np.uint64).reshape(-1, PAGE // 8)
    nonzero = np.any(pages, axis=1)
    if full < len(window):
        nonzero = np.append(nonzero, any(window[full:]))
    count = len(nonzero)
    # Boundaries of the zero runs: +1 where a run starts, -1 just after it ends.
    step = np.diff(np.concatenate(([0], (~nonzero).view(np.int8), [0])))
    starts = np.flatnonzero(step == 1)
    ends = np.flatnonzero(step == -1)
    keep = (ends - starts >= splitter.hole_pages) | (starts == 0) | (ends == count)
    pos = 0
    for s, e in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True):
        if s > pos:
            yield from splitter.data(window[pos * PAGE : s * PAGE])
        splitter.zeros(min(e * PAGE, len(window)) - s * PAGE)
        pos = e
    if pos < count:
        yield from splitter.data(window[pos * PAGE :])
