"""The userfaultfd calls of the lazy-pages daemon, and its copy loop, shared by the daemon's
process (demand faults) and its copy processes (the prefetch, `snapstore.criu.copier`)."""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE
# Bytes per UFFDIO_COPY: an event read waits for the copies in flight (CopyGate), and a
# demand fault behind it with them, so each copy is kept short.
COPY_BYTES = 512 << 10


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_UNREGISTER = _ioc(2, 0x01, 16)
UFFDIO_WAKE = _ioc(2, 0x02, 16)
_UFFDIO_COPY = _ioc(3, 0x03, 40)
_UFFDIO_ZEROPAGE = _ioc(3, 0x04, 32)


class Installed(enum.Enum):
    DONE = "done"  # every page installed, found installed or proven unmapped
    DROPPED = "dropped"  # the task dropped the range (an event) before it was all in
    GONE = "gone"  # the task is gone


class CopyError(OSError):
    """UFFDIO_COPY failed in a way that leaves pages missing."""


@dataclass(frozen=True, slots=True)
class CopyResult:
    copied: int
    error: int


def uffd_copy(uffd: int, dst: int, src: int, length: int) -> CopyResult:
    arg = bytearray(struct.pack("QQQQq", dst, src, length, 0, 0))
    try:
        fcntl.ioctl(uffd, _UFFDIO_COPY, arg, True)
        error = 0
    except OSError as e:
        error = e.errno or errno.EIO
    copied = struct.unpack_from("q", arg, 32)[0]
    return CopyResult(max(copied, 0), error)


def install(uffd: int, dst: int, src: int, length: int,
            wanted: Callable[[], AbstractContextManager[bool]]) -> Installed:
    """Install `length` bytes from address `src` at `dst` of the userfaultfd's task, in
    copies of at most COPY_BYTES, each inside `wanted()`, which says whether the range is
    still wanted and holds back the task's event reads until the copy returns.

    Once the daemon closes a userfaultfd, a page it did not install reads as zeros: every
    page is installed, found installed, or proven unmapped, or the outcome says why not."""
    done = 0
    page_by_page = False
    while done < length:
        with wanted() as still:
            if not still:
                return Installed.DROPPED
            res = uffd_copy(uffd, dst + done, src + done,
                            PAGE_SIZE if page_by_page else min(length - done, COPY_BYTES))
        if res.copied > 0:
            done += res.copied
        if res.error == 0:
            continue
        if res.error == errno.EEXIST:
            # Installed already (a fault raced the prefetch): skip that page.
            done = (done // PAGE_SIZE + 1) * PAGE_SIZE
        elif res.error == errno.EAGAIN:
            # A mapping change is pending: retry once the daemon has read and applied it
            # (it may drop or move this range).
            time.sleep(0.0005)
        elif res.error == errno.ENOENT and not page_by_page:
            # The range crosses a memory area boundary the task made since the dump
            # (mprotect splits an area, without an event): one page at a time.
            page_by_page = True
        elif res.error == errno.ENOENT:
            done += PAGE_SIZE  # that page is not mapped
        elif res.error == errno.ESRCH:
            return Installed.GONE
        else:
            raise CopyError(res.error, f"UFFDIO_COPY failed: {os.strerror(res.error)}")
    return Installed.DONE


def zeropage(uffd: int, addr: int) -> bool:
    """A zero page at `addr`, or a wake-up where a page is installed already; False when
    the task is gone."""
    arg = bytearray(struct.pack("QQQq", addr, PAGE_SIZE, 0, 0))
    try:
        fcntl.ioctl(uffd, _UFFDIO_ZEROPAGE, arg, True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            ioctl_range(uffd, UFFDIO_WAKE, addr, PAGE_SIZE)
        elif e.errno == errno.ESRCH:
            return False
        elif e.errno != errno.ENOENT:
            raise
    return True


def ioctl_range(uffd: int, request: int, start: int, length: int) -> None:
    try:
        fcntl.ioctl(uffd, request, bytearray(struct.pack("QQ", start, length)), True)
    except OSError as e:
        # ENOMEM: the task's memory is gone already; nothing to unregister or wake.
        if e.errno not in (errno.ENOMEM, errno.ENOENT, errno.ESRCH):
            raise


class Buffer:
    """A page-aligned buffer, filled by a PageSource and copied from by address
    (UFFDIO_COPY takes a source address)."""

    def __init__(self, size: int) -> None:
        self._map = mmap.mmap(-1, size)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.view = memoryview(self._map)
