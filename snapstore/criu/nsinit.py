"""The first process of a replica's pid and network namespace: brings loopback up, runs
`criu restore` there, reports, then reaps until the restored tree is gone.

It runs as `unshare --pid --fork --mount-proc --net python -m snapstore.criu.nsinit ...`.
A restored tree is left to the namespace's first process when CRIU exits, and that
process must stay: when it ends, the kernel kills everything in its namespace. So it
waits for its children and exits with the last of them. Killing it kills the replica.

Report, written to the path given: `ok PID` (the restored root's pid inside the
namespace) or `error MESSAGE`, one line.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
from pathlib import Path

from snapstore.criu.binary import Criu, CriuError
from snapstore.fileio import write_atomic

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def loopback_up() -> None:
    """A new network namespace starts with `lo` down; restored sockets on 127.0.0.1 (and
    the CUDA driver's abstract socket) need it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = bytearray(struct.pack("16sH14x", b"lo", 0))
        fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq, True)
        flags = struct.unpack_from("H", ifreq, 16)[0] | _IFF_UP
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))


def main(criu_path: str, images: Path, work: Path, lazy: bool, report: Path) -> None:
    try:
        loopback_up()
        criu = Criu.find(criu_path)
        pid = criu.restore(images, work, lazy_pages=lazy)
        result = f"ok {pid}"
    except (CriuError, OSError) as e:
        result = f"error {e}"
    # The parent polls for the report: it must appear whole. It is read at once, so it
    # need not survive a power loss.
    write_atomic(report, (result + "\n").encode(), durable=False)
    if not result.startswith("ok"):
        sys.exit(1)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "lazy",
         Path(sys.argv[5]))
