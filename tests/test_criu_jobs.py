"""Jobs of several processes and GPUs through CRIU for real: a tree whose processes talk
over TCP comes back with its connections; every process with CUDA state is locked before
any is checkpointed and restored before any is unlocked (a fake driver: CI has no GPU);
and the trees whose checkpoint could not restore are refused before they are touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from snapstore import ingest as ingest_module
from snapstore.criu import cudastate, preflight, workflow
from snapstore.criu.binary import Criu
from snapstore.criu.preflight import NCCL_CHECKPOINTABLE
from snapstore.errors import NotCheckpointableError, RestoreError
from snapstore.gpu import cuda
from snapstore.proctree import below
from snapstore.store.local import LocalStore
from snapstore.workflow import topology
from tests.conftest import FakeDriver, alive, kill, process_state, reap, wait_until

# A server and its client (its child) over a loopback TCP connection: on SIGUSR1 the
# server sends a number, the client answers it plus one, and the server writes the answer,
# both pids and its port to REPORT. The listening socket stays open.
JOB = """
import os, signal, socket, subprocess, sys
report, role = sys.argv[1], sys.argv[2]
if role == "client":
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[3])))
    while True:
        n = int.from_bytes(conn.recv(8), "big")
        conn.sendall((n + 1).to_bytes(8, "big"))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
