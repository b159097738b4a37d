"""The bytes of a snapshot's file read from the local store's chunks: each chunk
decompressed and hash-checked once by whichever thread needs it first (the others wait for
it), the last few kept for the neighbouring reads. The lazy-pages daemon reads the lazy
pages of a staged CRIU restore with it (`snapstore.criu.staging`), in its own threads and in
its copy processes, which import this and not the CRIU image format: each starts with the
restore, and its imports are on the way to the first page.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
from collections import OrderedDict
from concurrent.futures import Future

from snapstore.ids import ChunkId
from snapstore.manifest import Entry
from snapstore.store.local import LocalStore

# Decompressed chunks kept per pages file. An 8 MiB read spans seven or eight average chunks
# (1.2 MiB), and the next read of the same reader (a copy process going on through its
# stretch of the file, the staging of the eager part) starts in the last of them.
CACHED_CHUNKS = 8
# How far past a read the chunk objects are asked for ahead (LocalStore.will_need), so that
# a cold store's disk always has reads queued: the copy processes go through a pages file
# in order, each reading its chunks one at a time.
READ_AHEAD = 64 << 20


class StorePages:
    """Bytes of one file of a snapshot, read from the local store's chunks."""

    def __init__(self, store: LocalStore, snapshot: str, entry: Entry) -> None:
        self._store = store
        self._snapshot = snapshot
        self._path = entry.path
        self.size = entry.size
        self._starts: list[int] = []
        self._extents: list[tuple[ChunkId | None, int]] = []
        pos = 0
        for x in entry.extents:
            self._starts.append(pos)
            self._extents.append((x.chunk, x.size))
            pos += x.size
        self._lock = threading.Lock()
        self._cache: OrderedDict[ChunkId, Future[bytes]] = OrderedDict()
        self._asked: set[int] = set()  # extents whose chunk was asked for ahead

    def spec(self) -> dict[str, str]:
        return {"store": str(self._store.root), "snapshot": self._snapshot, "file": self._path}

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` from `offset`; the bytes filled (fewer only at the end of file).

        A chunk that lies wholly inside the read, and that no thread has decoded or is
        decoding, is decoded straight into `view` (LocalStore.read_chunk_into) and not
        kept: the reads that share a chunk are those on its ends. Other chunks are decoded
        once into the cache and copied from there with ctypes' memmove and memset, which
        run without the GIL, so threads reading one source (the daemon's event threads,
        one per task) copy in parallel (a slice assignment holds it for the copy). A
        chunk another thread is decoding is copied last: neighbouring reads share the
        chunk on their boundary, and this thread decodes its other chunks meanwhile
        instead of waiting for it."""
        want = min(len(view), max(0, self.size - offset))
        if want == 0:
            return 0
        dst = ctypes.addressof(ctypes.c_char.from_buffer(view))
        busy = []
        done = 0
        i = bisect.bisect_right(self._starts, offset) - 1
        self._read_ahead(i, offset + want)
        while done < want:
            chunk, size = self._extents[i]
            lo = offset + done - self._starts[i]
            n = min(size - lo, want - done)
            if chunk is None:
                ctypes.memset(dst + done, 0, n)
            elif n == size and not self._known(chunk):
                self._store.read_chunk_into(chunk, view[done : done + n])
            elif (data := self._chunk(chunk, size, wait=False)) is not None:
                ctypes.memmove(dst + done, _address(data) + lo, n)
            else:
                busy.append((dst + done, chunk, size, lo, n))
            done += n
            i += 1
        for at, chunk, size, lo, n in busy:
            data = self._chunk(chunk, size, wait=True)
            assert data is not None
            ctypes.memmove(at, _address(data) + lo, n)
        return done

    def _read_ahead(self, first: int, end: int) -> None:
        """Ask for the chunk objects of the extents from `first` to READ_AHEAD past `end`
        ahead, each once."""
        last = bisect.bisect_left(self._starts, end + READ_AHEAD)
        with self._lock:
            todo = [i for i in range(first, last) if i not in self._asked]
            self._asked.update(todo)
        for i in todo:
            chunk, _ = self._extents[i]
            if chunk is not None:
                self._store.will_need(chunk)

    def _known(self, cid: ChunkId) -> bool:
        """Whether the chunk is in the cache, decoded or being decoded."""
        with self._lock:
            return cid in self._cache

    def _chunk(self, cid: ChunkId, size: int, wait: bool) -> bytes | None:
        """The chunk's bytes, decoded by this thread unless another has or is decoding
        them; None when another is and `wait` is false."""
        # Threads call this (the daemon's event threads), not trio tasks: a Future per
        # chunk is the threads' single flight (the mounts' is snapstore.singleflight).
        with self._lock:
            fut = self._cache.get(cid)
            mine = fut is None
            if fut is None:
                fut = Future()
                self._cache[cid] = fut
                while len(self._cache) > CACHED_CHUNKS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(cid)
        if mine:
            try:
                fut.set_result(self._store.get_chunk(cid, size))
            except BaseException as e:
                # Not cached: a later read tries again and meets the damage itself.
                with self._lock:
                    if self._cache.get(cid) is fut:
                        del self._cache[cid]
                fut.set_exception(e)
        elif not wait and not fut.done():
            return None
        return fut.result()


def _address(data: bytes) -> int:
    """Where the bytes of `data` are (it must stay referenced while this is used)."""
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address
