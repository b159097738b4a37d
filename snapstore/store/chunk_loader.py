"""Chunk loads in loader processes, handed back as sealed memfds (docs/mount.md).

A mount's trio thread also writes every reply to the kernel. Loads in threads of its own
process, even though decompression and hashing release the GIL, cost it a GIL hand-off at
every step of every load. So each load runs in a loader process instead: it reads the
chunk object, decompresses it and checks its hash (`LocalStore.get_chunk`, the same code
as everywhere), writes the raw bytes into a fresh memfd, seals it against any change and
passes the descriptor back over a Unix socket. The mount maps it read-only; the mapping
is the cached chunk, and its memory goes away with the last view of it.

Protocol, one SOCK_SEQPACKET socket per loader, one request at a time:
- once started, the loader (`snapstore.store.chunk_loader_worker`) sends a reply with sequence
  number 0 and status OK;
- request: sequence number (u64), chunk id (32 bytes), size (u64), little endian;
- reply: the request's sequence number (u64) and a status byte; OK carries the memfd as
  SCM_RIGHTS, the others a UTF-8 message. A reply whose sequence number is not the one
  awaited answers a request whose caller was cancelled, and is dropped.
A loader exits when its socket closes. A loader that dies fails the load in flight, and
the next load given its place starts a new one.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import mmap
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.proctree import how_it_ended, stop
from snapstore.store.base import Chunk
from snapstore.store.chunk_loader_worker import CORRUPT, NOT_FOUND, OK, PID, REPLY, REQUEST, SEALS
from snapstore.store.local import LocalStore

log = logging.getLogger(__name__)

_MAX_MESSAGE = 4096
_START_SECONDS = 60
_STOP_SECONDS = 5
# Loader processes a load may meet dying (all killed at once) before one answers it.
_LOAD_ATTEMPTS = 4
# Descriptors kept free for everything else the mount opens (each mapping holds one).
_FD_RESERVE = 256

_T = TypeVar("_T")


class LoaderError(SnapstoreError):
    """A loader process failed: it died, or answered outside the protocol."""


class _Mapper:
    """Maps memfds read-only, at most `budget` mappings alive at once (each keeps a
    descriptor open); past that, their bytes are read into memory instead."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def map(self, fd: int, size: int) -> Chunk:
        _check_sealed(fd, size)
        if self.budget <= 0:
            return os.pread(fd, size, 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)
        self.budget -= 1
        weakref.finalize(mm, self._unmapped)
        return mm

    def _unmapped(self) -> None:
        self.budget += 1


def _check_sealed(fd: int, size: int) -> None:
    # Sealed, or whoever holds the memfd could change or shrink it under the mapping.
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
        raise LoaderError("a loader returned an unsealed chunk")
    if os.fstat(fd).st_size != size:
        raise LoaderError(f"a loader returned {os.fstat(fd).st_size} bytes, expected {size}")


