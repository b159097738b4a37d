"""The lazy-pages daemon's copy processes: each reads ranges of the pages files (chunks
decompressed and hash-checked) and installs them into the restored tasks with UFFDIO_COPY,
from a process of its own, so that the prefetch runs on every core. In threads of the
daemon's one process, the Python between the native calls held them back: on a 16-core
host more than half of the daemon's thread samples were waits for the interpreter lock,
and past 12 copy threads the fill went no faster (benchmarks/RESULTS.md, runs 14 and 15).

Protocol, over a SOCK_SEQPACKET socket per copy process, one JSON object per message:
- daemon to copier: `{"task": KEY, "pid": PID, "source": SPEC}` with the task's
  userfaultfd (SCM_RIGHTS), once per task, before any copy into it (SPEC: PageSource.spec);
  `{"copy": KEY, "start": A, "end": B, "offset": O}`: install [A, B) of the task from
  offset O of its pages file;
- copier to daemon, once per copy: `{"status": S, "read": R, "install": I, "waited": W}`
  with S one of `done`, `dropped` (the task dropped the range meanwhile), `gone` (the task
  is gone), or `failed` with `"error"`; R and I the seconds the copy spent reading its
  bytes and installing them (the gate's waits included), W the seconds the copier waited
  for this copy since its previous answer. The end of the socket ends the copier.

The gate (`CopyGate`) keeps the daemon's event invariant across processes (docs/criu.md):
no copy into a task is in flight while one of its events is read and applied, and none
starts into a range the event dropped. It is one memfd that the daemon and its copiers
share. Byte KEY says that an event of task KEY is being read; byte SLOTS_AT + N says that
the range copier N copies was dropped. Each copy holds a shared POSIX record lock on byte
KEY; the daemon takes it exclusive to read and apply an event. The lock is what excludes;
the byte only keeps copiers from starving the daemon of it. A copier that dies loses its
lock with it, so the daemon never waits on a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from snapstore.criu.sources import PagesError, PageSource, install_from, open_source
from snapstore.criu.uffdio import Buffer
from snapstore.errors import SnapstoreError
from snapstore.proctree import how_it_ended, stop

KEYS = 1 << 16  # tasks a daemon can serve
SLOTS_AT = KEYS
MAX_COPIERS = 32
# The most bytes one copy message asks for; the copier reads them into one buffer. Each
# range is a round trip to the daemon, whose threads share one interpreter lock: 8 MiB
# ranges left the copy processes waiting 5-6% of their time, 2 MiB ones 8-11%
# (benchmarks/RESULTS.md, run 17).
COPY_MESSAGE_BYTES = 8 << 20
_MAX_MESSAGE = 1 << 16


class CopyGate:
    """The shared flags and locks of a daemon and its copiers (module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, SLOTS_AT + MAX_COPIERS)
        self._parent = os.getppid()

    @classmethod
    def create(cls) -> CopyGate:
        fd = os.memfd_create("snapstore-copy-gate", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SLOTS_AT + MAX_COPIERS)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def exclusive(self, key: int) -> Iterator[None]:
        """The daemon's side: no copy into task `key` runs until the block ends."""
        self._map[key] = 1
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, key)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, key)
        finally:
            self._map[key] = 0

    def arm(self, slot: int) -> None:
        """Copier `slot` gets a new range: not dropped."""
        self._map[SLOTS_AT + slot] = 0

    def drop(self, slot: int) -> None:
        """The range copier `slot` copies was dropped (called inside `exclusive`)."""
        self._map[SLOTS_AT + slot] = 1

    @contextlib.contextmanager
    def shared(self, key: int, slot: int) -> Iterator[bool]:
        """A copier's side, around one UFFDIO_COPY into task `key`: whether its range is
        still wanted; no event of the task is read until the block ends."""
        while self._map[key]:
            if os.getppid() != self._parent:
                # The daemon died inside `exclusive`: its flag stays up.
                os._exit(1)
            time.sleep(0.0002)
        fcntl.lockf(self.fd, fcntl.LOCK_SH, 1, key)
        try:
            yield not self._map[SLOTS_AT + slot]
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, key)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class CopierGone(SnapstoreError):
    """A copy process ended before it answered."""


