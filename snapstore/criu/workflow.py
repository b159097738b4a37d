"""Checkpoint a process tree with CRIU into the store, and restore it from the snapshot
(lazily by default, with snapstore as CRIU's lazy-pages daemon), moving the tree's CUDA
state to host memory and back around CRIU; or start it cold when it cannot be restored."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapstore.criu import staging
from snapstore.criu.binary import Criu, CriuError
from snapstore.criu.lazy import LazyPagesDaemon, LazyPagesError, PageSource
from snapstore.errors import NoMatchError, RestoreError, SnapstoreError
from snapstore.gpu import cuda
from snapstore.ingest import IngestResult, check_labels, ingest
from snapstore.proctree import signal_tree
from snapstore.store.local import LocalStore
from snapstore.workflow import gpu_labels, mounted, pick, release

# How long the driver may wait for the process's CUDA work to finish before Lock fails.
LOCK_TIMEOUT_MS = 10_000
RUNTIME_LABEL = "runtime"
CUDA_LABEL = "cuda"
# How long a lazy restore may take to install the whole memory once the tree runs.
LAZY_TIMEOUT = 600.0


def compat_labels(criu: Criu) -> dict[str, str]:
    """What decides whether a CRIU snapshot can restore on a host."""
    return {
        RUNTIME_LABEL: "criu",
        "criu.version": criu.version,
        "kernel": platform.release(),
        "arch": platform.machine(),
        **gpu_labels(),
    }


def has_cuda(api: cuda.CheckpointApi, pid: int) -> bool:
    try:
        api.get_state(pid)
    except cuda.NoCudaContext:
        return False
    return True


def checkpoint(store: LocalStore, criu: Criu, pid: int, tag: str, labels: dict[str, str],
               leave_running: bool = False,
               api: cuda.CheckpointApi | None = None) -> IngestResult:
    """Dump the tree rooted at `pid` into a working directory of the store and ingest it.

    A process with CUDA state has it moved into its host memory first (Lock, Checkpoint),
    so CRIU sees no GPU mapping; it gets it back (Restore, Unlock) if the dump fails or
    when `leave_running`. Without `leave_running` the tree is killed, but only once its
    snapshot is stored and tagged: CRIU leaves it stopped, and if the ingest fails (a full
    disk, say) it is resumed as it was, so a failed checkpoint loses no process.
    """
    api = api or cuda.open_api()
    with_cuda = has_cuda(api, pid)
    # Labels no reader would accept fail here, before the process is touched.
    all_labels = check_labels({**compat_labels(criu), CUDA_LABEL: "1" if with_cuda else "0",
                               **labels})
    with store.work_dir("criu-dump") as work:
        images = work / "images"
        images.mkdir()
        if with_cuda:
            api.lock(pid, LOCK_TIMEOUT_MS)
            try:
                api.checkpoint(pid)
            except BaseException:
                api.unlock(pid)
                raise
        try:
            criu.dump(pid, images, work, leave_running)
        except BaseException:
            if with_cuda:
                _give_gpu_back(api, pid)
            raise
        if leave_running:
            if with_cuda:
                _give_gpu_back(api, pid)
            return ingest(store, images, tag, all_labels)
        try:
            result = ingest(store, images, tag, all_labels)
        except BaseException:
            signal_tree(pid, signal.SIGCONT)
            if with_cuda:
                _give_gpu_back(api, pid)
            raise
        signal_tree(pid, signal.SIGKILL)
        return result


def _give_gpu_back(api: cuda.CheckpointApi, pid: int) -> None:
    api.restore(pid)
    api.unlock(pid)


@dataclass(slots=True)
class RestoreReport:
    pid: int
    snapshot: str | None
    source: str | None  # "local" or the remote
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    mount_left: str | None = None
    path: str = "restore"  # or "cold"
    reason: str | None = None  # why it started cold


class Stages:
    """The time of each stage of a restore, in order, and a mount it had to leave."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.times: dict[str, float] = {}
        self.mount_left: str | None = None

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = round(now - self.last, 4)
        self.last = now

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def pick_criu(store: LocalStore, ref: str | None, match: dict[str, str],
              remote: str | None) -> tuple[str, str]:
    """The CRIU snapshot to restore and where it is (`workflow.pick`); a match never picks
    a gVisor snapshot that happens to carry the same labels."""
    return pick(store, ref, {**match, RUNTIME_LABEL: "criu"} if match else match, remote)


