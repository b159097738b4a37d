"""Loading a GPU dump back: fill a fresh process's memory from it through the uffd loader.

The page space is the dump's segment files one after another. From a snapshot, the loader
serves it straight from the store's chunks (snapstore.uffd.serve: nothing is written, the
manifest gives the data extents); from a dump directory, it reads the segment files. Every
data page is prefetched while the client (snapstore.uffd.client, in a child process) maps
the dump's regions, touches every data page and then checks each byte: against the chunk ids
(BLAKE3 of the bytes) and zero holes from a snapshot, against the files from a directory.
The time that counts is end to end: from the command's start to the last page installed.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from snapstore.errors import SnapstoreError
from snapstore.fileio import pwrite_all
from snapstore.gpu.dump import (
    PAGE,
    TABLE_FILE,
    Dump,
    allow_open_files,
    check_dump,
    load_table,
    parse_table,
    read_dump,
    segment_files,
    segment_names,
)
from snapstore.ids import ChunkId
from snapstore.manifest import Entry, Manifest
from snapstore.store.local import LocalStore
from snapstore.uffd import page_loader
from snapstore.uffd.client import Client
from snapstore.uffd.layout import Layout

# The loader accepts at most 64 regions in a handshake.
MAX_MAPPINGS = 64
_VERIFY_SLICE = 64 << 20
_INFLIGHT_PER_WORKER = 4
_CONNECT_SECONDS = 120


@dataclass(frozen=True, slots=True)
class LoadResult:
    bytes: int
    data_bytes: int
    mappings: int
    # Handshake to the last data page installed.
    load_seconds: float
    verified: bool
    loader_stats: dict[str, Any]
    # From the command's start (see process_start) to the last data page installed, and
    # the stages it breaks into, in order, each in seconds.
    end_to_end: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


def process_start() -> float:
    """This process's start on the time.monotonic() clock (10 ms resolution): the kernel
    records it in clock ticks since boot."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def open_snapshot(store: LocalStore, m: Manifest) -> tuple[Dump, Layout]:
    """A dump snapshot's table (checked as read_dump checks a directory) and the layout of
    its page space, from the manifest and the table's chunks alone."""
    files = {e.path: e for e in m.files()}
    if TABLE_FILE not in files:
        raise SnapstoreError(f"the snapshot holds no {TABLE_FILE}; is it a gpu-dump?")
    table = files[TABLE_FILE]
    text = b"".join(bytes(x.size) if x.chunk is None else store.get_chunk(x.chunk, x.size)
                    for x in table.extents)
    where = Path(TABLE_FILE)
    dump = check_dump(parse_table(text, where), where.parent,
                      lambda n: files[n].size if n in files else None)
    entries = [files[n] for n in segment_names(dump.pages_size, dump.segment_size)]
    return dump, Layout.of_files(entries, dump.segment_size)


def materialize(store: LocalStore, m: Manifest, dest: Path, workers: int | None = None) -> Dump:
    """Write a dump snapshot's table and segment files into the new directory `dest`: the way
    a snapshot was loaded before the loader served the store's chunks, kept as the baseline
    of benchmarks/dump_load.py.

    Unlike `snapstore export`, all workers write at once, each chunk with a pwrite at its
    offset, taking the segment files round robin so that they write to different files.
    """
    files = {e.path: e for e in m.files()}
    if TABLE_FILE not in files:
        raise SnapstoreError(f"the snapshot holds no {TABLE_FILE}; is it a gpu-dump?")
    try:
        dest.mkdir()
    except OSError as err:
        raise SnapstoreError(f"cannot create {dest}: {err.strerror}") from None
    workers = workers or min(16, os.cpu_count() or 2)
    with ThreadPoolExecutor(workers, thread_name_prefix="gpu-load") as pool:
        depth = workers * _INFLIGHT_PER_WORKER
        _write_files(store, [(files[TABLE_FILE], dest / TABLE_FILE)], pool, depth)
        names = segment_files(load_table(dest / TABLE_FILE), dest / TABLE_FILE)
        missing = [n for n in names if n not in files]
        if missing:
            raise SnapstoreError(f"the snapshot lacks {missing[0]}, which its {TABLE_FILE} "
                                 "lists")
        _write_files(store, [(files[n], dest / n) for n in names], pool, depth)
    return read_dump(dest)


