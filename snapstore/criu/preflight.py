"""What a checkpoint can tell from /proc before it touches a process tree: the GPUs it
uses, and the configurations CRIU or the CUDA driver cannot checkpoint, each refused with
the setting to change (docs/criu.md, "Several GPUs").

Seen on two H200s with driver 580: NCCL's default transports between ranks on one host
(peer memory, CUDA IPC, shared host memory, NVLink SHARP) checkpoint but fail to restore
(CUDA_ERROR_NOT_SUPPORTED; NVIDIA documents CUDA IPC from driver 610 on), and torch's
TCPStore server holds an io_uring instance, which CRIU cannot dump. A process's own peer
copies between two GPUs also fail to restore, but leave nothing in /proc to see them by.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import NotCheckpointableError
from snapstore.proctree import UNREADABLE, fd_targets, socket_inode

# The environment with which an NCCL job's ranks talk through the network transport alone.
NCCL_CHECKPOINTABLE = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
                       "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
# The first driver NVIDIA documents as checkpointing CUDA IPC memory.
IPC_DRIVER = 610
# NCCL's proxy binds an abstract unix socket of this name for each communicator.
_NCCL_SOCKET = "@tmp/nccl-socket-"
_NVIDIA_GPU = re.compile(r"^/dev/nvidia(\d+)$")
_IO_URING = "anon_inode:[io_uring]"


@dataclass(frozen=True, slots=True)
class Process:
    """What /proc shows of one process."""

    pid: int
    gpus: frozenset[int]  # the minor numbers of the /dev/nvidiaN it has a context on
    nccl: bool  # it holds an NCCL communicator
    io_uring: bool
    env: Mapping[str, str]  # as it was started (later changes do not show in /proc)


def inspect(pid: int) -> Process:
    fds = set(fd_targets(pid).values())
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except UNREADABLE:
        maps = ""
    return Process(pid, gpus_mapped(maps),
                   nccl=any(name.startswith(_NCCL_SOCKET) for name in _unix_names(pid, fds)),
                   io_uring=_IO_URING in fds or _IO_URING in maps, env=_environ(pid))


def gpus_mapped(maps: str) -> frozenset[int]:
    """The GPUs a process has a context on, from its /proc maps: every CUDA process opens
    each GPU's /dev/nvidiaN, but maps it read-write only where it has a context."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].startswith("rw"):
            m = _NVIDIA_GPU.match(fields[5])
            if m:
                found.add(int(m.group(1)))
    return frozenset(found)


def check(procs: Sequence[Process], cuda_pids: Iterable[int],
          driver_version: str | None) -> None:
    """Raise NotCheckpointableError naming each process that could not be restored from
    its checkpoint and what to change; `cuda_pids` are those holding CUDA state."""
    problems = []
    with_cuda = set(cuda_pids)
    for p in procs:
        if p.io_uring:
            problems.append(f"pid {p.pid} holds an io_uring instance, which CRIU cannot dump "
                            "(torch.distributed's TCPStore server makes one: start the job "
                            "with USE_LIBUV=0)")
        if p.pid in with_cuda and p.nccl and not _ipc_supported(driver_version):
            missing = [f"{k}={v}" for k, v in NCCL_CHECKPOINTABLE.items()
                       if p.env.get(k) != v]
            if missing:
                problems.append(
                    f"pid {p.pid} uses NCCL with transports whose GPU memory the CUDA "
                    f"checkpoint of driver {driver_version or '(unknown)'} cannot restore "
                    f"(peer memory and CUDA IPC, from driver {IPC_DRIVER} on): start the "
                    f"job with {' '.join(missing)}")
    if problems:
        raise NotCheckpointableError("cannot checkpoint this tree, nothing was done to it: "
                                     + "; ".join(problems))


def gpus_used(procs: Iterable[Process]) -> frozenset[int]:
    return frozenset().union(*(p.gpus for p in procs))


def _ipc_supported(driver_version: str | None) -> bool:
    if driver_version is None:
        return False
    major = driver_version.split(".")[0]
    return major.isdigit() and int(major) >= IPC_DRIVER


def _unix_names(pid: int, fds: set[str]) -> list[str]:
    """The bound names of the unix sockets among `fds` (abstract ones with their @)."""
    inodes = {socket_inode(t) for t in fds} - {None}
    names = []
    with contextlib.suppress(*UNREADABLE):
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes:
                names.append(fields[7])
    return names


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except UNREADABLE:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}
