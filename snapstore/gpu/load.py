"""Loading a GPU dump back: fill a fresh process's memory from it through the uffd loader.

The dump's segment files (materialised from the store when the dump is a snapshot), one
after another, are the native loader's image; every data page is on its hot list, so the
loader prefetches them all while the client (snapstore.uffd.client) maps the dump's regions,
touches every data page and then checks each byte against the page space.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapstore.errors import SnapstoreError
from snapstore.gpu.dump import (
    PAGE,
    TABLE_FILE,
    Dump,
    allow_open_files,
    load_table,
    read_dump,
    segment_files,
)
from snapstore.manifest import Entry, Manifest
from snapstore.store.local import LocalStore
from snapstore.uffd import loader
from snapstore.uffd.client import Client

# The loader accepts at most 64 regions in a handshake.
MAX_MAPPINGS = 64
_VERIFY_SLICE = 64 << 20
_INFLIGHT_PER_WORKER = 4


@dataclass(frozen=True, slots=True)
class LoadResult:
    bytes: int
    data_bytes: int
    mappings: int
    load_seconds: float
    verified: bool
    loader_stats: dict[str, Any]


def materialize(store: LocalStore, m: Manifest, dest: Path, workers: int | None = None) -> Dump:
    """Write a dump snapshot's table and segment files into the new directory `dest`.

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
            data = memoryview(store.get_chunk(cid, size))
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n

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


def load(dump: Dump, workdir: Path, verify: bool = True, direct: bool = False) -> LoadResult:
    """Fill a fresh process's anonymous mappings with the dump through the loader, timed.

    The restoring process is a child (`python -m snapstore.gpu.load`), because the loader
    kills its client when it fails rather than leave it hanging. The time runs from the
    handshake until every data page has been touched (installed); the byte check against the
    page space comes after it and is not timed.
    """
    hot = data_pages(dump)
    write_hot_list(hot, workdir / "hot.txt")
    sock = workdir / "loader.sock"
    stats_path = workdir / "loader-stats.json"
    log_path = workdir / "loader.log"
    opts = loader.LoaderOptions(image=dump.pages_paths, socket=sock, hot=workdir / "hot.txt",
                                stats_json=stats_path, direct=direct)
    with log_path.open("wb") as log:
        proc = loader.start(opts, stderr=log)
    client = subprocess.run(
        [sys.executable, "-m", "snapstore.gpu.load", str(dump.directory), str(sock),
         "1" if verify else "0"],
        capture_output=True, text=True, check=False)
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    if status != 0 or client.returncode != 0:
        why = log_path.read_text(errors="replace").strip().splitlines()
        err = client.stderr.strip().splitlines()
        raise SnapstoreError(
            f"load failed: loader exit {status} ({why[-1] if why else 'no message'}), "
            f"client exit {client.returncode} ({err[-1] if err else 'no message'})")
    report = json.loads(client.stdout)
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return LoadResult(dump.pages_size, int(hot.size) * PAGE, int(report["mappings"]),
                      float(report["seconds"]), bool(report["verified"]), stats)


def run_client(dump: Dump, sock: Path, verify: bool) -> dict[str, Any]:
    """The restoring process's side of `load`: map, touch every data page, check."""
    layout = mappings(dump)
    hot = data_pages(dump)
    client = Client(sock, layout)
    try:
        t = time.perf_counter()
        client.connect()
        _touch(client, layout, hot)
        seconds = time.perf_counter() - t
        if verify:
            _verify(client, dump)
    finally:
        client.close()
    return {"mappings": len(layout), "seconds": seconds, "verified": verify}


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
    return loader.run(loader.LoaderOptions(image=dump.pages_paths, socket=socket, hot=hot,
                                           direct=direct))


if __name__ == "__main__":
    try:
        doc = run_client(read_dump(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3] == "1")
    except SnapstoreError as e:
        print(f"snapstore: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(doc))
