"""Many small snapshots pushed and pulled at once: every byte arrives, and each process's
memory and open descriptors stay bounded.

Only the command line is used against the remote, so the test holds whatever the bucket
layout is. Each push and pull is its own `python -m snapstore` process, all started
together against one moto_server: the pushes from one store, the pulls into one fresh
store, so that processes race to upload the same shared chunks and to store them.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapstore.chunker_params import ChunkerParams
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from tests.conftest import memory_like
from tests.s3proxy import make_bucket, moto_server, s3_env

REPO = Path(__file__).resolve().parent.parent
SNAPSHOTS = int(os.environ.get("SNAPSTORE_LOAD_SNAPSHOTS", "32"))
# Small chunks, 27 to 31 a snapshot: more than a process's `--jobs` (16), so every push and
# pull keeps all its connections busy.
PARAMS = ChunkerParams(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10)
# One command, interpreter start included, on a 2-core machine shared with the rest of the
# suite: generous, since this bounds a hang, not a speed.
DEADLINE = 240.0
# Bounds per process, well above what was measured (docs/reliability.md): an interpreter
# with aiobotocore loaded is about 100 MiB, a push or pull holds at most `--jobs` chunks in
# flight and `--jobs` + 4 connections, and the interpreter a dozen descriptors of its own.
# A pull also keeps each chunk it wrote open (an unnamed temporary file) until the batch
# holding it is published after a syncfs: up to 256 files a batch.
MAX_RSS = 320 << 20
MAX_FDS = 64
MAX_PULL_FDS = MAX_FDS + 256


@dataclass
class Usage:
    """What one process used: peak resident bytes (VmHWM) and most descriptors seen."""

    argv: list[str]
    returncode: int = -1
    stderr: str = ""
    max_rss: int = 0
    max_fds: int = 0
    fd_samples: int = 0


@dataclass
class Batch:
    """Processes started together and watched until all have ended."""

    procs: dict[int, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)
    usage: dict[int, Usage] = field(default_factory=dict)

    def sample(self, stop: threading.Event) -> None:
        """Open descriptors and VmHWM (the peak RSS of the process's own memory since its
        exec). wait4's ru_maxrss cannot serve: Linux folds the memory the process had before
        exec into it, and a child that subprocess starts with vfork had the test runner's."""
        while not stop.is_set():
            for pid, u in list(self.usage.items()):
                try:
                    n = len(os.listdir(f"/proc/{pid}/fd"))
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(line.split()[1]) << 10 for line in status.splitlines()
                            if line.startswith("VmHWM:")), 0)
                u.max_rss = max(u.max_rss, hwm)
                u.max_fds = max(u.max_fds, n)
                u.fd_samples += 1
            stop.wait(0.02)


