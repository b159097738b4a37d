"""Export: write a snapshot's files back, byte-identical, holes as sparse ranges."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from snapstore.errors import SnapstoreError
from snapstore.fileio import write_all
from snapstore.manifest import Entry, Extent, Manifest
from snapstore.store.local import LocalStore
from snapstore.transcode import present

_READ_AHEAD_PER_WORKER = 3


def export(store: LocalStore, m: Manifest, dest: Path, workers: int | None = None) -> int:
    """Create `dest` holding the snapshot; returns bytes written.

    The tree is built beside `dest` and renamed into place only when every chunk
    passed its hash check, so a failed export leaves nothing half-written at `dest`.
    """
    if dest.exists() or dest.is_symlink():
        raise SnapstoreError(f"{dest} already exists; export writes a new directory")
    workers = workers or os.cpu_count() or 2
    work = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        work.mkdir(parents=False)
    except OSError as err:
        raise SnapstoreError(f"cannot create {work}: {err.strerror}") from None
    written = 0
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
            for entry in m.entries:
                path = work / entry.path
                if entry.kind == "dir":
                    path.mkdir()
                elif entry.kind == "symlink":
                    os.symlink(entry.target, path)
                    t = entry.mtime_ns
                    os.utime(path, ns=(t, t), follow_symlinks=False)
                else:
                    written += _write_file(store, entry, path, pool, workers)
        # Directory times last: creating children changes them.
        for entry in reversed(m.entries):
            if entry.kind == "dir":
                path = work / entry.path
                path.chmod(entry.mode)
                os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return written


def export_file(store: LocalStore, entry: Entry, dest: Path) -> int:
    """Write one file of a snapshot (its presented form if transcoded) to a new `dest`."""
    workers = os.cpu_count() or 2
    with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
        return _write_file(store, entry, dest, pool, workers)


def iter_file_bytes(
    store: LocalStore, entry: Entry, pool: ThreadPoolExecutor, depth: int
) -> Iterator[tuple[Extent, bytes | None]]:
    """Yield each extent of a file with its checked bytes (None for a hole), in order.

    Up to `depth` chunks are read, decompressed and hashed ahead on the pool.
    """
    ahead: deque[tuple[Extent, Future[bytes] | None]] = deque()
    extents = iter(entry.extents)
    try:
        for x in extents:
            fut = pool.submit(store.get_chunk, x.chunk, x.size) if x.chunk else None
            ahead.append((x, fut))
            if len(ahead) >= depth:
                x0, f0 = ahead.popleft()
                yield x0, f0.result() if f0 else None
        while ahead:
            x0, f0 = ahead.popleft()
            yield x0, f0.result() if f0 else None
    finally:
        for _, f in ahead:
            if f:
                f.cancel()


def _write_file(
    store: LocalStore, e: Entry, path: Path, pool: ThreadPoolExecutor, workers: int
) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    written = 0
    extents = iter_file_bytes(store, e, pool, workers * _READ_AHEAD_PER_WORKER)
    try:
        if e.layout is not None:
            # A transcoded statefile is written in its restorable (presented) form.
            for block in present(e.layout, _with_zeros(extents)):
                written += write_all(fd, block)
        for x, data in extents:
            if data is None:
                os.lseek(fd, x.size, os.SEEK_CUR)
            else:
                written += write_all(fd, data)
        # A trailing hole only moved the offset: the size must be set explicitly.
        os.ftruncate(fd, e.size)
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return written


def _with_zeros(extents: Iterator[tuple[Extent, bytes | None]]) -> Iterator[bytes]:
    """The stored bytes in order, holes as zeros at most 4 MiB at a time (a hole in
    inflated memory can be gigabytes)."""
    zeros = bytes(4 << 20)
    for x, data in extents:
        if data is not None:
            yield data
            continue
        left = x.size
        while left:
            n = min(left, len(zeros))
            yield zeros[:n]
            left -= n
