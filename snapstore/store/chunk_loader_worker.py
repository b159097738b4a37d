"""Loader processes of a mount: they answer chunk requests with sealed memfds.

The mount's side, and the protocol, are in `snapstore.store.chunk_loader`. One process is
started with the sockets of all the loaders the mount wants; it imports only what a load
needs and opens the store, then forks a loader for each further socket, so that those
cost a fork each rather than a Python start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
from pathlib import Path

from snapstore.errors import CorruptError, NotFoundError
from snapstore.fileio import write_all
from snapstore.ids import ChunkId
from snapstore.store.local import LocalStore

# The protocol (docs in snapstore.store.chunk_loader).
REQUEST = struct.Struct("<Q32sQ")
REPLY = struct.Struct("<QB")
PID = struct.Struct("<I")
OK, NOT_FOUND, CORRUPT, FAILED = range(4)
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def serve_loads(sock: socket.socket, store: LocalStore) -> None:
    """A loader's loop: say it started (with its pid), then answer requests on `sock`
    until it closes."""
    sock.send(REPLY.pack(0, OK) + PID.pack(os.getpid()))
    while req := sock.recv(REQUEST.size):
        seq, digest, size = REQUEST.unpack(req)
        cid = ChunkId(digest)
        try:
            raw = store.get_chunk(cid, size)
        except NotFoundError as e:
            sock.send(REPLY.pack(seq, NOT_FOUND) + str(e).encode())
        except CorruptError as e:
            sock.send(REPLY.pack(seq, CORRUPT) + str(e).encode())
        except OSError as e:
            sock.send(REPLY.pack(seq, FAILED) + f"chunk {cid}: {e}".encode())
        else:
            fd = sealed_memfd(raw)
            try:
                socket.send_fds(sock, [REPLY.pack(seq, OK)], [fd])
            finally:
                os.close(fd)


def sealed_memfd(data: bytes) -> int:
    """A memfd holding `data`, sealed: no one can write, grow or shrink it any more."""
    fd = os.memfd_create("snapstore-chunk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def main(argv: list[str]) -> None:
    """`chunk_loader_worker FD[,FD...] STORE`: serve the first socket here, fork for the rest."""
    # The mount handles SIGINT (a terminal's ^C reaches the whole group) and stops its
    # loaders by closing their sockets.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fds = [int(fd) for fd in argv[0].split(",")]
    store = LocalStore.open(Path(argv[1]), create=False)
    # The forked loaders are this process's children: let the kernel reap them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    mine = fds[0]
    for fd in fds[1:]:
        if os.fork() == 0:
            mine = fd
            break
    for fd in fds:
        if fd != mine:
            os.close(fd)
    sock = socket.socket(fileno=mine)
    # The mount closes the socket when it stops, also while a load is being answered.
    with contextlib.suppress(ConnectionError):
        serve_loads(sock, store)


if __name__ == "__main__":
    main(sys.argv[1:])
