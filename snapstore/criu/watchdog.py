"""Guards a lazy restore against the death of its lazy-pages daemon.

Once the daemon's process is gone, the userfaultfds close with it and every lazy page not
yet installed would read as zeros in the restored tasks: a wrong page, silently. So the
daemon starts this small process first and hands it a duplicate of every userfaultfd it
gets, with the task's pid. While this process holds them, a page the daemon did not
install stays missing (a task touching it waits), and if the daemon goes away before it
said "done", this process kills the tasks and everything they started, then lets go.

Protocol over a SOCK_SEQPACKET socket: `T` + pid (native int) with the userfaultfd as
SCM_RIGHTS, per task; `D` when every page is installed (then it exits quietly). The end of
the connection without `D` means the daemon failed or died.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys

from snapstore.proctree import signal_tree

_PID = struct.Struct("i")


def start() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start a watchdog; the daemon's end of its socket, and the process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Its own session: a signal to the restore command's process group spares it.
    proc = subprocess.Popen([sys.executable, "-m", "snapstore.criu.watchdog",
                             str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    theirs.close()
    return ours, proc


def guard(sock: socket.socket, pid: int, uffd: int) -> None:
    socket.send_fds(sock, [b"T" + _PID.pack(pid)], [uffd])


def release(sock: socket.socket) -> None:
    sock.send(b"D")


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    pids: set[int] = set()
    uffds: list[int] = []
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 1)
        except OSError:
            msg, fds = b"", []
        uffds += fds
        if msg == b"D":
            return
        if not msg:
            break
        if msg[:1] == b"T" and len(msg) == 1 + _PID.size:
            pids.add(_PID.unpack_from(msg, 1)[0])
    for pid in pids:
        signal_tree(pid, signal.SIGKILL)
    for u in uffds:
        os.close(u)


if __name__ == "__main__":
    main(int(sys.argv[1]))
