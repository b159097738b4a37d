"""Plays the restoring process of the uffd handshake, so tests and benchmarks can fault pages.

It maps memory (anonymous, or the loader's memfd), registers it with a userfaultfd, sends
Firecracker's region list with the uffd to the loader, and then reads pages through the
mappings; every first touch of a page is a fault that the loader serves.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PAGE_SIZE = mmap.PAGESIZE

_NR_USERFAULTFD = 323  # x86_64
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_FEATURE_EVENT_REMOVE = 1 << 3
_FEATURE_MISSING_SHMEM = 1 << 5
_FEATURE_EVENT_UNMAP = 1 << 6
_FEATURE_MINOR_SHMEM = 1 << 10
_REGISTER_MODE_MISSING = 1 << 0
_REGISTER_MODE_MINOR = 1 << 2


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API = _iowr(0x3F, 24)
_UFFDIO_REGISTER = _iowr(0x00, 32)
_USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00


def open_userfaultfd(features: int) -> int:
    """Creates a non-blocking userfaultfd with the given UFFDIO_API features."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_NR_USERFAULTFD, flags))
    if fd < 0:
        # The syscall can be disabled by policy while /dev/userfaultfd is still usable.
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        try:
            fd = fcntl.ioctl(dev, _USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(dev)
    try:
        api = bytearray(struct.pack("QQQ", _UFFD_API, features, 0))
        fcntl.ioctl(fd, _UFFDIO_API, api, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def register(uffd: int, addr: int, size: int, mode: int) -> None:
    fcntl.ioctl(uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, size, mode, 0)), True)


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """Connects to the loader, waiting for it to start listening."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def region_json(regions: Iterable[tuple[int, int, int]]) -> bytes:
    """Firecracker's handshake message for (address, size, image offset) triples."""
    return json.dumps(
        [
            {
                "base_host_virt_addr": addr,
                "size": size,
                "offset": offset,
                "page_size": PAGE_SIZE,
                "page_size_kib": PAGE_SIZE,
            }
            for addr, size, offset in regions
        ]
    ).encode()


@dataclass
class MappedRegion:
    offset: int
    size: int
    mm: mmap.mmap
    addr: int


def _address(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        # The exported buffer would keep the mmap from ever being closed.
        del anchor


class Client:
    """One restoring process: regions are (image offset, size) pairs, page aligned."""

    def __init__(
        self, socket_path: Path, regions: Sequence[tuple[int, int]], memfd: bool = False
    ) -> None:
        self.socket_path = socket_path
        self.layout = list(regions)
        self.memfd = memfd
        self.regions: list[MappedRegion] = []
        self.uffd = -1
        self.sock: socket.socket | None = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        self.sock = connect(self.socket_path, timeout)
        features = _FEATURE_EVENT_REMOVE | _FEATURE_EVENT_UNMAP
        mode = _REGISTER_MODE_MISSING
        if self.memfd:
            self._map_memfd()
            features |= _FEATURE_MISSING_SHMEM | _FEATURE_MINOR_SHMEM
            mode |= _REGISTER_MODE_MINOR
        else:
            for offset, size in self.layout:
                mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self.regions.append(MappedRegion(offset, size, mm, _address(mm)))
        self.uffd = open_userfaultfd(features)
        for r in self.regions:
            register(self.uffd, r.addr, r.size, mode)
        payload = region_json((r.addr, r.size, r.offset) for r in self.regions)
        socket.send_fds(self.sock, [payload], [self.uffd])

    def _map_memfd(self) -> None:
        assert self.sock is not None
        msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        if len(fds) != 1:
            raise ConnectionError("loader sent no memfd; is it running with --memfd?")
        try:
            size = int(json.loads(msg)["memfd_size"])
            for offset, length in self.layout:
                if offset + length > size:
                    raise ValueError(f"region at {offset} ends past the memfd ({size} bytes)")
                mm = mmap.mmap(fds[0], length, flags=mmap.MAP_SHARED, offset=offset)
                self.regions.append(MappedRegion(offset, length, mm, _address(mm)))
        finally:
            os.close(fds[0])

    def locate(self, offset: int) -> tuple[mmap.mmap, int]:
        """The mapping holding image byte `offset` and the byte's position in it."""
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r.mm, offset - r.offset
        raise IndexError(f"image offset {offset} is not mapped")

    def touch(self, pages: Iterable[int]) -> None:
        """Reads one byte of each image page, in order: each first touch is a fault."""
        if len(self.regions) == 1:
            r = self.regions[0]
            mm, base = r.mm, r.offset
            for p in pages:
                mm[p * PAGE_SIZE - base]
            return
        for p in pages:
            mm, pos = self.locate(p * PAGE_SIZE)
            mm[pos]

    def read(self, offset: int, size: int) -> bytes:
        mm, pos = self.locate(offset)
        return mm[pos : pos + size]

    def close(self) -> None:
        """Unmaps and disconnects; the loader sees the connection close and exits."""
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        for r in self.regions:
            r.mm.close()
        self.regions.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
