"""Real mounts through `snapstore mount`: bytes, concurrency, failures, lifecycle, runsc."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import random
import select
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

from fusefs.mount import MountPaths, access_path, is_mounted, read_state, unmount
from snapstore.chunker_params import ChunkerParams
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.manifest import Manifest
from snapstore.proctree import below
from snapstore.store.local import LocalStore
from tests.conftest import alive, memory_like, process_state, tmpfs, wait_until

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


def test_every_change_is_refused_with_erofs(
    mount: Callable[..., Mount], image_dir: Path
) -> None:
    """The mount is `ro`: the kernel refuses every change itself, before any request
    reaches the daemon, whatever the operation."""
    m = mount()
    f, d = m.path / "checkpoint.img", m.path / "sub"
    attempts: list[Callable[[], object]] = [
        lambda: os.open(f, os.O_WRONLY),
        lambda: os.open(f, os.O_RDWR),
        lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        lambda: os.open(m.path / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.truncate(f, 0),
        lambda: os.mkdir(m.path / "dir"),
        lambda: os.rmdir(d / "deeper"),
        lambda: os.unlink(m.path / "empty"),
        lambda: os.rename(m.path / "empty", m.path / "moved"),
        lambda: os.link(f, m.path / "hard"),
        lambda: os.symlink("checkpoint.img", m.path / "soft"),
        lambda: os.mknod(m.path / "node", 0o600 | stat.S_IFIFO),
        lambda: os.chmod(f, 0o777),
        lambda: os.chown(f, 65534, 65534),
        lambda: os.utime(f, (0, 0)),
        lambda: os.setxattr(f, "user.x", b"1"),
        lambda: os.removexattr(f, "user.x"),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, (i, e.value)
    assert sorted(os.listdir(m.path)) == sorted(os.listdir(image_dir))
    assert "Traceback" not in m.paths.log.read_text()


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
    pid = m.pid
    os.kill(pid, signal.SIGTERM)
    # The daemon records the order after it unmounted, before it exits.
    wait_until(lambda: not alive(pid), "the daemon to exit")
    assert not is_mounted(m.path)
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
    from examples.workloads import checkpoint_busybox, read_counter
    from snapstore.gvisor.runsc import Runsc, new_container_id

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


def daemon_usage(pid: int) -> tuple[int, int, int]:
    """Resident bytes, open file descriptors other than cached chunks' memfds, and
    those memfds (each cached chunk's mapping holds one) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fds = chunks = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:snapstore-chunk"):
                chunks += 1
            else:
                fds += 1
    return rss, fds, chunks


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
    rss, fds, chunks = (max(p[i] for p in peaks) for i in range(3))
    # 8 MiB of cache and a few chunks in flight, over the interpreter's own; each chunk
    # mapped holds a memfd, and there are at most 8 MiB of them.
    assert rss < peaks[0][0] + (200 << 20), f"daemon grew to {rss >> 20} MiB"
    assert fds < peaks[0][1] + 32, f"daemon held {fds} descriptors"
    assert chunks <= (8 << 20) // PARAMS.min_size + 8, f"daemon held {chunks} chunk memfds"
    assert is_mounted(m.path)


def test_read_ahead_loads_no_more_than_a_small_cache_holds(
    store: LocalStore, tmp_path: Path
) -> None:
    """With the default chunk sizes (1 MiB average, up to 4) and a 1 MiB cache, a
    sequential read in 1 MiB requests loads each chunk about once: read-ahead that the
    cache cannot hold would be evicted before it is read, and loaded again. The kernel's
    own read-ahead is off, so the requests are the reads, one at a time."""
    src = tmp_path / "image"
    src.mkdir()
    size = 48 << 20
    (src / "checkpoint.img").write_bytes(random.Random(5).randbytes(size))
    snapshot = ingest(store, src, "big").snapshot
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    snapstore(store, "mount", "big", str(mountpoint), "--cache-mem", "1M")
    try:
        m = Mount(store, mountpoint, snapshot)
        with open(m.path / "checkpoint.img", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            while f.read(1 << 20):
                pass
        wait_until(lambda: json.loads(m.paths.stats.read_text())["bytes_served"] >= size,
                   "the stats to count the whole read")
        stats = json.loads(m.paths.stats.read_text())
        assert stats["bytes_loaded"] <= 1.25 * size, stats
    finally:
        snapstore(store, "umount", str(mountpoint), check=False)
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)



# -- SIGKILL in the middle of reads ----------------------------------------------------

KILL_ROUNDS = int(os.environ.get("SNAPSTORE_CRASH_POINTS", "3"))
# Errors a read may end with once the daemon is gone: the connection is aborted under a
# request in flight (ECONNABORTED, or EIO for a page the kernel's read-ahead was loading),
# or refused before it is sent (ENOTCONN).
DEAD_MOUNT_ERRORS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}
READER_DEADLINE = 30.0

