"""The mount's lifecycle: mount, serve until unmounted or signalled, unmount, record.

`serve` is the whole lifecycle for any ChunkReader; the rest runs it as a daemon that
reports readiness through a pipe, keeps a state record and a stats file under the
store's mounts/ directory, and ends a mount whether or not its daemon is still alive.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fusefs.inodes import InodeTable
from fusefs.ops import SnapshotOps
from fusefs.reader import ChunkCache, MountStats, SnapshotReader
from snapstore.errors import SnapstoreError
from snapstore.fileio import write_atomic
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest
from snapstore.proctree import below
from snapstore.store.base import ChunkReader

log = logging.getLogger(__name__)

# Kernel read-ahead for the mount; the default 128 KiB cuts every sequential read into
# 128 KiB requests, each a round trip through Python. Requests never exceed max_pages
# (1 MiB) whatever this says; a larger window keeps several of them in flight.
READ_AHEAD_KB = 4096

# Every snapstore mount has this FUSE subtype, which mountinfo shows in its type: how
# umount tells snapstore's mounts from anything else mounted.
SUBTYPE = "snapstore"
FSTYPE = f"fuse.{SUBTYPE}"


@dataclass(frozen=True, slots=True)
class MountOptions:
    """How to mount: who may read, memory for chunks, read-ahead, and what to record."""

    allow_other: bool = False
    cache_bytes: int = 512 << 20
    read_ahead_bytes: int = 32 << 20
    max_prefetch: int = 16
    fsname: str = "snapstore"
    # Where to rewrite the stats JSON every `stats_interval` seconds (None: nowhere).
    stats_path: Path | None = None
    stats_interval: float = 1.0
    # Where to write the chunk access order on unmount (None: not recorded).
    access_path: Path | None = None
    # Prometheus text endpoint (host, port); None: no endpoint.
    metrics: tuple[str, int] | None = None
    # Chunks to load into the cache as soon as the mount is up, in this order.
    warm: tuple[tuple[ChunkId, int], ...] = ()


def fuse_options(options: MountOptions) -> set[str]:
    opts = set(pyfuse3.default_options)
    # No max_read=: libfuse ends the session when it differs from the max_read that
    # pyfuse3's init handler leaves at 0. Without it requests are bounded only by
    # max_pages, which libfuse negotiates at its 1 MiB maximum (docs/mount.md).
    opts |= {"ro", f"fsname={options.fsname}", f"subtype={SUBTYPE}"}
    if options.allow_other:
        opts.add("allow_other")
    return opts


async def serve(
    manifest: Manifest,
    mountpoint: Path,
    reader: ChunkReader,
    options: MountOptions,
    ready: Callable[[], None] | None = None,
) -> MountStats:
    """Mount `manifest` read-only at `mountpoint` and serve it until it is unmounted,
    SIGTERM or SIGINT arrives (main thread only), or the caller cancels.

    `ready` is called once the mount is in place, on the thread that serves it, before
    the first request is served: it must not touch the mount. The mountpoint is always
    unmounted on the way out, and the access order and final stats are written where asked.
    """
    mountpoint = resolve(mountpoint)
    table = InodeTable(manifest)
    stats = MountStats()
    cache = ChunkCache(reader, options.cache_bytes, stats)
    # Bound before mounting: an address in use fails the mount with its own error, before
    # there is a mount to take down.
    listeners = await _metrics_listeners(options.metrics)
    with _signal_receiver() as signals:
        try:
            async with trio.open_nursery() as nursery:
                ops = SnapshotOps(table, SnapshotReader(
                    cache, stats, nursery, options.read_ahead_bytes, options.max_prefetch))
                pyfuse3.init(ops, str(mountpoint), fuse_options(options))
                log.info("mounted %s (%d inodes, %d bytes)", mountpoint, len(table),
                         table.total_bytes)
                nursery.start_soon(_raise_read_ahead, ops, mountpoint)
                if signals is not None:
                    nursery.start_soon(_terminate_on, signals)
                if options.stats_path is not None:
                    nursery.start_soon(_write_stats_every, stats, options)
                if listeners:
                    await nursery.start(_serve_metrics, stats, listeners)
                if options.warm:
                    nursery.start_soon(cache.warm, options.warm)
                if ready is not None:
                    ready()
                await pyfuse3.main(min_tasks=4)
                # Unmounted: stop the stats writer, metrics and any prefetch still running.
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                listener.socket.close()
            # Unmounted before anything is recorded: a record that fails (a full disk)
            # must not leave readers a dead mount. Whoever waits for the records waits
            # for the daemon to exit, as umount does.
            pyfuse3.close(unmount=True)
            log.info("unmounted %s: %s", mountpoint, json.dumps(stats.as_dict()))
            if options.stats_path is not None:
                _write_stats(stats, options.stats_path)
            if options.access_path is not None and cache.access_order:
                _write_access_order(cache.access_order, options.access_path)
    return stats


@contextlib.contextmanager
def _signal_receiver() -> Iterator[Any]:
    # trio can only take signals over in the main thread; a caller that serves from
    # another thread stops the mount by cancelling instead.
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as receiver:
        yield receiver


async def _terminate_on(signals: Any) -> None:
    async for signum in signals:
        log.info("%s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return


async def _raise_read_ahead(ops: SnapshotOps, mountpoint: Path) -> None:
    # The kernel sets the mount's read-ahead from the INIT reply, so this comes after it.
    await ops.initialized.wait()
    found = _mount_at(mountpoint)
    if found is None:
        return
    dev = found.device
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as e:
        log.info("kept the kernel's read-ahead for %s: %s", dev, e.strerror)


async def _write_stats_every(stats: MountStats, options: MountOptions) -> None:
    assert options.stats_path is not None
    while True:
        _write_stats(stats, options.stats_path)
        await trio.sleep(options.stats_interval)


def _write_stats(stats: MountStats, path: Path) -> None:
    doc = stats.as_dict()
    doc["pid"] = os.getpid()
    doc["updated"] = time.time()
    try:
        # Rewritten every few seconds and stale once the mount is gone: no fsync.
        write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode(), durable=False)
    except OSError as e:
        log.warning("cannot write stats to %s: %s", path, e.strerror)


def _write_access_order(order: list[ChunkId], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(c.hex + "\n" for c in order).encode())
    except OSError as e:
        # Only the next --prefetch loses its order; the mount is already gone.
        log.warning("cannot record the access order in %s: %s", path, e.strerror)


async def _metrics_listeners(where: tuple[str, int] | None) -> list[trio.SocketListener]:
    if where is None:
        return []
    host, port = where
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise SnapstoreError(f"cannot serve metrics on {host}:{port}: "
                             f"{e.strerror or e}") from None


async def _serve_metrics(
    stats: MountStats,
    listeners: list[trio.SocketListener],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(5):
                await stream.receive_some(65536)
            body = prometheus_text(stats).encode()
            await stream.send_all(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await stream.aclose()

    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host, port)
    task_status.started()
    await trio.serve_listeners(handle, listeners)


def prometheus_text(stats: MountStats) -> str:
    lines = []
    for key, value in stats.as_dict().items():
        name = f"snapstore_mount_{key}"
        if key.startswith("load_latency"):
            lines.append(f"# TYPE {name} gauge")
        elif key.startswith("cache_"):
            kind = "counter" if key in ("cache_hits", "cache_misses") else "gauge"
            lines.append(f"# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}")
            name += "_total" if kind == "counter" else ""
        else:
            lines.append(f"# TYPE {name}_total counter")
            name += "_total"
        lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"


# -- records under the store ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountPaths:
    """Files a mount keeps under STORE/mounts/, named after its mountpoint."""

    state: Path
    stats: Path
    log: Path

    @classmethod
    def of(cls, store_root: Path, mountpoint: Path) -> MountPaths:
        key = mount_key(mountpoint)
        d = store_root / "mounts"
        return cls(d / f"{key}.json", d / f"{key}.stats.json", d / f"{key}.log")


def resolve(mountpoint: Path) -> Path:
    """The absolute, symlink-free path of a mountpoint, found without touching the
    mountpoint itself: a stat there would hang on a stuck FUSE daemon, or on our own
    mount before it serves requests."""
    path = Path(os.path.abspath(mountpoint))
    return Path(os.path.realpath(path.parent)) / path.name


def mount_key(mountpoint: Path) -> str:
    """A file name for a mountpoint: readable, and unique through a hash of the path."""
    text = str(resolve(mountpoint))
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip("/"))[-48:] or "root"
    return f"{readable}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def access_path(store_root: Path, snapshot: ChunkId) -> Path:
    return store_root / "access" / snapshot.hex


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def write_state(paths: MountPaths, mountpoint: Path, snapshot: ChunkId) -> None:
    pid = os.getpid()
    doc = {"pid": pid, "start_time": _start_time(pid), "mountpoint": str(resolve(mountpoint)),
           "snapshot": snapshot.hex, "log": str(paths.log), "stats": str(paths.stats)}
    try:
        paths.state.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(paths.state, json.dumps(doc, sort_keys=True).encode() + b"\n")
    except OSError as e:
        raise SnapstoreError(f"cannot record the mount in {paths.state}: "
                             f"{e.strerror or e}") from None


def read_state(paths: MountPaths) -> dict[str, Any] | None:
    try:
        doc = json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_mounted(mountpoint: Path) -> bool:
    return _mount_at(mountpoint) is not None


@dataclass(frozen=True, slots=True)
class _MountEntry:
    device: str  # major:minor
    fstype: str


def _mount_at(mountpoint: Path) -> _MountEntry | None:
    """The mount on top at `mountpoint` (the last one mounted there), read from mountinfo:
    a stat could hang on a FUSE mount whose daemon is stuck."""
    want = str(resolve(mountpoint))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == want:
                # Optional fields, then "-", then the filesystem type.
                found = _MountEntry(fields[2], fields[fields.index("-", 6) + 1])
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def unmount(mountpoint: Path, paths: MountPaths, timeout: float = 30.0) -> str:
    """End the snapstore mount at `mountpoint`: ask its daemon (SIGTERM), then force
    what is left. Anything else mounted there is refused (SnapstoreError), untouched.

    Returns how it ended. Works after the daemon crashed ("Transport endpoint is not
    connected"): fusermount3 -u, then a lazy umount; and when it was stopped (SIGSTOP):
    it and its loaders are continued, so that they see the SIGTERM and end; a daemon that
    has not ended after `timeout` seconds is killed with its loaders.
    """
    mountpoint = resolve(mountpoint)
    _check_ours(mountpoint)
    how = "not mounted"
    pid = _daemon_pid(read_state(paths), mountpoint)
    if pid is not None:
        how = _stop_daemon(pid, timeout)
    if is_mounted(mountpoint):
        for cmd in (["fusermount3", "-u", "-q"], ["umount", "-l"]):
            # Checked again before each: the mount on top may have changed meanwhile.
            _check_ours(mountpoint)
            with contextlib.suppress(OSError):
                subprocess.run([*cmd, str(mountpoint)], check=False, capture_output=True)
            if not is_mounted(mountpoint):
                forced = f"forced ({cmd[0]})"
                how = forced if how == "not mounted" else f"{how}, {forced}"
                break
        else:
            raise SnapstoreError(f"cannot unmount {mountpoint}; is it busy? see `lsof +f -- "
                                 f"{mountpoint}`")
    for p in (paths.state, paths.stats):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return how


def _check_ours(mountpoint: Path) -> None:
    """Refuse unless what is mounted on top at `mountpoint`, if anything, is a snapstore
    mount: every mount snapstore makes has the FUSE subtype "snapstore", and the kernel
    shows it as the type, whatever state its daemon is in."""
    found = _mount_at(mountpoint)
    if found is not None and found.fstype != FSTYPE:
        raise SnapstoreError(f"{mountpoint} is not a snapstore mount ({found.fstype}); "
                             "nothing unmounted")


def _daemon_pid(state: dict[str, Any] | None, mountpoint: Path) -> int | None:
    """The pid of the daemon `state` records for `mountpoint`, if that very process (the
    same start time, so not a reused pid) still runs."""
    if not state or state.get("mountpoint") != str(mountpoint):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or _start_time(pid) != state.get("start_time"):
        return None
    return pid


def _stop_daemon(pid: int, timeout: float) -> str:
    loaders = below(pid)
    os.kill(pid, signal.SIGTERM)
    # A stopped process acts on SIGTERM only once continued, and a daemon can end only
    # once its loaders (stopped with it, by a signal to its process group) let go.
    for p in (pid, *loaders):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGCONT)
    if _wait_gone(pid, timeout):
        return "daemon stopped"
    # Stuck (or stopped again): it would serve nothing more, and its loaders serve only it.
    for p in (pid, *loaders):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    _wait_gone(pid, timeout)
    return "daemon killed"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- daemon ---------------------------------------------------------------------------


def daemonize(run: Callable[[Callable[[], None]], None], log_path: Path) -> None:
    """Run `run(ready)` in a detached process; return once it calls `ready`.

    The daemon reports through a pipe: "ok" once mounted, or its error. If it dies
    first, the pipe closes empty and this raises. It is forked twice, so it is nobody's
    child and leaves no zombie behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            os.setsid()
            if os.fork() == 0:
                _daemon(run, wfd, log_path)
        finally:
            os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as r:
        answer = r.read().decode(errors="replace").strip()
    if answer != "ok":
        raise SnapstoreError(answer or f"the mount daemon died; see {log_path}")


class _ReadyPipe:
    """The write end of the readiness pipe, closed after its one message."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, message: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.write(fd, message.encode())
        os.close(fd)


def _daemon(run: Callable[[Callable[[], None]], None], wfd: int, log_path: Path) -> None:
    pipe = _ReadyPipe(wfd)
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            # Never through a link: the log is the store's file, not a way out of it.
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                          0o600)
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            pipe.send(f"cannot open the mount log {log_path}: {why}")
            return
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, force=True,
            format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        try:
            run(lambda: pipe.send("ok"))
            code = 0
        except SnapstoreError as e:
            log.error("%s", e)
            pipe.send(str(e))
        except BaseException as e:
            log.exception("mount daemon failed")
            pipe.send(f"mount failed: {e}; see {log_path}")
    finally:
        # Never return into the caller's code (its CLI, its test runner).
        os._exit(code)


def check_mountpoint(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        raise SnapstoreError(f"something is already mounted at {mountpoint}")
    try:
        if not mountpoint.is_dir():
            raise SnapstoreError(f"mountpoint {mountpoint} is not a directory")
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise SnapstoreError(f"{mountpoint} is a dead mount; run `snapstore umount "
                                 f"{mountpoint}` first") from None
        raise