def snapstore_argv(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snapstore", "--store", str(store), *args]


def run_all(commands: list[list[str]], env: dict[str, str], logs: Path) -> list[Usage]:
    """Start every command at once while a thread samples each one's peak RSS and open
    descriptors. Anything still running at the deadline is killed and fails
    the test. Each command's stderr goes to a file under `logs`, which no command can
    fill up and block on, as it could a pipe read only at the end."""
    batch = Batch()
    stop = threading.Event()
    sampler = threading.Thread(target=batch.sample, args=(stop,))
    logs.mkdir()
    # Sampling from before the first start: a short command started early in the batch
    # could end before a sampler started after the last one looked at it.
    sampler.start()
    try:
        for i, argv in enumerate(commands):
            log = logs / f"{i}.err"
            with log.open("wb") as err:
                proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
            batch.procs[proc.pid] = (proc, log)
            batch.usage[proc.pid] = Usage(argv)
        deadline = time.monotonic() + DEADLINE
        running = set(batch.procs)
        while running:
            assert time.monotonic() < deadline, f"{len(running)} commands still running"
            for pid in sorted(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                (proc, log), u = batch.procs[pid], batch.usage[pid]
                proc.returncode = u.returncode = os.waitstatus_to_exitcode(status)
                u.stderr = log.read_text(errors="replace")
                running.discard(pid)
            time.sleep(0.05)
    finally:
        stop.set()
        sampler.join()
        for proc, _ in batch.procs.values():
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return list(batch.usage.values())


def check_usage(what: str, usages: list[Usage], max_fds: int = MAX_FDS) -> tuple[int, int]:
    """Every command succeeded within the bounds; returns the largest RSS and fd count."""
    for u in usages:
        assert u.returncode == 0, f"{what} {u.argv[5:]} failed: {u.stderr}"
        assert u.fd_samples > 0, f"{what} {u.argv[5:]} ended before it could be sampled"
        assert u.max_rss < MAX_RSS, f"{what} {u.argv[5:]} reached {u.max_rss >> 20} MiB"
        assert u.max_fds < max_fds, f"{what} {u.argv[5:]} held {u.max_fds} descriptors"
    return max(u.max_rss for u in usages), max(u.max_fds for u in usages)


def snapshot_dirs(root: Path, count: int) -> list[Path]:
    """`count` image directories of about 3.5 MiB: a file all of them share, one shared
    by groups of four, and one of their own in which a few pages of a shared memory
    image are changed, as between two checkpoints of one process."""
    shared = memory_like(2 << 20, seed=500)
    families = [memory_like(1 << 20, seed=600 + f) for f in range(count // 4 + 1)]
    dirs = []
    for i in range(count):
        d = root / f"snap{i:02d}"
        (d / "sub").mkdir(parents=True)
        (d / "shared.img").write_bytes(shared)
        (d / "sub" / "family.img").write_bytes(families[i // 4])
        rng = random.Random(i)
        own = bytearray(memory_like(512 << 10, seed=700))
        for _ in range(8):
            at = rng.randrange(0, len(own) - 4096)
            own[at:at + 4096] = rng.randbytes(4096)
        (d / "own.img").write_bytes(bytes(own))
        (d / "note.txt").write_text(f"snapshot {i}\n")
        os.symlink("shared.img", d / "link")
        dirs.append(d)
    return dirs


def same_tree(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*"))
    for rel in names:
        x, y = a / rel, b / rel
        if x.is_symlink():
            assert os.readlink(x) == os.readlink(y), rel
        elif x.is_file():
            assert x.read_bytes() == y.read_bytes(), rel


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_many_small_snapshots_pushed_and_pulled_at_once(endpoint: str, tmp_path: Path) -> None:
    bucket = f"load-{os.getpid()}"
    make_bucket(int(endpoint.rsplit(":", 1)[1]), bucket)
    remote = f"s3://{bucket}/many"
    env = {**os.environ, **s3_env(), "PYTHONPATH": str(REPO)}
    env.pop("AWS_PROFILE", None)
    dirs = snapshot_dirs(tmp_path / "images", SNAPSHOTS)
    src = LocalStore.open(tmp_path / "src")
    for i, d in enumerate(dirs):
        ingest(src, d, f"t{i:02d}", params=PARAMS)

    pushes = run_all([snapstore_argv(src.root, "push", f"t{i:02d}", remote, "--endpoint-url",
                                     endpoint) for i in range(SNAPSHOTS)], env,
                     tmp_path / "push-logs")
    push_peak = check_usage("push", pushes)

    dst = tmp_path / "dst"
    pulls = run_all([snapstore_argv(dst, "pull", f"t{i:02d}", remote, "--endpoint-url",
                                    endpoint) for i in range(SNAPSHOTS)], env,
                    tmp_path / "pull-logs")
    pull_peak = check_usage("pull", pulls, MAX_PULL_FDS)

    verify = subprocess.run(snapstore_argv(dst, "verify", "--json"), env=env,
                            capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (tmp_path / "out").mkdir()
    exports = run_all([snapstore_argv(dst, "export", f"t{i:02d}", str(tmp_path / "out" / str(i)))
                       for i in range(SNAPSHOTS)], env, tmp_path / "export-logs")
    export_peak = check_usage("export", exports)
    for i, d in enumerate(dirs):
        same_tree(d, tmp_path / "out" / str(i))
    # The racing pulls stored each shared chunk once, as the ingests did, and left no
    # temporary file behind.
    src_stats, dst_stats = (
        json.loads(subprocess.run(snapstore_argv(s, "stats", "--json"), env=env, check=True,
                                  capture_output=True, text=True, timeout=DEADLINE).stdout)
        for s in (src.root, dst))
    for key in ("snapshots", "tags", "store_chunks", "stored_bytes"):
        assert dst_stats[key] == src_stats[key], (key, src_stats, dst_stats)
    assert list(LocalStore.open(dst).tmp_files()) == []
    # Shown with `pytest -s`: the figures docs/reliability.md reports.
    print(f"{SNAPSHOTS} snapshots, {src_stats['store_chunks']} chunks; peak RSS and fds: "
          f"push {push_peak[0] >> 20} MiB {push_peak[1]}, pull {pull_peak[0] >> 20} MiB "
          f"{pull_peak[1]}, export {export_peak[0] >> 20} MiB {export_peak[1]}")