client = subprocess.Popen([sys.executable, __file__, report, "client",
                           str(srv.getsockname()[1])], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
conn, _ = srv.accept()
n = 0
while True:
    n += 1
    conn.sendall(n.to_bytes(8, "big"))
    answer = int.from_bytes(conn.recv(8), "big")
    with open(report + ".tmp", "w") as f:
        f.write(f"{n} {answer} {os.getpid()} {client.pid} {srv.getsockname()[1]}")
    os.rename(report + ".tmp", report)
    signal.sigwait({signal.SIGUSR1})
"""


class Job:
    def __init__(self, tmp: Path) -> None:
        script = tmp / "job.py"
        script.write_text(JOB)
        self.report = tmp / "report"
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.report), "server"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.report.exists, "the job to start")
        self.server, self.client, self.port = self.read()[2:]

    def read(self) -> list[int]:
        return [int(x) for x in self.report.read_text().split()]

    def exchange(self, server: int) -> list[int]:
        """One more round trip over the connection: n, the answer, the pids, the port."""
        before = self.read()[0]
        os.kill(server, signal.SIGUSR1)
        wait_until(lambda: self.read()[0] > before, f"pid {server} to exchange")
        return self.read()

    def gone(self) -> bool:
        reap()
        self.proc.poll()  # the dumped server was this process's child: forget it too
        return not alive(self.server) and not alive(self.client)


def tcp_sockets_on(port: int) -> list[str]:
    """The states of this network namespace's TCP sockets with `port` at either end."""
    rows = (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    return [row[3] for row in rows
            if port in (int(row[1].split(":")[1], 16), int(row[2].split(":")[1], 16))]


def test_a_job_comes_back_with_its_tcp_connections_and_every_gpu_state_at_once(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    job = Job(tmp_path)
    api = FakeDriver({job.server, job.client})
    workflow.checkpoint(store, criu, job.server, "job", {}, api=api)
    wait_until(job.gone, "the dumped job to be killed")
    # One consistent point: every rank locked before any is checkpointed.
    assert sorted(api.calls[:2]) == [("lock", job.server), ("lock", job.client)]
    assert sorted(api.calls[2:]) == [("checkpoint", job.server), ("checkpoint", job.client)]
    assert store.get_manifest(store.resolve("job")).labels["cuda"] == "1"
    # The dumped connection closed without a packet: nothing lingers on its port (a plain
    # kill leaves it in TIME_WAIT for a minute).
    assert tcp_sockets_on(job.port) == []

    # Restored on the same ports.
    api.calls.clear()
    r = workflow.restore(store, criu, "job", {}, lazy=True, api=api)
    try:
        assert r.pid == job.server and below(r.pid) == [job.client]
        # Every restored process has its state back before any is unlocked.
        assert sorted(api.calls[:2]) == [("restore", job.server), ("restore", job.client)]
        assert sorted(api.calls[2:]) == [("unlock", job.server), ("unlock", job.client)]
        n, answer, *rest = job.exchange(r.pid)
        assert (answer, *rest) == (n + 1, job.server, job.client, job.port)
    finally:
        kill(r.pid)
        kill(job.client)


def holder(tmp: Path, code: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process that runs `code`, says it is ready, and sleeps."""
    ready = tmp / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nopen({str(ready)!r}, 'w').close()\n"
         "import time\nwhile True: time.sleep(1)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, **(env or {})})
    wait_until(ready.exists, "the process to start")
    return proc


IO_URING = """
import ctypes
params = ctypes.create_string_buffer(120)
ring = ctypes.CDLL(None, use_errno=True).syscall(425, 4, params)
assert ring >= 0, ctypes.get_errno()
"""
NCCL = """
import socket
comm = socket.socket(socket.AF_UNIX)
comm.bind("\\0tmp/nccl-socket-0-5eed")
"""


def test_a_tree_whose_checkpoint_could_not_restore_is_refused_untouched(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    ring = holder(tmp_path, IO_URING)
    try:
        # Through the command line: exit 5, one line, the process untouched.
        r = subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store.root),
                            "checkpoint", "--pid", str(ring.pid), "--tag", "x"],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 5, r.stderr
        assert "io_uring" in r.stderr and "USE_LIBUV=0" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert process_state(ring.pid) in ("S", "R") and store.tags() == {}
    finally:
        ring.kill()
        ring.wait()

    # An NCCL rank started with its default transports: refused, its GPU state untouched.
    rank = holder(tmp_path, NCCL)
    api = FakeDriver({rank.pid})
    try:
        with pytest.raises(NotCheckpointableError,
                           match="NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1"):
            workflow.checkpoint(store, criu, rank.pid, "x", {}, api=api)
        assert api.calls == [] and alive(rank.pid)
    finally:
        rank.kill()
        rank.wait()
    # Started with the transports that checkpoint: it goes through.
    rank = holder(tmp_path, NCCL, env=NCCL_CHECKPOINTABLE)
    api = FakeDriver({rank.pid})
    try:
        workflow.checkpoint(store, criu, rank.pid, "rank", {}, leave_running=True, api=api)
        assert api.names() == ["lock", "checkpoint", "restore", "unlock"]
    finally:
        rank.kill()
        rank.wait()


def test_a_snapshot_on_more_gpus_than_the_host_has_is_refused(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path) -> None:
    job = Job(tmp_path)
    workflow.checkpoint(store, criu, job.server, "two", {"gpu.used": "2"},
                        api=FakeDriver({job.server}, gpus=2))
    wait_until(job.gone, "the dumped job to be killed")
    with pytest.raises(RestoreError, match="taken on 2 GPUs; this host has 1"):
        workflow.restore(store, criu, "two", {}, lazy=True, api=FakeDriver(set(), gpus=1))
    assert not alive(job.server) and list(store.work_root.iterdir()) == []

    # A driver that cannot restore what a peer copy left: the tree is killed, and the
    # error says what to change.
    class PeerCopied(FakeDriver):
        def restore(self, pid: int) -> None:
            raise cuda.CudaError("cuCheckpointProcessRestore failed: CUDA_ERROR_INVALID_VALUE")

    api = PeerCopied(set(), gpus=2)
    api.state[job.server] = cuda.ProcessState.CHECKPOINTED
    with pytest.raises(RestoreError, match=r"peer to peer .* through host memory; killed it"):
        workflow.restore(store, criu, "two", {}, lazy=True, api=api)
    wait_until(job.gone, "the half-restored job to be killed")


class FailsFor(FakeDriver):
    """Fails `call` for pid `bad`."""

    def __init__(self, pids: set[int], call: str, bad: int) -> None:
        super().__init__(pids)
        self.call, self.bad = call, bad

    def checkpoint(self, pid: int) -> None:
        if (self.call, pid) == ("checkpoint", self.bad):
            raise cuda.CudaError("cuCheckpointProcessCheckpoint failed: CUDA_ERROR_UNKNOWN")
        super().checkpoint(pid)

    def restore(self, pid: int) -> None:
        if (self.call, pid) == ("restore", self.bad):
            raise cuda.CudaError("cuCheckpointProcessRestore failed: CUDA_ERROR_UNKNOWN")
        super().restore(pid)


# Pids no process has (the largest there can be): the fake driver alone knows them.
RANKS = [int(Path("/proc/sys/kernel/pid_max").read_text()) - n for n in (1, 2, 3)]


def test_one_failed_checkpoint_gives_every_rank_its_gpu_state_back() -> None:
    api = FailsFor(set(RANKS), "checkpoint", RANKS[1])
    with pytest.raises(cuda.CudaError, match=rf"pid {RANKS[1]}: .*CUDA_ERROR_UNKNOWN"):
        cudastate.checkpoint_all(api, RANKS)
    assert all(s is cuda.ProcessState.RUNNING for s in api.state.values())


def test_one_failed_restore_unlocks_no_rank() -> None:
    api = FailsFor(set(RANKS), "restore", RANKS[2])
    cudastate.checkpoint_all(api, RANKS)
    api.calls.clear()
    with pytest.raises(cuda.CudaError, match=f"pid {RANKS[2]}: "):
        cudastate.restore_all(api, RANKS)
    # Every other restore ran to its end; none was unlocked to run against a lost peer.
    assert sorted(api.calls) == sorted(("restore", p) for p in RANKS[:2])


def test_topology_reads_the_links_above_the_diagonal() -> None:
    matrix = ("\t\x1b[4mGPU0\tGPU1\tGPU2\tCPU Affinity\x1b[0m\n"
              "GPU0\t X \tNV18\tPIX\t0-31\nGPU1\tNV18\t X \tSYS\t0-31\n"
              "GPU2\tPIX\tSYS\t X \t0-31\n\nLegend:\n  X    = Self\n")
    assert topology(matrix, 3) == "NV18,PIX,SYS"
    assert topology(matrix, 1) == ""
    assert topology("garbage", 2) == ""


def test_a_job_whose_checkpoint_cannot_be_stored_talks_on(
        criu: Criu, reaper: None, store: LocalStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job(tmp_path)

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    # The checkpoint imports the ingest when it runs (a restore's start-up needs none of it).
    monkeypatch.setattr(ingest_module, "ingest", full)
    try:
        with pytest.raises(OSError, match="No space"):
            workflow.checkpoint(store, criu, job.server, "job", {}, api=FakeDriver(set()))
        # Resumed as it was: its connection takes part in the next round trip.
        n, answer, *rest = job.exchange(job.server)
        assert (answer, *rest) == (n + 1, job.server, job.client, job.port)
    finally:
        kill(job.server)
        kill(job.client)
        job.proc.poll()


def test_the_gpus_a_process_uses_are_those_it_maps_read_write() -> None:
    # As /proc showed a rank on the second of two GPUs: both device files open and mapped,
    # only its own read-write.
    maps = """\
7f0000000000-7f0000200000 rw-s 00000000 00:05 1041  /dev/nvidia1
7f0000200000-7f0000201000 -w-s 00000000 00:05 1041  /dev/nvidia1
7f0000201000-7f0000202000 -w-s 00000000 00:05 1040  /dev/nvidia0
7f0000202000-7f0000400000 rw-s 00000000 00:05 1039  /dev/nvidiactl
7f0000400000-7f0000600000 rw-s 00000000 00:05 1038  /dev/nvidia-uvm
7f0000600000-7f0000601000 rw-p 00000000 00:00 0
"""
    assert preflight.gpus_mapped(maps) == {1}
    assert preflight.gpus_mapped(maps.replace("-w-s 00000000 00:05 1040", "rw-s 0 0 1")) \
        == {0, 1}