def _mapping_budget() -> int:
    """Raise the soft open-file limit to the hard one and leave `_FD_RESERVE` of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return min(soft, 1 << 20) - len(os.listdir("/proc/self/fd")) - _FD_RESERVE


class _Loader:
    """One loader process and the mount's end of its socket. `proc` is set for a loader
    this process started (and must reap), not for one its first loader forked."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None) -> None:
        # Nonblocking (trio makes it so): LoaderPool uses it without an event loop.
        self.plain = sock
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.proc = proc
        self.pid = proc.pid if proc is not None else 0
        self.pidfd: int | None = None
        self.seq = 0
        self.ready = False
        self.dead = False

    @classmethod
    def spawn(cls, store_root: Path, count: int) -> list[_Loader]:
        """Start `count` loaders: one process, which forks the others once it has
        imported what they need and opened the store."""
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
        theirs = [t.fileno() for _, t in pairs]
        # The child imports snapstore from where this process did, installed or not.
        env = dict(os.environ)
        top = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (top, env.get("PYTHONPATH"))))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "snapstore.store.chunk_loader_worker",
                 ",".join(map(str, theirs)), str(store_root)],
                pass_fds=theirs, env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            raise
        finally:
            for _, t in pairs:
                t.close()
        return [cls(ours, proc if i == 0 else None) for i, (ours, _) in enumerate(pairs)]

    async def started(self) -> None:
        """Wait for the loader's first reply: it runs, has opened the store, and says
        its pid (held as a pidfd from then on, so it is never confused with another)."""
        with trio.move_on_after(_START_SECONDS), contextlib.suppress(ConnectionError):
            if self.hello(await self.sock.recv(REPLY.size + PID.size)):
                return
        raise self.not_started()

    def hello(self, msg: bytes) -> bool:
        """Take the loader's first message; whether it says the loader is ready."""
        if _is_greeting(msg):
            (self.pid,) = PID.unpack_from(msg, REPLY.size)
            with contextlib.suppress(ProcessLookupError):
                self.pidfd = os.pidfd_open(self.pid)
                self.ready = True
        return self.ready

    def not_started(self) -> LoaderError:
        self.dead = True
        return LoaderError(f"a loader process did not start{self.status()}; "
                           f"its error is in the mount's log")

    def exited(self) -> bool:
        return self.pidfd is not None and _readable(self.pidfd, 0)

    async def load(self, cid: ChunkId, size: int, take: Callable[[int, int], _T]) -> _T:
        """Load a chunk; `take` turns the loader's checked memfd into the result (the memfd
        itself is closed after it)."""
        self.seq += 1
        seq = self.seq
        try:
            await self.sock.send(REQUEST.pack(seq, cid.digest, size))
        except ConnectionError:
            raise self._died(cid) from None
        while True:
            try:
                msg, anc, flags, _ = await self.sock.recvmsg(
                    REPLY.size + _MAX_MESSAGE, socket.CMSG_SPACE(4))
            except ConnectionError:
                raise self._died(cid) from None
            fds = _fds(anc)
            try:
                if not msg:
                    raise self._died(cid)
                if _reply_seq(msg, flags, cid) != seq:
                    continue
                return take(_reply_fd(msg, fds, cid), size)
            finally:
                for fd in fds:
                    os.close(fd)

    def _died(self, cid: ChunkId) -> LoaderError:
        self.dead = True
        return LoaderError(f"the loader process of chunk {cid} died{self.status()}")

    def status(self) -> str:
        """How the loader ended, as " (...)", if it is this process's child (a forked
        loader's exit status goes to its parent). Called once it failed: its socket may
        close a moment before its exit status is there, so this waits a little for it."""
        if self.proc is None:
            return f" (pid {self.pid})" if self.pid else ""
        return how_it_ended(self.proc, 1) or " (running)"

    def close(self) -> None:
        """Close the socket, which ends the loader, and stop it."""
        self.sock.close()
        self.stop()

    def stop(self) -> None:
        """Once its socket is closed: wait a little for the loader to end, then kill it,
        and reap it if it is this process's child."""
        if self.pidfd is not None:
            if not _readable(self.pidfd, _STOP_SECONDS):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            os.close(self.pidfd)
            self.pidfd = None
        if self.proc is not None:
            stop(self.proc, _STOP_SECONDS)


def _is_greeting(msg: bytes) -> bool:
    """Whether `msg` is a loader's first message: sequence number 0, OK, and its pid."""
    return msg[:REPLY.size] == REPLY.pack(0, OK) and len(msg) == REPLY.size + PID.size


def _reply_seq(msg: bytes, flags: int, cid: ChunkId) -> int:
    if len(msg) < REPLY.size or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        raise LoaderError(f"a malformed reply from the loader of chunk {cid}")
    seq: int = REPLY.unpack_from(msg)[0]
    return seq


def _reply_fd(msg: bytes, fds: list[int], cid: ChunkId) -> int:
    """The memfd of a reply (still the caller's to close), or the error it reports."""
    _, status = REPLY.unpack_from(msg)
    text = msg[REPLY.size:].decode(errors="replace")
    if status == OK and len(fds) == 1:
        return fds[0]
    if status == NOT_FOUND:
        raise NotFoundError(text)
    if status == CORRUPT:
        raise CorruptError(text)
    raise LoaderError(text or f"the loader of chunk {cid} sent no chunk")


