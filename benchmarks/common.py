"""Helpers shared by the benchmarks: timed child processes, cache drops, medians, tables."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    max_rss_bytes: int


def timed(cmd: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Run a command to completion; its wall time and its own peak RSS (from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return Run(seconds, usage.ru_maxrss * 1024)


def kill_and_reap(pid: int) -> None:
    """Kill a restored process and wait until it is reaped (this process is its
    subreaper), so that its pid is free for the next restore."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.01)


def snapstore_cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snapstore", "--store", str(store), *args]


def drop_caches() -> None:
    """Write back and drop the page cache, so the next read comes from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du(path: Path) -> int:
    """Bytes of the regular files under `path` (apparent size)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds else 0.0


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so the output can go into RESULTS.md as is."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far, from /proc/stat, in seconds: busy (user, nice,
    system, irq, softirq, steal), of it in the kernel (system, irq, softirq), and idle
    (idle, iowait)."""

    busy: float
    kernel: float
    idle: float

    @classmethod
    def now(cls) -> CpuTimes:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        return cls((user + nice + system + irq + softirq + steal) / tick,
                   (system + irq + softirq) / tick, (idle + iowait) / tick)

    def since(self, start: CpuTimes) -> dict[str, float]:
        """Cores kept busy on average between `start` and now, and the kernel's share of it."""
        busy, kernel = self.busy - start.busy, self.kernel - start.kernel
        total = busy + self.idle - start.idle
        cores = os.cpu_count() or 1
        return {"busy_cores": round(cores * busy / total, 2) if total else 0.0,
                "kernel_share": round(kernel / busy, 3) if busy else 0.0}
