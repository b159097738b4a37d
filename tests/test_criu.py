"""The CRIU runtime for real: processes checkpointed with CRIU into a store, restored from a
lazy mount of the snapshot (local, or from a moto server with an empty store), running on
with their memory intact; and the failures, each one clear line with nothing left behind.
The CUDA calls go through a fake driver (CI has no GPU)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapstore.criu import lazy, preflight, storepages, workflow
from snapstore.criu.binary import Criu, CriuError
from snapstore.criu.copier import Copier, CopyGate
from snapstore.criu.images import PAGE_SIZE, PE_LAZY, PE_PRESENT, Extent, Pagemap, read_pagemap
from snapstore.criu.lazy import Span, Task
from snapstore.criu.sources import FilePages
from snapstore.criu.uffdio import UFFDIO_UNREGISTER, ioctl_range
from snapstore.errors import CorruptError, RestoreError
from snapstore.export import export
from snapstore.gpu import cuda
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.uffd.client import open_userfaultfd, register
from tests.conftest import (
    FakeDriver,
    alive,
    kill,
    memory_like,
    processes_named,
    reap,
    tmpfs,
    wait_until,
)
from tests.s3proxy import FaultProxy, make_bucket, moto_server, s3_env

# Holds SIZE bytes of seeded random data and counts in memory; on SIGUSR1 writes the
# data's SHA-256, its pid and its count to REPORT. It keeps no file open while it runs, so
# a dump never catches one half-written (CRIU restores an open file only at its size).
CHILD = """
import hashlib, os, signal, sys, time
import numpy as np
report_path, size = sys.argv[1], int(sys.argv[2])
data = np.random.default_rng(7).integers(0, 2**63, size=size // 8, dtype=np.int64)
n = 0
def report(*_):
    with open(report_path + ".tmp", "w") as f:
        f.write(f"{hashlib.sha256(data.tobytes()).hexdigest()} {os.getpid()} {n}")
    os.rename(report_path + ".tmp", report_path)
signal.signal(signal.SIGUSR1, report)
report()
while True:
    n += 1
    time.sleep(0.02)
"""
SIZE = 16 << 20


def digest_of(size: int) -> str:
    return hashlib.sha256(np.random.default_rng(7).integers(
        0, 2**63, size=size // 8, dtype=np.int64).tobytes()).hexdigest()


EXPECTED = digest_of(SIZE)


def restore_mounts() -> set[str]:
    """Mountpoints of the mounts restores make."""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return {p for p in points if "/snapstore-restore-" in p}


@pytest.fixture(autouse=True)
def no_mount_left() -> Iterator[None]:
    """Every test: a restore, failed or not, leaves no mount of its own behind."""
    before = restore_mounts()
    yield
    left = restore_mounts() - before
    for point in left:
        subprocess.run(["umount", "-l", point], check=False, timeout=60)
    assert not left, f"restores left mounted: {sorted(left)}"


class Child:
    """The test process: started in its own session with no terminal, stdio to /dev/null
    (CRIU dumps neither a terminal nor a pipe to a process outside the tree)."""

    def __init__(self, tmp: Path, size: int = SIZE) -> None:
        self.report = tmp / "report"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.report), str(size)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(lambda: self.report.exists(), "the child to start")
        self.pid = self.proc.pid

    def _answer(self, pid: int) -> list[str]:
        self.report.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: self.report.exists(), f"pid {pid} to report")
        return self.report.read_text().split()

    def ask(self, pid: int) -> tuple[str, int]:
        """The data digest and pid that process `pid` reports now."""
        digest, reported, _ = self._answer(pid)
        return digest, int(reported)

    def count(self, pid: int) -> int:
        """How far process `pid` has counted."""
        return int(self._answer(pid)[2])

    def wait_dead(self) -> None:
        """The original process was killed by the dump: reap it, so its pid is free."""
        self.proc.wait(timeout=30)


def snapstore(store: LocalStore, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store.root),
                           *args], capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def runs_on(child: Child, pid: int) -> None:
    """`pid` is the restored child: same pid, same data, and it keeps counting."""
    digest, reported = child.ask(pid)
    assert (digest, reported) == (EXPECTED, pid)
    before = child.count(pid)
    wait_until(lambda: child.count(pid) > before, "the restored process to count on")


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_checkpoint_and_restore_a_python_process(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path, mode: str) -> None:
    child = Child(tmp_path)
    assert child.ask(child.pid) == (EXPECTED, child.pid)
    ck = snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py",
                   "--label", "app=numpy")
    assert ck.returncode == 0, ck.stderr
    child.wait_dead()
    manifest = store.get_manifest(store.resolve("py"))
    assert manifest.labels["runtime"] == "criu" and manifest.labels["cuda"] == "0"
    assert manifest.labels["criu.version"] == criu.version
    assert {e.path for e in manifest.files()} >= {"inventory.img", "pstree.img"}

    r = snapstore(store, "restore", "--match", "app=numpy",
                  *(["--eager"] if mode == "eager" else []))
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.strip())
    assert ("memory_complete" in r.stderr) == (mode == "lazy")
    assert ("lazy pages: " in r.stderr) == (mode == "lazy")
    try:
        assert pid == child.pid
        runs_on(child, pid)
    finally:
        kill(pid)
    # Nothing of the restore is left: no mount, no working directory.
    assert list(store.work_root.iterdir()) == []


def test_a_second_checkpoint_of_one_process_adds_little(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    child = Child(tmp_path)
    try:
        first = workflow.checkpoint(store, criu, child.pid, "one", {}, leave_running=True)
        assert alive(child.pid)
        second = workflow.checkpoint(store, criu, child.pid, "two", {}, leave_running=True)
        assert alive(child.pid)
        runs_on(child, child.pid)
    finally:
        kill(child.pid)
        child.wait_dead()
    assert first.logical_bytes > SIZE
    assert second.new_stored_bytes < first.new_stored_bytes * 0.2, (first, second)


def test_restore_from_the_remote_alone(criu: Criu, reaper: None, store: LocalStore,
                                       tmp_path: Path) -> None:
    env = {**os.environ, **s3_env()}
    with moto_server() as port:
        make_bucket(port, "criu")
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        remote = "s3://criu/snaps"
        child = Child(tmp_path)
        assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py",
                         "--label", "app=remote").returncode == 0
        child.wait_dead()
        push = snapstore(store, "push", "py", remote, env=env)
        assert push.returncode == 0, push.stderr
        empty = LocalStore.open(tmp_path / "empty")
        r = snapstore(empty, "restore", "--match", "app=remote", "--remote", remote,
                      "--json", env=env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        pid = int(doc["pid"])
        # The daemon's figures: the process's data came in through it.
        lazy = doc["lazy"]
        assert lazy["tasks"] >= 1 and lazy["fill_seconds"] is not None
        assert lazy["prefetched_bytes"] + lazy["fault_bytes"] >= SIZE
        # The copy processes' own figures, from their prefetch copies.
        assert lazy["copiers"] >= 1
        copied = lazy["prefetched_bytes"] > 0
        assert (lazy["copy_read_seconds"] > 0) == copied
        assert (lazy["copy_install_seconds"] > 0) == copied
        try:
            runs_on(child, pid)
        finally:
            kill(pid)


def test_failures_are_one_line_and_leave_nothing(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    child = Child(tmp_path)
    assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py").returncode == 0
    child.wait_dead()

    no_match = snapstore(store, "restore", "--match", "app=absent")
    assert no_match.returncode == 3
    assert no_match.stderr.strip() == (
        "snapstore: error: no snapshot matches app=absent runtime=criu")

    # The pid the tree needs is taken (by its first restore): exit 4, naming the pid.
    first = snapstore(store, "restore", "--from", "py")
    assert first.returncode == 0, first.stderr
    try:
        taken = snapstore(store, "restore", "--from", "py")
        assert taken.returncode == 4
        assert taken.stderr.strip() == (
            f"snapstore: error: criu restore failed: pid {child.pid} is taken by another "
            "process (a restored tree gets back the pids it had)")
        runs_on(child, child.pid)
    finally:
        kill(child.pid)

    # A damaged chunk at the start of the pages file (pages CRIU restores itself). Eager:
    # CRIU reads EIO through the mount, the restore fails and no task of the tree is left.
    # Lazy: staging the pages CRIU reads meets it before CRIU starts.
    manifest = store.get_manifest(store.resolve("py"))
    pages = next(e for e in manifest.files() if e.path.startswith("pages-"))
    damaged = next(x.chunk for x in pages.extents if x.chunk is not None)
    corrupt(store, damaged)
    bad = snapstore(store, "restore", "--from", "py", "--eager")
    assert bad.returncode == 4, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "criu restore failed: Can't read pages data (-5)" in bad.stderr
    lazy = snapstore(store, "restore", "--from", "py")
    assert lazy.returncode == 4, lazy.stderr
    assert lazy.stderr.strip().startswith("snapstore: error: cannot stage snapshot ")
    assert damaged.hex in lazy.stderr and len(lazy.stderr.strip().splitlines()) == 1
    assert not alive(child.pid)
    assert list(store.work_root.iterdir()) == []
    missing = snapstore(store, "restore", "--from", "py", "--criu", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "is not CRIU >= 4" in missing.stderr


def corrupt(store: LocalStore, chunk: ChunkId) -> None:
    path = store.chunk_path(chunk)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(blob))


def test_a_damaged_lazy_page_kills_the_restored_tree(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    child = Child(tmp_path)
    assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py").returncode == 0
    child.wait_dead()
    manifest = store.get_manifest(store.resolve("py"))
    export(store, manifest, tmp_path / "images")
    pagemap = read_pagemap(tmp_path / "images" / f"pagemap-{child.pid}.img")
    lazy = [(e.offset, e.offset + e.nr_pages * PAGE_SIZE) for e in pagemap.lazy_extents()]
    # A chunk of the pages file that holds lazy pages only: CRIU reads none of it, the
    # lazy-pages daemon meets the damage when it installs those pages.
    pages = next(e for e in manifest.files() if e.path == pagemap.pages_file)
    offset, victim = 0, None
    for x in pages.extents:
        if x.chunk is not None and any(a <= offset and offset + x.size <= b for a, b in lazy):
            victim = x.chunk
            break
        offset += x.size
    assert victim is not None, "no chunk of lazy pages only"
    corrupt(store, victim)

    r = snapstore(store, "restore", "--from", "py")
    assert r.returncode == 4, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not its memory" in r.stderr and "killed it" in r.stderr, r.stderr
    # Killed, never left waiting on the page or given a wrong one.
    wait_until(lambda: not alive(child.pid), "the restored tree to be killed")
    kill(child.pid)
    assert list(store.work_root.iterdir()) == []


def exit_signal(pid: int, timeout: float = 30.0) -> int:
    """Reap `pid` (a child of this subreaper) and return the signal that ended it."""
    status: list[int] = []

    def reaped() -> bool:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            status.append(st)
        return bool(status)

    wait_until(reaped, f"pid {pid} to end", timeout)
    assert os.WIFSIGNALED(status[0]), f"pid {pid} exited with {status[0]:#x}"
    return os.WTERMSIG(status[0])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Rss for {pid}")


# Large enough that the daemon is still installing pages when CRIU has exited: 512 MiB
# went in before a test could stop it, once the prefetch copied 2 MiB at a time.
BIG = 1 << 30


def big_checkpoint(store: LocalStore, tmp_path: Path) -> Child:
    """A process of BIG bytes checkpointed as `big`, and gone."""
    child = Child(tmp_path, BIG)
    assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "big").returncode == 0
    child.wait_dead()
    return child


@contextlib.contextmanager
def stopped_mid_fill(store: LocalStore, child: Child) -> Iterator[subprocess.Popen[str]]:
    """A lazy restore of `child`'s snapshot `big`, stopped (the restore command and its
    copy processes, not its watchdog) while the daemon is still installing pages; killed
    with everything in its process group afterwards."""
    restore = subprocess.Popen(
        [sys.executable, "-m", "snapstore", "--store", str(store.root), "restore", "--from",
         "big"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        # CRIU exits once the tree runs; the daemon is still installing pages then. Polled
        # closely: the window is a fraction of a second on a quiet machine.
        deadline = time.monotonic() + 60
        while not (alive(child.pid) and not processes_named("--lazy-pages")):
            assert time.monotonic() < deadline, "the restore never ran the tree"
            assert restore.poll() is None, "the restore ended before it could be stopped"
            time.sleep(0.002)
        os.killpg(restore.pid, signal.SIGSTOP)
        assert alive(child.pid)
        assert rss(child.pid) < BIG, "the daemon had installed every page already"
        yield restore
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(restore.pid, signal.SIGKILL)
        restore.communicate(timeout=30)
        kill(child.pid)


def test_a_killed_lazy_restore_kills_the_tree_it_left_half_loaded(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    child = big_checkpoint(store, tmp_path)
    with stopped_mid_fill(store, child) as restore:
        # The restore command dies with pages still to install: its watchdog must kill
        # the tree, which would otherwise read those pages as zeros.
        os.kill(restore.pid, signal.SIGKILL)
        restore.wait(timeout=30)
        # Killed by the watchdog: not crashed on a zeroed page, not running on with one.
        assert exit_signal(child.pid) == signal.SIGKILL


def test_a_copy_process_killed_mid_restore_fails_it_and_kills_the_tree(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    child = big_checkpoint(store, tmp_path)
    with stopped_mid_fill(store, child) as restore:
        copiers = [pid for pid in processes_named("snapstore.criu.copier")
                   if os.getpgid(pid) == restore.pid]
        assert copiers
        os.kill(copiers[0], signal.SIGKILL)
        os.killpg(restore.pid, signal.SIGCONT)
        _, err = restore.communicate(timeout=60)
        assert restore.returncode == 4, err
        assert err.startswith(f"snapstore: error: restored pid {child.pid} but not its memory "
                              f"(copy process {copiers[0]} ended"), err
        assert len(err.strip().splitlines()) == 1, err
        assert exit_signal(child.pid) == signal.SIGKILL
        # The other copy processes ended with the restore command.
        wait_until(lambda: not any(alive(pid) for pid in copiers), "the copy processes end")


def test_cuda_state_moves_around_criu(criu: Criu, reaper: None, store: LocalStore,
                                      tmp_path: Path) -> None:
    child = Child(tmp_path)
    api = FakeDriver({child.pid})
    workflow.checkpoint(store, criu, child.pid, "gpu", {}, leave_running=True, api=api)
    # The GPU state went to host memory for the dump and came back for the process.
    assert api.calls == [("lock", child.pid), ("checkpoint", child.pid),
                         ("restore", child.pid), ("unlock", child.pid)]
    assert store.get_manifest(store.resolve("gpu")).labels["cuda"] == "1"
    api.calls.clear()
    workflow.checkpoint(store, criu, child.pid, "gpu", {}, api=api)
    child.wait_dead()
    assert api.calls == [("lock", child.pid), ("checkpoint", child.pid)]

    # The restored process is checkpointed as far as the driver knows: Restore + Unlock.
    api.calls.clear()
    r = workflow.restore(store, criu, "gpu", {}, api=api)
    try:
        assert api.calls == [("restore", r.pid), ("unlock", r.pid)]
        assert set(r.stages) == {"find", "mount", "criu_restore", "cuda_restore"}
        runs_on(child, r.pid)
    finally:
        kill(r.pid)

    # A driver that cannot restore the GPU state: the restored tree is killed, not left.
    class Failing(FakeDriver):
        def restore(self, pid: int) -> None:
            raise cuda.CudaError("cuCheckpointProcessRestore failed: CUDA_ERROR_INVALID_VALUE")

    failing = Failing({child.pid})
    failing.state[child.pid] = cuda.ProcessState.CHECKPOINTED
    with pytest.raises(RestoreError, match="killed it"):
        workflow.restore(store, criu, "gpu", {}, api=failing)
    wait_until(lambda: not alive(child.pid), "the half-restored process to be killed")


def test_the_fill_ends_when_the_last_page_is_in_not_when_the_restore_asks(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    """A lazy restore's fill time is the tasks' resuming to the last page in, even when the
    command asks only after a long CUDA restore: the daemon notes the end itself."""
    child = Child(tmp_path)
    api = FakeDriver({child.pid})
    workflow.checkpoint(store, criu, child.pid, "gpu", {}, api=api)
    child.wait_dead()

    class Slow(FakeDriver):
        def restore(self, pid: int) -> None:
            time.sleep(3)
            super().restore(pid)

    slow = Slow({child.pid})
    slow.state[child.pid] = cuda.ProcessState.CHECKPOINTED
    r = workflow.restore(store, criu, "gpu", {}, lazy=True, api=slow)
    try:
        assert r.lazy is not None and r.lazy["prefetched_bytes"]
        fill = r.lazy["fill_seconds"]
        assert fill is not None and fill < r.stages["cuda_restore"], (r.lazy, r.stages)
        runs_on(child, r.pid)
    finally:
        kill(r.pid)


def test_a_failed_dump_gives_the_gpu_back(criu: Criu, store: LocalStore) -> None:
    # A pid no process has (the largest there can be): the fake driver knows it, CRIU
    # fails to seize it, after Lock + Checkpoint.
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    assert not alive(gone)
    api = FakeDriver({gone})
    with pytest.raises(CriuError, match=f"criu dump of pid {gone} failed"):
        workflow.checkpoint(store, criu, gone, "gone", {}, api=api)
    assert [c for c, _ in api.calls] == ["lock", "checkpoint", "restore", "unlock"]
    assert "gone" not in store.tags() and list(store.work_root.iterdir()) == []


# Counts into $0 every 0.05 s with `sleep` as a child: a tree of two processes.
SHELL_COUNTER = ('i=0; while :; do i=$((i+1)); echo $i > "$0.tmp"; mv "$0.tmp" "$0"; '
                 'sleep 0.05; done')


def counters_gone() -> bool:
    reap()
    return not processes_named(SHELL_COUNTER)


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_shell_counter_counts_on_after_restore(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path, mode: str) -> None:
    counter = tmp_path / "count"
    shell = subprocess.Popen(["sh", "-c", SHELL_COUNTER, str(counter)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: counter.exists() and int(counter.read_text() or 0) > 3, "counting")
    ck = snapstore(store, "checkpoint", "--pid", str(shell.pid), "--tag", "sh")
    assert ck.returncode == 0, ck.stderr
    shell.wait(timeout=30)
    # The dumped tree's sleep, killed with it, is a zombie of this subreaper: reap it too.
    wait_until(counters_gone, "the tree to be gone")
    stopped = int(counter.read_text())
    r = snapstore(store, "restore", "--from", "sh", *(["--eager"] if mode == "eager" else []))
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    try:
        assert pid == shell.pid
        wait_until(lambda: int(counter.read_text() or 0) > stopped + 3, "counting on")
    finally:
        kill(pid)
        wait_until(counters_gone, "the tree to end")


def test_cold_start_when_there_is_nothing_to_restore(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    cmd = shlex.join(["sh", "-c", SHELL_COUNTER, str(counter)])
    r = snapstore(store, "restore", "--match", "app=none", "--cold-start", cmd, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["path"] == "cold" and doc["snapshot"] is None
    assert doc["reason"] == "no snapshot matches app=none runtime=criu"
    try:
        wait_until(lambda: counter.exists(), "the cold-started command to run")
    finally:
        kill(doc["pid"])
        wait_until(counters_gone, "the tree to end")

    # No fallback is silent, and a cold start that cannot start is an error of its own.
    bad = snapstore(store, "restore", "--match", "app=none", "--cold-start",
                    str(tmp_path / "no-such-program"))
    assert bad.returncode == 4
    assert bad.stderr.strip() == (
        "snapstore: error: no snapshot matches app=none runtime=criu; and the cold start "
        f"failed: No such file or directory: {tmp_path / 'no-such-program'}")


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_replicas_run_side_by_side_in_namespaces_of_their_own(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path, mode: str) -> None:
    child = Child(tmp_path)
    assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py").returncode == 0
    child.wait_dead()
    r = snapstore(store, "restore", "--from", "py", "--replicas", "2", "--json",
                  *(["--eager"] if mode == "eager" else []))
    assert r.returncode == 0, r.stderr
    replicas = json.loads(r.stdout)["replicas"]
    try:
        assert len({x["pid"] for x in replicas}) == 2
        for x in replicas:
            # Each has the pid it was checkpointed with, inside its own namespace.
            assert x["ns_pid"] == child.pid
            assert child.ask(x["pid"]) == (EXPECTED, child.pid)
    finally:
        for x in replicas:
            os.kill(x["keeper"], signal.SIGKILL)
    # Ending the keeper ends the replica.
    pids = [int(x["pid"]) for x in replicas]
    wait_until(lambda: not any(alive(p) for p in pids), "the replicas to end with their keepers")
    reap()
    assert list(store.work_root.iterdir()) == []


def test_a_remote_that_stalls_during_a_lazy_restore_fails_it_and_leaves_nothing(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    env = {**os.environ, **s3_env(), "SNAPSTORE_READ_TIMEOUT": "3"}
    with moto_server() as port:
        make_bucket(port, "stall")
        proxy = FaultProxy(port)
        try:
            env["AWS_ENDPOINT_URL"] = proxy.endpoint
            child = Child(tmp_path)
            assert snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag",
                             "py").returncode == 0
            child.wait_dead()
            assert snapstore(store, "push", "py", "s3://stall/s", env=env).returncode == 0
            # Every read of the chunks' packs is taken and never answered.
            proxy.inject("hang", "GET", "/packs/", times=-1)
            empty = LocalStore.open(tmp_path / "empty")
            r = snapstore(empty, "restore", "--from", "py", "--remote", "s3://stall/s",
                          env=env)
        finally:
            proxy.close()
    assert r.returncode == 4, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not alive(child.pid)
    assert list(empty.work_root.iterdir()) == []


MIB = 1 << 20
_FEATURE_EVENT_REMOVE = 1 << 3
_REGISTER_MODE_MISSING = 1
_MADV_DONTNEED = 4


def task_of(*ranges: tuple[int, int]) -> Task:
    """A task whose lazy memory is `ranges` (MiB), stored back to back in its pages file."""
    spans, offset = [], 0
    for start, end in ranges:
        spans.append(Span(start * MIB, end * MIB, offset))
        offset += (end - start) * MIB
    return Task(1, -1, None, spans)  # type: ignore[arg-type]  # no pages are read here


def test_prefetch_runs_on_from_the_last_fault_then_wraps() -> None:
    """The CUDA restore reads its staged buffers in order: after a fault, the prefetch
    copies what follows it, so the reader meets pages already in, and only then goes back
    for the rest."""
    task = task_of((0, 4), (8, 12), (16, 20))
    first = task.take_next(2 * MIB)
    assert first is not None and (first.start, first.offset) == (0, 0)
    fault = task.take(9 * MIB, 64 << 10)
    assert fault is not None and fault.offset == 5 * MIB
    got = []
    while (span := task.take_next(2 * MIB)) is not None:
        got.append((span.start, span.end, span.offset))
    assert got[:3] == [
        (9 * MIB + (64 << 10), 11 * MIB + (64 << 10), 5 * MIB + (64 << 10)),
        (11 * MIB + (64 << 10), 12 * MIB, 7 * MIB + (64 << 10)),
        (16 * MIB, 18 * MIB, 8 * MIB),
    ]
    # Then from the lowest address left: what the first copy and the fault skipped.
    assert got[4:] == [(2 * MIB, 4 * MIB, 2 * MIB), (8 * MIB, 9 * MIB, 4 * MIB)]
    assert not task.pending


def test_a_copier_goes_on_through_the_stride_it_started() -> None:
    """A copy process that starts afresh moves the prefetch's start a stride on, and is
    given what follows its last copy while that is pending: two copy processes seldom
    meet in one chunk of the pages file."""
    task = task_of((0, 64))
    a = task.take_next(2 * MIB, stride=16 * MIB)
    b = task.take_next(2 * MIB, stride=16 * MIB)
    assert a is not None and b is not None
    assert (a.start, b.start) == (0, 16 * MIB)
    a2 = task.take_next(2 * MIB, after=a.end, stride=16 * MIB)
    assert a2 is not None and (a2.start, a2.end, a2.offset) == (2 * MIB, 4 * MIB, 2 * MIB)
    c = task.take_next(2 * MIB, stride=16 * MIB)
    assert c is not None and c.start == 32 * MIB
    # Where its last copy ended is taken (a fault took it): it starts afresh, from the
    # cursor, which the fault left right after itself.
    assert task.take(18 * MIB, 64 << 10) is not None
    b2 = task.take_next(2 * MIB, after=b.end, stride=16 * MIB)
    assert b2 is not None and b2.start == 18 * MIB + (64 << 10)


def test_dropped_ranges_leave_the_rest_pending() -> None:
    task = task_of((0, 4), (8, 12), (16, 20), (24, 28))
    task.drop(2 * MIB, 10 * MIB)  # the end of one span, the start of the next
    task.drop(17 * MIB, 18 * MIB)  # the middle of one
    task.drop(30 * MIB, 40 * MIB)  # nothing there
    assert [(s.start // MIB, s.end // MIB, s.offset // MIB) for s in task.pending] == [
        (0, 2, 0), (10, 12, 6), (16, 17, 8), (18, 20, 10), (24, 28, 12)]


def test_a_drop_over_a_span_in_flight_keeps_the_rest_of_it_pending() -> None:
    task = task_of((0, 4))
    inflight = task.take_next(4 * MIB)
    assert inflight is not None
    task.drop(1 * MIB, 2 * MIB)
    # Its copier stops; what lies outside the dropped range is to install again.
    assert inflight.dropped
    assert [(s.start // MIB, s.end // MIB, s.offset // MIB) for s in task.pending] == [
        (0, 1, 0), (2, 4, 2)]


def test_a_remap_moves_what_is_pending_there_cut_at_its_bounds() -> None:
    task = task_of((0, 4), (8, 12), (16, 20))
    inflight = task.take(16 * MIB, 2 * MIB)
    assert inflight is not None
    # [2, 18) MiB moves to 100 MiB: two spans cross its bounds, one is in flight.
    task.remap(2 * MIB, 100 * MIB, 16 * MIB)
    assert inflight.dropped
    assert [(s.start // MIB, s.end // MIB, s.offset // MIB) for s in task.pending] == [
        (0, 2, 0), (18, 20, 10), (100, 102, 2), (106, 110, 4), (114, 116, 8)]


@contextlib.contextmanager
def uffd_memory(pages: int) -> Iterator[tuple[mmap.mmap, int, int]]:
    """`pages` pages of this process's memory registered with a new userfaultfd (REMOVE
    events on): the mapping, its address, the userfaultfd."""
    size = pages * PAGE_SIZE
    memory = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    uffd = open_userfaultfd(_FEATURE_EVENT_REMOVE)
    try:
        register(uffd, addr, size, _REGISTER_MODE_MISSING)
        yield memory, addr, uffd
    finally:
        os.close(uffd)
        memory.close()


def resident(addr: int, size: int) -> int:
    """How many pages of [addr, addr+size) are in memory (mincore): none is faulted in."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (size // PAGE_SIZE))()
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec)