# A reader in its own process, so that a reader stuck in the kernel shows as a timeout
# here instead of hanging the test runner. It reads its file over and over, dropping the
# kernel's cached pages before each pass so every pass reaches the daemon, and compares
# each block with the source. Exit 0: the stop file appeared; 3: a read failed (its errno
# printed); 4: a wrong byte. A "pread" reader goes through the kernel's page cache and
# read-ahead; a "direct" one opens with O_DIRECT, so each of its reads is a request of its
# own to the daemon; an "mmap" one faults the pages in, and dies of SIGBUS when the mount
# goes away under it.
READER_SCRIPT = """
import mmap, os, random, sys
mode, path, source, stop = sys.argv[1:5]
rng = random.Random(int(sys.argv[5]))
src = os.open(source, os.O_RDONLY)
size = os.fstat(src).st_size
direct = mmap.mmap(-1, 3 << 20)
announced = False


def read(fd, view, off, n):
    if view is not None:
        return view[off:off + n]
    if mode == "direct":
        return direct[:os.preadv(fd, [memoryview(direct)[:n]], off)]
    return os.pread(fd, n, off)


try:
    while not os.path.exists(stop):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        view = mmap.mmap(fd, size, prot=mmap.PROT_READ) if mode == "mmap" else None
        off = rng.randrange(0, size, 4096)
        for _ in range(size // (1 << 20) + 1):
            n = rng.choice([4096, 65536, 1 << 20, 3 << 20])
            got = read(fd, view, off, n)
            want = os.pread(src, n, off)
            # A read cut short by an error returns what it had: a prefix, never other bytes.
            if not got and want or got != want[:len(got)]:
                print("wrong bytes at", off, len(got), len(want), flush=True)
                sys.exit(4)
            if not announced:
                print("reading", flush=True)
                announced = True
            off = (off + max(len(got), 1)) % size
        if view is not None:
            view.close()
        os.close(fd)
except OSError as e:
    print("errno", e.errno, flush=True)
    sys.exit(3)
print("done", flush=True)
"""


@pytest.fixture
def big_image(tmp_path: Path) -> Path:
    """Files large enough that readers are still reading whenever the daemon is killed."""
    d = tmp_path / "big"
    d.mkdir()
    rng = random.Random(31)
    (d / "checkpoint.img").write_bytes(memory_like(24 << 20, seed=31))
    (d / "pages.img").write_bytes(rng.randbytes(16 << 20))
    return d