class Copier:
    """The daemon's end of one copy process."""

    def __init__(self, slot: int, gate: CopyGate) -> None:
        self.slot = slot
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "snapstore.criu.copier", str(theirs.fileno()),
                 str(gate.fd), str(slot)],
                pass_fds=[theirs.fileno(), gate.fd], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)
        self._send_lock = threading.Lock()

    def add_task(self, key: int, pid: int, source: PageSource, uffd: int) -> None:
        msg = json.dumps({"task": key, "pid": pid, "source": source.spec()}).encode()
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [msg], [uffd])
        except OSError:
            raise CopierGone(f"copy process {self.proc.pid} ended{self._how()}") from None

    def copy(self, key: int, start: int, end: int, offset: int) -> dict[str, Any]:
        """Have the copier install [start, end) of task `key`; its answer (the module
        docstring). One copy at a time per copier."""
        msg = json.dumps({"copy": key, "start": start, "end": end, "offset": offset})
        try:
            with self._send_lock:
                self._sock.send(msg.encode())
            reply = self._sock.recv(_MAX_MESSAGE)
        except OSError:
            reply = b""
        if not reply:
            raise CopierGone(f"copy process {self.proc.pid} ended{self._how()}")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def _how(self) -> str:
        return how_it_ended(self.proc, 5) or ""

    def end(self) -> None:
        """Have the copy process end: it stops once its socket ends (and a thread waiting
        for its answer gets the end at once). `wait` for it after."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def wait(self) -> None:
        stop(self.proc, 10)


class _Task:
    def __init__(self, pid: int, uffd: int, source: PageSource | SnapstoreError | OSError):
        self.pid = pid
        self.uffd = uffd
        self.source = source


def _open(spec: dict[str, Any], opened: dict[str, PageSource | SnapstoreError | OSError]
          ) -> PageSource | SnapstoreError | OSError:
    key = json.dumps(spec, sort_keys=True)
    if key not in opened:
        try:
            opened[key] = open_source(spec)
        except (SnapstoreError, OSError) as e:
            opened[key] = e
    return opened[key]


class _Timed:
    """A page source that adds up the seconds spent reading it."""

    def __init__(self, source: PageSource) -> None:
        self.source = source
        self.seconds = 0.0

    def read_into(self, view: memoryview, offset: int) -> int:
        start = time.monotonic()
        try:
            return self.source.read_into(view, offset)
        finally:
            self.seconds += time.monotonic() - start

    def spec(self) -> dict[str, str]:
        return self.source.spec()


def _copy(task: _Task, gate: CopyGate, slot: int, key: int, doc: dict[str, Any],
          buf: Buffer) -> dict[str, Any]:
    if isinstance(task.source, (SnapstoreError, OSError)):
        why: str = (task.source.strerror or str(task.source)
                    if isinstance(task.source, OSError) else str(task.source))
        return {"status": "failed", "error": f"cannot open the pages of pid {task.pid}: {why}"}
    source = _Timed(task.source)
    start = time.monotonic()
    try:
        outcome = install_from(source, task.pid, task.uffd, doc["start"], doc["offset"],
                               doc["end"] - doc["start"], buf, lambda: gate.shared(key, slot))
    except PagesError as e:
        return {"status": "failed", "error": str(e)}
    return {"status": outcome.value, "read": source.seconds,
            "install": time.monotonic() - start - source.seconds}


def serve(sock: socket.socket, gate: CopyGate, slot: int) -> None:
    """A copier's loop: take tasks and copies until the socket ends."""
    tasks: dict[int, _Task] = {}
    opened: dict[str, PageSource | SnapstoreError | OSError] = {}
    buf = Buffer(COPY_MESSAGE_BYTES)
    answered: float | None = None
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        except ConnectionResetError:
            return
        if not msg:
            return
        doc = json.loads(msg)
        if "task" in doc:
            tasks[doc["task"]] = _Task(doc["pid"], fds[0], _open(doc["source"], opened))
            continue
        for fd in fds:
            os.close(fd)
        key = doc["copy"]
        waited = 0.0 if answered is None else time.monotonic() - answered
        reply = {**_copy(tasks[key], gate, slot, key, doc, buf), "waited": waited}
        try:
            sock.send(json.dumps(reply).encode())
            answered = time.monotonic()
        except (BrokenPipeError, ConnectionResetError):
            return  # the daemon stopped meanwhile


def main(argv: list[str]) -> None:
    """`copier SOCKET_FD GATE_FD SLOT`."""
    # The restore command handles SIGINT (a terminal's ^C reaches the whole group) and
    # ends its copiers by closing their sockets.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    serve(sock, CopyGate(int(argv[1])), int(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
