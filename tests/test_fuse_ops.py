"""The FUSE layer without a mount: Operations methods, the chunk cache and read-ahead."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio
import trio.testing

from fusefs.inodes import ROOT_INODE, InodeTable
from fusefs.ops import SnapshotOps
from fusefs.reader import ChunkCache, ChunkError, MountStats, SnapshotReader
from snapstore.chunker_params import ChunkerParams
from snapstore.export import export
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.manifest import Manifest, prefetch_order
from snapstore.store.base import Chunk, ChunkReader
from snapstore.store.chunk_loader import ProcessChunkReader
from snapstore.store.local import LocalStore
from tests.conftest import memory_like
from tests.test_statefile import make_statefile

# Small chunks, so that small files cross many chunk boundaries and holes.
PARAMS = ChunkerParams(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10)
CTX = pyfuse3.RequestContext()


class CountingReader:
    """A ChunkReader that counts loads per chunk and can hold them until released."""

    def __init__(self, inner: ChunkReader) -> None:
        self.inner = inner
        self.loads: dict[ChunkId, int] = {}
        self.gate = trio.Event()
        self.gate.set()

    async def read_chunk(self, cid: ChunkId, size: int) -> Chunk:
        self.loads[cid] = self.loads.get(cid, 0) + 1
        await self.gate.wait()
        return await self.inner.read_chunk(cid, size)


class Fs:
    """One snapshot's Operations over a counting reader, plus what tests look at."""

    def __init__(
        self, store: LocalStore, m: Manifest, src: Path, nursery: trio.Nursery,
        loader: ChunkReader, cache_bytes: int = 64 << 20,
    ) -> None:
        self.store = store
        self.manifest = m
        self.src = src
        self.stats = MountStats()
        self.reader = CountingReader(loader)
        self.cache = ChunkCache(self.reader, cache_bytes, self.stats)
        self.table = InodeTable(m)
        self.ops = SnapshotOps(
            self.table, SnapshotReader(self.cache, self.stats, nursery, read_ahead_bytes=256 << 10))

    async def inode(self, path: str) -> int:
        inode = ROOT_INODE
        for part in path.split("/"):
            inode = (await self.ops.lookup(inode, os.fsencode(part), CTX)).st_ino
        return inode

    async def open(self, path: str) -> int:
        return (await self.ops.open(await self.inode(path), os.O_RDONLY, CTX)).fh

    def chunks_of(self, path: str) -> list[ChunkId]:
        entry = next(e for e in self.manifest.entries if e.path == path)
        return [x.chunk for x in entry.extents if x.chunk is not None]


@contextlib.asynccontextmanager
async def open_fs(
    store: LocalStore, m: Manifest, src: Path, cache_bytes: int = 64 << 20
) -> AsyncIterator[Fs]:
    """An Fs over real loader processes, with a nursery for its prefetches."""
    async with ProcessChunkReader(store, 2) as loader, trio.open_nursery() as nursery:
        yield Fs(store, m, src, nursery, loader, cache_bytes)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def fs(store: LocalStore, image_dir: Path) -> AsyncIterator[Fs]:
    r = ingest(store, image_dir, "t", params=PARAMS)
    async with open_fs(store, store.get_manifest(r.snapshot), image_dir) as fs:
        yield fs