@contextlib.contextmanager
def copy_process(pages: Path, uffd: int) -> Iterator[tuple[CopyGate, Copier]]:
    """A gate and copy process 0, given this process as task 0 (`uffd`, pages from
    `pages`) and armed for its first copy."""
    gate = CopyGate.create()
    copier = Copier(0, gate)
    source = FilePages(pages)
    try:
        copier.add_task(0, os.getpid(), source, uffd)
        gate.arm(0)
        yield gate, copier
    finally:
        copier.end()
        copier.wait()
        source.close()
        gate.close()


def test_a_copy_process_installs_a_range_from_its_pages_file(tmp_path: Path) -> None:
    data = np.random.default_rng(5).bytes(16 * PAGE_SIZE)
    (tmp_path / "pages").write_bytes(bytes(PAGE_SIZE) + data)
    with uffd_memory(16) as (memory, addr, uffd), \
            copy_process(tmp_path / "pages", uffd) as (_, copier):
        answer = copier.copy(0, addr, addr + len(data), PAGE_SIZE)
        assert answer["status"] == "done" and "error" not in answer
        assert answer["read"] > 0 and answer["install"] > 0 and answer["waited"] == 0
        assert memory[:] == data
        # The next copy says how long the copier waited for it.
        time.sleep(0.05)
        assert copier.copy(0, addr, addr + PAGE_SIZE, PAGE_SIZE)["waited"] >= 0.05