@contextlib.contextmanager
def images_of(store: LocalStore, snapshot: str, source: str, lazy: bool,
              stages: Stages) -> Iterator[tuple[Path, Mapping[str, PageSource]]]:
    """The image directory CRIU restores from, and the lazy pages' sources by file name.

    Lazy from the local store: a staged working directory (no mount), the daemon reading
    the lazy pages from the store. Otherwise a lazy mount of the snapshot, which CRIU and
    the daemon both read; released (or left, in `stages.mount_left`) afterwards.
    """
    if lazy and source == "local":
        with store.work_dir("criu-images") as work:
            try:
                sources = staging.stage(store, store.get_manifest(store.resolve(snapshot)),
                                        work / "images")
            except SnapstoreError as e:
                raise RestoreError(f"cannot stage snapshot {snapshot[:12]}: {e}") from None
            stages.done("stage")
            yield work / "images", sources
        return
    with mounted(store, snapshot, source, allow_other=False) as mnt:
        stages.done("mount")
        if not (mnt / "inventory.img").is_file():
            raise RestoreError(f"snapshot {snapshot[:12]} is not a CRIU checkpoint "
                               "(no inventory.img)")
        yield mnt, {}
        stages.mount_left = None if release(mnt) else str(mnt)


def restore_or_start(store: LocalStore, criu_path: str | None, ref: str | None,
                     match: dict[str, str], cold_start: Sequence[str],
                     remote: str | None = None, lazy: bool = False) -> RestoreReport:
    """`restore`, and if there is no usable CRIU, no snapshot matches or the restore
    fails, start `cold_start` (a command and its arguments) instead: detached, in a
    session of its own, its standard streams on /dev/null. The report says which
    happened, and why."""
    start = time.monotonic()
    try:
        return restore(store, Criu.find(criu_path), ref, match, remote, lazy)
    except (CriuError, NoMatchError, RestoreError) as e:
        reason = str(e)
    try:
        proc = subprocess.Popen(list(cold_start), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as e:
        raise RestoreError(f"{reason}; and the cold start failed: {e.strerror}: "
                           f"{cold_start[0]}") from None
    return RestoreReport(proc.pid, None, None, time.monotonic() - start, path="cold",
                         reason=reason)


def restore(store: LocalStore, criu: Criu, ref: str | None, match: dict[str, str],
            remote: str | None = None, lazy: bool = False,
            api: cuda.CheckpointApi | None = None) -> RestoreReport:
    """Restore the newest snapshot matching `match` (or `ref`) and return once its root
    process runs, its CUDA state back on the GPU, and all its memory in.

    Eager, CRIU reads the images through a lazy mount of the snapshot. With `lazy`, CRIU
    restores everything but the private anonymous memory, which snapstore's lazy-pages
    daemon installs: demand faults first, the rest in large parallel copies once the tree
    runs (`images_of` says where the pages come from). A tree that was restored but cannot
    get its memory or GPU state back is killed, never left half restored.
    """
    stages = Stages()
    snapshot, source = pick_criu(store, ref, match, remote)
    stages.done("find")
    api = api or cuda.open_api()
    with images_of(store, snapshot, source, lazy, stages) as (images, sources), \
            store.work_dir("criu-restore") as work:
        daemon = LazyPagesDaemon(images, work, sources) if lazy else None
        pid = _restore_from(criu, images, work, daemon, api, stages)
    return RestoreReport(pid, snapshot, source, stages.elapsed(), stages.times,
                         stages.mount_left)


def _restore_from(criu: Criu, images: Path, work: Path, daemon: LazyPagesDaemon | None,
                  api: cuda.CheckpointApi, stages: Stages) -> int:
    """criu restore from `images` (with `daemon` serving the lazy pages), then the CUDA
    state; the restored root's pid once all of it is back."""
    try:
        if daemon is not None:
            daemon.start()
        try:
            pid = criu.restore(images, work, lazy_pages=daemon is not None)
        except CriuError as e:
            raise RestoreError(str(e)) from None
        stages.done("criu_restore")
        if has_cuda(api, pid):
            cuda_restore(api, pid)
            stages.done("cuda_restore")
        if daemon is not None:
            try:
                daemon.wait(LAZY_TIMEOUT)
            except LazyPagesError as e:
                raise RestoreError(f"restored pid {pid} but not its memory ({e}); "
                                   "killed it") from None
            stages.done("memory_complete")
        return pid
    finally:
        if daemon is not None:
            daemon.close()


def cuda_restore(api: cuda.CheckpointApi, pid: int) -> None:
    try:
        _give_gpu_back(api, pid)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise RestoreError(f"restored pid {pid} but not its CUDA state ({e}); "
                           "killed it") from None
