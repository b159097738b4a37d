"""Serves a file of a snapshot to a uffd client straight from the store's chunks.

The native loader runs in chunk mode (docs/uffd.md, "Serving from the store"): it learns
the file's layout (data extents and holes) and its prefetch order from a memfd, asks this
process for chunks by index over a SOCK_SEQPACKET socket, and installs each from the
sealed memfd of verified bytes it gets back. This process only feeds: the mount's loader
processes (`snapstore.store.chunk_loader`) read, decompress and hash-check each chunk into a
memfd, and the descriptor is passed on, so page data never passes through Python.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import re
import socket
import struct
import subprocess
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from snapstore.errors import SnapstoreError, UsageError
from snapstore.fileio import write_all
from snapstore.ids import ChunkId
from snapstore.manifest import Entry, Manifest
from snapstore.store.chunk_loader import LoaderPool
from snapstore.store.chunk_loader_worker import sealed_memfd
from snapstore.store.local import LocalStore
from snapstore.uffd.layout import Layout
from snapstore.uffd.page_loader import binary_path

# The feeder's side of the protocol: the loader asks with a chunk index, its top bit set
# when a fault waits for the chunk; the answer is the index, a status byte and, for OK, the
# memfd (else a UTF-8 reason).
REQUEST = struct.Struct("<Q")
DEMAND = 1 << 63
REPLY = struct.Struct("<QB")
OK, FAILED = 0, 1
_MAX_REASON = 500


class ChunkSource(Protocol):
    async def read_chunk_fd(self, cid: ChunkId, size: int) -> int: ...


class BytesReader(Protocol):
    async def read_chunk(self, cid: ChunkId, size: int) -> bytes: ...


class MemfdSource:
    """A ChunkSource over a reader that gives checked bytes (a remote's): each chunk is
    written into a sealed memfd in a thread. One copy more than the loader processes make,
    behind a network fetch that costs far more."""

    def __init__(self, reader: BytesReader) -> None:
        self.reader = reader

    async def read_chunk_fd(self, cid: ChunkId, size: int) -> int:
        raw = await self.reader.read_chunk(cid, size)
        return await trio.to_thread.run_sync(sealed_memfd, raw)


async def serve_remote(store: LocalStore, remote: str, endpoint: str | None, ref: str,
                       path: str, hot: Path | None, sock_path: Path, prefetchers: int,
                       extra: Sequence[str] = ()) -> int:
    """Serve file `path` of snapshot `ref` of a remote, chunks fetched on demand as a lazy
    remote mount fetches them (through the store's disk cache); its own recorded order
    first when there is no hot list."""
    # Here, not at the top: the S3 client costs every local load its import time.
    from snapstore.remote.reader import RemoteChunkReader, open_remote_snapshot
    from snapstore.store.s3 import endpoint_url, open_s3
    from snapstore.store.url import RemoteURL

    async with open_s3(RemoteURL.parse(remote), endpoint_url(endpoint)) as s3:
        snap = await open_remote_snapshot(s3, ref)
        layout = Layout.of(find_file(snap.manifest, path))
        pages = read_hot_list(hot, layout.npages) if hot is not None else None
        order = prefetch_order(layout, pages, [cid for cid, _ in snap.order])
        source = MemfdSource(RemoteChunkReader(store, s3, snap))
        return await serve_chunks(layout, order, sock_path, source, prefetchers, extra)


def default_loaders() -> int:
    """Prefetch loader processes: two per CPU, at most 16. A loader idles for a round trip
    between two chunks, so one per CPU leaves the CPUs idle part of the time: on this
    project's 2-CPU machine 2, 4 and 6 loaders fed 0.36, 0.43 and 0.51 GB/s."""
    return min(2 * (os.cpu_count() or 1), 16)


def read_hot_list(path: Path, npages: int) -> list[int]:
    """Page indices, one decimal number a line, blank lines skipped (the loader's format)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise SnapstoreError(f"cannot read {path}: {e.strerror}") from None
    pages = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        if not re.fullmatch(rb"[0-9]+", line):
            raise UsageError(f"hot list line {n}: not a page index")
        if int(line) >= npages:
            raise UsageError(f"hot list line {n}: page {int(line)} is past the image end")
        pages.append(int(line))
    return pages


def prefetch_order(layout: Layout, hot: list[int] | None, recorded: Iterable[ChunkId]) -> list[int]:
    """With a hot list, the chunks of its pages; else the recorded chunks first, then every
    other chunk of the file in file order."""
    if hot is not None:
        return layout.chunks_of_pages(hot)
    where: dict[ChunkId, list[int]] = {}
    for i, (cid, _) in enumerate(layout.chunks):
        where.setdefault(cid, []).append(i)
    order: dict[int, None] = {}
    for cid in recorded:
        order.update(dict.fromkeys(where.get(cid, ())))
    order.update(dict.fromkeys(range(len(layout.chunks))))
    return list(order)


def find_file(m: Manifest, path: str) -> Entry:
    entry = next((e for e in m.files() if e.path == path), None)
    if entry is None:
        raise SnapstoreError(f"the snapshot has no file {path!r}")
    return entry


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("snapstore-layout", os.MFD_CLOEXEC)
    write_all(fd, data)
    return fd


def start_loader(layout: Layout, order: Sequence[int], sock_path: Path, window: int,
                 extra: Sequence[str] = (), stderr: int | None = None,
                 ) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Starts the native loader in chunk mode; returns it and the feeder's end of its socket.
    Its one-line error goes to `stderr` (default: ours)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    layout_fd = _memfd(layout.encode(order))
    try:
        argv = [str(binary_path()), "--chunks", str(theirs.fileno()), "--layout", str(layout_fd),
                "--socket", str(sock_path), "--queue-depth", str(window), *extra]
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), layout_fd), stderr=stderr)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        os.close(layout_fd)
    return proc, ours


def serve_local(store: LocalStore, layout: Layout, order: Sequence[int], sock_path: Path,
                prefetchers: int, extra: Sequence[str] = ()) -> int:
    """Runs the loader in chunk mode fed from the local store's loader processes (one more
    than `prefetchers`); returns the loader's exit status. The loader starts first, so that
    it listens while the loader processes start; if they fail, closing the socket ends the
    loader (and kills a client that handed it a uffd), and the error propagates.

    The feeding is a poll loop (LoaderPool), not an event loop: trio's scheduling cost
    about 0.2 ms of CPU a chunk, as much as a loader process spends on a chunk's bytes, and
    on two CPUs a restore of 2175 chunks went 0.2 s faster without it."""
    proc, ours = start_loader(layout, order, sock_path, 2 * prefetchers, extra)
    try:
        with LoaderPool(store.root, prefetchers + 1) as pool:
            _feed_local(ours, layout, pool, prefetchers)
    finally:
        ours.close()
        status = proc.wait()
    return status


def _feed_local(sock: socket.socket, layout: Layout, pool: LoaderPool, prefetchers: int) -> None:
    """Answers the loader's chunk requests until it closes its end (it exits). Requests for
    faults go first, and at most `prefetchers` prefetch loads run at once, so a fault's
    request always finds a loader free."""
    queue: deque[tuple[int, bool]] = deque()
    running: dict[int, tuple[int, bool]] = {}
    keys = itertools.count()
    prefetching = 0
    while True:
        readable, ended = pool.wait(sock.fileno())
        try:
            for key, result in ended:
                index, prefetch = running.pop(key)
                prefetching -= prefetch
                sock.sendmsg(*_reply(index, result))
        except ConnectionError:
            return
        finally:
            for _, result in ended:
                if isinstance(result, int):
                    os.close(result)
        while readable:
            try:
                msg = sock.recv(REQUEST.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionError:
                return
            request = _request(msg, layout)
            if request is None:
                return
            index, demand = request
            if demand:
                queue.appendleft((index, False))
            else:
                queue.append((index, True))
        while queue and pool.free() and not (queue[0][1] and prefetching >= prefetchers):
            index, prefetch = queue.popleft()
            key = next(keys)
            running[key] = index, prefetch
            prefetching += prefetch
            pool.submit(key, *layout.chunks[index])


async def feed(sock: socket.socket, layout: Layout, source: ChunkSource, prefetchers: int) -> None:
    """Answers the loader's chunk requests until it closes its end (it exits). At most
    `prefetchers` prefetch loads run at once."""
    tsock = trio.socket.from_stdlib_socket(sock)
    prefetch = trio.Semaphore(prefetchers)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                msg = await tsock.recv(REQUEST.size)
            except ConnectionError:
                break
            request = _request(msg, layout)
            if request is None:
                break
            index, demand = request
            limit = None if demand else prefetch
            nursery.start_soon(_answer, tsock, index, layout.chunks[index], source, limit)
        nursery.cancel_scope.cancel()


async def _answer(sock: trio.socket.SocketType, index: int, chunk: tuple[ChunkId, int],
                  source: ChunkSource, limit: trio.Semaphore | None) -> None:
    result: int | SnapstoreError
    try:
        async with limit if limit is not None else contextlib.nullcontext():
            result = await source.read_chunk_fd(*chunk)
    except SnapstoreError as e:
        result = e
    try:
        with contextlib.suppress(ConnectionError):
            await sock.sendmsg(*_reply(index, result))
    finally:
        if isinstance(result, int):
            os.close(result)


def _request(msg: bytes, layout: Layout) -> tuple[int, bool] | None:
    """The chunk index a request asks for and whether a fault waits for it; None for a
    request outside the protocol, which ends the feeding."""
    if len(msg) != REQUEST.size:
        return None
    (index,) = REQUEST.unpack(msg)
    if index & ~DEMAND >= len(layout.chunks):
        return None
    return index & ~DEMAND, bool(index & DEMAND)


def _reply(index: int, result: int | SnapstoreError,
           ) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """The answer to the request for chunk `index`: the chunk's memfd, or why there is none."""
    if isinstance(result, SnapstoreError):
        return [REPLY.pack(index, FAILED) + str(result).encode()[:_MAX_REASON]], []
    fds = array.array("i", [result]).tobytes()
    return [REPLY.pack(index, OK)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]


async def serve_chunks(layout: Layout, order: Sequence[int], sock_path: Path,
                       source: ChunkSource, prefetchers: int, extra: Sequence[str] = ()) -> int:
    """Runs the loader in chunk mode fed from `source` (a remote's), at most `prefetchers`
    prefetch loads at once; returns the loader's exit status. The loader keeps two prefetch
    requests per prefetcher in flight: one loading, one queued, so no load waits for the
    round trip of its request."""
    proc, ours = start_loader(layout, order, sock_path, 2 * prefetchers, extra)
    try:
        await feed(ours, layout, source, prefetchers)
    finally:
        ours.close()
        status = await trio.to_thread.run_sync(proc.wait)
    return status
