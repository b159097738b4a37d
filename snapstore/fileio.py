"""Writing files whole: the write-all loops, the atomic replacement and creation of a file.

Stdlib only: the loader processes import it, and they import only what a load needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def write_all(fd: int, data: bytes | memoryview) -> int:
    """Write all of `data` to `fd` (os.write may write less); returns its length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def read_fully(fd: int, out: memoryview) -> int:
    """Read into all of `out` unless the file ends first (os.readv may read less); the
    bytes read."""
    done = 0
    while done < len(out) and (n := os.readv(fd, [out[done:]])):
        done += n
    return done


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of `data` to `fd` at `offset` (os.pwrite may write less); its length."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return len(data)


def fsync_dir(d: Path) -> None:
    """Make the entries of directory `d` durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot sync a directory; their renames are as durable as they get.
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, durable: bool = True,
                 tmp: Path | None = None) -> None:
    """Write `path` whole or not at all: the temp file `tmp`, then a rename over `path`.

    `durable` adds the fsyncs of the file and of its directory that make it survive a
    power loss. `tmp` must be on the filesystem of `path` and have a name no other writer
    uses at the same time; by default it lies beside `path`, named by the process (one
    writer per process). The temp file is opened without following a link, so a link
    planted under a predictable name is not written through.
    """
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes | memoryview, *, tmp: Path) -> bool:
    """Write `path` whole, durably, only if nothing has that name; say whether it did.

    The temp file `tmp` (on the filesystem of `path`, a name no other writer uses) is
    written and synced, then hard-linked to `path`: a link never replaces a name, so of
    writers racing for one `path` exactly one wins, and a reader sees all of its bytes or
    none. `tmp` is removed either way.
    """
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return True
