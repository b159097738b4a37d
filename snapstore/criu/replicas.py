"""Restore N copies of one CRIU snapshot side by side, each in a pid and network namespace
of its own (a restored tree gets back its pids, and its sockets their addresses: two
copies can only coexist apart).

Each replica is `unshare --pid --fork --mount-proc --net --kill-child` running
`snapstore.criu.nsinit`, which restores the tree inside and stays as the namespace's first
process. Killing the `unshare` process (the replica's keeper) ends the replica. The images
are staged (or mounted) once for all of them; each has its own CRIU work directory and,
lazily, its own lazy-pages daemon, all reading the same sources.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapstore.criu import cudastate
from snapstore.criu.binary import TIMEOUT, Criu
from snapstore.criu.lazy import LazyPagesDaemon, LazyPagesError
from snapstore.criu.workflow import (
    LAZY_TIMEOUT,
    Stages,
    cuda_restore,
    images_of,
    pick_criu,
)
from snapstore.errors import RestoreError
from snapstore.gpu import cuda
from snapstore.proctree import below, children
from snapstore.store.local import LocalStore


@dataclass(frozen=True, slots=True)
class Replica:
    pid: int  # the restored root, as this host sees it
    ns_pid: int  # its pid inside its namespace: the one it was checkpointed with
    keeper: int  # the `unshare` process; killing it ends the replica


@dataclass(slots=True)
class ReplicasReport:
    replicas: list[Replica]
    snapshot: str
    source: str
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    mount_left: str | None = None


def restore_replicas(store: LocalStore, criu: Criu, ref: str | None, match: dict[str, str],
                     count: int, remote: str | None = None, lazy: bool = True,
                     api: cuda.CheckpointApi | None = None) -> ReplicasReport:
    """Restore `count` copies at once; return when every one runs with all its memory and
    its CUDA state. If one fails, every one is killed."""
    stages = Stages()
    api = api or cuda.open_api()
    picked = pick_criu(store, ref, match, remote, api)
    stages.done("find")
    with images_of(store, picked, lazy, stages) as (images, sources), \
            contextlib.ExitStack() as stack:
        works = [stack.enter_context(store.work_dir("criu-replica")) for _ in range(count)]
        # The host's cores shared out: each daemon's copy processes serve one replica.
        copiers = max(1, (os.cpu_count() or 2) // count)
        daemons = [LazyPagesDaemon(images, w, sources, copiers) for w in works] if lazy else []
        for d in daemons:
            stack.callback(d.close)
        keepers: list[subprocess.Popen[bytes]] = []
        try:
            for i, work in enumerate(works):
                keepers.append(_start(criu, images, work, lazy))
                if lazy:
                    daemons[i].start(kill_root=keepers[i].pid)
            replicas = [_restored(k, w / "nsinit.report")
                        for k, w in zip(keepers, works, strict=True)]
            stages.done("criu_restore")
            # Every replica's processes at once, as one job's ranks are.
            gpu_pids = [p for r in replicas
                        for p in cudastate.with_cuda(api, [r.pid, *below(r.pid)])]
            if gpu_pids:
                cuda_restore(api, replicas[0].pid, gpu_pids, picked.gpus)
                stages.done("cuda_restore")
            # Eager, there are no daemons and nothing to wait for.
            for r, d in zip(replicas, daemons, strict=False):
                try:
                    d.wait(LAZY_TIMEOUT)
                except LazyPagesError as e:
                    raise RestoreError(f"restored replica pid {r.pid} but not its memory "
                                       f"({e}); killed every replica") from None
            if daemons:
                stages.done("memory_complete")
        except BaseException:
            for k in keepers:
                _end(k)
            raise
    return ReplicasReport(replicas, picked.snapshot, picked.source, stages.elapsed(), stages.times,
                          stages.mount_left)


def _start(criu: Criu, images: Path, work: Path, lazy: bool) -> subprocess.Popen[bytes]:
    # --propagation slave: when the mount of the images goes away here, it goes away in the
    # replica's copy of the mount table too, so the mount's daemon can exit.
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--kill-child",
         "--propagation", "slave", sys.executable, "-m", "snapstore.criu.nsinit", criu.path,
         str(images), str(work), "lazy" if lazy else "eager", str(work / "nsinit.report")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def _restored(keeper: subprocess.Popen[bytes], report: Path) -> Replica:
    """Wait for the replica's report; the restored root as this host sees it."""
    deadline = time.monotonic() + TIMEOUT
    while not report.exists():
        if keeper.poll() is not None:
            raise RestoreError(f"the replica's namespace ended before it restored anything "
                               f"(unshare exited {keeper.returncode})")
        if time.monotonic() > deadline:
            raise RestoreError(f"a replica did not restore in {TIMEOUT:.0f}s")
        time.sleep(0.005)
    status, _, rest = report.read_text().strip().partition(" ")
    if status != "ok":
        raise RestoreError(rest)
    ns_pid = int(rest)
    for init in children(keeper.pid):
        for pid in children(init):
            if _ns_pids(pid)[-1:] == [ns_pid]:
                return Replica(pid, ns_pid, keeper.pid)
    raise RestoreError(f"restored pid {ns_pid} of a replica is gone")


def _ns_pids(pid: int) -> list[int]:
    """The pid of `pid` in each pid namespace it is in, outermost first."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    except OSError:
        pass
    return []


def _end(keeper: subprocess.Popen[bytes]) -> None:
    """Kill a replica (its keeper's death kills the namespace's first process, and so
    every process in it) and reap the keeper."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(keeper.pid, signal.SIGKILL)
    keeper.wait()