async def test_lookup_and_getattr_match_the_source(fs: Fs) -> None:
    for rel in ("checkpoint.img", "sub", "sub/pages.img", "empty", "link", "sparse.img"):
        st = (fs.src / rel).lstat()
        a = await fs.ops.getattr(await fs.inode(rel), CTX)
        assert a.st_mode == st.st_mode, rel
        assert a.st_mtime_ns == st.st_mtime_ns, rel
        if not stat.S_ISDIR(st.st_mode):
            assert a.st_size == st.st_size, rel
        assert a.st_nlink == (3 if rel == "sub" else 1)
        assert a.entry_timeout >= 3600
    sparse = await fs.ops.getattr(await fs.inode("sparse.img"), CTX)
    assert sparse.st_blocks == 0
    full = await fs.ops.getattr(await fs.inode("checkpoint.img"), CTX)
    assert 0 < full.st_blocks * 512 <= full.st_size + 511
    root = await fs.ops.getattr(ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and root.st_nlink == 3


async def test_lookup_of_a_missing_name_is_enoent(fs: Fs) -> None:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.ops.lookup(ROOT_INODE, b"nope", CTX)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.ops.lookup(await fs.inode("checkpoint.img"), b"x", CTX)
    assert e.value.errno == errno.ENOTDIR
    assert (await fs.ops.lookup(await fs.inode("sub"), b"..", CTX)).st_ino == ROOT_INODE


async def test_readdir_lists_every_entry_and_resumes(
    fs: Fs, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[tuple[bytes, int]] = []
    room = [3]

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        listed.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await fs.ops.opendir(ROOT_INODE, CTX)
    token = cast(pyfuse3.ReaddirToken, None)
    await fs.ops.readdir(fh, 0, token)
    room[0] = 100
    await fs.ops.readdir(fh, listed[-1][1], token)
    await fs.ops.releasedir(fh)
    assert sorted(n.decode() for n, _ in listed) == sorted(os.listdir(fs.src))


async def test_readlink(fs: Fs) -> None:
    assert await fs.ops.readlink(await fs.inode("link"), CTX) == b"sub/pages.img"
    assert await fs.ops.readlink(await fs.inode("dangling"), CTX) == b"/nonexistent/target"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await fs.ops.readlink(await fs.inode("empty"), CTX)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("path", ["checkpoint.img", "sub/pages.img", "sparse.img", "empty"])
async def test_sequential_reads_return_the_file(fs: Fs, path: str) -> None:
    fh = await fs.open(path)
    want = (fs.src / path).read_bytes()
    got = bytearray()
    while True:
        piece = await fs.ops.read(fh, len(got), 100_000)
        if not piece:
            break
        got += piece
    await fs.ops.release(fh)
    assert bytes(got) == want


async def test_reads_at_any_offset_and_size(fs: Fs) -> None:
    want = (fs.src / "checkpoint.img").read_bytes()
    entry = next(e for e in fs.manifest.entries if e.path == "checkpoint.img")
    assert entry.hole_bytes > 0 and entry.chunk_count > 10
    fh = await fs.open("checkpoint.img")
    rng = random.Random(3)
    # Every extent boundary, then random ranges, then past the end.
    edges = [0]
    for x in entry.extents:
        edges.append(edges[-1] + x.size)
    cases = [(max(0, b - 7), 14) for b in edges]
    cases += [(rng.randrange(len(want)), rng.choice([1, 4096, 65536, 1 << 20, 3 << 20]))
              for _ in range(200)]
    cases += [(len(want) - 5, 100), (len(want), 10), (len(want) + 4096, 10)]
    for off, size in cases:
        assert bytes(await fs.ops.read(fh, off, size)) == want[off:off + size], (off, size)


async def test_a_bad_chunk_fails_its_reads_only(
    fs: Fs, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, missing = list(dict.fromkeys(fs.chunks_of("checkpoint.img")))[2:4]
    shared = set(fs.chunks_of("sub/pages.img")) & {corrupt, missing}
    assert not shared
    path = fs.store.chunk_path(corrupt)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    fs.store.chunk_path(missing).unlink()
    entry = next(e for e in fs.manifest.entries if e.path == "checkpoint.img")
    starts: dict[ChunkId | None, int] = {}
    pos = 0
    for x in entry.extents:
        starts.setdefault(x.chunk, pos)
        pos += x.size
    fh = await fs.open("checkpoint.img")
    for cid in (corrupt, missing):
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await fs.ops.read(fh, starts[cid], 4096)
            assert e.value.errno == errno.EIO
    assert corrupt.hex in caplog.text and "checkpoint.img" in caplog.text
    assert fs.stats.read_errors == 4
    # The rest of the file and the other files still read.
    want = (fs.src / "checkpoint.img").read_bytes()
    assert bytes(await fs.ops.read(fh, 0, 4096)) == want[:4096]
    other = await fs.open("sub/pages.img")
    pages = (fs.src / "sub/pages.img").read_bytes()
    assert bytes(await fs.ops.read(other, 0, 1 << 20)) == pages[: 1 << 20]


async def test_concurrent_readers_of_one_chunk_share_one_load(fs: Fs) -> None:
    cid = fs.chunks_of("sub/pages.img")[1]
    entry = next(e for e in fs.manifest.entries if e.path == "sub/pages.img")
    off = next(sum(x.size for x in entry.extents[:i]) for i, x in enumerate(entry.extents)
               if x.chunk == cid)
    want = (fs.src / "sub/pages.img").read_bytes()[off:off + 1000]
    fs.reader.gate = trio.Event()
    results: list[bytes] = []

    async def reader() -> None:
        fh = await fs.open("sub/pages.img")
        results.append(bytes(await fs.ops.read(fh, off, 1000)))

    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        fs.reader.gate.set()
    assert results == [want] * 50
    assert fs.reader.loads[cid] == 1
    assert fs.stats.coalesced == 49


async def test_32_concurrent_random_readers_get_the_right_bytes(fs: Fs) -> None:
    files = {p: (fs.src / p).read_bytes() for p in ("checkpoint.img", "sub/pages.img")}

    async def reader(seed: int) -> None:
        rng = random.Random(seed)
        path = rng.choice(list(files))
        fh = await fs.open(path)
        for _ in range(20):
            off, size = rng.randrange(len(files[path])), rng.randrange(1, 300_000)
            assert bytes(await fs.ops.read(fh, off, size)) == files[path][off:off + size]

    async with trio.open_nursery() as n:
        for seed in range(32):
            n.start_soon(reader, seed)
    assert all(count == 1 for count in fs.reader.loads.values())


async def test_the_cache_stays_within_its_byte_bound(store: LocalStore, image_dir: Path) -> None:
    r = ingest(store, image_dir, "t", params=PARAMS)
    async with open_fs(store, store.get_manifest(r.snapshot), image_dir, 300_000) as fs:
        fh = await fs.open("checkpoint.img")
        size = (fs.src / "checkpoint.img").stat().st_size
        for off in range(0, size, 128 << 10):
            await fs.ops.read(fh, off, 128 << 10)
            assert fs.stats.cache_bytes <= 300_000


async def test_sequential_reads_prefetch_and_record_the_access_order(fs: Fs) -> None:
    fh = await fs.open("checkpoint.img")
    await fs.ops.read(fh, 0, 4096)
    await trio.testing.wait_all_tasks_blocked()
    assert fs.stats.prefetches > 0
    loaded_ahead = fs.stats.chunk_loads
    await fs.ops.read(fh, 4096, 4096)
    assert fs.stats.chunk_loads >= loaded_ahead
    chunks = fs.chunks_of("checkpoint.img")
    assert fs.cache.access_order == list(dict.fromkeys(chunks))[: len(fs.cache.access_order)]


async def test_read_ahead_within_a_small_cache_loads_each_chunk_once(
    store: LocalStore, tmp_path: Path
) -> None:
    """A cache smaller than the read-ahead window: what is read ahead must still be there
    when the read comes, so a sequential read of a file without repeated chunks loads
    every chunk once. Reads wait for the prefetches they started."""
    src = tmp_path / "random"
    src.mkdir()
    path = "checkpoint.img"
    want = random.Random(3).randbytes(4 << 20)
    (src / path).write_bytes(want)
    r = ingest(store, src, "t", params=PARAMS)
    async with open_fs(store, store.get_manifest(r.snapshot), src, 400_000) as fs:
        fh = await fs.open(path)
        for off in range(0, len(want), 64 << 10):
            assert bytes(await fs.ops.read(fh, off, 64 << 10)) == want[off:off + (64 << 10)]
            await trio.testing.wait_all_tasks_blocked()
        assert fs.stats.prefetches > 0
        assert max(fs.reader.loads.values()) == 1, fs.reader.loads


async def test_read_ahead_abandoned_by_a_closed_or_jumping_stream_is_given_up(
    store: LocalStore, tmp_path: Path
) -> None:
    """What a stream read ahead and never read must not keep its room in the cache: a
    sequential read after a stream read a little and closed, or jumped elsewhere,
    reads ahead exactly as much as in a fresh cache."""
    src = tmp_path / "random"
    src.mkdir()
    rng = random.Random(4)
    for name in ("a.img", "b.img"):
        (src / name).write_bytes(rng.randbytes(2 << 20))
    m = store.get_manifest(ingest(store, src, "t", params=PARAMS).snapshot)

    async def prefetches_of_b(fs: Fs) -> int:
        before = fs.stats.prefetches
        fh = await fs.open("b.img")
        for off in range(0, 1 << 20, 64 << 10):
            await fs.ops.read(fh, off, 64 << 10)
            await trio.testing.wait_all_tasks_blocked()
        await fs.ops.release(fh)
        return fs.stats.prefetches - before

    async with open_fs(store, m, src, 400_000) as fs:
        fresh = await prefetches_of_b(fs)
    assert fresh > 0
    async with open_fs(store, m, src, 400_000) as fs:
        fh = await fs.open("a.img")
        await fs.ops.read(fh, 0, 64 << 10)
        await trio.testing.wait_all_tasks_blocked()
        await fs.ops.release(fh)
        assert await prefetches_of_b(fs) == fresh
    async with open_fs(store, m, src, 400_000) as fs:
        fh = await fs.open("a.img")
        await fs.ops.read(fh, 0, 64 << 10)
        await trio.testing.wait_all_tasks_blocked()
        await fs.ops.read(fh, 1900 << 10, 4096)
        assert await prefetches_of_b(fs) == fresh


async def test_random_reads_do_not_prefetch(fs: Fs) -> None:
    fh = await fs.open("checkpoint.img")
    await fs.ops.read(fh, 3 << 20, 4096)
    await fs.ops.read(fh, 1 << 20, 4096)
    await trio.testing.wait_all_tasks_blocked()
    assert fs.stats.prefetches == 0


async def test_a_cancelled_load_does_not_strand_its_waiters(fs: Fs) -> None:
    cid = fs.chunks_of("checkpoint.img")[0]
    size = fs.manifest.chunk_sizes()[cid]
    fs.reader.gate = trio.Event()
    loader_scope = trio.CancelScope()
    got: list[Chunk] = []

    async def loader() -> None:
        with loader_scope:
            await fs.cache.get(cid, size)

    async def waiter() -> None:
        got.append(await fs.cache.get(cid, size))

    async with trio.open_nursery() as n:
        n.start_soon(loader)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        loader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        fs.reader.gate.set()
    assert len(got) == 1 and len(got[0]) == size
    assert fs.reader.loads[cid] == 2


async def test_chunk_errors_name_the_chunk(fs: Fs) -> None:
    cid = fs.chunks_of("checkpoint.img")[0]
    fs.store.chunk_path(cid).unlink()
    with pytest.raises(ChunkError) as e:
        await fs.cache.get(cid, fs.manifest.chunk_sizes()[cid])
    assert cid.hex in str(e.value)
    assert fs.stats.load_errors == 1


async def test_a_transcoded_statefile_reads_as_its_presented_form(
    store: LocalStore, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "checkpoint.img").write_bytes(make_statefile(memory_like(3 << 20, seed=5)))
    m = store.get_manifest(ingest(store, src, "sf", params=PARAMS).snapshot)
    assert m.entries[0].form == "transcoded"
    export(store, m, tmp_path / "exported")
    want = (tmp_path / "exported" / "checkpoint.img").read_bytes()
    async with open_fs(store, m, src) as fs:
        assert (await fs.ops.getattr(await fs.inode("checkpoint.img"), CTX)).st_size == len(want)
        fh = await fs.open("checkpoint.img")
        got = bytearray()
        while piece := await fs.ops.read(fh, len(got), 131072):
            got += piece
        assert bytes(got) == want
        rng = random.Random(1)
        for _ in range(200):
            off, size = rng.randrange(len(want)), rng.choice([1, 7, 4096, 70_000, 1 << 20])
            assert bytes(await fs.ops.read(fh, off, size)) == want[off:off + size], (off, size)


async def test_warming_loads_ahead_within_capacity_without_recording(
    store: LocalStore, image_dir: Path
) -> None:
    m = store.get_manifest(ingest(store, image_dir, "t", params=PARAMS).snapshot)
    order = prefetch_order(m, [])
    sizes = [size for _, size in order]
    capacity = sum(sizes) // 2
    async with open_fs(store, m, image_dir, capacity) as fs:
        await fs.cache.warm(order)
        fitting = 0
        while fitting < len(sizes) and sum(sizes[: fitting + 1]) <= capacity:
            fitting += 1
        assert sorted(fs.reader.loads) == sorted(cid for cid, _ in order[:fitting])
        assert fs.cache.access_order == []
        entry = next(e for e in m.files() if e.path == "checkpoint.img")
        at = 0
        for x in entry.extents:
            if x.chunk is not None:
                break
            at += x.size
        fh = await fs.open("checkpoint.img")
        want = (image_dir / "checkpoint.img").read_bytes()
        assert await fs.ops.read(fh, at, 4096) == want[at : at + 4096]
        assert fs.stats.cache_hits == 1 and fs.cache.access_order == [x.chunk]