def _readable(fd: int, timeout: float) -> bool:
    # poll, not select: with a mapping per cached chunk, descriptors pass FD_SETSIZE.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class ProcessChunkReader:
    """A ChunkReader over a local store whose loads run in `processes` loader processes.

    Use it as an async context manager: entering starts the loaders (one process that
    forks the others) and waits until the first has opened the store (LoaderError if it
    cannot); leaving stops them all. A load given a loader that has not started yet waits
    for it. `max_mapped` bounds the chunks held as mappings at once (default: what the
    open-file limit allows).
    """

    def __init__(self, store: LocalStore, processes: int, max_mapped: int | None = None) -> None:
        if processes < 1:
            raise ValueError("need at least one loader process")
        self.store = store
        self._processes = processes
        self._max_mapped = max_mapped
        self._mapper = _Mapper(0)
        self._slots = trio.Semaphore(processes)
        self._idle: list[_Loader] = []
        self._started: list[_Loader] = []

    async def __aenter__(self) -> ProcessChunkReader:
        self._mapper.budget = (_mapping_budget() if self._max_mapped is None
                               else self._max_mapped)
        try:
            loaders = self._spawn(self._processes)
            await loaders[0].started()
            # The first last, so that the first load takes the loader that is ready.
            self._idle = loaders[::-1]
        except BaseException:
            self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        # Every socket first, so that the loaders end together, then wait for each.
        for loader in self._started:
            loader.sock.close()
        for loader in self._started:
            loader.close()
        self._started.clear()

    @property
    def pids(self) -> list[int]:
        """The loaders' pids, of those that have started."""
        return [loader.pid for loader in self._started if loader.ready]

    async def read_chunk(self, cid: ChunkId, size: int) -> Chunk:
        if size == 0:
            return b""
        return await self._load(cid, size, self._mapper.map)

    async def _load(self, cid: ChunkId, size: int, take: Callable[[int, int], _T]) -> _T:
        # A slot per loader: every loader is idle or serves the holder of a slot.
        async with self._slots:
            loader = self._idle.pop()
            try:
                if loader.dead or loader.exited():
                    loader = self._replace(loader)
                if not loader.ready:
                    await loader.started()
                return await loader.load(cid, size, take)
            finally:
                self._idle.append(loader)

    def _spawn(self, count: int) -> list[_Loader]:
        loaders = _Loader.spawn(self.store.root, count)
        self._started.extend(loaders)
        return loaders

    def _replace(self, dead: _Loader) -> _Loader:
        log.warning("a loader process ended%s; starting another", dead.status())
        dead.close()
        self._started.remove(dead)
        return self._spawn(1)[0]


@dataclass
class _Job:
    key: int
    cid: ChunkId
    size: int
    attempts: int = 0


