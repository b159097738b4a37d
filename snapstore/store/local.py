"""The local content-addressed store: chunks, manifests and tags in one directory.

Layout, write order and the safety argument are in docs/format.md. In short: every object
is written to tmp/ and renamed into place after an fsync, so a reader never sees a partial
object; a snapshot's chunks are durable before its manifest, and its manifest before its
tag, so a tag always reaches complete data. Ingests hold a shared lock and gc an
exclusive one, so gc never deletes a chunk that an unfinished ingest relies on. The store
follows no symbolic link inside itself: a link where it expects one of its directories or
files is refused, and deletions go through descriptors of its own directories.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from snapstore import codec, manifest
from snapstore.errors import (
    CorruptError,
    ManifestError,
    NotFoundError,
    SnapstoreError,
    UsageError,
)
from snapstore.fileio import fsync_dir, read_fully, write_all, write_atomic, write_new
from snapstore.ids import ChunkId, is_valid_hex_id

STORE_FORMAT = "snapstore-store"
STORE_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 30
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,127}")
# A working directory's name: its purpose, its owner's pid and a random part. gc touches
# nothing else under work/.
_PURPOSE_RE = re.compile(r"[a-z]+(?:-[a-z]+)*")
_WORK_RE = re.compile(r"[a-z]+(?:-[a-z]+)*-[0-9]+-[0-9a-f]{16}")
# A tag file holds 64 hex digits and a newline; anything much longer is not a tag.
_TAG_FILE_MAX = 256
_libc = ctypes.CDLL(None, use_errno=True)


def check_tag(name: str) -> str:
    """Tag names are one path component, so a tag can never escape refs/tags/."""
    if not _TAG_RE.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid tag name {name!r:.80}: use letters, digits and . _ : @ + - "
            "(at most 128, not starting with . or -)"
        )
    return name


def check_manifest_object(mid: ChunkId, obj: bytes) -> None:
    """Decode an encoded manifest as every reader will: CorruptError unless it is the
    manifest `mid`."""
    manifest.decode(codec.decode_bounded(obj, mid, MAX_MANIFEST_BYTES))


def tag_file(mid: ChunkId) -> bytes:
    """A tag's content, in a store's refs/tags/ and in a remote's: the snapshot id in hex
    and a newline."""
    return (mid.hex + "\n").encode()


def tag_target(data: bytes) -> ChunkId:
    """The snapshot a tag's content names; CorruptError if it names none."""
    return ChunkId.parse(data.decode("ascii", errors="replace").strip())