@pytest.fixture
def big_mount(store: LocalStore, big_image: Path) -> Iterator[Callable[..., Mount]]:
    """Mounts `big_image` (tag big) at one mountpoint, as often as asked; unmounted at the end."""
    snapshot = ingest(store, big_image, "big", params=PARAMS).snapshot
    base = Path(tempfile.mkdtemp(prefix="snapstore-mnt-"))
    mountpoint = base / "mnt"
    mountpoint.mkdir()

    def make(*options: str) -> Mount:
        snapstore(store, "mount", "big", str(mountpoint), *options)
        return Mount(store, mountpoint, snapshot)

    try:
        yield make
    finally:
        if is_mounted(mountpoint) or read_state(MountPaths.of(store.root, mountpoint)):
            snapstore(store, "umount", str(mountpoint), check=False)
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start_reader(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts reader processes, which stop once `tmp_path/stop` exists; any still running
    when the test ends is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(mode: str, path: Path, source: Path, seed: int) -> subprocess.Popen[str]:
        reader = subprocess.Popen(
            [sys.executable, "-c", READER_SCRIPT, mode, str(path), str(source),
             str(tmp_path / "stop"), str(seed)],
            stdout=subprocess.PIPE, text=True)
        started.append(reader)
        return reader

    yield start
    for reader in started:
        if reader.poll() is None:
            reader.kill()
        reader.communicate(timeout=READER_DEADLINE)


def wait_reading(reader: subprocess.Popen[str]) -> None:
    """Block until `reader` has read its first block from the mount, within a deadline."""
    assert reader.stdout is not None
    ready, _, _ = select.select([reader.stdout], [], [], READER_DEADLINE)
    assert ready, "reader did not start reading"
    line = reader.stdout.readline()
    assert line == "reading\n", line


def finish(reader: subprocess.Popen[str], daemon: int) -> tuple[int, str]:
    """The reader's exit status and last words. A reader that does not end in time fails
    the test, a hang being the failure this section looks for; killing the daemon aborts
    the connection, which releases a reader blocked in a request, so the test ends."""
    try:
        out, _ = reader.communicate(timeout=READER_DEADLINE)
    except subprocess.TimeoutExpired:
        if alive(daemon):
            os.kill(daemon, signal.SIGKILL)
        reader.kill()
        reader.communicate(timeout=READER_DEADLINE)
        pytest.fail(f"reader {reader.pid} still blocked {READER_DEADLINE:.0f} s later")
    return reader.returncode, out


def wait_dead(pid: int) -> None:
    wait_until(lambda: not alive(pid), f"process {pid} to die")


def read_everything(m: Mount, source: Path) -> None:
    for rel in source_files(source):
        assert (m.path / rel).read_bytes() == (source / rel).read_bytes(), rel


def test_sigkill_of_the_daemon_mid_read_ends_every_reader(
    big_mount: Callable[..., Mount], store: LocalStore, big_image: Path,
    start_reader: Callable[..., subprocess.Popen[str]],
) -> None:
    """Readers in the middle of reads when the daemon dies end with an error, promptly;
    umount cleans up, the store verifies and a new mount reads the same bytes."""
    rng = random.Random(4711)
    files = source_files(big_image)
    for round_ in range(KILL_ROUNDS):
        # A small cache, so the readers keep asking the daemon to load chunks.
        m = big_mount("--cache-mem", "8M")
        pid = m.pid
        readers = [
            start_reader(mode, m.path / files[i % len(files)], big_image / files[i % len(files)],
                         seed=round_ * 10 + i)
            for i, mode in enumerate(["mmap", "direct", "pread", "pread"])
        ]
        for r in readers:
            wait_reading(r)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        for i, r in enumerate(readers):
            code, out = finish(r, pid)
            if i == 0:
                # A page fault on a mapping of a dead mount: SIGBUS, or EIO from a read.
                assert code in (-signal.SIGBUS, 3), (round_, code, out)
            else:
                assert code == 3, (round_, code, out)
            if code == 3:
                assert int(out.split()[-1]) in DEAD_MOUNT_ERRORS, (round_, out)
        umount = snapstore(store, "umount", str(m.path))
        assert "forced" in umount.stderr, umount.stderr
        assert not is_mounted(m.path)
        assert read_state(m.paths) is None
        assert snapstore(store, "verify").returncode == 0
    m = big_mount()
    read_everything(m, big_image)
    assert "forced" not in snapstore(store, "umount", str(m.path)).stderr


def test_sigkill_of_a_reader_mid_read_leaves_the_mount_healthy(
    big_mount: Callable[..., Mount], store: LocalStore, big_image: Path, tmp_path: Path,
    start_reader: Callable[..., subprocess.Popen[str]],
) -> None:
    """Readers killed in the middle of reads, while others go on reading, cost the daemon
    nothing: no error, no leak of a request, a clean unmount."""
    rng = random.Random(815)
    files = source_files(big_image)
    m = big_mount("--cache-mem", "8M")
    pid = m.pid
    steady = [start_reader("pread", m.path / f, big_image / f, seed=100 + i)
              for i, f in enumerate(files)]
    for r in steady:
        wait_reading(r)
    for i in range(KILL_ROUNDS * 2):
        f = files[i % len(files)]
        victim = start_reader(("pread", "direct", "mmap")[i % 3], m.path / f, big_image / f,
                              seed=i)
        wait_reading(victim)
        time.sleep(rng.uniform(0.0, 0.3))
        victim.kill()
        assert finish(victim, pid)[0] == -signal.SIGKILL
    (tmp_path / "stop").touch()
    for r in steady:
        assert finish(r, pid) == (0, "done\n")
    assert alive(pid) and is_mounted(m.path)
    read_everything(m, big_image)
    stats = json.loads(snapstore(store, "mount-stats", str(m.path), "--json").stdout)
    assert (stats["read_errors"], stats["load_errors"]) == (0, 0), stats
    assert "Traceback" not in m.paths.log.read_text()
    out = snapstore(store, "umount", str(m.path))
    assert "forced" not in out.stderr, out.stderr
    assert not alive(pid)
    assert snapstore(store, "verify").returncode == 0


# -- hostile and unlucky: other mounts, a stopped daemon, a full disk, a busy port ----


def test_umount_refuses_a_mount_that_is_not_snapstores(
    mount: Callable[..., Mount], store: LocalStore, tmp_path: Path
) -> None:
    m = mount()
    with tmpfs(tmp_path / "tmpfs", "1m") as other:
        (other / "keep").write_text("kept")
        # A stale record of a snapstore mount at the same path makes no difference.
        shutil.copy(m.paths.state, MountPaths.of(store.root, other).state)
        out = snapstore(store, "umount", str(other), check=False)
        assert out.returncode == 1, out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert "not a snapstore mount" in out.stderr and str(other) in out.stderr
        assert is_mounted(other) and (other / "keep").read_text() == "kept"
        # The snapstore mount that record named is untouched too.
        assert alive(m.pid) and is_mounted(m.path)
    assert "forced" not in snapstore(store, "umount", str(m.path)).stderr


def test_umount_of_a_stopped_daemon_leaves_no_process(
    mount: Callable[..., Mount], store: LocalStore
) -> None:
    m = mount()
    (m.path / "checkpoint.img").read_bytes()
    daemon = m.pid
    group = [daemon, *below(daemon)]
    assert len(group) > 1, "the daemon started no loader"
    os.killpg(os.getpgid(daemon), signal.SIGSTOP)
    try:
        wait_until(lambda: all(process_state(p) == "T" for p in group), "every process to stop")
        snapstore(store, "umount", str(m.path))
        assert not is_mounted(m.path)
        wait_until(lambda: not any(alive(p) for p in group), "the daemon and its loaders to end")
        assert os.listdir(m.path) == []
        assert read_state(m.paths) is None
    finally:
        for p in group:
            if alive(p):
                os.kill(p, signal.SIGKILL)


PTRACE_SEIZE, PTRACE_INTERRUPT, WAIT_ALL = 0x4206, 0x4207, 0x40000000


def test_umount_kills_a_daemon_that_does_not_stop(mount: Callable[..., Mount]) -> None:
    """A daemon held in a ptrace stop, which SIGCONT does not end (as a debugger would
    hold it), is killed with its loaders once the wait is over, and the mount forced."""
    m = mount()
    (m.path / "checkpoint.img").read_bytes()
    daemon = m.pid
    group = [daemon, *below(daemon)]
    libc = ctypes.CDLL(None, use_errno=True)
    for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
        assert libc.ptrace(request, daemon, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        os.waitpid(daemon, WAIT_ALL)
        assert process_state(daemon) == "t"
        assert unmount(m.path, m.paths, timeout=2).startswith("daemon killed, forced")
        assert not is_mounted(m.path)
        wait_until(lambda: not any(alive(p) for p in group), "the daemon and its loaders to end")
        assert os.listdir(m.path) == []
        assert read_state(m.paths) is None
    finally:
        for p in group:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        # The tracer reaps the traced daemon; its parent never sees it otherwise.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(daemon, WAIT_ALL)


def test_sigterm_with_the_store_disk_full_still_unmounts(
    image_dir: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "48m") as disk:
        store = LocalStore.open(disk / "store")
        snapshot = ingest(store, image_dir, "t", params=PARAMS).snapshot
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        snapstore(store, "mount", "t", str(mountpoint))
        try:
            m = Mount(store, mountpoint, snapshot)
            pid = m.pid
            assert (m.path / "checkpoint.img").read_bytes() == (
                image_dir / "checkpoint.img").read_bytes()
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"\xff" * 4096)
                    f.flush()
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not alive(pid), "the daemon to end")
            assert not is_mounted(mountpoint)
            assert os.listdir(mountpoint) == []
            # The fault did happen: the access order could not be written.
            assert not access_path(store.root, snapshot).exists()
        finally:
            if is_mounted(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_mount_with_the_store_disk_full_fails_in_one_line(
    image_dir: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "48m") as disk:
        store = LocalStore.open(disk / "store")
        ingest(store, image_dir, "t", params=PARAMS)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\xff" * 4096)
                f.flush()
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        out = snapstore(store, "mount", "t", str(mountpoint), check=False)
        try:
            assert out.returncode == 1, out.stderr
            assert len(out.stderr.splitlines()) == 1, out.stderr
            assert "No space left on device" in out.stderr and "Trio" not in out.stderr
            assert not is_mounted(mountpoint)
        finally:
            if is_mounted(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_metrics_on_a_busy_port_fails_the_mount_in_one_line(
    mount: Callable[..., Mount], store: LocalStore, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = snapstore(store, "mount", "t", str(mountpoint), "--metrics",
                        f"127.0.0.1:{port}", check=False)
    assert out.returncode == 1, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "Trio" not in out.stderr, out.stderr
    assert not is_mounted(mountpoint)
    assert read_state(MountPaths.of(store.root, mountpoint)) is None


def test_a_local_mount_needs_no_s3_client(store: LocalStore, image_dir: Path) -> None:
    """A host that carries only what a restore needs (a GPU host with no package registry)
    has no S3 client library: a mount from its local store must not import it."""
    ingest(store, image_dir, "t", params=PARAMS)
    base = Path(tempfile.mkdtemp(prefix="snapstore-mnt-"))
    mnt = base / "mnt"
    mnt.mkdir()
    no_s3 = ("import runpy, sys; sys.modules['aiobotocore'] = None; "
             "runpy.run_module('snapstore', run_name='__main__')")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", no_s3, "--store", str(store.root), "mount", "t", str(mnt)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "sub" / "deeper" / "note.txt").read_text() == "hello\n"
    finally:
        snapstore(store, "umount", str(mnt), check=False)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)