def _write_files(
    store: LocalStore, files: list[tuple[Entry, Path]], pool: ThreadPoolExecutor, depth: int
) -> None:
    allow_open_files(len(files))
    fds: list[int] = []
    try:
        for e, path in files:
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            os.ftruncate(fds[-1], e.size)

        def put(fd: int, cid: Any, size: int, offset: int) -> None:
            pwrite_all(fd, store.get_chunk(cid, size), offset)

        pending: deque[Future[None]] = deque()
        for fd, cid, size, offset in _round_robin(
                [_chunk_writes(fd, e) for fd, (e, _) in zip(fds, files, strict=True)]):
            pending.append(pool.submit(put, fd, cid, size, offset))
            # Bounded in flight: memory stays a few chunks per worker.
            while len(pending) >= depth:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        for fd in fds:
            os.close(fd)


def _chunk_writes(fd: int, e: Entry) -> Iterator[tuple[int, Any, int, int]]:
    """(fd, chunk, size, offset) of each stored extent of a file; holes stay holes."""
    offset = 0
    for x in e.extents:
        if x.chunk is not None:
            yield fd, x.chunk, x.size, offset
        offset += x.size


def _round_robin(
    streams: list[Iterator[tuple[int, Any, int, int]]],
) -> Iterator[tuple[int, Any, int, int]]:
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


