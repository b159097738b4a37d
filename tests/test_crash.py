"""Crash tests: SIGKILL at random points of ingest and gc, then verify and run again.

Kill points are drawn from a seeded generator so a failure can be replayed; the count is
kept small so the suite stays fast (docs/reliability.md has the longer runs).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapstore.gc import gc
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.verify import verify
from tests.conftest import memory_like

KILL_POINTS = int(os.environ.get("SNAPSTORE_CRASH_POINTS", "6"))


def start(store: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "snapstore", "--store", str(store), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """SIGKILL `proc` after `delay` seconds; False if it had already finished."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def timed_ingest(store: Path, src: Path) -> float:
    t = time.monotonic()
    start(store, "ingest", str(src), "--tag", "probe").wait()
    return time.monotonic() - t


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "mem.img").write_bytes(memory_like(40 << 20, seed=21))
    (src / "sub" / "rand.img").write_bytes(os.urandom(24 << 20))
    os.symlink("mem.img", src / "link")
    return src


def test_sigkill_during_ingest_at_random_points(tmp_path: Path, source: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore.open(root)
    ingest(store, source, "before")
    duration = timed_ingest(root, source)
    rng = random.Random(1234)
    killed = 0
    for i in range(KILL_POINTS):
        # A different image each round, so each run writes new chunks when killed.
        (source / "sub" / "rand.img").write_bytes(os.urandom(24 << 20))
        proc = start(root, "ingest", str(source), "--tag", f"run{i}")
        killed += kill_after(proc, rng.uniform(0.0, duration * 1.2))
        report = verify(store, store.tags())
        assert report.problems == [], f"round {i}: {report.problems}"
        assert all(t in ("before", "probe") or t.startswith("run") for t in store.tags())
    assert killed >= 1
    gc(store)
    assert list(store.tmp_files()) == []
    ingest(store, source, "after")
    assert verify(store, store.tags()).problems == []


def test_sigkill_during_gc_loses_nothing_tagged(tmp_path: Path, source: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore.open(root)
    ingest(store, source, "keep")
    rng = random.Random(99)
    for i in range(KILL_POINTS):
        garbage = tmp_path / f"garbage{i}"
        garbage.mkdir()
        (garbage / "g").write_bytes(os.urandom(16 << 20))
        ingest(store, garbage, "drop")
        store.delete_tag("drop")
        kill_after(start(root, "gc"), rng.uniform(0.0, 0.6))
        assert verify(store, store.tags()).problems == []
    gc(store)
    assert {c.cid for c in store.iter_chunks()} == store.get_manifest(
        store.resolve("keep")).chunk_ids()
