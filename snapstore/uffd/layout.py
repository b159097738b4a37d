"""A file's layout in the store: its data extents (chunks) and holes, as the native loader
learns it in chunk mode (docs/uffd.md, "Serving from the store").

Apart from serve.py, so that a process that only needs the layout (the restoring process of
`gpu-load`) does not import the feeder's event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from snapstore.chunker_params import PAGE
from snapstore.ids import ChunkId
from snapstore.manifest import Entry


@dataclass(frozen=True)
class Layout:
    """A file's data extents, in file order: chunk, size and offset of each."""

    size: int
    chunks: list[tuple[ChunkId, int]]
    offsets: np.ndarray[tuple[int], np.dtype[np.uint64]]

    @classmethod
    def of(cls, entry: Entry) -> Layout:
        return cls.of_files([entry], entry.size)

    @classmethod
    def of_files(cls, entries: Sequence[Entry], stride: int) -> Layout:
        """Files one after another, file `i` at `i * stride` (a GPU dump's segments)."""
        chunks, offsets = [], []
        for i, entry in enumerate(entries):
            pos = i * stride
            for x in entry.extents:
                if x.chunk is not None:
                    chunks.append((x.chunk, x.size))
                    offsets.append(pos)
                pos += x.size
        size = (len(entries) - 1) * stride + entries[-1].size if entries else 0
        return cls(size, chunks, np.array(offsets, dtype=np.uint64))

    def data_pages(self) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        """The pages holding chunk bytes, in order."""
        sizes = np.array([s for _, s in self.chunks], dtype=np.int64)
        first = self.offsets.astype(np.int64) // PAGE
        last = (self.offsets.astype(np.int64) + sizes - 1) // PAGE
        # +1 where a chunk's pages start, -1 past its last: a page holds chunk bytes where
        # the running sum is positive. Linear in the pages, where sorting them was not.
        edges = np.zeros(self.npages + 1, dtype=np.int64)
        np.add.at(edges, first, 1)
        np.add.at(edges, last + 1, -1)
        return np.flatnonzero(np.cumsum(edges[:-1]) > 0).astype(np.int64)

    @property
    def npages(self) -> int:
        return -(-self.size // PAGE)

    def chunks_of_pages(self, pages: Iterable[int]) -> list[int]:
        """Indices of the chunks holding bytes of `pages`, by first appearance."""
        sizes = np.array([s for _, s in self.chunks], dtype=np.uint64)
        ends = self.offsets + sizes
        order: dict[int, None] = {}
        for p in pages:
            i = int(np.searchsorted(ends, p * PAGE, side="right"))
            while i < len(self.chunks) and int(self.offsets[i]) < (p + 1) * PAGE:
                order.setdefault(i)
                i += 1
        return list(order)

    def encode(self, order: Sequence[int]) -> bytes:
        """The loader's layout: u64 words, file size, chunk count, (offset, size) per chunk,
        prefetch count, chunk indices in prefetch order."""
        words = [self.size, len(self.chunks)]
        for off, (_, size) in zip(self.offsets.tolist(), self.chunks, strict=True):
            words += [off, size]
        words += [len(order), *order]
        return np.array(words, dtype="<u8").tobytes()