def data_pages(dump: Dump) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Page space indices of the pages that are not holes, in order."""
    per_segment = dump.segment_size // PAGE
    runs = [_file_data_pages(path) + i * per_segment for i, path in enumerate(dump.pages_paths)]
    return np.concatenate(runs)


def _file_data_pages(path: Path) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Indices of the pages of a sparse file that are not holes, in file order."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        runs = []
        pos = 0
        while pos < size:
            try:
                lo = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            hi = os.lseek(fd, lo, os.SEEK_HOLE)
            runs.append(np.arange(lo // PAGE, -(-hi // PAGE), dtype=np.int64))
            pos = hi
    finally:
        os.close(fd)
    return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)


def mappings(dump: Dump, limit: int = MAX_MAPPINGS) -> list[tuple[int, int]]:
    """(page space offset, size) of the client's mappings: one per region, or neighbours
    merged (they are adjacent in the page space) when there are more regions than `limit`."""
    group = -(-len(dump.regions) // limit) if dump.regions else 1
    out = []
    for i in range(0, len(dump.regions), group):
        part = dump.regions[i : i + group]
        out.append((part[0].offset, part[-1].offset + part[-1].size - part[0].offset))
    return out


def write_hot_list(pages: np.ndarray[Any, np.dtype[np.int64]], path: Path) -> None:
    path.write_text("".join(f"{p}\n" for p in pages.tolist()))


def load(dump: Dump, workdir: Path, verify: bool = True, direct: bool = False,
         started: float | None = None) -> LoadResult:
    """Fill a fresh process's anonymous mappings with a dump directory through the loader.

    The restoring process is a child (`python -m snapstore.gpu.load_dump`), because the loader
    kills its client when it fails rather than leave it hanging. The load time runs from
    the handshake until every data page has been touched (installed); the byte check against
    the page space comes after it and is not timed. `started`: the command's start, for the
    end-to-end time (default: this process's start).
    """
    started = process_start() if started is None else started
    hot = data_pages(dump)
    write_hot_list(hot, workdir / "hot.txt")
    sock = workdir / "loader.sock"
    stats_path = workdir / "loader-stats.json"
    log_path = workdir / "loader.log"
    opts = page_loader.LoaderOptions(image=dump.pages_paths, socket=sock, hot=workdir / "hot.txt",
                                stats_json=stats_path, direct=direct)
    spawned = time.monotonic()
    with log_path.open("wb") as log:
        proc = page_loader.start(opts, stderr=log)
    client = _start_client(["dir", str(dump.directory)], sock, verify)
    try:
        status = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    out, err = client.communicate()
    if status != 0 or client.returncode != 0:
        why = log_path.read_text(errors="replace").strip().splitlines()
        raise SnapstoreError(
            f"load failed: loader exit {status} ({why[-1] if why else 'no message'}), "
            f"client exit {client.returncode} ({_last_line(err)})")
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return _result(dump, int(hot.size) * PAGE, json.loads(out), stats, started, spawned)


def start_snapshot_client(store_root: Path, ref: str, workdir: Path,
                          verify: bool = True) -> subprocess.Popen[str]:
    """The restoring process of `load_snapshot`, started on its own: its start-up (an
    interpreter, numpy, the manifest) then overlaps this process's own."""
    return _start_client(["store", str(store_root), ref], workdir / "loader.sock", verify)


def load_snapshot(store: LocalStore, mid: ChunkId, dump: Dump, layout: Layout, workdir: Path,
                  verify: bool = True, started: float | None = None,
                  client: subprocess.Popen[str] | None = None) -> LoadResult:
    """Fill a fresh process's anonymous mappings with a dump snapshot, served by the loader
    straight from the store's chunks (snapstore.uffd.serve); timed as `load` is. `client`:
    one from start_snapshot_client for the same snapshot and workdir (default: start one)."""
    started = process_start() if started is None else started
    sock = workdir / "loader.sock"
    stats_path = workdir / "loader-stats.json"
    spawned = time.monotonic()
    if client is None:
        client = start_snapshot_client(store.root, mid.hex, workdir, verify)
    status = 1
    try:
        status = serve_snapshot(store, layout, sock, ["--stats-json", str(stats_path)])
    finally:
        # A loader that failed before the child connected leaves it waiting to connect.
        if status != 0:
            client.kill()
        out, err = client.communicate()
    if status != 0 or client.returncode != 0:
        raise SnapstoreError(f"load failed: loader exit {status}, client exit "
                             f"{client.returncode} ({_last_line(err)})")
    stats: dict[str, Any] = json.loads(stats_path.read_text())
    data = sum(size for _, size in layout.chunks)
    return _result(dump, data, json.loads(out), stats, started, spawned)


def serve_snapshot(store: LocalStore, layout: Layout, sock: Path, extra: list[str]) -> int:
    """Serve a dump snapshot's page space on `sock` from the store's chunks, every chunk
    prefetched in page space order; the loader's exit status."""
    # Here, not at the top: the restoring process imports this module and needs no feeder.
    from snapstore.uffd.serve import default_loaders, serve_local

    return serve_local(store, layout, range(len(layout.chunks)), sock, default_loaders(), extra)


def _start_client(source: list[str], sock: Path, verify: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "snapstore.gpu.load_dump", *source, str(sock),
         "1" if verify else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def _result(dump: Dump, data_bytes: int, report: dict[str, Any], stats: dict[str, Any],
            started: float, spawned: float) -> LoadResult:
    handshake = float(stats.get("handshake_at") or report["connected_at"])
    touched = float(report["touched_at"])
    stages = {"start-up and opening the dump": spawned - started,
              "until the handshake": handshake - spawned,
              "install (handshake to last page)": touched - handshake}
    if stats.get("first_served_at"):
        stages["first fault served after the handshake"] = stats["first_served_at"] - handshake
    stages["verify (not counted)"] = float(report["verify_seconds"])
    return LoadResult(dump.pages_size, data_bytes, int(report["mappings"]), touched - handshake,
                      bool(report["verified"]), stats, touched - started, stages)


def run_client(dump: Dump, sock: Path, verify: bool,
               layout: Layout | None = None) -> dict[str, Any]:
    """The restoring process's side of a load: map, touch every data page, check (against the
    layout's chunk ids and zero holes, else against the dump's files)."""
    mapped = mappings(dump)
    client = Client(sock, mapped)
    try:
        connected = time.monotonic()
        # The loader's parent may still be starting (the two start side by side).
        client.connect(timeout=_CONNECT_SECONDS)
        # Which pages to touch is the stand-in's bookkeeping, not a restored process's
        # start-up: it is worked out once the loader has the handshake and is installing.
        hot = layout.data_pages() if layout is not None else data_pages(dump)
        _touch(client, mapped, hot)
        touched = time.monotonic()
        if verify:
            if layout is not None:
                _verify_chunks(client, layout)
            else:
                _verify(client, dump)
    finally:
        client.close()
    return {"mappings": len(mapped), "connected_at": connected, "touched_at": touched,
            "verify_seconds": time.monotonic() - touched, "verified": verify}


def _touch(
    client: Client, layout: list[tuple[int, int]], hot: np.ndarray[Any, np.dtype[np.int64]]
) -> None:
    """Read one byte of every data page, in page space order, as the restored process would."""
    offsets = hot * PAGE
    for (base, size), region in zip(layout, client.regions, strict=True):
        inside = offsets[(offsets >= base) & (offsets < base + size)] - base
        mem = np.frombuffer(region.mm, dtype=np.uint8)
        try:
            int(mem[inside].sum())
        finally:
            # An exported buffer would keep the mapping from being closed.
            del mem


def _verify(client: Client, dump: Dump) -> None:
    for region in client.regions:
        mem = np.frombuffer(region.mm, dtype=np.uint8)
        try:
            for pos in range(0, region.size, _VERIFY_SLICE):
                n = min(_VERIFY_SLICE, region.size - pos)
                want = np.frombuffer(dump.read(region.offset + pos, n), dtype=np.uint8)
                if not np.array_equal(mem[pos : pos + n], want):
                    bad = int(np.flatnonzero(mem[pos : pos + n] != want)[0])
                    raise SnapstoreError(
                        f"loaded memory differs from the dump at page space offset "
                        f"{region.offset + pos + bad}")
        finally:
            del mem


def serve(dump: Dump, workdir: Path, socket: Path, direct: bool = False) -> int:
    """Run the loader in the foreground for an outside client; returns its exit status.

    The client maps the table's regions (anywhere) and sends their page space offsets in the
    handshake; every data page is prefetched.
    """
    hot = workdir / "hot.txt"
    write_hot_list(data_pages(dump), hot)
    return page_loader.run(page_loader.LoaderOptions(image=dump.pages_paths, socket=socket, hot=hot,
                                           direct=direct))


def _verify_chunks(client: Client, layout: Layout) -> None:
    """Every chunk's bytes hash to its id, and every other byte is zero."""
    pos = 0
    for (cid, size), off in zip(layout.chunks, layout.offsets.tolist(), strict=True):
        _check_zero(client, pos, off - pos)
        digest = blake3.blake3()
        for piece in _pieces(client, off, size):
            digest.update(piece)
        if digest.digest() != cid.digest:
            raise SnapstoreError(f"loaded memory differs from chunk {cid} at page space "
                                 f"offset {off}")
        pos = off + size
    _check_zero(client, pos, sum(r.size for r in client.regions) - pos)


def _check_zero(client: Client, off: int, size: int) -> None:
    for piece in _pieces(client, off, size):
        if np.frombuffer(piece, dtype=np.uint8).any():
            raise SnapstoreError(f"loaded memory is not zero in the hole at page space offset "
                                 f"{off}")


def _pieces(client: Client, off: int, size: int) -> Iterator[bytes]:
    """The page space bytes [off, off + size) from the client's mappings, a slice at a time."""
    for r in client.regions:
        lo, hi = max(off, r.offset), min(off + size, r.offset + r.size)
        for pos in range(lo, hi, _VERIFY_SLICE):
            n = min(_VERIFY_SLICE, hi - pos)
            yield r.mm[pos - r.offset : pos - r.offset + n]


def _client_main(argv: list[str]) -> dict[str, Any]:
    if argv[0] == "dir":
        return run_client(read_dump(Path(argv[1])), Path(argv[2]), argv[3] == "1")
    store = LocalStore.open(Path(argv[1]), create=False)
    dump, layout = open_snapshot(store, store.get_manifest(store.resolve(argv[2])))
    return run_client(dump, Path(argv[3]), argv[4] == "1", layout)


if __name__ == "__main__":
    try:
        doc = _client_main(sys.argv[1:])
    except SnapstoreError as e:
        print(f"snapstore: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(doc))
