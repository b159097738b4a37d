"""Restore time of a CRIU-checkpointed process: upstream `criu restore` from a plain image
directory against `snapstore restore` from the store, with its defaults (lazy: snapstore
is CRIU's lazy-pages daemon) and `--eager` (CRIU reads every page through a mount).

Run as root from the repository:
`python -m benchmarks.criu_restore [--size 1G] [--runs 3] [--kind memory-like|random]`.
The process's data is a memory-like image by default (40% zero pages, 30% random, 30% one
repeated page, in clustered runs: `examples.workloads.memory_image`), or random bytes.
The cases take turns within each round, so they share the machine's noise; the page cache
is dropped before every restore. Each restore is timed to the command's return (the
process runs) and to the process's answer to a request that reads a byte of every page of
its data (its memory is all back); every restored process's data is also checked whole
(SHA-256), outside the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import drop_caches, gb, kill_and_reap, median, snapstore_cmd, table
from examples.workloads import memory_image
from snapstore.cli.common import parse_size
from snapstore.criu.binary import Criu
from snapstore.export import export
from snapstore.store.local import LocalStore

PR_SET_CHILD_SUBREAPER = 36

# SIGUSR1: read a byte of every page, then write "touched" to PATH; SIGUSR2: write the
# SHA-256 of the data to PATH.
CHILD = """
import hashlib, os, signal, sys, time
import numpy as np
source, path = sys.argv[1], sys.argv[2]
data = np.fromfile(source, dtype=np.uint8)
def answer(text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR1, lambda *_: answer(str(int(data[::4096].sum()))))
signal.signal(signal.SIGUSR2, lambda *_: answer(hashlib.sha256(data).hexdigest()))
answer("ready")
while True:
    time.sleep(0.01)
"""


def ask(pid: int, sig: int, answer: Path, timeout: float = 300) -> str:
    answer.unlink(missing_ok=True)
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not answer")
        time.sleep(0.001)
    return answer.read_text()



def restore(cmd: list[str], pid_from_stdout: bool, pid: int,
            answer: Path) -> tuple[float, float, str]:
    """Seconds to the command's return, to the whole-memory answer; the data's digest."""
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    returned = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    if pid_from_stdout:
        assert int(proc.stdout.split()[-1]) == pid
    ask(pid, signal.SIGUSR1, answer)
    touched = time.perf_counter() - start
    digest = ask(pid, signal.SIGUSR2, answer)
    kill_and_reap(pid)
    return returned, touched, digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="process data (1G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kind", choices=("memory-like", "random"), default="memory-like")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    # Restored processes are left to the nearest subreaper: this one, so it can reap them
    # and their pid is free for the next restore.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    criu = Criu.find()
    work = Path(tempfile.mkdtemp(prefix="criu-restore-", dir="/var/tmp"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        answer = work / "answer"
        source = work / "data.img"
        if args.kind == "memory-like":
            memory_image(source, args.size, seed=5)
        else:
            source.write_bytes(np.random.default_rng(5).bytes(args.size))
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(answer)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        while not answer.exists():
            time.sleep(0.05)
        store_dir = work / "store"
        start = time.perf_counter()
        subprocess.run(snapstore_cmd(store_dir, "checkpoint", "--pid", str(child.pid),
                                     "--tag", "bench"), check=True, capture_output=True)
        checkpoint_s = time.perf_counter() - start
        child.wait()
        store = LocalStore.open(store_dir)
        plain = work / "plain"
        export(store, store.get_manifest(store.resolve("bench")), plain)
        criu_work = work / "criu-work"
        criu_work.mkdir()
        cases = {
            "upstream criu restore (plain dir)": (
                [criu.path, "restore", "-D", str(plain), "-W", str(criu_work), "-d"], False),
            "snapstore restore (lazy, the default)": (
                snapstore_cmd(store_dir, "restore", "--from", "bench"), True),
            "snapstore restore --eager": (
                snapstore_cmd(store_dir, "restore", "--from", "bench", "--eager"), True),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (cmd, from_stdout) in cases.items():
                returned, touched, digest = restore(cmd, from_stdout, child.pid, answer)
                if digest != expected:
                    raise RuntimeError(f"{name}: the restored data is wrong")
                results[name].append((returned, touched))
        base = median([t for _, t in results["upstream criu restore (plain dir)"]])
        rows = []
        for name, runs in results.items():
            ret = median([r for r, _ in runs])
            touched = median([t for _, t in runs])
            rows.append([name, f"{ret:.2f}", f"{touched:.2f}", f"{base / touched:.2f}x",
                         f"{args.size / touched / 1e9:.2f}"])
        print(f"process data {gb(args.size)} {args.kind}, checkpoint into the store "
              f"{checkpoint_s:.2f}s, {args.runs} runs, medians, cold page cache, every "
              "restore's data verified")
        print(table(["restore", "to return (s)", "to all memory read (s)",
                     "speed vs upstream", "GB/s"], rows))


if __name__ == "__main__":
    main()
