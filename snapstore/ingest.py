"""Ingest: turn an image directory into chunks, a manifest and a tag, in that order."""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from snapstore import codec, manifest
from snapstore.chunker_params import ChunkerParams
from snapstore.chunking import Data, Readable, split
from snapstore.errors import ManifestError, SnapstoreError, UsageError
from snapstore.ids import ChunkId
from snapstore.manifest import Entry, Extent, Manifest
from snapstore.progress import Advance, byte_progress
from snapstore.store.local import ChunkWriter, LocalStore, check_tag
from snapstore.transcode import MAGIC, NotAStatefile, StoredForm

# Bytes of chunks handed to the workers and not yet settled. Enough that a slow chunk
# (one that waits for the disk) does not idle the other workers, and a bound on memory
# whatever the input size: a few max-size chunks per worker.
_INFLIGHT_BYTES = 48 << 20


@dataclass(frozen=True, slots=True)
class IngestResult:
    snapshot: ChunkId
    files: int
    logical_bytes: int
    hole_bytes: int
    chunks: int
    new_chunks: int
    new_stored_bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Stored:
    cid: ChunkId
    size: int
    written: int


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels, if a manifest reader accepts them; else a UsageError saying why.
    Called before anything is written (and, by checkpoint, before runsc runs)."""
    try:
        return manifest.check_labels(labels)
    except ManifestError as e:
        raise UsageError(f"cannot store these labels: {e}") from None


def scan(src: Path) -> list[tuple[str, os.stat_result]]:
    """List the tree under `src` (parents first, sorted); refuse what cannot be stored,
    with the manifest reader's own checks, before any chunk is written."""
    try:
        top = src.stat()
    except OSError as err:
        raise SnapstoreError(f"cannot read {src}: {err.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise SnapstoreError(f"{src} is not a directory")
    out: list[tuple[str, os.stat_result]] = []

    def walk(d: Path, prefix: str) -> None:
        try:
            with os.scandir(d) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise SnapstoreError(f"cannot list {d}: {err.strerror}") from None
        for item in items:
            rel = prefix + item.name
            st = item.stat(follow_symlinks=False)
            try:
                manifest.check_path(rel)
                manifest.check_mtime(st.st_mtime_ns, rel)
            except ManifestError as e:
                raise SnapstoreError(f"cannot store {Path(item.path)}: {e}") from None
            if stat.S_ISDIR(st.st_mode):
                out.append((rel, st))
                walk(Path(item.path), rel + "/")
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out.append((rel, st))
            else:
                raise SnapstoreError(
                    f"{Path(item.path)} is a device, socket or fifo; only regular files, "
                    "directories and symlinks can be stored"
                )

    walk(src, "")
    if len(out) > manifest.MAX_ENTRIES:
        raise SnapstoreError(f"{src} holds {len(out)} entries; a snapshot holds at most "
                             f"{manifest.MAX_ENTRIES}")
    return out


def ingest(
    store: LocalStore,
    src: Path,
    tag: str,
    labels: dict[str, str] | None = None,
    params: ChunkerParams | None = None,
    workers: int | None = None,
    transcode: bool = True,
) -> IngestResult:
    """Store the directory `src` as a snapshot and point `tag` at it.

    gVisor statefiles are stored transcoded (snapstore/transcode.py) unless `transcode`
    is false; anything else, or a statefile that does not parse, is stored byte-exact.
    """
    check_tag(tag)
    labels = check_labels(labels or {})
    params = params or ChunkerParams()
    workers = workers or os.cpu_count() or 2
    start = time.monotonic()
    plan = scan(src)
    total = sum(st.st_size for _, st in plan if stat.S_ISREG(st.st_mode))
    stored: list[_Stored] = []
    writer = store.chunk_writer()
    with store.writer_lock():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest")
        try:
            with byte_progress("ingest", total) as advance:
                entries = [
                    _entry(src, rel, st, writer, params, pool, stored, advance, transcode)
                    for rel, st in plan
                ]
        except BaseException:
            # Stop the workers before dropping their files, or late ones would leave some.
            pool.shutdown(wait=True, cancel_futures=True)
            writer.abort()
            raise
        pool.shutdown()
        m = Manifest(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            chunker=params,
            entries=tuple(entries),
            labels=labels,
        )
        # Write order: chunks durable, then the manifest, then the tag.
        writer.close()
        mid = store.put_manifest(m)
        store.set_tag(tag, mid)
    return IngestResult(
        snapshot=mid,
        files=sum(1 for e in entries if e.kind == "file"),
        logical_bytes=m.logical_bytes,
        hole_bytes=m.hole_bytes,
        chunks=len(stored),
        new_chunks=sum(1 for s in stored if s.written),
        new_stored_bytes=sum(s.written for s in stored),
        seconds=time.monotonic() - start,
    )


def _entry(
    src: Path,
    rel: str,
    st: os.stat_result,
    writer: ChunkWriter,
    params: ChunkerParams,
    pool: ThreadPoolExecutor,
    stored: list[_Stored],
    advance: Advance,
    transcode: bool,
) -> Entry:
    mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
    if stat.S_ISDIR(st.st_mode):
        return Entry(rel, "dir", mode, mtime)
    if stat.S_ISLNK(st.st_mode):
        return Entry(rel, "symlink", mode, mtime, target=os.readlink(src / rel))
    path = src / rel
    if transcode and _is_statefile(path):
        try:
            with _open(path) as f:
                form = StoredForm(f)
                extents = _ingest_stream(writer, form, path, params, pool, stored, advance)
            layout = form.layout()
            return Entry(rel, "file", mode, mtime, layout.presented_size(), tuple(extents),
                         form="transcoded", layout=layout)
        except NotAStatefile as e:
            # Chunks stored before the problem showed are left to gc.
            print(f"snapstore: warning: {path}: {e}; storing it byte-exact", file=sys.stderr)
    with _open(path) as f:
        extents = _ingest_stream(writer, f, path, params, pool, stored, advance)
    return Entry(rel, "file", mode, mtime, sum(x.size for x in extents), tuple(extents))


def _open(path: Path) -> io.FileIO:
    try:
        return path.open("rb", buffering=0)
    except OSError as e:
        raise SnapstoreError(f"cannot read {path}: {e.strerror}") from None


def _is_statefile(path: Path) -> bool:
    with _open(path) as f:
        return f.read(len(MAGIC)) == MAGIC


def _ingest_stream(
    writer: ChunkWriter,
    f: Readable,
    path: Path,
    params: ChunkerParams,
    pool: ThreadPoolExecutor,
    stored: list[_Stored],
    advance: Advance,
) -> list[Extent]:
    extents: list[Extent] = []
    # Holes wait in line behind the chunks in flight, so extents stay in file order.
    inflight: deque[Future[_Stored] | Extent] = deque()
    inflight_bytes = 0

    def settle(limit: int) -> None:
        nonlocal inflight_bytes
        while inflight and inflight_bytes > limit:
            item = inflight.popleft()
            if isinstance(item, Extent):
                extents.append(item)
                advance(item.size)
            else:
                s = item.result()
                inflight_bytes -= s.size
                stored.append(s)
                extents.append(Extent(s.cid, s.size))
                advance(s.size, 1)

    try:
        for piece in split(f, params):
            if isinstance(piece, Data):
                inflight.append(pool.submit(_store_chunk, writer, piece.data))
                inflight_bytes += piece.size
            else:
                inflight.append(Extent(None, piece.size))
            settle(_INFLIGHT_BYTES)
        settle(-1)
    except BaseException as e:
        # Chunks still in flight must land (or give up their claim) before anything else
        # runs: a retry of this file as byte-exact may dedup against them.
        wait([x for x in inflight if isinstance(x, Future)])
        if isinstance(e, OSError):
            raise _io_error(e, path) from None
        raise
    return extents


def _io_error(e: OSError, path: Path) -> SnapstoreError:
    where = e.filename or path
    if e.errno == errno.ENOSPC:
        return SnapstoreError(
            "no space left on the store's device: nothing was tagged; "
            "free space, then run `snapstore gc` to remove the partial data"
        )
    return SnapstoreError(f"I/O error on {where}: {e.strerror}")


def _store_chunk(writer: ChunkWriter, data: bytes) -> _Stored:
    cid = ChunkId.of(data)
    written = writer.put(cid, codec.encode(data)) if writer.claim(cid) else 0
    return _Stored(cid, len(data), written)

