"""Checkpoint a process tree with CRIU into the store, and restore it from the snapshot
(lazily by default, with snapstore as CRIU's lazy-pages daemon), moving the tree's CUDA
state to host memory and back around CRIU; or start it cold when it cannot be restored."""

from __future__ import annotations

import contextlib
import platform
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from snapstore.criu import cudastate, preflight, staging
from snapstore.criu.binary import Criu, CriuError
from snapstore.criu.lazy import LazyPagesDaemon, LazyPagesError
from snapstore.criu.sources import PageSource
from snapstore.criu.tcprepair import kill_quietly, resume
from snapstore.errors import NoMatchError, NotFoundError, RestoreError, SnapstoreError
from snapstore.gpu import cuda
from snapstore.manifest import Manifest
from snapstore.proctree import below, signal_tree
from snapstore.store.local import LocalStore
from snapstore.workflow import gpu_labels, mounted, pick, release

if TYPE_CHECKING:
    from snapstore.ingest import IngestResult

RUNTIME_LABEL = "runtime"
CUDA_LABEL = "cuda"
# How many GPUs the tree's processes held when it was checkpointed.
GPUS_USED_LABEL = "gpu.used"
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


def checkpoint(store: LocalStore, criu: Criu, pid: int, tag: str, labels: dict[str, str],
               leave_running: bool = False,
               api: cuda.CheckpointApi | None = None) -> IngestResult:
    """Dump the tree rooted at `pid` into a working directory of the store and ingest it.

    Every process of the tree with CUDA state has it moved into its host memory first
    (all locked, then all checkpointed: cudastate.py), so CRIU sees no GPU mapping; they
    get it back if the dump fails or when `leave_running`. A tree whose checkpoint could
    not be restored (preflight.py) is refused before anything is done to it. Without
    `leave_running` the tree is killed, but only once its snapshot is stored and tagged:
    CRIU leaves it stopped, and if the ingest fails (a full disk, say) it is resumed as it
    was, so a failed checkpoint loses no process.
    """
    # Here, not at the top: a restore needs none of the chunker (numpy) at start-up.
    from snapstore.ingest import check_labels, ingest

    api = api or cuda.open_api()
    procs = [preflight.inspect(p) for p in [pid, *below(pid)]]
    gpu_pids = cudastate.with_cuda(api, [p.pid for p in procs])
    preflight.check(procs, gpu_pids, cuda.kernel_driver_version())
    gpus = preflight.gpus_used(p for p in procs if p.pid in gpu_pids)
    # Labels no reader would accept fail here, before the process is touched.
    all_labels = check_labels({**compat_labels(criu), CUDA_LABEL: "1" if gpu_pids else "0",
                               **({GPUS_USED_LABEL: str(len(gpus))} if gpus else {}),
                               **labels})
    with store.work_dir("criu-dump") as work:
        images = work / "images"
        images.mkdir()
        cudastate.checkpoint_all(api, gpu_pids)
        try:
            criu.dump(pid, images, work, leave_running)
        except BaseException:
            _give_gpu_back(api, pid, gpu_pids, len(gpus))
            raise
        if leave_running:
            _give_gpu_back(api, pid, gpu_pids, len(gpus))
            return ingest(store, images, tag, all_labels)
        try:
            result = ingest(store, images, tag, all_labels)
        except BaseException:
            resume(pid)
            _give_gpu_back(api, pid, gpu_pids, len(gpus))
            raise
        kill_quietly(pid)
        return result


def _give_gpu_back(api: cuda.CheckpointApi, root: int, gpu_pids: list[int],
                   gpus: int) -> None:
    """The tree's GPU state back on its `gpus` GPUs; a tree that cannot have it is killed
    rather than left hanging on its next CUDA call."""
    try:
        cudastate.restore_all(api, gpu_pids)
    except cuda.CudaError as e:
        signal_tree(root, signal.SIGKILL)
        raise cuda.CudaError(f"the tree at pid {root} could not have its CUDA state back "
                             f"({e}){_peer_hint(e, gpus)}; killed it") from None


def _peer_hint(err: cuda.CudaError, gpus: int) -> str:
    """What an INVALID_VALUE from Restore most likely means for a tree on several GPUs."""
    if "INVALID_VALUE" in str(err) and gpus > 1:
        return ("; a process that copied between its GPUs peer to peer cannot be restored "
                "by this driver: move data between GPUs through host memory")
    return ""


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
    lazy: dict[str, int | float | None] | None = None  # the lazy-pages daemon's figures


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