def test_no_copy_runs_while_an_event_is_read_and_none_fills_a_dropped_range(
        tmp_path: Path) -> None:
    """The daemon's two sides, each in its own process, on a real userfaultfd over this
    process's memory. While the daemon reads an event (holding the gate exclusive), a copy
    process waits before its UFFDIO_COPY; the event is a REMOVE of the very range the copy
    was given, and once it is applied the copy process installs nothing there: the range
    reads as zeros, never as the bytes the copy carried. And the event read waits for a
    copy already in flight, from another process that holds the gate shared."""
    size = 16 * PAGE_SIZE
    (tmp_path / "pages").write_bytes(b"\xaa" * size)
    with uffd_memory(16) as (memory, addr, uffd), \
            copy_process(tmp_path / "pages", uffd) as (gate, copier):
        answer: list[dict[str, Any]] = []
        with gate.exclusive(0):
            copy = threading.Thread(
                target=lambda: answer.append(copier.copy(0, addr, addr + size, 0)))
            copy.start()
            libc = ctypes.CDLL(None, use_errno=True)
            madvise = threading.Thread(target=libc.madvise, args=(
                ctypes.c_void_p(addr), ctypes.c_size_t(size), _MADV_DONTNEED))
            madvise.start()
            assert select.select([uffd], [], [], 10)[0], "no REMOVE event"
            msg = os.read(uffd, 32)
            assert msg[0] == 0x15  # REMOVE
            start, end = struct.unpack_from("QQ", msg, 8)
            assert (start, end) == (addr, addr + size)
            assert resident(addr, size) == 0 and not answer
            gate.drop(0)
            ioctl_range(uffd, UFFDIO_UNREGISTER, start, end - start)
        for t in (copy, madvise):
            t.join(10)
            assert not t.is_alive()
        assert [a["status"] for a in answer] == ["dropped"] and "error" not in answer[0]
        assert memory[:] == bytes(size)

        # A copy in flight in another process: the event read waits for it.
        with subprocess.Popen(
                [sys.executable, "-c", "import sys; from snapstore.criu.copier import CopyGate\n"
                 "with CopyGate(int(sys.argv[1])).shared(0, 1) as wanted:\n"
                 "    print(wanted, flush=True); sys.stdin.readline()", str(gate.fd)],
                pass_fds=[gate.fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline() == "True\n"
            read = threading.Event()

            def reader() -> None:
                with gate.exclusive(0):
                    read.set()

            event = threading.Thread(target=reader)
            event.start()
            assert not read.wait(0.5)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert read.wait(10)
            event.join(10)
            assert holder.wait(10) == 0


def test_a_checkpoint_that_cannot_be_stored_loses_no_process(
        criu: Criu, reaper: None, tmp_path: Path) -> None:
    # A store on a disk far smaller than the process: the dump succeeds, the ingest fails.
    with tmpfs(tmp_path / "disk", "40m") as disk:
        store = LocalStore.open(disk / "store")
        child = Child(tmp_path)
        try:
            ck = snapstore(store, "checkpoint", "--pid", str(child.pid), "--tag", "py")
            assert ck.returncode == 1, ck.stderr
            assert "no space left on the store's device" in ck.stderr
            # The process was stopped for the dump, never killed: it runs on, as it was.
            runs_on(child, child.pid)
            assert "py" not in store.tags() and list(store.work_root.iterdir()) == []
        finally:
            child.proc.kill()
            child.wait_dead()


def test_a_read_of_staged_pages_asks_for_the_chunks_ahead_once(
        store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(3).bytes(24 << 20)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "pages-1.img").write_bytes(data)
    entry = next(iter(store.get_manifest(ingest(store, tmp_path / "img", "p").snapshot).files()))
    starts, chunks = [], []
    pos = 0
    for x in entry.extents:
        starts.append(pos)
        chunks.append(x.chunk)
        pos += x.size
    asked: list[ChunkId] = []
    monkeypatch.setattr(store, "will_need", asked.append)
    monkeypatch.setattr(storepages, "READ_AHEAD", 4 << 20)
    pages = storepages.StorePages(store, "0" * 64, entry)
    buf = bytearray(1 << 20)
    assert pages.read_into(memoryview(buf), 0) == len(buf) and buf == data[:1 << 20]
    # The chunks of the read and of the 4 MiB after it, in order.
    ahead = [c for s, c in zip(starts, chunks, strict=True) if s < (1 << 20) + (4 << 20)]
    assert asked == ahead and len(ahead) < len(chunks)
    # Each once: the same read again asks for nothing more; one further on, for the
    # chunks its own window adds.
    pages.read_into(memoryview(buf), 0)
    assert asked == ahead
    pages.read_into(memoryview(buf), 2 << 20)
    assert asked == [c for s, c in zip(starts, chunks, strict=True) if s < (3 << 20) + (4 << 20)]


def test_staged_pages_read_any_range_right_and_whole_chunks_straight_in(
        store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = memory_like(12 << 20, seed=7)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "pages-1.img").write_bytes(data)
    entry = next(iter(store.get_manifest(ingest(store, tmp_path / "img", "p").snapshot).files()))
    straight: list[ChunkId] = []
    read_chunk_into = store.read_chunk_into

    def spy(cid: ChunkId, out: memoryview) -> None:
        straight.append(cid)
        read_chunk_into(cid, out)

    monkeypatch.setattr(store, "read_chunk_into", spy)
    pages = storepages.StorePages(store, "0" * 64, entry)
    rng = np.random.default_rng(8)
    for _ in range(40):
        offset, n = int(rng.integers(0, len(data))), int(rng.integers(1, 9 << 20))
        buf = bytearray(n)
        got = pages.read_into(memoryview(buf), offset)
        assert got == min(n, len(data) - offset) and buf[:got] == data[offset:offset + got]
    # Large reads took their inner chunks straight into the buffer, the others cached.
    assert straight and len(set(straight)) < sum(1 for x in entry.extents if x.chunk)
    # A damaged chunk inside a read fails the read.
    pos, victim = 0, None
    for x in entry.extents:
        if x.chunk is not None and x.size > 4096:
            victim = (pos, x)
            break
        pos += x.size
    assert victim is not None
    start, x = victim
    assert x.chunk is not None
    path = store.chunk_path(x.chunk)
    obj = bytearray(path.read_bytes())
    obj[len(obj) // 2] ^= 0x01
    path.write_bytes(bytes(obj))
    fresh = storepages.StorePages(store, "0" * 64, entry)
    with pytest.raises(CorruptError):
        fresh.read_into(memoryview(bytearray(x.size + 2 * 4096)), max(0, start - 4096))


def test_lazy_spans_join_what_follows_in_memory_and_file_and_cut_at_areas() -> None:
    # CRIU writes an area's pages in entries of at most 1 MiB: four of them in a row are one
    # span (a prefetch takes from one span), cut where a memory area ends; an entry that
    # follows in memory but not in the pages file stays apart.
    mib, base = 1 << 20, 0x7F0000000000
    flags = PE_LAZY | PE_PRESENT
    extents = tuple(Extent(base + i * mib, 256, flags, i * mib) for i in range(4))
    extents += (Extent(base + 4 * mib, 256, flags, 9 * mib),)
    areas = [(base, base + 3 * mib), (base + 3 * mib, base + 8 * mib)]
    spans = lazy._spans(Pagemap(1, extents), areas)
    assert [(s.start - base, s.end - base, s.offset) for s in spans] == [
        (0, 3 * mib, 0), (3 * mib, 4 * mib, 3 * mib), (4 * mib, 5 * mib, 9 * mib)]


def test_a_process_gone_while_the_tree_is_inspected_is_no_error() -> None:
    # A tree's short-lived child (a shell's `sleep`) may exit between the listing of the
    # tree and the reading of its /proc files: ESRCH there, not only ENOENT.
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "import os; os._exit(0)"])
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        time.sleep(0.001)
    try:
        for pid in (child.pid, zombie.pid):
            p = preflight.inspect(pid)
            assert p.pid == pid and not p.gpus and not p.io_uring
    finally:
        zombie.wait()
