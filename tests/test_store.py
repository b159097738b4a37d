"""The local store end to end: ingest, export, verify, gc, tags, and its faults."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapstore import codec
from snapstore.catalog import store_stats
from snapstore.errors import CorruptError, NotFoundError, SnapstoreError, UsageError
from snapstore.export import export
from snapstore.gc import gc
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.verify import verify
from tests.conftest import memory_like, tmpfs


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Everything export promises to keep: kind, permission bits, content or target."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, p.read_bytes())
    return out


def test_ingest_export_is_byte_identical(store: LocalStore, image_dir: Path,
                                         tmp_path: Path) -> None:
    r = ingest(store, image_dir, "snap", {"model": "m1"})
    assert r.files == 5
    m = store.get_manifest(store.resolve("snap"))
    assert m.labels == {"model": "m1"}
    dest = tmp_path / "out"
    export(store, m, dest)
    assert tree(dest) == tree(image_dir)
    assert (dest / "sparse.img").stat().st_blocks == 0
    src_mtime = (image_dir / "checkpoint.img").stat().st_mtime_ns
    assert (dest / "checkpoint.img").stat().st_mtime_ns == src_mtime


def test_second_ingest_stores_nothing_new(store: LocalStore, image_dir: Path) -> None:
    first = ingest(store, image_dir, "a")
    second = ingest(store, image_dir, "b")
    assert first.new_chunks > 0
    assert second.new_chunks == 0 and second.new_stored_bytes == 0
    assert store.get_manifest(second.snapshot).entries == \
        store.get_manifest(first.snapshot).entries


def test_refs_resolve_by_tag_and_prefix(store: LocalStore, image_dir: Path) -> None:
    mid = ingest(store, image_dir, "a").snapshot
    assert store.resolve("a") == mid
    assert store.resolve(mid.hex[:6]) == mid
    with pytest.raises(NotFoundError):
        store.resolve("nope")
    with pytest.raises(UsageError):
        store.set_tag("../escape", mid)


def test_empty_directory_and_empty_files(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = ingest(store, tmp_path / "empty", "e")
    assert r.files == 0 and r.logical_bytes == 0
    export(store, store.get_manifest(r.snapshot), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_refuses_missing_source_and_special_files(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(SnapstoreError, match="cannot read"):
        ingest(store, tmp_path / "missing", "x")
    d = tmp_path / "with-fifo"
    d.mkdir()
    os.mkfifo(d / "pipe")
    with pytest.raises(SnapstoreError, match="fifo"):
        ingest(store, d, "x")
    s = tmp_path / "with-socket"
    s.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(s / "sock"))
    with pytest.raises(SnapstoreError, match="socket"):
        ingest(store, s, "x")
    sock.close()
    assert store.tags() == {}


def test_source_that_is_not_a_directory(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SnapstoreError, match="not a directory"):
        ingest(store, tmp_path / "file", "x")


def corrupt_one_chunk(store: LocalStore) -> Path:
    path = next(store.chunk_path(c.cid) for c in store.iter_chunks()
                if c.stored_size > 1000)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_verify_names_bad_and_missing_chunks(store: LocalStore, image_dir: Path,
                                             tmp_path: Path) -> None:
    ingest(store, image_dir, "snap")
    assert verify(store, store.tags()).problems == []
    corrupt_one_chunk(store)
    victim = next(c for c in store.iter_chunks()
                  if store.chunk_path(c.cid).read_bytes()[0:1] != b"")
    report = verify(store, store.tags())
    assert len(report.problems) == 1
    assert report.problems[0].affects and report.problems[0].affects[0].startswith("snap:")
    store.delete_chunk(victim.cid)
    reasons = " ".join(p.reason for p in verify(store, store.tags()).problems)
    assert "missing" in reasons or "hash" in reasons


def test_export_never_writes_unchecked_bytes(store: LocalStore, image_dir: Path,
                                             tmp_path: Path) -> None:
    ingest(store, image_dir, "snap")
    corrupt_one_chunk(store)
    with pytest.raises(SnapstoreError):
        export(store, store.get_manifest(store.resolve("snap")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_corrupt_manifest_is_detected(store: LocalStore, image_dir: Path) -> None:
    mid = ingest(store, image_dir, "snap").snapshot
    path = store.snapshots_dir / mid.hex
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SnapstoreError):
        store.get_manifest(mid)
    assert verify(store, store.tags()).problems[0].what == "snapshot"
    with pytest.raises(SnapstoreError, match="gc stopped"):
        gc(store)


def test_gc_keeps_tagged_and_frees_untagged(store: LocalStore, image_dir: Path,
                                            tmp_path: Path) -> None:
    ingest(store, image_dir, "keep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "big").write_bytes(memory_like(3 << 20, seed=99))
    ingest(store, other, "drop")
    before = store_stats(store)
    assert store.delete_tag("drop")
    dry = gc(store, dry_run=True)
    assert dry.deleted_chunks > 0 and store_stats(store)["store_chunks"] == before["store_chunks"]
    real = gc(store)
    assert real.deleted_chunks == dry.deleted_chunks and real.deleted_snapshots == 1
    assert verify(store, store.tags()).problems == []
    export(store, store.get_manifest(store.resolve("keep")), tmp_path / "out")
    assert tree(tmp_path / "out") == tree(image_dir)


def test_concurrent_ingests_of_the_same_content(store: LocalStore, image_dir: Path) -> None:
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            ingest(store, image_dir, tag)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # The same entries, not always the same id: the ids differ when the ingests end on
    # either side of a second, since a manifest records when it was made.
    manifests = [store.get_manifest(mid) for mid in store.tags().values()]
    assert len(manifests) == 4 and len({m.entries for m in manifests}) == 1
    assert verify(store, store.tags()).problems == []


def test_gc_waits_for_a_running_ingest(store: LocalStore, image_dir: Path) -> None:
    """gc takes the exclusive lock: chunks of an unfinished ingest are never swept."""
    order: list[str] = []

    def collect() -> None:
        gc(store)
        order.append("gc")

    with store.writer_lock():
        t = threading.Thread(target=collect)
        t.start()
        t.join(timeout=0.5)
        order.append("writer done")
    t.join()
    assert order == ["writer done", "gc"]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "tiny", "6m") as mnt:
        yield mnt


def test_disk_full_is_clean(tiny_fs: Path, tmp_path: Path) -> None:
    store = LocalStore.open(tiny_fs / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(12 << 20))
    with pytest.raises(SnapstoreError, match="no space left"):
        ingest(store, src, "full")
    assert store.tags() == {}
    assert list(store.tmp_files()) == []
    gc(store)
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_bytes(os.urandom(1 << 20))
    ingest(store, small, "fits")
    assert verify(store, store.tags()).problems == []


def random_source(tmp_path: Path, mib: int) -> Path:
    """A directory holding one file of `mib` MiB of random bytes (incompressible chunks)."""
    src = tmp_path / "src"
    src.mkdir()
    with (src / "big").open("wb") as f:
        for _ in range(mib // 4):
            f.write(os.urandom(4 << 20))
    return src


def test_sigkill_during_ingest_then_gc_and_verify(tmp_path: Path) -> None:
    # Chunks become visible a batch (64 MiB) at a time, so the kill lands with most of the
    # 512 MiB still to go even when the poll below runs late on a loaded machine.
    src = random_source(tmp_path, 512)
    root = tmp_path / "store"
    store = LocalStore.open(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapstore", "--store", str(root), "ingest", str(src),
         "--tag", "big"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(1 for _ in store.iter_chunks()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.tags() == {}
    report = gc(store)
    assert report.deleted_chunks >= 5
    assert sum(1 for _ in store.iter_chunks()) == 0
    ingest(store, src, "big")
    assert verify(store, store.tags()).problems == []


def test_ingest_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    """A batch keeps its chunks open until they are linked; under `ulimit -n 64` batches
    must shrink, or an ingest of ~96 chunks runs out of descriptors."""
    src = random_source(tmp_path, 96)
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "snapstore", "--store", str(root), "ingest", str(src),
           "--tag", "big"]
    done = subprocess.run(["sh", "-c", 'ulimit -n 64 && exec "$@"', "sh", *cmd],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    store = LocalStore.open(root)
    assert sum(1 for _ in store.iter_chunks()) >= 64
    assert verify(store, store.tags()).problems == []


def stored_chunk(store: LocalStore, compressible: bool) -> tuple[bytes, ChunkId, bytes]:
    """A chunk put in the store, zstd-compressed or raw: its bytes, id and object."""
    data = bytes(200_000) + b"x" if compressible else random.Random(5).randbytes(200_000)
    cid = ChunkId.of(data)
    obj = codec.encode(data)
    assert obj[0] == (codec.ZSTD if compressible else codec.RAW)
    store.put_chunk(cid, obj)
    return data, cid, obj


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
def test_get_chunk_refuses_a_stored_object_cut_short_or_grown(store: LocalStore,
                                                              compressible: bool) -> None:
    data, cid, obj = stored_chunk(store, compressible)
    assert store.get_chunk(cid, len(data)) == data
    path = store.chunk_path(cid)
    path.write_bytes(obj[: len(obj) // 2])
    with pytest.raises(CorruptError):
        store.get_chunk(cid, len(data))
    path.write_bytes(b"")
    with pytest.raises(CorruptError, match="empty"):
        store.get_chunk(cid, len(data))
    if not compressible:  # a zstd frame ends itself: bytes after it are not read as data
        path.write_bytes(obj + b"\0")
        with pytest.raises(CorruptError):
            store.get_chunk(cid, len(data))
    path.unlink()
    with pytest.raises(NotFoundError):
        store.get_chunk(cid, len(data))


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
def test_read_chunk_into_fills_the_buffer_or_refuses(store: LocalStore,
                                                      compressible: bool) -> None:
    data, cid, obj = stored_chunk(store, compressible)
    out = memoryview(bytearray(len(data)))
    store.read_chunk_into(cid, out)
    assert out == data
    path = store.chunk_path(cid)
    damaged = bytearray(obj)
    damaged[len(obj) // 2] ^= 0x10
    for bad in (obj[: len(obj) // 2], bytes(damaged), obj + b"\0", b""):
        if compressible and bad == obj + b"\0":
            continue  # a zstd frame ends itself: bytes after it are not read as data
        path.write_bytes(bad)
        with pytest.raises(CorruptError):
            store.read_chunk_into(cid, memoryview(bytearray(len(data))))
    path.write_bytes(b"\x07" + data)
    with pytest.raises(CorruptError, match="unknown codec tag 7"):
        store.read_chunk_into(cid, memoryview(bytearray(len(data))))
    path.write_bytes(obj)
    with pytest.raises(CorruptError, match=r"declares|expected|not stored as"):
        store.read_chunk_into(cid, memoryview(bytearray(len(data) - 1)))
    with pytest.raises(CorruptError, match=r"expected|not stored as"):
        store.read_chunk_into(cid, memoryview(bytearray(len(data) + 1)))
    path.unlink()
    with pytest.raises(NotFoundError):
        store.read_chunk_into(cid, out)