@dataclass(frozen=True)
class Picked:
    """The CRIU snapshot a restore brings back: its id, where it is ("local", or the
    remote URL), its manifest, read once, and how many GPUs it needs."""

    snapshot: str
    source: str
    manifest: Manifest
    gpus: int


def pick_criu(store: LocalStore, ref: str | None, match: dict[str, str],
              remote: str | None, api: cuda.CheckpointApi) -> Picked:
    """The CRIU snapshot to restore (`workflow.pick`); a match never picks a gVisor
    snapshot that happens to carry the same labels. A RestoreError, before anything is
    restored, when its manifest cannot be read or this host has fewer GPUs than it needs."""
    snapshot, source = pick(store, ref, {**match, RUNTIME_LABEL: "criu"} if match else match,
                            remote)
    manifest = _manifest_of(store, snapshot, source)
    return Picked(snapshot, source, manifest, check_gpus(snapshot, manifest.labels, api))


def _manifest_of(store: LocalStore, snapshot: str, source: str) -> Manifest:
    try:
        if source == "local":
            return store.get_manifest(store.resolve(snapshot))
        from snapstore.remote.catalog import remote_manifest

        return remote_manifest(source, snapshot)
    except NotFoundError as e:
        raise NoMatchError(str(e)) from None
    except SnapstoreError as e:
        raise RestoreError(f"cannot read snapshot {snapshot[:12]}: {e}") from None


@contextlib.contextmanager
def images_of(store: LocalStore, picked: Picked, lazy: bool,
              stages: Stages) -> Iterator[tuple[Path, Mapping[str, PageSource]]]:
    """The image directory CRIU restores from, and the lazy pages' sources by file name.

    Lazy from the local store: a staged working directory (no mount), the daemon reading
    the lazy pages from the store. Otherwise a lazy mount of the snapshot, which CRIU and
    the daemon both read; released (or left, in `stages.mount_left`) afterwards.
    """
    snapshot = picked.snapshot
    if lazy and picked.source == "local":
        with store.work_dir("criu-images") as work:
            try:
                sources = staging.stage(store, snapshot, picked.manifest, work / "images")
            except SnapstoreError as e:
                raise RestoreError(f"cannot stage snapshot {snapshot[:12]}: {e}") from None
            stages.done("stage")
            yield work / "images", sources
        return
    with mounted(store, snapshot, picked.source, allow_other=False) as mnt:
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
    api = api or cuda.open_api()
    picked = pick_criu(store, ref, match, remote, api)
    stages.done("find")
    with images_of(store, picked, lazy, stages) as (images, sources), \
            store.work_dir("criu-restore") as work:
        daemon = LazyPagesDaemon(images, work, sources) if lazy else None
        pid = _restore_from(criu, images, work, daemon, api, stages, picked.gpus)
    return RestoreReport(pid, picked.snapshot, picked.source, stages.elapsed(), stages.times,
                         stages.mount_left,
                         lazy=daemon.stats.report() if daemon is not None else None)


def check_gpus(snapshot: str, labels: Mapping[str, str], api: cuda.CheckpointApi) -> int:
    """How many GPUs the snapshot's tree used (its labels say); a RestoreError on a host
    with fewer."""
    used = labels.get(GPUS_USED_LABEL, "0")
    needed = int(used) if used.isdigit() else 0
    info = api.describe()
    here = len(info.gpus) if info else 0
    if needed > here:
        raise RestoreError(f"snapshot {snapshot[:12]} was taken on {needed} GPUs; this host "
                           f"has {here}")
    return needed


def _restore_from(criu: Criu, images: Path, work: Path, daemon: LazyPagesDaemon | None,
                  api: cuda.CheckpointApi, stages: Stages, gpus: int) -> int:
    """criu restore from `images` (with `daemon` serving the lazy pages), then the CUDA
    state of each restored process that had some, all at once; the restored root's pid
    once all of it is back."""
    try:
        if daemon is not None:
            daemon.start()
        try:
            pid = criu.restore(images, work, lazy_pages=daemon is not None)
        except CriuError as e:
            raise RestoreError(str(e)) from None
        stages.done("criu_restore")
        gpu_pids = cudastate.with_cuda(api, [pid, *below(pid)])
        if gpu_pids:
            cuda_restore(api, pid, gpu_pids, gpus)
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


def cuda_restore(api: cuda.CheckpointApi, root: int, gpu_pids: list[int], gpus: int) -> None:
    """The CUDA state of the restored tree at `root` back; a RestoreError, the tree
    killed, if it cannot be."""
    try:
        _give_gpu_back(api, root, gpu_pids, gpus)
    except cuda.CudaError as e:
        raise RestoreError(f"restored pid {root} but not its CUDA state: {e}") from None
