"""The CUDA checkpoint calls a GPU dump needs, behind one small interface.

`DriverCheckpoint` calls the driver through `cuda.bindings`; `NoCuda` stands in where that
module is missing or no driver answers, so the dump path runs, and is tested, without a GPU.
Either raises `NoCudaContext` from `get_state` for a process that holds no CUDA state.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from snapstore.errors import SnapstoreError

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class CudaError(SnapstoreError):
    """A CUDA checkpoint call failed; the message names the call and the driver's error."""


class NoCudaContext(CudaError):
    """The process holds no CUDA state (or no driver is available to ask)."""


class ProcessState(enum.Enum):
    """The driver's CUprocessState, by the same numbers."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    uuid: str


@dataclass(frozen=True, slots=True)
class DriverInfo:
    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[GpuInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid} for g in self.gpus],
        }


class CheckpointApi(Protocol):
    """Moves a process's GPU state into its host memory and back (CUDA 12.8+ driver API).

    The calls follow the driver's state machine: lock (RUNNING -> LOCKED), checkpoint
    (LOCKED -> CHECKPOINTED), restore (CHECKPOINTED -> LOCKED), unlock (LOCKED -> RUNNING).
    Checkpoint and restore are carried out by a driver thread inside the target process,
    so the process must not be stopped (SIGSTOP) while they run.
    """

    def describe(self) -> DriverInfo | None:
        """The driver and the GPUs it sees; None without a driver."""

    def get_state(self, pid: int) -> ProcessState:
        """The process's CUDA state; NoCudaContext when it has none."""

    def lock(self, pid: int, timeout_ms: int) -> None:
        """Block the process's further CUDA calls, waiting up to `timeout_ms` for work to end."""

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int) -> None: ...

    def unlock(self, pid: int) -> None: ...


class NoCuda:
    """The API where there is no CUDA: every process is one without CUDA state."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self) -> DriverInfo | None:
        return None

    def get_state(self, pid: int) -> ProcessState:
        raise NoCudaContext(self.reason)

    def lock(self, pid: int, timeout_ms: int) -> None:
        raise CudaError(self.reason)

    def checkpoint(self, pid: int) -> None:
        raise CudaError(self.reason)

    def restore(self, pid: int) -> None:
        raise CudaError(self.reason)

    def unlock(self, pid: int) -> None:
        raise CudaError(self.reason)


class DriverCheckpoint:
    """The API through `cuda.bindings.driver`; construct it with `open_api`."""

    def __init__(self, driver: Any) -> None:
        # cuda.bindings has no type stubs; every value from it stays inside this class.
        self._d = driver

    def _check(self, call: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self._d.CUresult.CUDA_SUCCESS:
            raise CudaError(f"{call} failed: {self._error_name(err)}")
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else result[1:]
        return None

    def _error_name(self, err: Any) -> str:
        got = self._d.cuGetErrorName(err)
        name = got[1] if got[0] == self._d.CUresult.CUDA_SUCCESS else None
        return name.decode() if isinstance(name, bytes) else str(err)

    def describe(self) -> DriverInfo | None:
        version = int(self._check("cuDriverGetVersion", self._d.cuDriverGetVersion()))
        gpus = []
        for i in range(int(self._check("cuDeviceGetCount", self._d.cuDeviceGetCount()))):
            dev = self._check("cuDeviceGet", self._d.cuDeviceGet(i))
            raw_name = self._check("cuDeviceGetName", self._d.cuDeviceGetName(256, dev))
            name = bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace")
            uuid = bytes(self._check("cuDeviceGetUuid", self._d.cuDeviceGetUuid(dev)).bytes)
            gpus.append(GpuInfo(i, name, "GPU-" + _uuid_text(uuid)))
        return DriverInfo(
            driver_version=kernel_driver_version(),
            cuda_version=f"{version // 1000}.{version % 1000 // 10}",
            gpus=tuple(gpus),
        )

    def get_state(self, pid: int) -> ProcessState:
        err, state = self._d.cuCheckpointProcessGetState(pid)
        if err != self._d.CUresult.CUDA_SUCCESS:
            # The driver answers this way for a process that never created a context.
            raise NoCudaContext(f"cuCheckpointProcessGetState: {self._error_name(err)}")
        return ProcessState(int(state))

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = self._d.CUcheckpointLockArgs()
        args.timeoutMs = timeout_ms
        self._check("cuCheckpointProcessLock", self._d.cuCheckpointProcessLock(pid, args))

    def checkpoint(self, pid: int) -> None:
        self._check("cuCheckpointProcessCheckpoint",
                    self._d.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int) -> None:
        self._check("cuCheckpointProcessRestore", self._d.cuCheckpointProcessRestore(pid, None))

    def unlock(self, pid: int) -> None:
        self._check("cuCheckpointProcessUnlock", self._d.cuCheckpointProcessUnlock(pid, None))


def open_api() -> CheckpointApi:
    """The driver API when cuda.bindings imports and the driver initialises, else NoCuda."""
    try:
        driver = importlib.import_module("cuda.bindings.driver")
    except ImportError as err:
        return NoCuda(f"cuda.bindings is not installed ({err})")
    try:
        result = driver.cuInit(0)
    except Exception as err:  # cuda.bindings raises its own types when libcuda is absent
        return NoCuda(f"no CUDA driver: {err}")
    code = result[0] if isinstance(result, tuple) else result
    if code != driver.CUresult.CUDA_SUCCESS:
        return NoCuda(f"cuInit failed: {code}")
    return DriverCheckpoint(driver)


def kernel_driver_version() -> str | None:
    """The NVIDIA kernel module's version (e.g. 580.159.04), as nvidia-smi reports it."""
    try:
        text = DRIVER_VERSION_FILE.read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
