"""Fixtures shared by every test layer: stores and generated image directories."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from examples import workloads
from fusefs.mount import is_mounted
from snapstore.criu.binary import Criu, CriuError
from snapstore.gpu import cuda
from snapstore.gvisor.runsc import Runsc
from snapstore.store.local import LocalStore

PAGE = 4096

# CI runs the same generated cases every time, so a red run can be repeated as it was;
# elsewhere hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def memory_like(size: int, seed: int) -> bytes:
    """Clustered runs of zero, random and one repeated page, like a process's memory."""
    rng = np.random.default_rng(seed)
    repeated = rng.bytes(PAGE)
    out = bytearray()
    while len(out) < size:
        kind = rng.integers(0, 10)
        n = int(rng.integers(1, 48)) * PAGE
        if kind < 4:
            out += bytes(n)
        elif kind < 7:
            out += rng.bytes(n)
        else:
            out += repeated * (n // PAGE)
    return bytes(out[:size])


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore.open(tmp_path / "store")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A small image directory with every kind of entry snapstore stores."""
    d = tmp_path / "image"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "checkpoint.img").write_bytes(memory_like(6 << 20, seed=1))
    (d / "sub" / "pages.img").write_bytes(memory_like(3 << 20, seed=2) + b"tail")
    (d / "empty").write_bytes(b"")
    (d / "sub" / "deeper" / "note.txt").write_text("hello\n")
    with (d / "sparse.img").open("wb") as f:
        f.truncate(5 << 20)
    os.symlink("sub/pages.img", d / "link")
    os.symlink("/nonexistent/target", d / "dangling")
    (d / "sub" / "pages.img").chmod(0o600)
    return d


def runsc_unavailable() -> str | None:
    if shutil.which("runsc") is None and not Path("/usr/bin/runsc").exists():
        return "runsc is not installed"
    if os.geteuid() != 0:
        return "runsc checkpoint/restore needs root"
    if not workloads.BUSYBOX.exists():
        return f"{workloads.BUSYBOX} (busybox-static) is not installed"
    return None


@pytest.fixture
def rs(tmp_path: Path) -> Iterator[Runsc]:
    reason = runsc_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Runsc.private(parent=tmp_path) as runsc:
        yield runsc
    # Nothing of this root may outlive the test: no state dir, no runsc processes.
    assert not runsc.root.exists()
    assert processes_using(runsc.root) == []


def processes_using(root: Path) -> list[int]:
    return processes_named(f"--root={root}")


def processes_named(needle: str) -> list[int]:
    """Processes whose command line contains `needle`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_counter_above(bundle: Path, value: int, timeout: float = 30) -> int:
    """Wait for the busybox counter of `bundle` to pass `value`; return what it read."""
    deadline = time.monotonic() + timeout
    while (current := workloads.read_counter(bundle)) <= value:
        assert time.monotonic() < deadline, f"counter stuck at {current}, expected > {value}"
        time.sleep(0.05)
    return current


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "48m") mounted at the new directory `path`: a small disk
    to fill up."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        if is_mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chunk_loader_pids(store_root: Path) -> list[int]:
    """The chunk loader processes serving the store at `store_root`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"snapstore.store.chunk_loader_worker" in argv and str(store_root).encode() in argv:
            pids.append(int(d.name))
    return pids


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return process_state(pid) not in ("", "Z")


def process_state(pid: int) -> str:
    """The state letter /proc gives `pid` ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # ESRCH: it ended between the file's open and its read.
        return ""


def criu_or_skip() -> Criu:
    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    try:
        return Criu.find()
    except CriuError as e:
        pytest.skip(str(e))


@pytest.fixture
def criu() -> Criu:
    return criu_or_skip()


PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def reaper() -> Iterator[None]:
    """Make this process the subreaper of what CRIU restores (criu restore -d leaves the
    tree to the nearest subreaper), and reap every zombie child at the end, so a restored
    pid is free again for the next restore."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reap()


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill(pid: int) -> None:
    """Kill `pid` and wait until it is reaped: its pid is free for the next restore."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return

    def gone() -> bool:
        # A killed leader shows as a zombie before its other threads have exited, and
        # cannot be reaped until they have: reap until /proc has no trace of it.
        reap()
        return not Path(f"/proc/{pid}").exists()

    wait_until(gone, f"pid {pid} to die and be reaped")


class FakeDriver:
    """The CUDA checkpoint API's state machine per pid on a host of `gpus` fake GPUs,
    recording every call as (name, pid)."""

    def __init__(self, with_cuda: set[int], gpus: int = 1) -> None:
        self.state = {pid: cuda.ProcessState.RUNNING for pid in with_cuda}
        self.gpus = gpus
        self.calls: list[tuple[str, int]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def describe(self) -> cuda.DriverInfo | None:
        return cuda.DriverInfo("580.0", "13.0", tuple(
            cuda.GpuInfo(i, "Fake GPU", f"GPU-{i}") for i in range(self.gpus)))

    def get_state(self, pid: int) -> cuda.ProcessState:
        if pid not in self.state:
            raise cuda.NoCudaContext(f"pid {pid} has no CUDA state")
        return self.state[pid]

    def _step(self, name: str, pid: int, want: cuda.ProcessState,
              to: cuda.ProcessState) -> None:
        assert self.state[pid] is want, f"{name} of {pid} in {self.state[pid]}"
        if name in ("checkpoint", "restore"):
            # The driver's thread inside the process does this work: it must be running.
            assert process_state(pid) not in ("T", "t"), f"{name} of stopped pid {pid}"
        self.calls.append((name, pid))
        self.state[pid] = to

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._step("lock", pid, cuda.ProcessState.RUNNING, cuda.ProcessState.LOCKED)

    def checkpoint(self, pid: int) -> None:
        self._step("checkpoint", pid, cuda.ProcessState.LOCKED, cuda.ProcessState.CHECKPOINTED)

    def restore(self, pid: int) -> None:
        self._step("restore", pid, cuda.ProcessState.CHECKPOINTED, cuda.ProcessState.LOCKED)

    def unlock(self, pid: int) -> None:
        self._step("unlock", pid, cuda.ProcessState.LOCKED, cuda.ProcessState.RUNNING)
