"""The CUDA state of every process of a tree, moved to host memory and back together.

A job of several processes (NCCL ranks, one per GPU) is checkpointed at one consistent
point: every process is locked before any is checkpointed, so that no rank is left running
a collective against a peer whose GPU state is already gone. The checkpoints and restores
then run side by side, one thread per process (the driver does the work in a thread inside
each target process), and a restored job is unlocked only once every rank has its state
back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from snapstore.gpu import cuda

# How long the driver may wait for a process's CUDA work to finish before Lock fails.
LOCK_TIMEOUT_MS = 10_000


def has_cuda(api: cuda.CheckpointApi, pid: int) -> bool:
    try:
        api.get_state(pid)
    except cuda.NoCudaContext:
        return False
    return True


def with_cuda(api: cuda.CheckpointApi, pids: Sequence[int]) -> list[int]:
    """The processes of `pids` that hold CUDA state."""
    return [pid for pid in pids if has_cuda(api, pid)]


def checkpoint_all(api: cuda.CheckpointApi, pids: Sequence[int]) -> None:
    """Lock every process, then checkpoint them all at once. On a failure, every process
    gets back what it had (its GPU state, unlocked) before the error is raised."""
    locked: list[int] = []
    try:
        for pid in pids:
            api.lock(pid, LOCK_TIMEOUT_MS)
            locked.append(pid)
    except BaseException:
        _each(api.unlock, locked)
        raise
    failed = _parallel(api.checkpoint, pids)
    if failed:
        done = [pid for pid in pids if pid not in failed]
        with contextlib.suppress(cuda.CudaError):
            restore_all(api, done)
        # A process whose checkpoint failed is still locked (or the driver gave up on it).
        _each(api.unlock, list(failed))
        raise _first(failed)


def restore_all(api: cuda.CheckpointApi, pids: Sequence[int]) -> None:
    """Restore every process at once, then unlock them all; the first failure raised,
    naming its process, once every restore has ended (none is left running)."""
    failed = _parallel(api.restore, pids)
    if failed:
        raise _first(failed)
    for pid in pids:
        api.unlock(pid)


def _parallel(call: Callable[[int], None], pids: Sequence[int]) -> dict[int, cuda.CudaError]:
    """`call` for every pid, side by side; the driver errors by pid."""
    def one(pid: int) -> cuda.CudaError | None:
        try:
            call(pid)
        except cuda.CudaError as e:
            return e
        return None

    if len(pids) <= 1:
        results = [one(pid) for pid in pids]
    else:
        with ThreadPoolExecutor(len(pids)) as pool:
            results = list(pool.map(one, pids))
    return {pid: err for pid, err in zip(pids, results, strict=True) if err is not None}


def _each(call: Callable[[int], None], pids: Sequence[int]) -> None:
    """`call` for every pid, whatever the others do (a way back, not a way forward)."""
    for pid in pids:
        with contextlib.suppress(cuda.CudaError):
            call(pid)


def _first(failed: dict[int, cuda.CudaError]) -> cuda.CudaError:
    pid, err = next(iter(failed.items()))
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return type(err)(f"pid {pid}: {err}{more}")
