"""The local store under hostile contents and killed writers: what it follows, what gc
removes, what a damaged tag breaks, and what ingest refuses to write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from snapstore.gc import gc
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.verify import verify
from tests.conftest import wait_until

# Stands in for runsc in `snapstore checkpoint`: answers the calls made before the
# checkpoint, then writes part of an image and waits to be killed, as a slow checkpoint
# would.
FAKE_RUNSC = """#!/bin/sh
for a in "$@"; do
  case "$a" in
    --version) echo "runsc version fake"; exit 0;;
    --image-path=*) image="${a#--image-path=}";;
    state) echo '{"id": "c1", "status": "running", "pid": 1, "bundle": "/"}'; exit 0;;
  esac
done
echo partial > "$image/checkpoint.img"
exec sleep 60
"""


def snapstore(store: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store), *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def test_gc_after_a_killed_checkpoint(store: LocalStore, image_dir: Path,
                                      tmp_path: Path) -> None:
    ingest(store, image_dir, "keep")
    runsc = tmp_path / "runsc"
    runsc.write_text(FAKE_RUNSC)
    runsc.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapstore", "--store", str(store.root), "checkpoint", "c1",
         "--tag", "lost", "--runsc", str(runsc)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: any(store.root.rglob("checkpoint.img")), "the partial image")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for _ in range(2):
        done = snapstore(store.root, "gc")
        assert done.returncode == 0, done.stderr
    assert not any(store.root.rglob("checkpoint.img"))
    assert list(store.tags()) == ["keep"]
    assert verify(store, store.tags()).problems == []


def test_gc_survives_a_directory_in_tmp(store: LocalStore, image_dir: Path) -> None:
    """What an earlier snapstore left in tmp/: a working directory of a killed checkpoint."""
    ingest(store, image_dir, "keep")
    left = store.tmp_dir / "checkpoint-k2j4x9_a"
    left.mkdir()
    (left / "checkpoint.img").write_bytes(b"partial")
    (store.tmp_dir / "stray.tmp").write_bytes(b"x")
    for _ in range(2):
        done = snapstore(store.root, "gc")
        assert done.returncode == 0, done.stderr
        # Nothing says whether an older snapstore still works in it: named, not removed.
        assert f"left {left}: a directory" in done.stderr
    assert not (store.tmp_dir / "stray.tmp").exists()
    assert (left / "checkpoint.img").read_bytes() == b"partial"
    assert verify(store, store.tags()).problems == []


def test_gc_keeps_working_directories_in_use_and_what_it_did_not_make(
        store: LocalStore, image_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    store.work_root.mkdir(exist_ok=True)
    # Named like a working directory of a long-dead process, but a link out of the store.
    (store.work_root / f"checkpoint-999999999-{'0' * 16}").symlink_to(outside)
    (store.work_root / "notes").mkdir()
    with store.work_dir("checkpoint") as work:
        (work / "checkpoint.img").write_bytes(b"in progress")
        report = gc(store)
        assert (work / "checkpoint.img").read_bytes() == b"in progress"
    assert report.deleted_work_dirs == 0 and len(report.left_alone) == 2
    assert not work.exists()
    assert (outside / "precious").read_bytes() == b"keep me"
    assert (store.work_root / "notes").is_dir()
