"""The TCP connections of a tree CRIU dumped and left stopped: in repair mode (TCP_REPAIR),
as CRIU leaves them, frozen and silent.

Killed so, each connection closes without a packet and without a TIME_WAIT, and the
restore gets its ports back at once; that is also how CRIU kills a tree itself. Resumed
(the snapshot could not be stored), the connections must leave repair mode first, or they
stay frozen and the tree's processes never hear from each other again. The sockets are
reached through pidfd_getfd, which needs the privileges a dump has anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from pathlib import Path

from snapstore.proctree import UNREADABLE, below, fd_targets, socket_inode

TCP_REPAIR = 19
_SYS_PIDFD_GETFD = 438
_LISTEN = "0A"
_libc = ctypes.CDLL(None, use_errno=True)


def kill_quietly(root: int) -> None:
    """SIGKILL `root` and every process below it, their TCP connections closing in repair
    mode (best effort: a socket that cannot be put in repair closes as it would)."""
    _signal(root, signal.SIGKILL, repair=True)


def resume(root: int) -> None:
    """SIGCONT `root` and every process below it, their TCP connections out of repair."""
    _signal(root, signal.SIGCONT, repair=False)


def _signal(root: int, sig: int, repair: bool) -> None:
    pids = [root, *below(root)]
    for pid in pids:
        _set_repair(pid, repair)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def tcp_connection_fds(pid: int) -> list[int]:
    """The descriptors of `pid` that are TCP sockets other than listening ones."""
    inodes: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(*UNREADABLE):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9:
                    inodes[fields[9]] = fields[3]
    return [fd for fd, target in fd_targets(pid).items()
            if inodes.get(socket_inode(target) or "", _LISTEN) != _LISTEN]


def _set_repair(pid: int, on: bool) -> None:
    fds = tcp_connection_fds(pid)
    if not fds:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        for fd in fds:
            own = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if own < 0:
                continue
            # Repair mode belongs to the socket, not to a descriptor of it.
            with socket.socket(fileno=own) as sock, contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1 if on else 0)
    finally:
        os.close(pidfd)
