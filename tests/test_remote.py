"""Remote layer: push, pull, lazy reads, remote gc and ls against a moto server, with faults."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusefs.reader import prefetch_order
from snapstore import cli
from snapstore.errors import CorruptError, SnapstoreError, UsageError
from snapstore.export import export
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.remote.gc import remote_gc
from snapstore.remote.reader import PriorityLimiter, RemoteChunkReader, open_remote_snapshot
from snapstore.remote.transfer import pull, push, remote_missing
from snapstore.remote.url import RemoteURL
from snapstore.store.local import LocalStore
from snapstore.store.s3 import RemoteAccessError, S3Store, chunk_key, open_s3, tag_key
from snapstore.verify import verify
from tests.conftest import memory_like
from tests.s3proxy import FaultProxy, free_port, make_bucket, moto_server, s3_env

_buckets = itertools.count()


@pytest.fixture(scope="session")
def moto_port() -> Iterator[int]:
    with moto_server() as port:
        yield port


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def proxy(moto_port: int) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_port)
    yield p
    p.close()


@pytest.fixture
def remote(moto_port: int) -> str:
    name = f"bucket-{os.getpid()}-{next(_buckets)}"
    make_bucket(moto_port, name)
    return f"s3://{name}/snaps"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    d = tmp_path / "image"
    (d / "sub").mkdir(parents=True)
    (d / "checkpoint.img").write_bytes(memory_like(12 << 20, seed=11))
    (d / "sub" / "pages.img").write_bytes(memory_like(3 << 20, seed=12) + b"tail")
    (d / "note.txt").write_text("hello\n")
    return d


@pytest.fixture
def loaded(store: LocalStore, source: Path) -> LocalStore:
    ingest(store, source, "t1")
    return store


@asynccontextmanager
async def s3_at(endpoint: str, remote: str) -> AsyncIterator[S3Store]:
    async with open_s3(RemoteURL.parse(remote), endpoint) as s3:
        yield s3


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*"))
    for rel in files_a:
        if (a / rel).is_file():
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def check_store(store: LocalStore) -> None:
    report = verify(store, store.tags())
    assert not report.problems


# -- urls ------------------------------------------------------------------------------


def test_url_parse() -> None:
    assert RemoteURL.parse("s3://my-bucket") == RemoteURL("my-bucket", "")
    u = RemoteURL.parse("s3://my.bucket/a/b/")
    assert (u.prefix, u.key("chunks/ab/cd"), str(u)) == ("a/b", "a/b/chunks/ab/cd",
                                                         "s3://my.bucket/a/b")
    for bad in ("http://b/x", "s3://", "s3://Bad_Bucket", "s3://b", "s3://bk/../x",
                "s3://bkt/a/./b", "bucket/x", "s3://bkt/a b"):
        with pytest.raises(UsageError):
            RemoteURL.parse(bad)


# -- push and pull ---------------------------------------------------------------------


async def test_push_pull_roundtrip(moto_port: int, remote: str, loaded: LocalStore,
                                   source: Path, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{moto_port}"
    async with s3_at(endpoint, remote) as s3:
        r = await push(loaded, "t1", s3)
        assert r.tag_status == "created" and r.chunks_sent == r.chunks > 0
        again = await push(loaded, "t1", s3)
        assert (again.chunks_sent, again.tag_status) == (0, "unchanged")
        other = LocalStore.open(tmp_path / "other")
        p = await pull(other, "t1", s3)
        assert p.chunks_sent == r.chunks and other.get_tag("t1") == r.snapshot
        assert (await pull(other, "t1", s3)).chunks_sent == 0
    check_store(other)
    export(other, other.get_manifest(r.snapshot), tmp_path / "out")
    same_tree(source, tmp_path / "out")


async def test_missing_by_head_and_list_agree(moto_port: int, remote: str,
                                              loaded: LocalStore) -> None:
    m = loaded.get_manifest(loaded.resolve("t1"))
    cids = sorted(m.chunk_ids())
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await s3.put(chunk_key(cids[0]), loaded.get_chunk_object(cids[0]))
        by_head = await remote_missing(s3, cids, 4, "head")
        by_list = await remote_missing(s3, cids, 4, "list")
    assert by_head == by_list == set(cids[1:])


async def test_tag_conflict_and_force(moto_port: int, remote: str, loaded: LocalStore,
                                      tmp_path: Path) -> None:
    (tmp_path / "img2").mkdir()
    (tmp_path / "img2" / "f").write_bytes(b"other data" * 1000)
    other = LocalStore.open(tmp_path / "other")
    ingest(other, tmp_path / "img2", "t1")
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        with pytest.raises(SnapstoreError, match="already points at"):
            await push(other, "t1", s3)
        assert (await s3.get(tag_key("t1"))).decode().strip() == loaded.resolve("t1").hex
        r = await push(other, "t1", s3, force=True)
        assert r.tag_status == "set"
        # Pull refuses to move a local tag that names another snapshot, unless forced.
        with pytest.raises(SnapstoreError, match="local tag"):
            await pull(loaded, "t1", s3)
        await pull(loaded, "t1", s3, force=True)
    assert loaded.get_tag("t1") == other.get_tag("t1")


async def test_two_hosts_race_for_one_tag(moto_port: int, remote: str, loaded: LocalStore,
                                          tmp_path: Path) -> None:
    (tmp_path / "img2").mkdir()
    (tmp_path / "img2" / "f").write_bytes(b"second host" * 1000)
    other = LocalStore.open(tmp_path / "other")
    ingest(other, tmp_path / "img2", "t1")
    outcomes: list[str] = []

    async def one(store: LocalStore) -> None:
        async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
            try:
                outcomes.append((await push(store, "t1", s3)).tag_status)
            except SnapstoreError:
                outcomes.append("refused")

    async with trio.open_nursery() as n:
        n.start_soon(one, loaded)
        n.start_soon(one, other)
    assert sorted(outcomes) == ["created", "refused"]


async def test_push_never_sends_a_corrupt_chunk(moto_port: int, remote: str,
                                                loaded: LocalStore) -> None:
    cid = sorted(loaded.get_manifest(loaded.resolve("t1")).chunk_ids())[0]
    path = loaded.chunk_path(cid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        with pytest.raises(CorruptError, match="not pushed"):
            await push(loaded, "t1", s3)
        assert await s3.head(chunk_key(cid)) is None
        assert await s3.head(tag_key("t1")) is None


# -- faults ----------------------------------------------------------------------------


async def test_push_and_pull_survive_transient_faults(proxy: FaultProxy, remote: str,
                                                      loaded: LocalStore, source: Path,
                                                      tmp_path: Path) -> None:
    for kind in ("500", "503", "reset", "slow"):
        proxy.inject(kind, "PUT", "/chunks/", times=2)
    async with s3_at(proxy.endpoint, remote) as s3:
        r = await push(loaded, "t1", s3, jobs=4)
    assert proxy.injected == {"500": 2, "503": 2, "reset": 2, "slow": 2}
    for kind in ("500", "503", "reset", "slow", "flip"):
        proxy.inject(kind, "GET", "/chunks/", times=2)
    other = LocalStore.open(tmp_path / "other")
    async with s3_at(proxy.endpoint, remote) as s3:
        p = await pull(other, "t1", s3, jobs=4)
    assert p.chunks_sent == r.chunks
    assert proxy.injected["flip"] == 2 and proxy.injected["reset"] == 4
    check_store(other)
    export(other, other.get_manifest(r.snapshot), tmp_path / "out")
    same_tree(source, tmp_path / "out")


async def test_pull_of_a_bad_remote_chunk_fails_and_stores_nothing_wrong(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3)
        proxy.inject("flip", "GET", "/chunks/", times=-1)
        other = LocalStore.open(tmp_path / "other")
        with pytest.raises(CorruptError, match="checksum"):
            await pull(other, "t1", s3, jobs=2)
        assert other.get_tag("t1") is None and not other.manifest_ids()
        assert list(other.iter_chunks()) == []
        # A bad object stored in the bucket (its S3 checksum matches): our hash check.
        proxy.clear()
        cid = sorted(loaded.get_manifest(loaded.resolve("t1")).chunk_ids())[0]
        await s3.put(chunk_key(cid), loaded.get_chunk_object(cid)[:-1] + b"x")
        with pytest.raises(CorruptError, match="failed its check 3 times"):
            await pull(other, "t1", s3, jobs=2)
    assert other.get_tag("t1") is None and not other.has_chunk(cid)
    check_store(other)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fails_fast_with_one_line(proxy: FaultProxy, remote: str, loaded: LocalStore,
                                      moto_port: int,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--store", str(loaded.root)]
    cases = [
        (["--endpoint-url", f"http://127.0.0.1:{free_port()}"], remote, "cannot reach"),
        (["--endpoint-url", f"http://127.0.0.1:{moto_port}"], "s3://no-such-bucket-x",
         "does not exist"),
        (["--endpoint-url", proxy.endpoint], remote, "denied"),
    ]
    proxy.inject("403", times=-1)
    for opts, where, message in cases:
        start = time.monotonic()
        code, out, err = _cli([*base, "push", "t1", where, *opts], capsys)
        assert code == 1 and out == "", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err and "testing-secret-key" not in err
        assert time.monotonic() - start < 30
    code, _, err = _cli([*base, "push", "t1", "ftp://x"], capsys)
    assert code == 2 and "s3://BUCKET" in err


def test_cli_push_ls_pull_gc(moto_port: int, remote: str, loaded: LocalStore,
                             tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    code, out, err = _cli(["--store", str(loaded.root), "push", "t1", remote, "--json"], capsys)
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["tag_status"] == "created"
    code, out, _ = _cli(["remote", "ls", remote, "--json"], capsys)
    doc = json.loads(out)
    assert doc["tags"] == {"t1": pushed["snapshot"]}
    [snap] = doc["snapshots"]
    assert snap["chunks"] == pushed["chunks"] and snap["missing_chunks"] == 0
    assert snap["stored_bytes"] == pushed["bytes_sent"] == doc["stored_bytes"]
    assert "testing" not in out
    other = tmp_path / "other"
    code, out, err = _cli(["--store", str(other), "pull", "t1", remote], capsys)
    assert code == 0 and out.strip() == pushed["snapshot"], err
    code, out, _ = _cli(["--store", str(other), "verify"], capsys)
    assert code == 0
    code, out, err = _cli(["gc", "--remote", remote, "--grace", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["deleted_chunks"] == 0


def test_killed_push_resumes_with_only_the_missing_chunks(
        proxy: FaultProxy, remote: str, loaded: LocalStore) -> None:
    total = len(loaded.get_manifest(loaded.resolve("t1")).chunk_ids())
    # Slow uploads, one at a time, so the kill lands mid-way.
    proxy.inject("slow", "PUT", "/chunks/", times=-1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "snapstore", "--store", str(loaded.root), "push", "t1",
           remote, "--endpoint-url", proxy.endpoint, "--jobs", "1", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def count_remote() -> int:
        async with s3_at(proxy.endpoint, remote) as s3:
            return len([o async for o in s3.list("chunks/")])

    deadline = time.monotonic() + 120
    while proxy.injected.get("slow", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    proxy.clear()
    # An upload the proxy held when the client died may still land: wait until none moves.
    before = trio.run(count_remote)
    settle = time.monotonic() + 10
    while time.monotonic() < settle:
        time.sleep(1.0)
        now = trio.run(count_remote)
        if now == before:
            break
        before = now
    assert 0 < before < total
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["chunks_sent"] == total - before
    assert report["tag_status"] == "created"


# -- lazy reads ------------------------------------------------------------------------


async def _all_chunks(loaded: LocalStore) -> dict[ChunkId, bytes]:
    m = loaded.get_manifest(loaded.resolve("t1"))
    return {cid: loaded.get_chunk(cid, size) for cid, size in m.chunk_sizes().items()}


async def test_remote_reader_fetches_checks_and_caches(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    want = await _all_chunks(loaded)
    empty = LocalStore.open(tmp_path / "empty")
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3)
        proxy.inject("flip", "GET", "/chunks/", times=3)
        proxy.inject("reset", "GET", "/chunks/", times=2)
        reader = RemoteChunkReader(empty, s3, cache_bytes=1 << 30, connections=4)
        got: dict[ChunkId, bytes] = {}

        async def read(cid: ChunkId) -> None:
            got[cid] = await reader.read_chunk(cid, len(want[cid]))

        async with trio.open_nursery() as n:
            for cid in want:
                n.start_soon(read, cid)
                n.start_soon(read, cid)  # the same chunk twice at once: one fetch
        assert got == want
        assert reader.stats.fetches == len(want)
        # Second pass: served from the cache, no request.
        requests = proxy.requests
        for cid, raw in want.items():
            assert await reader.read_chunk(cid, len(raw)) == raw
        assert proxy.requests == requests and reader.stats.cache_hits == len(want)
    # The cache never becomes part of the store.
    assert list(empty.iter_chunks()) == [] and len(list(empty.iter_cache())) == len(want)


async def test_remote_reader_never_caches_a_bad_chunk(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    want = await _all_chunks(loaded)
    cid, raw = next(iter(want.items()))
    empty = LocalStore.open(tmp_path / "empty")
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3)
        proxy.inject("flip", "GET", "/chunks/", times=-1)
        reader = RemoteChunkReader(empty, s3)
        with pytest.raises(CorruptError):
            await reader.read_chunk(cid, len(raw))
        assert list(empty.iter_cache()) == []
        proxy.clear()
        assert await reader.read_chunk(cid, len(raw)) == raw


async def test_cache_is_bounded_and_spares_store_chunks(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    want = await _all_chunks(loaded)
    partial = LocalStore.open(tmp_path / "partial")
    kept = sorted(want)[:3]
    for cid in kept:
        partial.put_chunk(cid, loaded.get_chunk_object(cid))
    limit = 3 * max(len(loaded.get_chunk_object(c)) for c in want)
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        reader = RemoteChunkReader(partial, s3, cache_bytes=limit)
        for _ in range(2):
            for cid, raw in want.items():
                assert await reader.read_chunk(cid, len(raw)) == raw
        assert reader.stats.evictions > 0 and reader.stats.local_hits == 2 * len(kept)
    cached = list(partial.iter_cache())
    assert sum(c.stored_size for c, _ in cached) <= limit
    assert sorted(c.cid for c in partial.iter_chunks()) == kept
    # A reader started later picks the cache up within the limit.
    assert RemoteChunkReader(partial, s3, cache_bytes=limit).stats.cache_bytes <= limit


async def test_prefetch_follows_the_recorded_order(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    mid = loaded.resolve("t1")
    m = loaded.get_manifest(mid)
    order = sorted(m.chunk_ids(), reverse=True)
    access = loaded.root / "access"
    access.mkdir()
    (access / mid.hex).write_text("".join(c.hex + "\n" for c in order[:4]) + "junk\n")
    empty = LocalStore.open(tmp_path / "empty")
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        snap = await open_remote_snapshot(s3, "t1")
        assert [c for c, _ in snap.order[:4]] == order[:4]
        assert len(snap.order) == len(m.chunk_ids())
        reader = RemoteChunkReader(empty, s3)
        await reader.prefetch(snap.order)
        assert reader.stats.prefetched == len(snap.order)
        requests = reader.stats.fetches
        for cid, size in snap.order:
            await reader.read_chunk(cid, size)
        assert reader.stats.fetches == requests


def test_prefetch_order_skips_foreign_lines(loaded: LocalStore) -> None:
    m = loaded.get_manifest(loaded.resolve("t1"))
    first = sorted(m.chunk_ids())[-1]
    order = prefetch_order(m, ["../../etc", "f" * 64, first.hex])
    assert order[0][0] == first and len(order) == len(m.chunk_ids())


async def test_priority_limiter_serves_demand_first() -> None:
    limiter = PriorityLimiter(2, reserved=1)
    log: list[str] = []
    release = trio.Event()

    async def hold(name: str) -> None:
        async with limiter.demand_slot():
            log.append(name)
            await release.wait()

    async def background(name: str) -> None:
        async with limiter.background_slot():
            log.append(name)

    async def demand(name: str) -> None:
        async with limiter.demand_slot():
            log.append(name)

    async with trio.open_nursery() as n:
        n.start_soon(hold, "h1")
        n.start_soon(hold, "h2")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(background, "b1")
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(demand, "d1")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert sorted(log[:2]) == ["h1", "h2"] and log.index("d1") < log.index("b1")


# -- remote gc -------------------------------------------------------------------------


async def test_remote_gc_sweeps_only_old_unreferenced_objects(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "img2").mkdir()
    (tmp_path / "img2" / "f").write_bytes(os.urandom(1 << 20))
    ingest(loaded, tmp_path / "img2", "t2")
    only_t2 = (loaded.get_manifest(loaded.resolve("t2")).chunk_ids()
               - loaded.get_manifest(loaded.resolve("t1")).chunk_ids())
    assert only_t2
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        await push(loaded, "t2", s3)
        await s3.delete_many([tag_key("t2")])
        young = await remote_gc(s3, grace_s=3600)
        assert young.deleted_chunks == 0 and young.young_unreferenced == 0  # manifest is a root
        dry = await remote_gc(s3, grace_s=0, dry_run=True)
        assert dry.deleted_chunks == len(only_t2) and dry.deleted_snapshots == 1
        assert all([await s3.head(chunk_key(c)) is not None for c in only_t2])
        r = await remote_gc(s3, grace_s=0)
        assert (r.deleted_chunks, r.deleted_snapshots, r.tags) == (len(only_t2), 1, 1)
        assert all([await s3.head(chunk_key(c)) is None for c in only_t2])
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", s3)
    check_store(other)


async def test_remote_gc_stops_on_an_unreadable_tag(moto_port: int, remote: str,
                                                    loaded: LocalStore) -> None:
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        await s3.put(tag_key("bad"), b"not an id\n")
        with pytest.raises(SnapstoreError, match="without deleting"):
            await remote_gc(s3, grace_s=0)


async def test_missing_bucket_is_an_access_error(moto_port: int) -> None:
    with pytest.raises(RemoteAccessError, match="does not exist"):
        async with s3_at(f"http://127.0.0.1:{moto_port}", "s3://missing-bucket-y"):
            pass


def test_killed_pull_at_random_points_then_resumes(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    """SIGKILL a pull at seeded random moments: the store stays valid, no tag appears
    before its chunks, and the next pull completes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, "-m", "snapstore", "--store", str(loaded.root), "push",
                    "t1", remote, "--endpoint-url", proxy.endpoint], env=env, check=True,
                   capture_output=True)
    other = LocalStore.open(tmp_path / "other")
    cmd = [sys.executable, "-m", "snapstore", "--store", str(other.root), "pull", "t1",
           remote, "--endpoint-url", proxy.endpoint, "--jobs", "2"]
    proxy.inject("slow", "GET", "/chunks/", times=-1)
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5, 3.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        check_store(other)
    proxy.clear()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert other.get_tag("t1") == loaded.resolve("t1")
    check_store(other)
