"""Loader processes: chunks come back checked and sealed, and no failure hangs a load."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.store.chunk_loader import LoaderError, LoaderPool, ProcessChunkReader, _Mapper
from snapstore.store.chunk_loader_worker import sealed_memfd
from snapstore.store.local import LocalStore
from tests.conftest import alive, chunk_loader_pids, wait_until
from tests.test_fuse_ops import PARAMS


def chunks(store: LocalStore, image_dir: Path) -> dict[ChunkId, int]:
    m = store.get_manifest(ingest(store, image_dir, "t", params=PARAMS).snapshot)
    return m.chunk_sizes()


async def test_every_chunk_comes_back_checked_and_read_only(
    store: LocalStore, image_dir: Path
) -> None:
    sizes = chunks(store, image_dir)
    got: dict[ChunkId, bytes] = {}

    async def load(reader: ProcessChunkReader, cid: ChunkId) -> None:
        data = await reader.read_chunk(cid, sizes[cid])
        assert isinstance(data, mmap.mmap)
        with pytest.raises(TypeError):
            data[0] = 0
        got[cid] = bytes(data)

    async with ProcessChunkReader(store, 3) as reader, trio.open_nursery() as n:
        for cid in sizes:
            n.start_soon(load, reader, cid)
    assert len(got) == len(sizes) > 20
    for cid, data in got.items():
        assert data == store.get_chunk(cid, sizes[cid])


async def test_bad_chunks_raise_and_the_loader_goes_on(store: LocalStore, image_dir: Path) -> None:
    sizes = chunks(store, image_dir)
    corrupt, missing, good = list(sizes)[:3]
    path = store.chunk_path(corrupt)
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    store.chunk_path(missing).unlink()
    async with ProcessChunkReader(store, 1) as reader:
        pid = reader.pids[0]
        with pytest.raises(CorruptError, match=corrupt.hex):
            await reader.read_chunk(corrupt, sizes[corrupt])
        with pytest.raises(NotFoundError, match=missing.hex):
            await reader.read_chunk(missing, sizes[missing])
        with pytest.raises(CorruptError):
            await reader.read_chunk(good, sizes[good] + 1)
        assert bytes(await reader.read_chunk(good, sizes[good])) == store.get_chunk(
            good, sizes[good])
        assert reader.pids == [pid]


async def test_a_killed_loader_fails_its_load_and_is_replaced(
    store: LocalStore, image_dir: Path
) -> None:
    sizes = chunks(store, image_dir)
    a, b = list(sizes)[:2]
    async with ProcessChunkReader(store, 1) as reader:
        first = reader.pids[0]
        # Stopped, the loader cannot answer; killed, its load must fail, not hang.
        os.kill(first, signal.SIGSTOP)
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, _kill_soon, first)
            with pytest.raises(LoaderError, match=r"died \(killed by signal 9\)"):
                await reader.read_chunk(a, sizes[a])
        assert bytes(await reader.read_chunk(b, sizes[b])) == store.get_chunk(b, sizes[b])
        second = reader.pids[0]
        assert second != first
        os.kill(second, signal.SIGKILL)
        while alive(second):
            await trio.sleep(0.01)
        # Dead while idle: the next load starts a new loader and succeeds.
        assert bytes(await reader.read_chunk(a, sizes[a])) == store.get_chunk(a, sizes[a])
        assert reader.pids[0] not in (first, second)


async def test_a_forked_loader_that_died_is_replaced(store: LocalStore, image_dir: Path) -> None:
    sizes = chunks(store, image_dir)
    pairs = list(sizes.items())[:6]

    async def load_all(reader: ProcessChunkReader) -> None:
        got: dict[ChunkId, bytes] = {}

        async def one(cid: ChunkId, size: int) -> None:
            got[cid] = bytes(await reader.read_chunk(cid, size))

        async with trio.open_nursery() as n:
            for cid, size in pairs:
                n.start_soon(one, cid, size)
        assert got == {cid: store.get_chunk(cid, size) for cid, size in pairs}

    async with ProcessChunkReader(store, 2) as reader:
        # A mount with many chunks mapped holds descriptors past select's FD_SETSIZE;
        # the replacement's pidfd is one of them.
        held = [os.dup(0) for _ in range(1100)]
        await load_all(reader)
        first, forked = reader.pids
        # The second loader is the first one's child, not this process's.
        assert Path(f"/proc/{forked}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(first)
        os.kill(forked, signal.SIGKILL)
        while alive(forked):
            await trio.sleep(0.01)
        await load_all(reader)
        assert len(reader.pids) == 2 and forked not in reader.pids
        assert max(loader.pidfd or 0 for loader in reader._started) > 1024
        for fd in held:
            os.close(fd)


def _kill_soon(pid: int) -> None:
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


async def test_a_cancelled_load_leaves_no_stale_reply(store: LocalStore, image_dir: Path) -> None:
    sizes = chunks(store, image_dir)
    a, b = list(sizes)[:2]
    async with ProcessChunkReader(store, 1) as reader:
        pid = reader.pids[0]
        os.kill(pid, signal.SIGSTOP)
        with trio.move_on_after(0.2) as scope:
            await reader.read_chunk(a, sizes[a])
        assert scope.cancelled_caught
        os.kill(pid, signal.SIGCONT)
        # The loader answers `a` now; the load of `b` must skip that answer.
        assert bytes(await reader.read_chunk(b, sizes[b])) == store.get_chunk(b, sizes[b])
        assert bytes(await reader.read_chunk(a, sizes[a])) == store.get_chunk(a, sizes[a])


async def test_a_loader_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    store = LocalStore.open(tmp_path / "store")
    (store.root / "config.json").write_text('{"format": "other"}')
    reader = ProcessChunkReader(store, 2)
    with pytest.raises(LoaderError, match=r"did not start \(exit status 1\)"):
        await reader.__aenter__()
    assert reader.pids == []


def test_loaders_exit_when_the_mount_process_dies(store: LocalStore, image_dir: Path) -> None:
    sizes = chunks(store, image_dir)
    script = (
        "import sys, trio\n"
        "from pathlib import Path\n"
        "from snapstore.ids import ChunkId\n"
        "from snapstore.store.local import LocalStore\n"
        "from snapstore.store.chunk_loader import ProcessChunkReader\n"
        "async def main():\n"
        "    async with ProcessChunkReader(LocalStore.open(Path(sys.argv[1])), 2) as r:\n"
        "        async with trio.open_nursery() as n:\n"
        "            for arg in sys.argv[2:]:\n"
        "                cid, size = arg.split(':')\n"
        "                n.start_soon(r.read_chunk, ChunkId.parse(cid), int(size))\n"
        "        print(*r.pids, flush=True)\n"
        "        await trio.sleep_forever()\n"
        "trio.run(main)\n"
    )
    args = [f"{cid.hex}:{size}" for cid, size in list(sizes.items())[:4]]
    with subprocess.Popen([sys.executable, "-c", script, str(store.root), *args],
                          stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
        finally:
            parent.kill()
    assert len(pids) == 2
    wait_until(lambda: not any(alive(p) for p in pids), "the loaders to exit")


async def test_mappings_past_the_budget_become_bytes(store: LocalStore, image_dir: Path) -> None:
    sizes = chunks(store, image_dir)
    a, b = list(sizes)[:2]
    async with ProcessChunkReader(store, 1, max_mapped=1) as reader:
        first = await reader.read_chunk(a, sizes[a])
        assert isinstance(first, mmap.mmap)
        second = await reader.read_chunk(b, sizes[b])
        assert isinstance(second, bytes) and second == store.get_chunk(b, sizes[b])
        del first
        gc.collect()
        assert isinstance(await reader.read_chunk(b, sizes[b]), mmap.mmap)


def test_the_mapper_refuses_unsealed_or_misfit_memfds() -> None:
    mapper = _Mapper(10)
    unsealed = os.memfd_create("t")
    sealed = sealed_memfd(b"x" * 5000)
    try:
        os.write(unsealed, b"x" * 5000)
        with pytest.raises(LoaderError, match="unsealed"):
            mapper.map(unsealed, 5000)
        with pytest.raises(LoaderError, match="4999"):
            mapper.map(sealed, 4999)
        assert bytes(mapper.map(sealed, 5000)) == b"x" * 5000
        with pytest.raises(PermissionError):
            os.write(sealed, b"y")
    finally:
        os.close(unsealed)
        os.close(sealed)


def _pool_load(pool: LoaderPool, cid: ChunkId, size: int) -> int | SnapstoreError:
    """One load through `pool`, waited for: the memfd (closed here: its size is returned)
    or the error."""
    r, w = os.pipe()
    try:
        deadline = time.monotonic() + 60
        while not pool.free():
            assert time.monotonic() < deadline, "no loader started"
            pool.wait(r)
        pool.submit(0, cid, size)
        ended: list[tuple[int, int | SnapstoreError]] = []
        while not ended:
            _, ended = pool.wait(r)
    finally:
        os.close(r)
        os.close(w)
    result = ended[0][1]
    if isinstance(result, int):
        got = os.fstat(result).st_size
        os.close(result)
        return got
    return result


def test_pool_loaders_killed_before_they_started_are_replaced(
        store: LocalStore, image_dir: Path) -> None:
    # Killed as soon as both processes exist, mostly before they say they started (the
    # first forks the second, then each says so): the pool starts others, and loads.
    cid, size = next(iter(chunks(store, image_dir).items()))
    for _ in range(3):
        with LoaderPool(store.root, 2) as pool:
            deadline = time.monotonic() + 30
            while len(pids := chunk_loader_pids(store.root)) < 2:
                assert time.monotonic() < deadline
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            assert _pool_load(pool, cid, size) == size


def test_a_pool_whose_loaders_cannot_start_fails(tmp_path: Path) -> None:
    store = LocalStore.open(tmp_path / "store")
    (store.root / "config.json").write_text('{"format": "other"}')
    with LoaderPool(store.root, 2) as pool, \
            pytest.raises(LoaderError, match=r"did not start \(exit status 1\)"):
        _pool_load(pool, ChunkId.of(b"x"), 1)
