"""The local store under hostile contents and killed writers: what it follows, what gc
removes, what a damaged tag breaks, and what ingest refuses to write."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.mount import MountPaths, is_mounted
from snapstore import codec
from snapstore.chunker_params import ChunkerParams
from snapstore.chunking import split
from snapstore.errors import CorruptError, SnapstoreError
from snapstore.fileio import write_atomic
from snapstore.gc import gc
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.manifest import Entry, Manifest
from snapstore.store.local import LocalStore
from snapstore.verify import verify
from tests.conftest import memory_like, wait_until

# Stands in for runsc in `snapstore checkpoint`: answers the calls made before the
# checkpoint, then writes part of an image and waits to be killed, as a slow checkpoint
# would.
FAKE_RUNSC = """#!/bin/sh
echo "$@" >> "$0.calls"
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


def test_a_linked_tmp_is_refused_and_its_target_untouched(store: LocalStore, image_dir: Path,
                                                         tmp_path: Path) -> None:
    ingest(store, image_dir, "keep")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_bytes(b"not the store's")
    store.tmp_dir.rmdir()
    store.tmp_dir.symlink_to(victim)
    done = snapstore(store.root, "gc")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "tmp is a symbolic link" in done.stderr
    assert (victim / "data").read_bytes() == b"not the store's"


def test_a_tag_that_links_to_a_secret_is_not_read(store: LocalStore, image_dir: Path,
                                                 tmp_path: Path) -> None:
    ingest(store, image_dir, "good")
    secret = tmp_path / "secret"
    secret.write_text("hunter2-" + "s" * 100 + "\n")
    (store.tags_dir / "leak").symlink_to(secret)
    for argv in (["list"], ["list", "--json"], ["show", "leak"], ["verify"], ["gc"]):
        said = snapstore(store.root, *argv)
        said_all = said.stdout + said.stderr
        assert "hunter2" not in said_all, argv
        assert f"tag 'leak' ({store.tags_dir / 'leak'}) is damaged" in said_all, argv
    assert secret.read_text().startswith("hunter2-")


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_mount_log_that_is_a_link_is_not_followed(store: LocalStore, image_dir: Path,
                                                   tmp_path: Path) -> None:
    ingest(store, image_dir, "good")
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = MountPaths.of(store.root, mnt).log
    log.parent.mkdir(exist_ok=True)
    log.symlink_to(victim)
    try:
        done = snapstore(store.root, "mount", "good", str(mnt))
    finally:
        if is_mounted(mnt):
            snapstore(store.root, "umount", str(mnt))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and str(log) in done.stderr
    assert "symbolic link" in done.stderr
    assert victim.read_bytes() == b"untouched\n"