def default_store_dir() -> Path:
    env = os.environ.get("SNAPSTORE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "snapstore"


@dataclass(frozen=True, slots=True)
class StoredChunk:
    cid: ChunkId
    stored_size: int


@dataclass(frozen=True, slots=True)
class DamagedTag:
    """A file under refs/tags/ that does not name a snapshot: what it reached is unknown."""

    name: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"tag {self.name!r} ({self.path}) is damaged: {self.reason}"


@dataclass(frozen=True, slots=True)
class Sweep:
    """What a sweep of tmp/ or work/ removed (or would remove), and what it left alone."""

    removed: int
    left: tuple[str, ...]


class LocalStore:
    """A store directory. Methods are safe to call from several threads and processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunks_dir = root / "chunks"
        self.snapshots_dir = root / "snapshots"
        self.tags_dir = root / "refs" / "tags"
        self.tmp_dir = root / "tmp"
        self.work_root = root / "work"
        # What a host keeps of its remotes (snapstore.remote.cache): fetched chunks, and
        # copies of pack indexes.
        self.cache_dir = root / "cache"
        self.pack_index_dir = root / "pack-index"
        self._lock_path = root / "lock"

    @classmethod
    def open(cls, root: Path, create: bool = True) -> LocalStore:
        store = cls(root)
        config = root / "config.json"
        if not config.exists():
            if not create:
                raise NotFoundError(f"no snapstore store at {root}")
            store._create()
        store._check_config(config)
        store._check_layout()
        return store

    def _create(self) -> None:
        for d in (self.chunks_dir, self.snapshots_dir, self.tags_dir, self.tmp_dir,
                  self.work_root):
            d.mkdir(parents=True, exist_ok=True)
        # All 256 fan-out directories up front: no mkdir on the path of each chunk write.
        for i in range(256):
            (self.chunks_dir / f"{i:02x}").mkdir(exist_ok=True)
        doc = {"format": STORE_FORMAT, "version": STORE_VERSION}
        self.write_atomic(self.root / "config.json", json.dumps(doc).encode() + b"\n")

    def _check_config(self, config: Path) -> None:
        try:
            doc = json.loads(config.read_bytes())
        except (OSError, ValueError) as e:
            raise CorruptError(f"cannot read store config {config}: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
            raise CorruptError(f"{self.root} is not a snapstore store")
        if doc.get("version") != STORE_VERSION:
            raise CorruptError(
                f"store {self.root} has format version {doc.get('version')!r}; "
                f"this snapstore reads version {STORE_VERSION}"
            )

    def _check_layout(self) -> None:
        """Refuse a store whose own directories are links: following one would read,
        write or delete outside the store (gc empties tmp/, wherever it points)."""
        for d in (self.chunks_dir, self.snapshots_dir, self.tags_dir.parent, self.tags_dir,
                  self.tmp_dir, self.work_root, self.cache_dir, self.root / "mounts",
                  self.root / "access", self.pack_index_dir):
            try:
                st = d.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise CorruptError(_not_a_directory(d))

    # -- atomic writes -------------------------------------------------------------

    def write_atomic(self, dest: Path, data: bytes | memoryview, durable: bool = True
                     ) -> None:
        """`fileio.write_atomic` through tmp/, where gc sweeps what a killed writer left."""
        write_atomic(dest, data, durable=durable, tmp=self._tmp_name(dest))

    def write_new(self, dest: Path, data: bytes | memoryview) -> bool:
        """`fileio.write_new` through tmp/: `dest` written only if it does not exist."""
        return write_new(dest, data, tmp=self._tmp_name(dest))

    def _tmp_name(self, dest: Path) -> Path:
        return self.tmp_dir / f"{dest.name}.{uuid.uuid4().hex}.tmp"

    def sync(self) -> None:
        """Make every rename so far durable (directory entries included): one syncfs."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), str(self.root))
        finally:
            os.close(fd)

    # -- chunks --------------------------------------------------------------------

    def chunk_path(self, cid: ChunkId) -> Path:
        h = cid.hex
        return self.chunks_dir / h[:2] / h[2:]

    def has_chunk(self, cid: ChunkId) -> bool:
        return self.chunk_path(cid).exists()

    def put_chunk(self, cid: ChunkId, obj: bytes) -> int:
        """Store one encoded chunk durably; returns the bytes written (0 if already there)."""
        path = self.chunk_path(cid)
        if path.exists():
            return 0
        path.parent.mkdir(exist_ok=True)
        self.write_atomic(path, obj)
        return len(obj)

    def chunk_writer(self, batch_bytes: int = 64 << 20) -> ChunkWriter:
        return ChunkWriter(self, batch_bytes)

    def get_chunk_object(self, cid: ChunkId) -> bytes:
        fd = self._open_chunk(cid)
        try:
            parts = []
            while part := os.read(fd, 1 << 20):
                parts.append(part)
        finally:
            os.close(fd)
        return b"".join(parts)

    def _open_chunk(self, cid: ChunkId) -> int:
        """The chunk object's file, opened for reading. Never through a link (it would lead
        out of the store), and never waiting on a FIFO (an open for reading would block
        until a writer came): either read as an empty object, which is damage."""
        try:
            return os.open(self.chunk_path(cid),
                           os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"chunk {cid} is missing from the store") from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise CorruptError(f"chunk {cid} is a symbolic link in the store, which "
                               "snapstore never writes") from None

    def get_chunk(self, cid: ChunkId, size: int) -> bytes:
        """The chunk's raw bytes, hash-checked; CorruptError or NotFoundError otherwise.

        The object is read with two `read`s: its codec tag, then at most size + 1 bytes of
        body (a valid body is at most size, and the one byte more shows a raw object that
        grew), so that a raw chunk is the read's own bytes, never copied again holding the
        GIL (in a lazy CRIU restore of incompressible memory that copy was the copy
        threads' largest hold of the GIL). Four system calls where `read_bytes` makes nine:
        every call hands the GIL to another thread. A short read (which a local file gives
        only to a dying process) fails the check.
        """
        fd = self._open_chunk(cid)
        try:
            tag = os.read(fd, 1)
            body = os.read(fd, size + 1)
        finally:
            os.close(fd)
        return codec.decode_body(codec.tag_of(tag, cid), body, cid, size)

    def read_chunk_into(self, cid: ChunkId, out: memoryview) -> None:
        """`get_chunk` into `out`, which is as long as the chunk, for a reader that copies
        the bytes on anyway: a raw object is read straight into it, a compressed one
        inflated into it (codec.inflate_into), and the bytes are hash-checked there. On an
        error `out` holds unchecked bytes, which the caller must not use.

        A lazy restore's copy processes fill their ranges this way: with a chunk-sized
        allocation and a copy fewer per chunk, their reading took 12% less time from zstd
        chunks and 21% less from raw ones (benchmarks/RESULTS.md, run 23)."""
        fd = self._open_chunk(cid)
        try:
            tag = codec.tag_of(os.read(fd, 1), cid)
            if tag == codec.RAW:
                done = read_fully(fd, out)
                if done != len(out) or os.read(fd, 1):
                    raise CorruptError(f"chunk {cid} is not stored as {len(out)} bytes")
            else:
                body = os.read(fd, len(out) + 1)
        finally:
            os.close(fd)
        if tag == codec.RAW:
            codec.check(out, cid)
        else:
            codec.inflate_into(tag, body, cid, out)

    def will_need(self, cid: ChunkId) -> None:
        """Ask the kernel to start reading the chunk's object into the page cache, without
        waiting for it: a cold read of many small objects, one at a time, leaves the disk
        idle between them (one reader of 867 cold objects: 0.60 GB/s, and 1.12 GB/s with
        the next 16 asked for ahead). A missing object, or one that is no plain file (a
        link is not followed, a FIFO not waited on), is left to the read that needs it."""
        try:
            fd = os.open(self.chunk_path(cid),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def iter_chunks(self) -> Iterator[StoredChunk]:
        for cid, st in walk_fanout(self.chunks_dir):
            yield StoredChunk(cid, st.st_size)

    def delete_chunk(self, cid: ChunkId) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.chunk_path(cid).unlink()

    # -- manifests -----------------------------------------------------------------

    def put_manifest(self, m: manifest.Manifest) -> ChunkId:
        """Store a new manifest, after reading it back as every reader will: the store
        never writes a snapshot that it could not then read."""
        raw = m.encode()
        try:
            manifest.decode(raw)
        except ManifestError as e:
            raise SnapstoreError(f"this snapshot would not read back ({e}): nothing was "
                                 "tagged; `snapstore gc` removes its chunks") from None
        mid = ChunkId.of(raw)
        path = self.snapshots_dir / mid.hex
        if not path.exists():
            self.write_atomic(path, codec.encode(raw))
        return mid

    def put_manifest_object(self, mid: ChunkId, obj: bytes) -> None:
        """Store an encoded manifest received from elsewhere, after checking it."""
        check_manifest_object(mid, obj)
        self.write_atomic(self.snapshots_dir / mid.hex, obj)

    def get_manifest_object(self, mid: ChunkId) -> bytes:
        try:
            return (self.snapshots_dir / mid.hex).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"snapshot {mid} is missing from the store") from None

    def get_manifest(self, mid: ChunkId) -> manifest.Manifest:
        raw = codec.decode_bounded(self.get_manifest_object(mid), mid, MAX_MANIFEST_BYTES)
        return manifest.decode(raw)

    def manifest_ids(self) -> list[ChunkId]:
        return [ChunkId.parse(e.name) for e in list_dir(self.snapshots_dir)
                if is_valid_hex_id(e.name)]

    def delete_manifest(self, mid: ChunkId) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.snapshots_dir / mid.hex).unlink()

    # -- tags ----------------------------------------------------------------------

    def set_tag(self, name: str, mid: ChunkId) -> None:
        self.write_atomic(self.tags_dir / check_tag(name), tag_file(mid))

    def create_tag(self, name: str, mid: ChunkId) -> bool:
        """Set a tag only if there is none of that name; False leaves the one there."""
        return self.write_new(self.tags_dir / check_tag(name), tag_file(mid))

    def get_tag(self, name: str) -> ChunkId | None:
        """The snapshot a tag names; None if there is no such tag, CorruptError naming the
        tag and its file if it is damaged."""
        found = self._read_tag(check_tag(name))
        if isinstance(found, DamagedTag):
            raise CorruptError(str(found))
        return found

    def _read_tag(self, name: str) -> ChunkId | DamagedTag | None:
        path = self.tags_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
            return DamagedTag(name, path, f"{why}, not a tag file")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return DamagedTag(name, path, "not a regular file")
            raw = os.read(fd, _TAG_FILE_MAX + 1)
        except OSError as e:
            return DamagedTag(name, path, f"cannot read it: {e.strerror}")
        finally:
            os.close(fd)
        # The content is not echoed: a damaged tag may hold anything.
        if len(raw) <= _TAG_FILE_MAX:
            with contextlib.suppress(CorruptError):
                return tag_target(raw)
        what = "empty" if not raw else f"{len(raw)} bytes that are not a snapshot id"
        return DamagedTag(name, path, what)

    def delete_tag(self, name: str) -> bool:
        try:
            (self.tags_dir / check_tag(name)).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.tags_dir)
        return True

    def scan_tags(self) -> tuple[dict[str, ChunkId], list[DamagedTag]]:
        """Every tag: those that name a snapshot (sorted by name), and the damaged ones."""
        good: dict[str, ChunkId] = {}
        damaged: list[DamagedTag] = []
        for e in sorted(list_dir(self.tags_dir), key=lambda e: e.name):
            if _TAG_RE.fullmatch(e.name):
                found = self._read_tag(e.name)
                if isinstance(found, DamagedTag):
                    damaged.append(found)
                elif found is not None:
                    good[e.name] = found
        return good, damaged

    def tags(self) -> dict[str, ChunkId]:
        """The tags that name a snapshot; damaged ones are left out (`scan_tags` has
        them), so one bad file does not stop commands about the others."""
        return self.scan_tags()[0]

    def damaged_tags(self) -> list[DamagedTag]:
        return self.scan_tags()[1]

    def resolve(self, ref: str) -> ChunkId:
        """A tag name, or a unique prefix (at least 4 hex digits) of a snapshot id."""
        if _TAG_RE.fullmatch(ref) and ".." not in ref:
            mid = self.get_tag(ref)
            if mid is not None:
                return mid
        if re.fullmatch(r"[0-9a-f]{4,64}", ref):
            hits = [m for m in self.manifest_ids() if m.hex.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UsageError(f"snapshot id prefix {ref!r} is ambiguous ({len(hits)} match)")
        raise NotFoundError(f"no tag or snapshot {ref!r:.80} in {self.root}")

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held (shared) by every writer from its first chunk to its tag."""
        with self._flock(fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def gc_lock(self, wait: bool = True) -> Iterator[None]:
        """Held (exclusive) by gc: no writer runs while gc marks and sweeps."""
        with self._flock(fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB):
            yield

    @contextlib.contextmanager
    def _flock(self, how: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                raise SnapstoreError("the store is busy (an ingest or gc is running)") from None
            yield
        finally:
            os.close(fd)

    def tmp_files(self) -> Iterator[Path]:
        for e in list_dir(self.tmp_dir):
            yield Path(e.path)

    # -- working directories -------------------------------------------------------

    @contextlib.contextmanager
    def work_dir(self, purpose: str) -> Iterator[Path]:
        """A private directory `work/<purpose>-<pid>-<random>` for a command's working
        files (a checkpoint image, an image exported for the page loader), removed when
        the block ends. Its owner holds an flock on it while it lives, so gc can tell
        one left by a killed process from one in use, whatever became of the pid."""
        if not _PURPOSE_RE.fullmatch(purpose):
            raise ValueError(f"bad working directory purpose {purpose!r}")
        parent = self._open_own_dir(self.work_root, create=True)
        try:
            name = f"{purpose}-{os.getpid()}-{uuid.uuid4().hex[:16]}"
            # Made and locked under the writer lock: gc, which sweeps under the exclusive
            # one, never finds it made but not yet locked.
            with self.writer_lock():
                os.mkdir(name, 0o700, dir_fd=parent)
                owner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=parent)
                fcntl.flock(owner, fcntl.LOCK_EX)
            try:
                yield self.work_root / name
            finally:
                shutil.rmtree(name, ignore_errors=True, dir_fd=parent)
                os.close(owner)
        finally:
            os.close(parent)

    # -- sweeping (gc, under the exclusive lock) -------------------------------------

    def open_sweep_dirs(self) -> tuple[int, int]:
        """Descriptors of tmp/ and work/ for `sweep_tmp` and `sweep_work`, opened without
        following a link: CorruptError, before gc deletes anything, if either is one."""
        tmp = self._open_own_dir(self.tmp_dir, create=True)
        try:
            return tmp, self._open_own_dir(self.work_root, create=True)
        except BaseException:
            os.close(tmp)
            raise

    def sweep_tmp(self, tmp: int, dry_run: bool) -> Sweep:
        """Remove what killed writers left in tmp/ (no writer runs while gc holds its lock).

        Only files and links are removed (unlink never follows a link); a directory was
        not made there by this version of snapstore, so it is left alone and reported."""
        removed = 0
        left: list[str] = []
        for e in _scandir_fd(tmp):
            if e.is_dir(follow_symlinks=False):
                left.append(f"{self.tmp_dir / e.name}: a directory, not made by this "
                            "snapstore; remove it once no older snapstore runs")
                continue
            removed += 1
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.name, dir_fd=tmp)
        return Sweep(removed, tuple(left))

    def sweep_work(self, work: int, dry_run: bool) -> Sweep:
        """Remove the working directories whose owner is gone: those named as `work_dir`
        names them, that are directories (not links), and whose flock is free. Anything
        else under work/ is left alone and reported."""
        removed = 0
        left: list[str] = []
        for e in _scandir_fd(work):
            if not (_WORK_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
                left.append(f"{self.work_root / e.name}: not a snapstore working directory")
                continue
            try:
                fd = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=work)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                removed += 1
                if not dry_run:
                    # rmtree with dir_fd walks by descriptors and never follows a link.
                    shutil.rmtree(e.name, dir_fd=work)
            finally:
                os.close(fd)
        return Sweep(removed, tuple(left))

    def _open_own_dir(self, d: Path, create: bool = False) -> int:
        """A descriptor of one of the store's directories; CorruptError if it is a link."""
        if create:
            with contextlib.suppress(FileExistsError):
                d.mkdir()
        try:
            return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptError(_not_a_directory(d)) from None
            raise


def _not_a_directory(d: Path) -> str:
    return (f"{d} is a symbolic link or not a directory: the store follows no link it "
            "did not make; replace it with a directory")


# Files a batch holds open (unnamed, until linked) at most. Two batches are open at once
# (one committing, one filling), so under a low descriptor limit (`ulimit -n 256`) batches
# shrink to leave the rest of the process room.
_BATCH_FILES = min(256, max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))