class LoaderPool:
    """Loader processes driven without an event loop, for a caller that waits on a descriptor
    of its own beside them (the local feeder of snapstore.uffd.serve). Per load it costs a
    request, a reply and a poll, where an event loop's scheduling cost a feeder as much CPU
    again as the loader process spent on the chunk.

    A load goes to a free loader (`submit`) and comes back from `wait` as a sealed memfd of
    the chunk's checked bytes, or as the error that ended it. A loader that dies fails only
    the load it had: that load is tried again on the loader started in its place, up to four
    times in all. A loader that ends before it says it started is replaced too, four times
    in the pool's life; the next is a LoaderError from `wait`, and so is a loader that says
    nothing for a minute. Use it as a context manager: entering starts the loaders
    (one process that forks the others), leaving stops them all.
    """

    def __init__(self, store_root: Path, processes: int) -> None:
        if processes < 1:
            raise ValueError("need at least one loader process")
        self._root = store_root
        self._processes = processes
        self._poll = select.poll()
        self._loaders: dict[int, _Loader] = {}
        self._jobs: dict[_Loader, _Job] = {}
        self._free: list[_Loader] = []
        self._retry: list[_Job] = []
        self._failed: list[tuple[int, int | SnapstoreError]] = []
        self._deadline = 0.0
        self._early_deaths = 0

    def __enter__(self) -> LoaderPool:
        try:
            self._spawn(self._processes)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        # Every socket first, so that the loaders end together, then wait for each. The
        # plain sockets: closing trio's wrapper needs an event loop.
        for loader in self._loaders.values():
            loader.plain.close()
        for loader in self._loaders.values():
            loader.stop()
        self._loaders.clear()

    def _spawn(self, count: int) -> None:
        for loader in _Loader.spawn(self._root, count):
            self._loaders[loader.sock.fileno()] = loader
            self._poll.register(loader.sock.fileno(), select.POLLIN)
        self._deadline = time.monotonic() + _START_SECONDS

    def free(self) -> int:
        """How many loads `submit` can take now."""
        return len(self._free)

    def submit(self, key: int, cid: ChunkId, size: int) -> None:
        """Start loading chunk `cid` on a free loader; `wait` gives it back under `key`."""
        self._send(self._free.pop(), _Job(key, cid, size))

    def _send(self, loader: _Loader, job: _Job) -> None:
        loader.seq += 1
        self._jobs[loader] = job
        try:
            loader.plain.send(REQUEST.pack(loader.seq, job.cid.digest, job.size))
        except ConnectionError:
            self._lost(loader)

    def wait(self, fd: int) -> tuple[bool, list[tuple[int, int | SnapstoreError]]]:
        """Wait until `fd` is readable or loads end; whether `fd` is readable, and the loads
        that ended: (key, memfd, which the caller closes) or (key, error)."""
        ended, self._failed = self._failed, []
        starting = any(not loader.ready for loader in self._loaders.values())
        timeout = max(0.0, self._deadline - time.monotonic()) * 1000 if starting else None
        if ended:
            timeout = 0
        self._poll.register(fd, select.POLLIN)
        try:
            events = self._poll.poll(timeout)
        finally:
            self._poll.unregister(fd)
        readable = False
        for ready_fd, _ in events:
            if ready_fd == fd:
                readable = True
            else:
                self._receive(self._loaders[ready_fd], ended)
        if starting and not events and not ended:
            raise next(x for x in self._loaders.values() if not x.ready).not_started()
        while self._retry and self._free:
            self._send(self._free.pop(), self._retry.pop())
        ended += self._failed
        self._failed = []
        return readable, ended

    def _receive(self, loader: _Loader, ended: list[tuple[int, int | SnapstoreError]]) -> None:
        try:
            msg, anc, flags, _ = loader.plain.recvmsg(REPLY.size + _MAX_MESSAGE,
                                                      socket.CMSG_SPACE(4))
        except BlockingIOError:
            return
        except ConnectionError:
            msg, anc, flags = b"", [], 0
        fds = _fds(anc)
        try:
            if not loader.ready:
                if msg and loader.hello(msg):
                    self._free.append(loader)
                elif (not msg or _is_greeting(msg)) and self._early_deaths < _LOAD_ATTEMPTS:
                    # Ended before it said it started, or right after (its pid was gone
                    # when its greeting was read): killed, most likely; replaced like any
                    # loader that died, a few times (one that cannot start ends so every
                    # time).
                    self._early_deaths += 1
                    self._lost(loader)
                else:
                    raise loader.not_started()
            elif not msg:
                self._lost(loader)
            elif loader in self._jobs:
                self._answered(loader, msg, flags, fds, ended)
        finally:
            for fd in fds:
                os.close(fd)

    def _answered(self, loader: _Loader, msg: bytes, flags: int, fds: list[int],
                  ended: list[tuple[int, int | SnapstoreError]]) -> None:
        job = self._jobs[loader]
        result: int | SnapstoreError
        try:
            if _reply_seq(msg, flags, job.cid) != loader.seq:
                return
            result = _reply_fd(msg, fds, job.cid)
            _check_sealed(result, job.size)
            fds.remove(result)
        except SnapstoreError as e:
            result = e
        del self._jobs[loader]
        self._free.append(loader)
        ended.append((job.key, result))

    def _lost(self, dead: _Loader) -> None:
        """A loader died: start another, and give it the load it had (or fail that load)."""
        job = self._jobs.pop(dead, None)
        log.warning("a loader process ended%s; starting another", dead.status())
        self._poll.unregister(dead.sock.fileno())
        del self._loaders[dead.sock.fileno()]
        dead.plain.close()
        dead.stop()
        with contextlib.suppress(ValueError):
            self._free.remove(dead)
        self._spawn(1)
        if job is None:
            return
        job.attempts += 1
        if job.attempts < _LOAD_ATTEMPTS:
            self._retry.append(job)
        else:
            self._failed.append((job.key, dead._died(job.cid)))