def test_a_damaged_tag_is_named_and_the_others_keep_working(
        store: LocalStore, image_dir: Path, tmp_path: Path) -> None:
    ingest(store, image_dir, "good", {"model": "m1"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(b"untagged")
    untagged = ingest(store, other, "gone").snapshot
    assert store.delete_tag("gone")
    (store.tags_dir / "bad").write_bytes(b"")
    named = f"tag 'bad' ({store.tags_dir / 'bad'}) is damaged: empty"

    for argv in (["list"], ["stats", "--json"], ["find", "--label", "model=m1"],
                 ["show", "good"]):
        done = snapstore(store.root, *argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert "not a valid id" not in done.stderr
    assert named in snapstore(store.root, "list").stderr
    assert json.loads(snapstore(store.root, "stats", "--json").stdout)["tags"] == 1
    assert "good" in snapstore(store.root, "find", "--label", "model=m1").stdout

    shown = snapstore(store.root, "show", "bad")
    assert shown.returncode == 1 and named in shown.stderr

    checked = snapstore(store.root, "verify", "--json")
    doc = json.loads(checked.stdout)
    assert checked.returncode == 1 and doc["snapshots"] == 1
    assert [(p["kind"], p["affects"]) for p in doc["problems"]] == [("tag", ["bad"])]

    # gc cannot know what the damaged tag reached: it deletes nothing.
    refused = snapstore(store.root, "gc")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert named in refused.stderr and "without deleting anything" in refused.stderr
    assert untagged in store.manifest_ids()


@pytest.mark.parametrize("seconds", [-315_619_200, -1, 4_700_000_000, 7_258_118_400,
                                     10_413_792_000], ids=["1960", "1969", "2118", "2200",
                                                           "2300"])
def test_any_mtime_a_file_can_have_is_stored_and_read_back(
        store: LocalStore, tmp_path: Path, seconds: int) -> None:
    """2300 is past what int64 nanoseconds hold; ext4 and tmpfs keep it all the same."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    ns = seconds * 10**9 + 123
    os.utime(src / "f", ns=(ns, ns))
    ns = (src / "f").stat().st_mtime_ns
    done = snapstore(store.root, "ingest", str(src), "--tag", "t")
    assert done.returncode == 0, done.stderr
    for argv in (["show", "t"], ["verify"], ["export", "t", str(tmp_path / "out")]):
        done = snapstore(store.root, *argv)
        assert done.returncode == 0, (argv, done.stderr)
    assert (tmp_path / "out" / "f").stat().st_mtime_ns == ns
    assert gc(store).kept_snapshots == 1


@pytest.mark.parametrize("labels", [[f"k{i}=v" for i in range(257)], ["k=" + "v" * 4097],
                                    ["k" * 4097 + "=v"]],
                         ids=["257-labels", "long-value", "long-key"])
def test_labels_no_reader_accepts_fail_the_ingest_before_any_chunk(
        store: LocalStore, image_dir: Path, labels: list[str]) -> None:
    argv = [a for label in labels for a in ("--label", label)]
    done = snapstore(store.root, "ingest", str(image_dir), "--tag", "t", *argv)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "label" in done.stderr and "at most" in done.stderr
    assert store.tags() == {} and list(store.iter_chunks()) == []
    assert store.manifest_ids() == []


def test_checkpoint_refuses_bad_labels_before_runsc_checkpoints(store: LocalStore,
                                                                tmp_path: Path) -> None:
    """runsc stops the container it checkpoints: labels are checked before that."""
    runsc = tmp_path / "runsc"
    runsc.write_text(FAKE_RUNSC)
    runsc.chmod(0o755)
    done = snapstore(store.root, "checkpoint", "c1", "--tag", "t", "--runsc", str(runsc),
                     "--label", "k=" + "v" * 4097)
    assert done.returncode == 2 and "at most 4096" in done.stderr, done.stderr
    assert "checkpoint" not in Path(f"{runsc}.calls").read_text()


def test_the_store_writes_no_manifest_its_reader_refuses(store: LocalStore) -> None:
    """The last line of defence behind ingest's own checks, for any other writer."""
    hostile = Manifest(created="2026-01-01T00:00:00+00:00", chunker=ChunkerParams(),
                       entries=(Entry("a/../b", "dir", 0o755, 0),))
    with pytest.raises(SnapstoreError, match=r"would not read back.*'\.\.' component"):
        store.put_manifest(hostile)
    assert store.manifest_ids() == []


def traced_peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_small_file_costs_buffers_of_its_size(tmp_path: Path) -> None:
    """Each file once got 52 MiB of fresh, zero-filled buffers: ~25 ms a file whatever
    its size. A file's buffers are now bounded by its size (up to the read window)."""
    small = tmp_path / "small"
    small.write_bytes(random.Random(1).randbytes(2048))
    with small.open("rb", buffering=0) as f:
        peak = traced_peak(lambda: list(split(f, ChunkerParams())))
    assert peak < 64 << 10


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 3 << 20, (20 << 20) + 5])
def test_buffers_sized_to_the_file_cut_the_same_pieces(tmp_path: Path, size: int) -> None:
    """A file (its size known) and a stream of the same bytes (no size): same pieces."""
    path = tmp_path / "f"
    path.write_bytes(memory_like(size, seed=size))
    with path.open("rb", buffering=0) as f:
        sized = list(split(f, ChunkerParams()))
    assert sized == list(split(io.BytesIO(path.read_bytes()), ChunkerParams()))


def test_an_ingest_of_small_files_allocates_what_they_hold(store: LocalStore,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    for i in range(50):
        (src / f"f{i:02d}").write_bytes(rng.randbytes(2048))
    peak = traced_peak(lambda: ingest(store, src, "small", workers=1))
    assert peak < 8 << 20
    assert verify(store, store.tags()).problems == []


def test_mount_records_are_not_written_through_a_planted_link(tmp_path: Path) -> None:
    """The temporary name of a mount's state or stats file is predictable (name, pid):
    a link planted there must not be written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched\n")
    state = tmp_path / "mounts" / "m.json"
    state.parent.mkdir()
    (state.parent / f".m.json.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(state, b"{}\n")
    assert victim.read_bytes() == b"untouched\n"
    assert not state.exists()


def test_asking_for_a_planted_chunk_ahead_neither_hangs_nor_follows(
        store: LocalStore, tmp_path: Path) -> None:
    # A FIFO where a chunk object belongs would block an open for reading forever; a link
    # would lead out of the store. `will_need` only asks the kernel to read ahead: it
    # leaves both alone, and the read that needs the chunk refuses them (below).
    fifo, link = ChunkId.of(b"fifo"), ChunkId.of(b"link")
    for cid in (fifo, link):
        store.chunk_path(cid).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(store.chunk_path(fifo))
    os.mkfifo(tmp_path / "outside")
    store.chunk_path(link).symlink_to(tmp_path / "outside")
    def ask() -> None:
        for cid in (fifo, link):
            store.will_need(cid)

    asked = threading.Thread(target=ask, daemon=True)
    asked.start()
    asked.join(10)
    assert not asked.is_alive(), "will_need waited on a FIFO"
    store.will_need(ChunkId.of(b"absent"))


def test_reading_a_planted_chunk_neither_hangs_nor_follows(store: LocalStore,
                                                           tmp_path: Path) -> None:
    # A link to a valid object outside the store is refused all the same: the store
    # follows no link, whatever it leads to.
    data = b"outside" * 1000
    fifo, link = ChunkId.of(b"fifo"), ChunkId.of(data)
    for cid in (fifo, link):
        store.chunk_path(cid).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(store.chunk_path(fifo))
    (tmp_path / "outside").write_bytes(codec.encode(data))
    store.chunk_path(link).symlink_to(tmp_path / "outside")
    errors: list[str] = []

    def read() -> None:
        for cid, size in ((fifo, 4), (link, len(data))):
            for how in ("get_chunk", "get_chunk_object", "read_chunk_into"):
                try:
                    if how == "get_chunk":
                        store.get_chunk(cid, size)
                    elif how == "get_chunk_object":
                        store.get_chunk_object(cid)
                    else:
                        store.read_chunk_into(cid, memoryview(bytearray(size)))
                except CorruptError as e:
                    errors.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "a read waited on a FIFO"
    assert len(errors) == 5
    assert sum("symbolic link" in e for e in errors) == 3