class ChunkWriter:
    """Writes many chunks with one syncfs per batch instead of one fsync per chunk.

    A chunk is written to tmp/ and renamed into chunks/ only after a syncfs that
    followed its write, so a chunk visible in chunks/ always has durable content, and
    `close()` makes every rename durable before the caller writes a manifest. Full
    batches are committed on a thread of their own while the next one fills; a writer that
    finds the next one full too waits for the commit, so open files stay bounded (about two
    batches) however slow the disk is. Safe to call from several threads.
    """

    def __init__(self, store: LocalStore, batch_bytes: int) -> None:
        self._store = store
        self._batch_bytes = batch_bytes
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._committing = False
        self._pending: list[tuple[int, Path]] = []
        self._pending_bytes = 0
        self._claimed: set[ChunkId] = set()
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._commits: list[Future[None]] = []

    def claim(self, cid: ChunkId) -> bool:
        """True if the caller should `put` this chunk: neither the store nor this writer
        has it yet. Claiming first lets callers skip compressing what dedups."""
        with self._lock:
            if cid in self._claimed:
                return False
            self._claimed.add(cid)
        return not self._store.chunk_path(cid).exists()

    def put(self, cid: ChunkId, obj: bytes | memoryview) -> int:
        """Write a claimed, encoded chunk; returns the bytes written."""
        dest = self._store.chunk_path(cid)
        with self._room:
            while self._full() and not self._hand_over():
                self._room.wait()
        fd = -1
        try:
            fd = os.open(self._store.tmp_dir, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            write_all(fd, obj)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._unclaim(cid)
            raise
        with self._lock:
            self._pending.append((fd, dest))
            self._pending_bytes += len(obj)
            if self._full():
                self._hand_over()
        return len(obj)

    def _full(self) -> bool:
        return self._pending_bytes >= self._batch_bytes or len(self._pending) >= _BATCH_FILES

    def _hand_over(self) -> bool:
        """Start committing the filling batch unless a commit is running; with the lock held."""
        if self._committing:
            return False
        self._committing = True
        self._commits.append(self._committer.submit(self._commit_in_turn, self._take()))
        return True

    def _commit_in_turn(self, batch: list[tuple[int, Path]]) -> None:
        try:
            self._commit(batch)
        finally:
            with self._room:
                self._committing = False
                self._room.notify_all()

    def _unclaim(self, cid: ChunkId) -> None:
        """A claimed chunk that could not be written: let a later `claim` try again."""
        with self._lock:
            self._claimed.discard(cid)

    def _take(self) -> list[tuple[int, Path]]:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        return batch

    def _commit(self, batch: list[tuple[int, Path]]) -> None:
        if not batch:
            return
        try:
            self._store.sync()
            for fd, dest in batch:
                _link_unnamed(fd, dest)
        finally:
            for fd, _ in batch:
                os.close(fd)

    def close(self) -> None:
        """Publish every batch and make all renames durable."""
        with self._lock:
            last = self._take()
        self._committer.shutdown(wait=True)
        for done in self._commits:
            done.result()
        self._commit(last)
        self._store.sync()

    def abort(self) -> None:
        """Drop the chunks not yet published (after a failure)."""
        self._committer.shutdown(wait=True)
        with self._lock:
            batch = self._take()
        for fd, _ in batch:
            os.close(fd)


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _link_unnamed(fd: int, dest: Path) -> None:
    """Give the O_TMPFILE file `fd` the name `dest` (already there: same content, fine).

    Through /proc with AT_SYMLINK_FOLLOW, which needs no privilege (os.link does not
    follow the /proc link)."""
    src = f"/proc/self/fd/{fd}".encode()
    for _ in range(2):
        if _libc.linkat(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(dest), _AT_SYMLINK_FOLLOW) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            return
        if e != errno.ENOENT:
            break
        # A store made before its fan-out directories were created up front.
        dest.parent.mkdir(exist_ok=True)
    raise OSError(e, os.strerror(e), str(dest))


def walk_fanout(d: Path) -> Iterator[tuple[ChunkId, os.stat_result]]:
    """The objects of a directory fanned out by id (`d/ab/<62 hex>`: chunks/, cache/),
    each with its stat; other names, and subdirectories that are links, are skipped."""
    for sub in list_dir(d):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for f in list_dir(Path(sub.path)):
            name = sub.name + f.name
            if is_valid_hex_id(name):
                with contextlib.suppress(FileNotFoundError):
                    yield ChunkId.parse(name), f.stat()


def list_dir(d: Path) -> list[os.DirEntry[str]]:
    """The entries of directory `d`; none when it does not exist."""
    try:
        with os.scandir(d) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _scandir_fd(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return list(it)
