"""Real mounts through `snapstore mount`: bytes, concurrency, failures, lifecycle, runsc."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusefs.mount import MountPaths, access_path, is_mounted, read_state
from snapstore.chunking import ChunkerParams
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.manifest import Manifest
from snapstore.store.local import LocalStore

REPO = Path(__file__).resolve().parent.parent
PARAMS = ChunkerParams(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other, umount -l)"),
]


def snapstore(
    store: LocalStore, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "snapstore", "--store", str(store.root), *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snapstore {' '.join(args)} failed: {proc.stderr}")
    return proc


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Mount:
    def __init__(self, store: LocalStore, mountpoint: Path, snapshot: ChunkId) -> None:
        self.store = store
        self.path = mountpoint
        self.snapshot = snapshot
        self.paths = MountPaths.of(store.root, mountpoint)

    @property
    def manifest(self) -> Manifest:
        return self.store.get_manifest(self.snapshot)

    @property
    def pid(self) -> int:
        state = read_state(self.paths)
        assert state is not None
        return int(state["pid"])


@pytest.fixture
def mount(store: LocalStore, image_dir: Path) -> Iterator[Callable[..., Mount]]:
    """Mounts `image_dir` (ingested as tag t); every mount is gone when the test ends.

    Mountpoints live in a directory other users can enter (pytest's tmp_path is 0700),
    so that tests can show who may read a mount.
    """
    snapshot = ingest(store, image_dir, "t", params=PARAMS).snapshot
    made: list[Mount] = []
    base = Path(tempfile.mkdtemp(prefix="snapstore-mnt-"))
    base.chmod(0o755)

    def make(*options: str) -> Mount:
        mountpoint = base / f"mnt{len(made)}"
        mountpoint.mkdir()
        m = Mount(store, mountpoint, snapshot)
        made.append(m)
        snapstore(store, "mount", "t", str(mountpoint), *options)
        return m

    try:
        yield make
    finally:
        for m in made:
            if is_mounted(m.path) or read_state(m.paths):
                snapstore(store, "umount", str(m.path), check=False)
            if is_mounted(m.path):
                subprocess.run(["umount", "-l", str(m.path)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def source_files(src: Path) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in src.rglob("*")
                  if p.is_file() and not p.is_symlink())


def test_tree_reads_back_identical(mount: Callable[..., Mount], image_dir: Path) -> None:
    m = mount()
    for src in sorted(image_dir.rglob("*")):
        rel = src.relative_to(image_dir)
        dst = m.path / rel
        s, d = src.lstat(), dst.lstat()
        assert (d.st_mode, d.st_mtime_ns) == (s.st_mode, s.st_mtime_ns), rel
        if stat.S_ISLNK(s.st_mode):
            assert os.readlink(dst) == os.readlink(src)
        elif stat.S_ISREG(s.st_mode):
            assert d.st_size == s.st_size
            assert dst.read_bytes() == src.read_bytes(), rel
        else:
            assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    assert sorted(os.listdir(m.path)) == sorted(os.listdir(image_dir))


def test_random_offsets_and_sizes(mount: Callable[..., Mount], image_dir: Path) -> None:
    m = mount()
    rng = random.Random(7)
    for rel in source_files(image_dir):
        want = (image_dir / rel).read_bytes()
        fd = os.open(m.path / rel, os.O_RDONLY)
        try:
            for _ in range(100):
                off = rng.randrange(len(want) + 10)
                size = rng.choice([1, 100, 4096, 70_000, 1 << 20, 5 << 20])
                assert os.pread(fd, size, off) == want[off:off + size], (rel, off, size)
        finally:
            os.close(fd)


def test_32_concurrent_reader_threads(mount: Callable[..., Mount], image_dir: Path) -> None:
    m = mount()
    files = {rel: (image_dir / rel).read_bytes() for rel in source_files(image_dir)}

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        rel = rng.choice(sorted(files))
        want = files[rel]
        fd = os.open(m.path / rel, os.O_RDONLY)
        try:
            for _ in range(50):
                off, size = rng.randrange(len(want) + 1), rng.randrange(1, 600_000)
                assert os.pread(fd, size, off) == want[off:off + size]
            return 1
        finally:
            os.close(fd)

    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(reader, range(32))) == 32


def test_writes_are_refused(mount: Callable[..., Mount]) -> None:
    m = mount()
    for attempt in (
        lambda: (m.path / "checkpoint.img").open("r+b"),
        lambda: (m.path / "new").write_bytes(b"x"),
        lambda: (m.path / "dir").mkdir(),
        lambda: (m.path / "empty").unlink(),
        lambda: os.chmod(m.path / "empty", 0o777),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_a_corrupt_chunk_gives_eio_and_the_mount_stays_up(
    mount: Callable[..., Mount], store: LocalStore, image_dir: Path
) -> None:
    m = mount()
    entry = next(e for e in m.manifest.entries if e.path == "checkpoint.img")
    others = {x.chunk for e in m.manifest.files() if e.path != entry.path for x in e.extents}
    offset, bad = 0, None
    for x in entry.extents:
        if x.chunk is not None and x.chunk not in others and offset > entry.size // 2:
            bad = x.chunk
            break
        offset += x.size
    assert bad is not None
    path = store.chunk_path(bad)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    fd = os.open(m.path / "checkpoint.img", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, offset)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == (image_dir / "checkpoint.img").read_bytes()[:4096]
    finally:
        os.close(fd)
    assert (m.path / "sub/pages.img").read_bytes() == (image_dir / "sub/pages.img").read_bytes()
    assert bad.hex in m.paths.log.read_text()
    wait_until(lambda: '"read_errors": 0' not in m.paths.stats.read_text(), "stats")


def test_umount_after_the_daemon_was_killed(mount: Callable[..., Mount], store: LocalStore) -> None:
    m = mount()
    os.kill(m.pid, signal.SIGKILL)

    def disconnected() -> bool:
        try:
            (m.path / "empty").open("rb").close()
        except OSError as e:
            return e.errno == errno.ENOTCONN
        return False

    wait_until(disconnected, "'Transport endpoint is not connected'")
    out = snapstore(store, "umount", str(m.path))
    assert "forced" in out.stderr
    assert not is_mounted(m.path)
    assert os.listdir(m.path) == []
    assert read_state(m.paths) is None


def test_sigterm_unmounts_and_records_the_access_order(
    mount: Callable[..., Mount], store: LocalStore
) -> None:
    m = mount()
    (m.path / "checkpoint.img").read_bytes()
    os.kill(m.pid, signal.SIGTERM)
    wait_until(lambda: not is_mounted(m.path), "the unmount")
    order = access_path(store.root, m.snapshot).read_text().split()
    assert order
    assert len(set(order)) == len(order)
    assert {ChunkId.parse(h) for h in order} <= m.manifest.chunk_ids()


def test_mount_stats_and_metrics(mount: Callable[..., Mount], store: LocalStore) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = mount("--metrics", f"127.0.0.1:{port}", "--cache-mem", "64M")
    (m.path / "checkpoint.img").read_bytes()
    wait_until(lambda: '"reads": 0,' not in m.paths.stats.read_text(), "stats to be written")
    out = snapstore(store, "mount-stats", str(m.path), "--json")
    assert '"chunk_loads"' in out.stdout and '"load_latency_p99_ms"' in out.stdout
    text = snapstore(store, "mount-stats", str(m.path)).stdout
    assert "hits" in text and "p99" in text
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    assert "snapstore_mount_reads_total" in body
    assert "snapstore_mount_cache_hits_total" in body


def test_other_users_need_allow_other(mount: Callable[..., Mount]) -> None:
    private, shared = mount(), mount("--allow-other")

    def as_nobody(path: Path) -> int:
        return subprocess.run(["cat", str(path)], user=65534, capture_output=True,
                              check=False).returncode

    assert as_nobody(private.path / "checkpoint.img") != 0
    assert as_nobody(shared.path / "checkpoint.img") == 0
    # default_permissions: the manifest's 0600 still keeps other users out.
    assert as_nobody(shared.path / "sub/pages.img") != 0


def test_mount_refuses_a_busy_mountpoint_and_unknown_refs(
    mount: Callable[..., Mount], store: LocalStore, tmp_path: Path
) -> None:
    m = mount()
    again = snapstore(store, "mount", "t", str(m.path), check=False)
    assert again.returncode == 1 and "already mounted" in again.stderr
    (tmp_path / "other").mkdir()
    missing = snapstore(store, "mount", "nope", str(tmp_path / "other"), check=False)
    assert missing.returncode == 1 and not is_mounted(tmp_path / "other")


@pytest.mark.runsc
@pytest.mark.skipif(shutil.which("runsc") is None, reason="needs runsc")
def test_runsc_restores_from_the_mount(store: LocalStore, tmp_path: Path) -> None:
    from snapstore.examples import checkpoint_busybox, read_counter
    from snapstore.runsc import Runsc, new_container_id

    with Runsc.private(parent=tmp_path) as rs:
        ckpt = checkpoint_busybox(tmp_path / "work", runsc=rs)
        ingest(store, ckpt.image_dir, "busybox")
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        try:
            snapstore(store, "mount", "busybox", str(mountpoint), "--allow-other")
            cid = new_container_id()
            try:
                rs.restore(cid, ckpt.bundle, mountpoint)
                wait_until(lambda: read_counter(ckpt.bundle) != ckpt.counter, "the counter")
                resumed = read_counter(ckpt.bundle)
                # Resumed, not restarted: a fresh container would count from 1 again.
                assert resumed > ckpt.counter
                wait_until(lambda: read_counter(ckpt.bundle) > resumed, "the counter to rise")
            finally:
                rs.destroy(cid)
        finally:
            snapstore(store, "umount", str(mountpoint), check=False)
            if is_mounted(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)


LOAD_SECONDS = float(os.environ.get("SNAPSTORE_LOAD_SECONDS", "60"))


def daemon_usage(pid: int) -> tuple[int, int]:
    """Resident bytes and open file descriptors of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_64_readers_sustained_with_bounded_memory_and_fds(
    mount: Callable[..., Mount], image_dir: Path
) -> None:
    """64 threads read random ranges for LOAD_SECONDS through a small chunk cache; the
    kernel's page cache is dropped before each read, so every read reaches the daemon."""
    m = mount("--cache-mem", "8M")
    files = {rel: (image_dir / rel).read_bytes() for rel in source_files(image_dir)}
    deadline = time.monotonic() + LOAD_SECONDS
    peaks = [daemon_usage(m.pid)]

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        reads = 0
        while time.monotonic() < deadline:
            rel = rng.choice(sorted(files))
            want = files[rel]
            fd = os.open(m.path / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                off, size = rng.randrange(len(want) + 1), rng.randrange(1, 1 << 20)
                assert os.pread(fd, size, off) == want[off:off + size]
                reads += 1
            finally:
                os.close(fd)
        return reads

    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(reader, i) for i in range(64)]
        while not all(f.done() for f in futures):
            peaks.append(daemon_usage(m.pid))
            time.sleep(0.5)
        total = sum(f.result() for f in futures)
    assert total >= 64
    rss, fds = max(p[0] for p in peaks), max(p[1] for p in peaks)
    # 8 MiB of cache and a few chunks in flight per load thread, over the interpreter's own.
    assert rss < peaks[0][0] + (200 << 20), f"daemon grew to {rss >> 20} MiB"
    assert fds < peaks[0][1] + 32, f"daemon held {fds} descriptors"
    assert is_mounted(m.path)
