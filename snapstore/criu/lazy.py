"""snapstore as CRIU's lazy-pages daemon: serves the restored tasks' lazy memory (private
anonymous pages) from the snapshot's pages files, demand faults first, and has its copy
processes (`snapstore.criu.copier`) install every other page in large parallel
UFFDIO_COPYs once the restore is done.

Protocol (CRIU `criu/uffd.c`): `criu restore --lazy-pages -W WORK` connects to
`WORK/lazy-pages.socket` and sends, per task, its pid as a native int and then its
userfaultfd by SCM_RIGHTS (a zombie sends -pid and no descriptor), and finally
0x52535446 ("RSTF") once every task is restored, just before they resume. The daemon
handles the userfaultfd events CRIU enables: page faults, fork (a new userfaultfd for the
child), remap, remove and unmap. docs/criu.md has the invariants; in short:
- a page is installed only from its pages file through the snapshot mount (hash-checked);
- a range that an UNMAP or REMOVE event dropped is never filled afterwards: no copy is in
  flight while a task's event is read and applied, and every copy starts after checking
  that its range is still wanted (the copy processes' gate, `copier.CopyGate`);
- a page the daemon cannot serve kills the restored tree: no task waits on it forever;
- a watchdog process (`snapstore.criu.watchdog`) holds a duplicate of every userfaultfd
  and kills the tree if this process dies before every page is in, so that an absent page
  is never read as zeros.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from snapstore.criu import watchdog
from snapstore.criu.copier import (
    COPY_MESSAGE_BYTES,
    KEYS,
    MAX_COPIERS,
    Copier,
    CopierGone,
    CopyGate,
)
from snapstore.criu.images import PAGE_SIZE, Pagemap, read_pagemap, read_vma_bounds
from snapstore.criu.sources import FilePages, PagesError, PageSource, install_from
from snapstore.criu.uffdio import (
    UFFDIO_UNREGISTER,
    Buffer,
    Installed,
    ioctl_range,
    zeropage,
)
from snapstore.errors import SnapstoreError
from snapstore.proctree import stop

SOCKET_NAME = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446
# Bytes installed per demand fault: the faulting page and its neighbours in the same range.
FAULT_AROUND = 64 << 10
# Bytes per prefetch copy: large enough that the kernel's copy dominates the call.
PREFETCH_BYTES = COPY_MESSAGE_BYTES
# Where a copy process starts afresh, the next one starts this far on: the first goes on
# through the stretch between (`Task.take_next`), so that two copy processes seldom share
# a chunk (each would decompress and check it).
STRIDE = 32 << 20

_UFFD_EVENT_PAGEFAULT = 0x12
_UFFD_EVENT_FORK = 0x13
_UFFD_EVENT_REMAP = 0x14
_UFFD_EVENT_REMOVE = 0x15
_UFFD_EVENT_UNMAP = 0x16
_MSG_SIZE = 32


class LazyPagesError(SnapstoreError):
    """The daemon could not serve a restored task; the task was killed."""


@dataclass(slots=True, eq=False)
class Span:
    """Pages still to install: [start, end) in the task now, from `offset` of the pages
    file. `dropped` is set when the task unmapped or removed it while it was in flight.
    Compared by identity: an in-flight span is taken out of `Task.inflight` as itself,
    never as another with the same bounds."""

    start: int
    end: int
    offset: int
    dropped: bool = False
    slot: int = -1  # the copy process copying it, if one is


def _start(span: Span) -> int:
    return span.start


@dataclass(slots=True, eq=False)
class Task:
    """What is left to install in one task. A GPU process has tens of thousands of lazy
    spans (every run of present pages in its areas), and every fault and every prefetch
    takes from them: each operation finds its place by bisection, never by a walk."""

    pid: int
    uffd: int
    pages: PageSource
    pending: list[Span]  # sorted by start, disjoint
    # Its copy processes' gate, and its key there (copier.CopyGate).
    gate: CopyGate | None = None
    key: int = 0
    inflight: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False
    # Where the next prefetch starts: after the last demand fault, so that the copies run
    # ahead of a task reading its memory in order (the CUDA restore reads every staged
    # buffer through) instead of elsewhere while it faults page range by page range.
    cursor: int = 0
    # Seconds the task's event reads waited for copies in flight.
    event_waits: float = 0.0

    @contextlib.contextmanager
    def reading_events(self) -> Iterator[None]:
        """Hold the lock, with no copy in flight and none starting until the block ends:
        for reading an event from the userfaultfd and applying it. The copies run in the
        copy processes, outside the lock; the gate makes them wait (docs/criu.md says
        why)."""
        with self.lock:
            if self.gate is None:
                yield
                return
            start = time.monotonic()
            with self.gate.exclusive(self.key):
                self.event_waits += time.monotonic() - start
                yield

    def take(self, start: int, length: int) -> Span | None:
        """Cut [start, start+length) out of the pending span holding `start`, clipped to
        it, and mark it in flight."""
        i = bisect.bisect_right(self.pending, start, key=_start) - 1
        if i < 0 or start >= self.pending[i].end:
            return None
        return self._cut(i, start, length)

    def take_next(self, length: int, after: int | None = None,
                  stride: int | None = None) -> Span | None:
        """The next `length` pending bytes: from `after` on if that is pending (a copier
        going on where its last copy ended), else from the cursor on, wrapping to the
        lowest. A start from the cursor moves it `stride` on (default `length`): the rest
        of that stride is left for the copier that took its start."""
        if not self.pending:
            return None
        if after is not None:
            i = bisect.bisect_right(self.pending, after, key=_start) - 1
            if i >= 0 and after < self.pending[i].end:
                return self._cut(i, after, length, keep_cursor=True)
        i = bisect.bisect_right(self.pending, self.cursor, key=_start) - 1
        if i >= 0 and self.cursor < self.pending[i].end:
            start = self.cursor
        else:
            i = 0 if i + 1 == len(self.pending) else i + 1
            start = self.pending[i].start
        span = self._cut(i, start, length)
        if stride is not None:
            self.cursor = span.start + stride
        return span

    def _cut(self, i: int, start: int, length: int, keep_cursor: bool = False) -> Span:
        s = self.pending[i]
        end = min(s.end, start + length)
        cut = Span(start, end, s.offset + (start - s.start))
        pieces = []
        if s.start < start:
            pieces.append(Span(s.start, start, s.offset))
        if end < s.end:
            pieces.append(Span(end, s.end, s.offset + (end - s.start)))
        self.pending[i:i + 1] = pieces
        self.inflight.append(cut)
        if not keep_cursor:
            self.cursor = end
        return cut

    def in_flight(self, addr: int) -> bool:
        return any(s.start <= addr < s.end for s in self.inflight)

    def drop(self, start: int, end: int) -> None:
        """The task unmapped or removed [start, end): nothing may be installed there.

        An in-flight span that overlaps it stops (its copier checks `dropped` before every
        retry), and what of it lies outside the range is pending again: the pages it had
        not installed yet must not be lost."""
        i = max(0, bisect.bisect_right(self.pending, start, key=_start) - 1)
        j = bisect.bisect_left(self.pending, end, key=_start)
        kept = [piece for s in self.pending[i:j] for piece in _split(s, start, end)
                if not start <= piece.start < end]
        self.pending[i:j] = kept
        again = [piece for s in self._stop_inflight(start, end)
                 for piece in _split(s, start, end) if not start <= piece.start < end]
        self._add(again)

    def remap(self, old: int, new: int, length: int) -> None:
        """The task moved [old, old+length) to `new`: what is pending there moves with it.

        A span crossing the range's bounds is cut at them first. An in-flight span that
        overlaps it stops, and is pending again, moved where it was inside: its copier
        would now meet the old addresses unmapped, and the pages it had installed moved
        with the memory (a copy onto them finds them installed)."""
        end, delta = old + length, new - old
        pieces = [piece for s in self.pending for piece in _split(s, old, end)]
        pieces += [piece for s in self._stop_inflight(old, end)
                   for piece in _split(s, old, end)]
        for piece in pieces:
            if old <= piece.start < end:
                piece.start += delta
                piece.end += delta
        self.pending = []
        self._add(pieces)

    def _stop_inflight(self, start: int, end: int) -> list[Span]:
        """Mark the in-flight spans overlapping [start, end) dropped; copies of them."""
        stopped = []
        for s in self.inflight:
            if s.start < end and start < s.end and not s.dropped:
                s.dropped = True
                if s.slot >= 0 and self.gate is not None:
                    self.gate.drop(s.slot)
                stopped.append(Span(s.start, s.end, s.offset))
        return stopped

    def _add(self, spans: list[Span]) -> None:
        self.pending = sorted([*self.pending, *spans], key=_start)


def _split(s: Span, *cuts: int) -> list[Span]:
    """`s` cut at each of `cuts` that falls inside it."""
    pieces = []
    start = s.start
    for cut in sorted(c for c in cuts if s.start < c < s.end):
        pieces.append(Span(start, cut, s.offset + (start - s.start)))
        start = cut
    pieces.append(Span(start, s.end, s.offset + (start - s.start)))
    return pieces


@dataclass(slots=True)
class Stats:
    faults: int = 0
    fault_bytes: int = 0
    prefetched_bytes: int = 0
    zero_pages: int = 0
    tasks: int = 0
    first_fault_at: float | None = None
    resumed_at: float | None = None  # CRIU said every task is restored
    done_at: float | None = None
    event_waits: float = 0.0
    copiers: int = 0
    copy_read: float = 0.0
    copy_install: float = 0.0
    copy_waited: float = 0.0

    def report(self) -> dict[str, int | float | None]:
        """The figures of a restore, for its --json: what was installed and how, seconds
        from the tasks' resuming to the last page in, how long event reads waited for
        copies in flight (a demand fault behind them waited as long), and the copy
        processes' seconds, added up over all of them: reading (decoding and checking
        chunks), installing (the gate's waits included), and waiting for their next range."""
        fill = (None if self.done_at is None or self.resumed_at is None
                else round(self.done_at - self.resumed_at, 4))
        return {"tasks": self.tasks, "faults": self.faults, "fault_bytes": self.fault_bytes,
                "prefetched_bytes": self.prefetched_bytes, "zero_pages": self.zero_pages,
                "fill_seconds": fill, "event_wait_seconds": round(self.event_waits, 4),
                "copiers": self.copiers, "copy_read_seconds": round(self.copy_read, 4),
                "copy_install_seconds": round(self.copy_install, 4),
                "copy_wait_seconds": round(self.copy_waited, 4)}


class LazyPagesDaemon:
    """Serves one `criu restore --lazy-pages` whose work directory is `work` and whose
    images are in `images` (the snapshot mount). Call `start` before CRIU runs, `wait`
    after it returned, `close` always."""

    def __init__(self, images: Path, work: Path,
                 sources: Mapping[str, PageSource] | None = None,
                 copiers: int | None = None) -> None:
        """`sources` gives the bytes of pages files by name; any other is read from
        `images` (the snapshot mount). `copiers`: how many copy processes (default one
        per core); they start here, so that they are ready when the tasks resume."""
        self.images = images
        self.work = work
        self._sources: dict[str, PageSource] = dict(sources or {})
        self._opened: list[FilePages] = []
        self.stats = Stats()
        self.error: str | None = None
        self._tasks: list[Task] = []
        self._tasks_lock = threading.Lock()
        self._turn = 0  # which task the next prefetch copy starts looking at
        self._finished = threading.Event()  # RSTF received
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # CRIU connects to the name relative to its work directory, which may be deeper
        # than a socket address can name: bind through a descriptor of the directory.
        work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._listener.bind(f"/proc/self/fd/{work_fd}/{SOCKET_NAME}")
        finally:
            os.close(work_fd)
        self._listener.listen(1)
        self._watchdog, self._watchdog_proc = watchdog.start()
        self._kill_root: int | None = None
        self._watchdog_lock = threading.Lock()
        self._gate = CopyGate.create()
        self._keys = 0  # tasks given a key in the gate
        count = min(MAX_COPIERS, copiers or os.cpu_count() or 2)
        self.stats.copiers = count
        self._copiers = [Copier(slot, self._gate) for slot in range(count)]

    # -- lifecycle ----------------------------------------------------------------

    def start(self, kill_root: int | None = None) -> None:
        """Serve CRIU's connection. `kill_root` is the process to kill (with everything
        below it) instead of the tasks' own pids, when those are another pid namespace's."""
        self._kill_root = kill_root
        self._spawn(self._accept, "lazy-accept")

    def wait(self, timeout: float) -> None:
        """Until every page of every task is installed (or its task is gone)."""
        deadline = time.monotonic() + timeout
        while not self._all_done():
            if self.error is not None:
                raise LazyPagesError(self.error)
            if time.monotonic() > deadline:
                self._fail("the lazy pages were not all installed in time")
                raise LazyPagesError(self.error or "timed out")
            time.sleep(0.005)
        if self.error is not None:
            raise LazyPagesError(self.error)
        if self.stats.done_at is None:
            self.stats.done_at = time.monotonic()
        self.stats.event_waits = sum(t.event_waits for t in self._tasks)
        with self._watchdog_lock:
            watchdog.release(self._watchdog)

    def close(self) -> None:
        """Stop serving. Unless `wait` saw every page in, the watchdog kills the tree."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._listener.close()
        self._watchdog.close()
        stop(self._watchdog_proc, 30)
        for copier in self._copiers:
            copier.end()
        for copier in self._copiers:
            copier.wait()
        for t in self._threads:
            t.join(timeout=10)
        for task in self._tasks:
            with contextlib.suppress(OSError):
                os.close(task.uffd)
        for f in self._opened:
            f.close()
        self._gate.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=self._guard, args=(target, *args), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, SnapstoreError)
                       else str(e))

    def _fail(self, why: str) -> None:
        """Never leave a restored task waiting on a page nobody will install."""
        if self.error is None:
            self.error = why
        for pid in {self._kill_root} if self._kill_root else {t.pid for t in self._tasks}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for task in self._tasks:
            task.gone = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def _note_done(self) -> None:
        """Note when the last page went in: `wait` may come much later (the CUDA restore
        runs between), and the fill ends here, not there."""
        while not self._all_done():
            if self.error is not None or select.select([self._stop_r], [], [], 0.005)[0]:
                return
        if self.stats.done_at is None:
            self.stats.done_at = time.monotonic()

    def _all_done(self) -> bool:
        if not self._finished.is_set():
            return False
        with self._tasks_lock:
            return all(t.gone or (not t.pending and not t.inflight) for t in self._tasks)

    # -- CRIU's socket --------------------------------------------------------------

    def _accept(self) -> None:
        ready, _, _ = select.select([self._listener.fileno(), self._stop_r], [], [])
        if self._stop_r in ready:
            return
        conn, _ = self._listener.accept()
        with conn:
            while True:
                word = _recv_exact(conn, 4, self._stop_r)
                if word is None:
                    return
                (value,) = struct.unpack("i", word)
                if value == RESTORE_FINISHED:
                    self.stats.resumed_at = time.monotonic()
                    self._finished.set()
                    for copier in self._copiers:
                        self._spawn(self._feed, f"lazy-copier-{copier.slot}", copier)
                    self._spawn(self._note_done, "lazy-done")
                    return
                if value < 0:  # a zombie: no memory, no descriptor
                    continue
                _, fds, _, _ = socket.recv_fds(conn, 16, 1)
                if len(fds) != 1:
                    raise LazyPagesError(f"CRIU sent pid {value} without its userfaultfd")
                self._add_task(value, fds[0])

    def _add_task(self, pid: int, uffd: int) -> None:
        pagemap = read_pagemap(self.images / f"pagemap-{pid}.img")
        vmas = read_vma_bounds(self.images / f"mm-{pid}.img")
        self._serve(Task(pid, uffd, self._source(pagemap), _spans(pagemap, vmas)),
                    f"lazy-events-{pid}")

    def _serve(self, task: Task, name: str) -> None:
        """Guard the task's userfaultfd, hand it to the copy processes, serve its events."""
        self._guard_uffd(task.pid, task.uffd)
        with self._tasks_lock:
            if self._keys == KEYS:
                raise LazyPagesError(f"more than {KEYS} tasks")
            task.gate, task.key = self._gate, self._keys
            self._keys += 1
        for copier in self._copiers:
            copier.add_task(task.key, task.pid, task.pages, task.uffd)
        with self._tasks_lock:
            self._tasks.append(task)
            self.stats.tasks += 1
        self._spawn(self._serve_events, name, task)

    def _guard_uffd(self, pid: int, uffd: int) -> None:
        with self._watchdog_lock:
            watchdog.guard(self._watchdog, self._kill_root or pid, uffd)

    def _source(self, pagemap: Pagemap) -> PageSource:
        name = pagemap.pages_file
        if name not in self._sources:
            opened = FilePages(self.images / name)
            self._opened.append(opened)
            self._sources[name] = opened
        return self._sources[name]

    # -- faults and events ------------------------------------------------------------

    def _serve_events(self, task: Task) -> None:
        buf = Buffer(FAULT_AROUND)
        poller = select.poll()
        poller.register(task.uffd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not task.gone:
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            if events.get(task.uffd, 0) & (select.POLLERR | select.POLLHUP):
                task.gone = True
                return
            with task.reading_events():
                try:
                    msg = os.read(task.uffd, _MSG_SIZE)
                except BlockingIOError:
                    continue
                if len(msg) != _MSG_SIZE:
                    raise LazyPagesError(f"short userfaultfd read from pid {task.pid}")
                event = msg[0]
                if event == _UFFD_EVENT_PAGEFAULT:
                    (addr,) = struct.unpack_from("Q", msg, 16)
                    span = self._fault_span(task, addr & ~(PAGE_SIZE - 1))
                elif event == _UFFD_EVENT_FORK:
                    (child_uffd,) = struct.unpack_from("I", msg, 8)
                    self._fork(task, child_uffd)
                    continue
                elif event == _UFFD_EVENT_REMAP:
                    old, new, length = struct.unpack_from("QQQ", msg, 8)
                    task.remap(old, new, length)
                    continue
                elif event in (_UFFD_EVENT_REMOVE, _UFFD_EVENT_UNMAP):
                    start, end = struct.unpack_from("QQ", msg, 8)
                    task.drop(start, end)
                    if event == _UFFD_EVENT_REMOVE:
                        # Later faults there are the kernel's (zero pages), not ours.
                        ioctl_range(task.uffd, UFFDIO_UNREGISTER, start, end - start)
                    continue
                else:
                    raise LazyPagesError(f"unexpected userfaultfd event {event:#x} "
                                         f"from pid {task.pid}")
            if span is not None:
                self._install(task, span, buf)

    def _fault_span(self, task: Task, addr: int) -> Span | None:
        """Under the task's lock: what to install for a fault at `addr`."""
        if self.stats.first_fault_at is None:
            self.stats.first_fault_at = time.monotonic()
        span = task.take(addr, FAULT_AROUND)
        if span is None and not task.in_flight(addr):
            # Not lazy memory, or installed since the fault was queued: a zero page
            # where nothing is there, a wake-up where something is (EEXIST).
            with self._tasks_lock:
                self.stats.zero_pages += 1
            if not zeropage(task.uffd, addr):
                task.gone = True
        return span

    def _fork(self, parent: Task, child_uffd: int) -> None:
        """The child starts with what its parent still had to install, from the same file."""
        child = Task(parent.pid, child_uffd, parent.pages,
                     [Span(s.start, s.end, s.offset) for s in [*parent.pending,
                                                               *parent.inflight]
                      if not s.dropped])
        child.pending.sort(key=lambda s: s.start)
        self._serve(child, f"lazy-events-{parent.pid}-child")

    # -- copying ------------------------------------------------------------------------

    def _feed(self, copier: Copier) -> None:
        """Give one copy process its prefetch copies, one after another, until none is
        left: from where its last one ended while that is pending, so that it reads a
        stretch of the pages file in order and decodes each chunk there once."""
        last: tuple[Task, int] | None = None
        while self.error is None:
            work = self._next_prefetch(copier.slot, last)
            if work is None:
                return
            task, span = work
            try:
                answer = copier.copy(task.key, span.start, span.end, span.offset)
            except CopierGone as e:
                self._fail(str(e))
                return
            finally:
                with task.lock:
                    task.inflight.remove(span)
            last = None
            status, why = answer["status"], answer.get("error", "")
            with self._tasks_lock:
                self.stats.copy_read += answer.get("read", 0.0)
                self.stats.copy_install += answer.get("install", 0.0)
                self.stats.copy_waited += answer["waited"]
                if status == "done":
                    self.stats.prefetched_bytes += span.end - span.start
            if status == "done":
                last = task, span.end
            elif status == "gone":
                task.gone = True
            elif status != "dropped":
                self._fail(why)
                return

    def _next_prefetch(self, slot: int, last: tuple[Task, int] | None
                       ) -> tuple[Task, Span] | None:
        """The next span for copy process `slot` to prefetch: on from `last` (a task and
        where its last copy ended) while that is pending, else from each task in turn: the
        processes of a job (one per GPU) get their memory side by side, and their CUDA
        restores run together."""
        with self._tasks_lock:
            tasks = [t for t in self._tasks if not t.gone and t.pending]
            self._turn += 1
            turn = self._turn % len(tasks) if tasks else 0
        ordered = tasks[turn:] + tasks[:turn]
        if last is not None and last[0] in tasks:
            ordered.remove(last[0])
            ordered.insert(0, last[0])
        for task in ordered:
            with task.lock:
                after = last[1] if last is not None and last[0] is task else None
                span = task.take_next(PREFETCH_BYTES, after=after, stride=STRIDE)
                if span is not None:
                    # Under the lock, as events are applied: a drop from here on is seen.
                    span.slot = slot
                    self._gate.arm(slot)
                    return task, span
        return None

    def _install(self, task: Task, span: Span, buf: Buffer) -> None:
        """A demand fault's span, installed by the task's event thread (which reads no
        event meanwhile, so nothing drops the span before the copy ends)."""
        length = span.end - span.start
        try:
            outcome = install_from(task.pages, task.pid, task.uffd, span.start, span.offset,
                                   length, buf, lambda: contextlib.nullcontext(not task.gone))
        except PagesError as e:
            self._fail(str(e))
            return
        finally:
            with task.lock:
                task.inflight.remove(span)
        if outcome is Installed.GONE:
            task.gone = True
        # Each task's event thread counts here: one lock for all of them.
        with self._tasks_lock:
            self.stats.faults += 1
            self.stats.fault_bytes += length


def _spans(pagemap: Pagemap, vmas: list[tuple[int, int]]) -> list[Span]:
    """The lazy extents, joined where one follows another in memory and in the pages file,
    and cut at memory area bounds: a UFFDIO_COPY that crosses one fails with ENOENT, like
    one into memory that is not mapped at all.

    CRIU writes an area's pages in entries of at most 1 MiB (its page pipes are at most
    pipe-max-size), and a prefetch takes from one span: unjoined, every prefetch was 1 MiB
    whatever PREFETCH_BYTES said, and two copiers of neighbouring prefetches shared a chunk
    at nearly every span's ends (chunks are 1 MiB on average)."""
    cuts = sorted({b for vma in vmas for b in vma})
    joined: list[Span] = []
    for e in sorted(pagemap.lazy_extents(), key=lambda e: e.vaddr):
        last = joined[-1] if joined else None
        if last is not None and last.end == e.vaddr \
                and last.offset + (last.end - last.start) == e.offset:
            last.end = e.end
        else:
            joined.append(Span(e.vaddr, e.end, e.offset))
    spans = []
    for j in joined:
        start = j.start
        for cut in cuts[bisect.bisect_right(cuts, j.start):bisect.bisect_left(cuts, j.end)]:
            spans.append(Span(start, cut, j.offset + (start - j.start)))
            start = cut
        spans.append(Span(start, j.end, j.offset + (start - j.start)))
    return spans


def _recv_exact(conn: socket.socket, n: int, stop_fd: int) -> bytes | None:
    out = b""
    while len(out) < n:
        ready, _, _ = select.select([conn.fileno(), stop_fd], [], [])
        if stop_fd in ready:
            return None
        chunk = conn.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out

