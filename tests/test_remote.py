"""Remote layer: push, pull, lazy reads, remote gc and ls against a moto server, with faults."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from snapstore import cli, codec
from snapstore.errors import CorruptError, SnapstoreError, UsageError
from snapstore.export import export
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.manifest import MAX_CHUNK, prefetch_order
from snapstore.remote import fetch, transfer
from snapstore.remote.cache import FetchCache, PackIndexCopies
from snapstore.remote.catalog import find_remote
from snapstore.remote.gc import remote_gc
from snapstore.remote.packs import MAX_PACK_BYTES
from snapstore.remote.reader import PriorityLimiter, RemoteChunkReader, open_remote_snapshot
from snapstore.remote.transfer import pull, push, remote_chunks
from snapstore.store.backend import Handle, Kind
from snapstore.store.layout import id_of_key
from snapstore.store.local import LocalStore
from snapstore.store.s3 import RemoteAccessError, RemoteError, S3Store, open_s3
from snapstore.store.url import RemoteURL
from snapstore.verify import verify
from tests.conftest import memory_like, tmpfs
from tests.s3proxy import FaultProxy, free_port, make_bucket, moto_server, put_object, s3_env

_buckets = itertools.count()
# A bound for the objects tests read back whole: any pack fits.
ANY_SIZE = MAX_PACK_BYTES
# Small packs, so that the test snapshot (about 8 MB stored) spans several.
SMALL_PACKS = 1 << 20


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
    """The tagged snapshots verify, and every chunk in the store, tagged or not, holds the
    bytes its name says."""
    report = verify(store, store.tags())
    assert not report.problems
    for c in store.iter_chunks():
        codec.decode_bounded(store.get_chunk_object(c.cid), c.cid, MAX_CHUNK)


async def names(s3: S3Store, kind: Kind) -> list[str]:
    return sorted([o.name async for o in s3.list(kind)])


def plant(port: int, s3: S3Store, key: str, data: bytes) -> None:
    """An object at a raw key of the remote, written past the store (no handle names it)."""
    put_object(port, s3.url.bucket, s3.url.key(key), data)




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
        r = await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        assert r.tag_status == "created" and r.chunks_sent == r.chunks > r.packs > 1
        assert len(await names(s3, "pack")) == len(await names(s3, "index")) == r.packs
        again = await push(loaded, "t1", s3)
        assert (again.chunks_sent, again.packs, again.tag_status) == (0, 0, "unchanged")
        other = LocalStore.open(tmp_path / "other")
        p = await pull(other, "t1", s3)
        assert p.chunks_sent == r.chunks and other.get_tag("t1") == r.snapshot
        # One GET per pack: the runs of a pack that is needed whole are the pack.
        assert p.packs == r.packs and p.bytes_sent == r.bytes_sent
        assert (await pull(other, "t1", s3)).chunks_sent == 0
    check_store(other)
    export(other, other.get_manifest(r.snapshot), tmp_path / "out")
    same_tree(source, tmp_path / "out")


async def test_remote_chunks_come_from_indexes_of_present_packs(
        proxy: FaultProxy, remote: str, loaded: LocalStore) -> None:
    cids = loaded.get_manifest(loaded.resolve("t1")).chunk_ids()
    async with s3_at(proxy.endpoint, remote) as s3:
        r = await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        # The push kept copies of the indexes it wrote: no GET of index/ now.
        before = proxy.requests
        known = await remote_chunks(s3, loaded)
        assert proxy.requests - before == 2  # the two listings
        assert set(known.where) == cids and len(known.pack_sizes) == r.packs
        assert (await remote_chunks(s3, None)).where == known.where
        # A damaged copy in the store is refused and fetched again.
        some = sorted(known.pack_sizes)[0]
        copies = PackIndexCopies(loaded)
        copies.path(some).write_bytes(b"junk")
        assert (await remote_chunks(s3, loaded)).where == known.where
        assert copies.path(some).read_bytes() == await s3.load(
            Handle.of("index", some), ANY_SIZE)
        # An index whose pack is gone, and a pack without an index, hold nothing.
        gone, unindexed = sorted(known.pack_sizes)[:2]
        await s3.remove(Handle.of("pack", gone), Handle.of("index", unindexed))
        left = await remote_chunks(s3, loaded)
        assert set(left.pack_sizes) == set(known.pack_sizes) - {gone, unindexed}
        assert {known.where[c].pack for c in cids - set(left.where)} == {gone, unindexed}
        # Stray keys are not ids: listed names are checked before they are parsed.
        plant(proxy.upstream_port, s3, "index/" + "G" * 64, b"x")
        plant(proxy.upstream_port, s3, "packs/zz/" + "0" * 62, b"x")
        assert (await remote_chunks(s3, loaded)).where == left.where


def test_id_of_key_takes_only_exact_ids() -> None:
    h = "ab" * 32
    assert id_of_key(f"index/{h}", "index/") == ChunkId.parse(h)
    assert id_of_key(f"packs/{h[:2]}/{h[2:]}", "packs/") == ChunkId.parse(h)
    for bad in (f"index/{h.upper()}", f"index/{h}0", f"index/{h[:-1]}", f"index/../{h}",
                f"packs/{h}", f"packs/{h[:3]}/{h[3:]}", f"locate/{h}"):
        prefix = "packs/" if bad.startswith("packs/") else "index/"
        assert id_of_key(bad, prefix) is None, bad


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
        tag = await s3.load(Handle("tag", "t1"), ANY_SIZE)
        assert tag.decode().strip() == loaded.resolve("t1").hex
        r = await push(other, "t1", s3, force=True)
        assert r.tag_status == "set"
        # Pull refuses to move a local tag that names another snapshot, unless forced.
        with pytest.raises(SnapstoreError, match="local tag"):
            await pull(loaded, "t1", s3)
        await pull(loaded, "t1", s3, force=True)
    assert loaded.get_tag("t1") == other.get_tag("t1")


async def test_pull_never_moves_a_local_tag_set_while_it_ran(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "img2").mkdir()
    (tmp_path / "img2" / "f").write_bytes(b"local work" * 1000)
    other = LocalStore.open(tmp_path / "other")
    ingest(other, tmp_path / "img2", "mine")
    mine = other.resolve("mine")

    async def tagged_meanwhile(*args: Any) -> Any:
        # An ingest beside the pull tags t1 after the pull's first look at the tag.
        other.set_tag("t1", mine)
        return await fetch.fetch_locator(*args)

    monkeypatch.setattr(transfer, "fetch_locator", tagged_meanwhile)
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        with pytest.raises(SnapstoreError, match="came to point at"):
            await pull(other, "t1", s3)
        assert other.get_tag("t1") == mine
        # The snapshot came whole all the same: a forced pull only moves the tag.
        assert (await pull(other, "t1", s3, force=True)).chunks_sent == 0
    assert other.get_tag("t1") == loaded.resolve("t1")


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
            await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        assert cid not in (await remote_chunks(s3, None)).where
        assert await names(s3, "locator") == await names(s3, "manifest") == []
        assert await s3.stat(Handle("tag", "t1")) is None


# -- faults ----------------------------------------------------------------------------


async def test_push_and_pull_survive_transient_faults(proxy: FaultProxy, remote: str,
                                                      loaded: LocalStore, source: Path,
                                                      tmp_path: Path) -> None:
    for kind in ("500", "503", "reset", "slow"):
        proxy.inject(kind, "PUT", "/packs/", times=2)
    async with s3_at(proxy.endpoint, remote) as s3:
        r = await push(loaded, "t1", s3, jobs=4, pack_size=SMALL_PACKS)
    assert proxy.injected == {"500": 2, "503": 2, "reset": 2, "slow": 2}
    for kind in ("500", "503", "reset", "slow", "flip"):
        proxy.inject(kind, "GET", "/packs/", times=2)
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
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        proxy.inject("flip", "GET", "/packs/", times=-1)
        other = LocalStore.open(tmp_path / "other")
        # A GET of a whole pack fails the checksum S3 stored with it; a GET of part of a
        # pack, our hash check.
        with pytest.raises(CorruptError, match=r"checksum|failed its check"):
            await pull(other, "t1", s3, jobs=2)
        assert other.get_tag("t1") is None and not other.manifest_ids()
        check_store(other)
        # A bad pack stored in the bucket (its S3 checksum matches): our hash check.
        proxy.clear()
        cid = sorted(loaded.get_manifest(loaded.resolve("t1")).chunk_ids())[0]
        await flip_chunk_in_pack(s3, cid)
        with pytest.raises(CorruptError, match="failed its check 3 times"):
            await pull(other, "t1", s3, jobs=2)
    assert other.get_tag("t1") is None and not other.has_chunk(cid)
    check_store(other)


async def flip_chunk_in_pack(s3: S3Store, cid: ChunkId) -> None:
    """Rewrite the pack holding `cid` with one bit of that chunk flipped."""
    at = (await remote_chunks(s3, None)).where[cid]
    pack = Handle.of("pack", at.pack)
    data = bytearray(await s3.load(pack, ANY_SIZE))
    data[at.offset + at.length // 2] ^= 0x10
    await s3.save(pack, bytes(data))


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
    code, out, err = _cli(["--store", str(loaded.root), "push", "t1", remote, "--json",
                           "--pack-size", "1M"], capsys)
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["tag_status"] == "created" and pushed["packs"] > 1
    code, out, _ = _cli(["remote", "ls", remote, "--json"], capsys)
    doc = json.loads(out)
    assert doc["tags"] == {"t1": pushed["snapshot"]}
    [snap] = doc["snapshots"]
    assert snap["chunks"] == pushed["chunks"] and snap["missing_chunks"] == 0
    assert snap["stored_bytes"] == pushed["bytes_sent"] == doc["stored_bytes"]
    assert doc["packs"] == pushed["packs"]
    assert "testing" not in out
    other = tmp_path / "other"
    code, out, err = _cli(["--store", str(other), "pull", "t1", remote], capsys)
    assert code == 0 and out.strip() == pushed["snapshot"], err
    code, out, _ = _cli(["--store", str(other), "verify"], capsys)
    assert code == 0
    code, out, err = _cli(["gc", "--remote", remote, "--grace", "0", "--force", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["deleted_packs"] == 0
    code, _, err = _cli(["--store", str(loaded.root), "push", "t1", remote, "--pack-size",
                         "0"], capsys)
    assert code == 2 and "--pack-size" in err


def test_killed_push_resumes_with_only_the_missing_chunks(
        proxy: FaultProxy, remote: str, loaded: LocalStore) -> None:
    total = len(loaded.get_manifest(loaded.resolve("t1")).chunk_ids())
    # Slow pack uploads, one at a time, so the kill lands mid-way.
    proxy.inject("slow", "PUT", "/packs/", times=-1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "snapstore", "--store", str(loaded.root), "push", "t1",
           remote, "--endpoint-url", proxy.endpoint, "--jobs", "1", "--json",
           "--pack-size", "512K"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def count_remote() -> tuple[int, int]:
        async with s3_at(proxy.endpoint, remote) as s3:
            return (len((await remote_chunks(s3, None)).where),
                    len(await names(s3, "pack")))

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
    indexed, _ = before
    assert 0 < indexed < total
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    # Only chunks of indexed packs count as present; a pack without its index is sent again.
    assert report["chunks_sent"] == total - indexed
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
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        proxy.inject("flip", "GET", "/packs/", times=3)
        proxy.inject("reset", "GET", "/packs/", times=2)
        snap = await open_remote_snapshot(s3, "t1")
        reader = RemoteChunkReader(empty, s3, snap, cache_bytes=1 << 30, connections=4)
        got: dict[ChunkId, bytes] = {}

        async def read(cid: ChunkId) -> None:
            got[cid] = await reader.read_chunk(cid, len(want[cid]))

        async with trio.open_nursery() as n:
            for cid in want:
                n.start_soon(read, cid)
                n.start_soon(read, cid)  # the same chunk twice at once: one fetch
        assert got == want
        assert reader.stats.fetches == len(want)
        # Asked for all at once, neighbours in a pack came with one ranged GET.
        assert reader.stats.requests - 3 < len(want) // 2
        # Second pass: served from the cache, no request.
        requests = proxy.requests
        for cid, raw in want.items():
            assert await reader.read_chunk(cid, len(raw)) == raw
        assert proxy.requests == requests and reader.stats.cache_hits == len(want)
    # The cache never becomes part of the store.
    assert list(empty.iter_chunks()) == []
    assert len(list(FetchCache(empty).entries())) == len(want)


async def test_remote_reader_never_caches_a_bad_chunk(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    want = await _all_chunks(loaded)
    cid, raw = next(iter(want.items()))
    empty = LocalStore.open(tmp_path / "empty")
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3)
        proxy.inject("flip", "GET", "/packs/", times=-1)
        reader = RemoteChunkReader(empty, s3, await open_remote_snapshot(s3, "t1"))
        with pytest.raises(CorruptError):
            await reader.read_chunk(cid, len(raw))
        assert list(FetchCache(empty).entries()) == []
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
        snap = await open_remote_snapshot(s3, "t1")
        reader = RemoteChunkReader(partial, s3, snap, cache_bytes=limit)
        for _ in range(2):
            for cid, raw in want.items():
                assert await reader.read_chunk(cid, len(raw)) == raw
        assert reader.stats.evictions > 0 and reader.stats.local_hits == 2 * len(kept)
    cached = list(FetchCache(partial).entries())
    assert sum(c.stored_size for c, _ in cached) <= limit
    assert sorted(c.cid for c in partial.iter_chunks()) == kept
    # A reader started later picks the cache up within the limit.
    assert RemoteChunkReader(partial, s3, snap, cache_bytes=limit).stats.cache_bytes <= limit


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
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        snap = await open_remote_snapshot(s3, "t1")
        assert [c for c, _ in snap.order[:4]] == order[:4]
        assert len(snap.order) == len(m.chunk_ids())
        reader = RemoteChunkReader(empty, s3, snap)
        await reader.prefetch(snap.order)
        assert reader.stats.prefetched == len(snap.order)
        # After the recorded four, file order: neighbours in a pack share one GET (each of
        # the four, taken out of file order, may split one pack's run in two).
        assert reader.stats.requests <= 4 + len(snap.locator.packs) + 4
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
        t2 = await push(loaded, "t2", s3)
        t2_packs = {(await remote_chunks(s3, None)).where[c].pack for c in only_t2}
        await s3.remove(Handle("tag", "t2"))
        young = await remote_gc(s3, grace_s=3600)
        assert young.deleted_packs == 0 and young.young_unreferenced == 0  # manifest is a root
        dry = await remote_gc(s3, loaded, grace_s=0, dry_run=True, force=True)
        assert (dry.deleted_packs, dry.deleted_chunks) == (t2.packs, len(only_t2))
        assert dry.deleted_snapshots == 1
        assert all([await s3.stat(Handle.of("pack", p)) is not None for p in t2_packs])
        r = await remote_gc(s3, loaded, grace_s=0, force=True)
        assert (r.deleted_chunks, r.deleted_snapshots, r.tags) == (len(only_t2), 1, 1)
        assert r.deleted_indexes == r.deleted_packs == t2.packs
        for p in t2_packs:
            assert await s3.stat(Handle.of("pack", p)) is None
            assert await s3.stat(Handle.of("index", p)) is None
            assert not PackIndexCopies(loaded).path(p).exists()
        assert await names(s3, "locator") == [loaded.resolve("t1").hex]
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", s3)
    check_store(other)


async def test_remote_gc_keeps_packs_with_live_chunks_and_reports_dead_bytes(
        moto_port: int, remote: str, loaded: LocalStore, source: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    (both / "extra").mkdir(parents=True)
    shutil.copytree(source, both / "image")
    (both / "extra" / "f").write_bytes(os.urandom(1 << 20))
    ingest(loaded, both, "both", params=loaded.get_manifest(loaded.resolve("t1")).chunker)
    m1 = loaded.get_manifest(loaded.resolve("t1"))
    dead = loaded.get_manifest(loaded.resolve("both")).chunk_ids() - m1.chunk_ids()
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        first = await push(loaded, "both", s3)
        t1 = await push(loaded, "t1", s3)
        assert t1.chunks_sent == 0  # its chunks lie in the packs of "both"
        await s3.remove(Handle("tag", "both"))
        r = await remote_gc(s3, grace_s=0, force=True)
        assert (r.deleted_snapshots, r.deleted_packs, r.kept_packs) == (1, 0, first.packs)
        # No repacking: the dead chunks stay inside the live packs, and are reported.
        assert r.dead_bytes_in_kept_packs == sum(
            len(loaded.get_chunk_object(c)) for c in dead)
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", s3)
    check_store(other)


async def test_remote_gc_deletes_orphans_and_keeps_what_locators_name(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        r = await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        known = await remote_chunks(s3, None)
        lost_index, lost_pack = sorted(known.pack_sizes)[:2]
        # A pack whose index is lost is still named by the tag's locator: kept.
        await s3.remove(Handle.of("index", lost_index))
        # An index whose pack is gone would make pushes skip chunks: deleted at any age.
        await s3.remove(Handle.of("pack", lost_pack))
        # A pack a killed push left without an index holds nothing anyone names.
        await s3.save(Handle.of("pack", ChunkId.of(b"stray")), b"stray")
        g = await remote_gc(s3, grace_s=0, force=True)
        assert (g.deleted_packs, g.deleted_indexes, g.kept_packs) == (1, 1, r.packs - 1)
        assert await s3.stat(Handle.of("pack", lost_index)) is not None
        assert await names(s3, "index") == sorted(
            p.hex for p in known.pack_sizes if p not in (lost_index, lost_pack))
        # The next push sends what the remote lost again, in new packs, and a new locator.
        again = await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        lost = {c for c, at in known.where.items() if at.pack in (lost_index, lost_pack)}
        assert again.chunks_sent == len(lost)
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", s3)
    check_store(other)


async def test_remote_gc_stops_on_an_unreadable_tag(moto_port: int, remote: str,
                                                    loaded: LocalStore) -> None:
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3)
        await s3.save(Handle("tag", "bad"), b"not an id\n")
        with pytest.raises(SnapstoreError, match="without deleting"):
            await remote_gc(s3, grace_s=0, force=True)


async def test_remote_gc_stops_on_an_unreadable_locator_or_index(
        moto_port: int, remote: str, loaded: LocalStore) -> None:
    mid = loaded.resolve("t1")
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        stray, locator = Handle.of("pack", ChunkId.of(b"stray")), Handle.of("locator", mid)
        await s3.save(stray, b"stray")
        good = await s3.load(locator, ANY_SIZE)
        await s3.save(locator, good[:-1])
        with pytest.raises(SnapstoreError, match="without deleting"):
            await remote_gc(s3, grace_s=0, force=True)
        await s3.save(locator, good)
        pack = sorted((await remote_chunks(s3, None)).pack_sizes)[0]
        await s3.save(Handle.of("index", pack), b"SNAPIDX\x01" + bytes(100))
        with pytest.raises(SnapstoreError, match=f"index of pack {pack.short()}.*without"):
            await remote_gc(s3, grace_s=0, force=True)
        assert await s3.stat(stray) is not None


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
                    "t1", remote, "--endpoint-url", proxy.endpoint, "--pack-size", "1M"],
                   env=env, check=True, capture_output=True)
    other = LocalStore.open(tmp_path / "other")
    cmd = [sys.executable, "-m", "snapstore", "--store", str(other.root), "pull", "t1",
           remote, "--endpoint-url", proxy.endpoint, "--jobs", "2"]
    proxy.inject("slow", "GET", "/packs/", times=-1)
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


# -- a hostile or tampered bucket ----------------------------------------------------------


def _cli_fails_with_one_line(args: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err, err


def test_hostile_locator_or_index_is_refused_with_one_line(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    mid = loaded.resolve("t1")
    code, _, err = _cli(["--store", str(loaded.root), "push", "t1", remote, "--pack-size",
                         "1M"], capsys)
    assert code == 0, err

    async def tamper(h: Handle, data: bytes) -> bytes:
        async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
            old = await s3.load(h, ANY_SIZE)
            await s3.save(h, data)
            return old

    other = LocalStore.open(tmp_path / "other")
    locator = Handle.of("locator", mid)
    good = trio.run(tamper, locator, b"SNAPLOC\x01" + bytes(4 << 20))
    _cli_fails_with_one_line(["--store", str(other.root), "pull", "t1", remote],
                             "more than", capsys)
    trio.run(tamper, locator, good[:-40] + good[-32:])
    _cli_fails_with_one_line(["--store", str(other.root), "pull", "t1", remote],
                             "fails its checksum", capsys)
    assert other.get_tag("t1") is None and not other.manifest_ids()
    assert list(other.iter_chunks()) == []
    trio.run(tamper, locator, good)

    async def first_index() -> str:
        async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
            return (await names(s3, "index"))[0]

    name = trio.run(first_index)
    trio.run(tamper, Handle("index", name), b"\xff" * 100)
    fresh = LocalStore.open(tmp_path / "fresh")
    ingest(fresh, loaded.root.parent / "image", "t1")
    _cli_fails_with_one_line(["--store", str(fresh.root), "push", "t1", remote],
                             f"index of pack {name}", capsys)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete pack", "delete index"])
def test_pull_from_a_tampered_bucket_fails_cleanly(
        damage: str, moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    m = loaded.get_manifest(loaded.resolve("t1"))
    entry = next(e for e in m.files() if e.path == "checkpoint.img")
    cid = next(x.chunk for x in entry.extents[len(entry.extents) // 2:] if x.chunk)
    endpoint = f"http://127.0.0.1:{moto_port}"

    async def setup() -> None:
        async with s3_at(endpoint, remote) as s3:
            await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
            at = (await remote_chunks(s3, None)).where[cid]
            pack = Handle.of("pack", at.pack)
            if damage == "flip":
                await flip_chunk_in_pack(s3, cid)
            elif damage == "truncate":
                await s3.save(pack, (await s3.load(pack, ANY_SIZE))[: at.offset + 1])
            else:
                await s3.remove(pack if damage == "delete pack" else Handle.of("index", at.pack))

    trio.run(setup)
    other = tmp_path / "other"
    args = ["--store", str(other), "pull", "t1", remote, "--endpoint-url", endpoint]
    if damage == "delete index":
        # Pulls and mounts read the locator; only pushes read indexes (and send again
        # what no index lists).
        code, _, err = _cli(args, capsys)
        assert code == 0, err
    else:
        message = {"flip": "failed its check 3 times", "truncate": "the pack ends before",
                   "delete pack": "does not exist"}[damage]
        _cli_fails_with_one_line(args, message, capsys)
        assert LocalStore.open(other).get_tag("t1") is None
    check_store(LocalStore.open(other))
    code, _, err = _cli(["--store", str(other), "verify"], capsys)
    assert code == 0, err


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_tampered_pack_through_a_real_lazy_mount(
        moto_port: int, remote: str, loaded: LocalStore, source: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte in one pack: reads of that chunk's bytes get EIO, every other byte
    reads right, the mount stays up, and nothing wrong reaches the store or its cache."""
    m = loaded.get_manifest(loaded.resolve("t1"))
    entry = next(e for e in m.files() if e.path == "checkpoint.img")
    offset = 0
    for x in entry.extents:
        if x.chunk is not None and offset > entry.size // 2:
            bad, bad_size = x.chunk, x.size
            break
        offset += x.size
    endpoint = f"http://127.0.0.1:{moto_port}"

    async def setup() -> None:
        async with s3_at(endpoint, remote) as s3:
            await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
            await flip_chunk_in_pack(s3, bad)

    trio.run(setup)
    empty = LocalStore.open(tmp_path / "empty")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, _, err = _cli(["--store", str(empty.root), "mount", "t1", str(mnt), "--remote",
                         remote, "--endpoint-url", endpoint], capsys)
    assert code == 0, err
    image = (source / "checkpoint.img").read_bytes()
    try:
        fd = os.open(mnt / "checkpoint.img", os.O_RDONLY)
        try:
            for at in (offset, offset + bad_size // 2, offset + bad_size - 1):
                with pytest.raises(OSError) as e:
                    os.pread(fd, 1, at)
                assert e.value.errno == errno.EIO
            assert os.pread(fd, offset, 0) == image[:offset]
            after = offset + bad_size
            assert os.pread(fd, len(image) - after, after) == image[after:]
        finally:
            os.close(fd)
        assert (mnt / "sub/pages.img").read_bytes() == (source / "sub/pages.img").read_bytes()
        assert (mnt / "note.txt").read_text() == "hello\n"
    finally:
        code, _, err = _cli(["--store", str(empty.root), "umount", str(mnt)], capsys)
    assert code == 0, err
    cache = FetchCache(empty)
    assert bad not in {c.cid for c, _ in cache.entries()}
    for c, _ in cache.entries():
        codec.decode_bounded(cache.get(c.cid), c.cid, MAX_CHUNK)
    check_store(empty)
    code, _, err = _cli(["--store", str(empty.root), "verify"], capsys)
    assert code == 0, err


# -- attack round 2: the remote ----------------------------------------------------------


def test_stray_keys_under_refs_tags_are_skipped_and_reported(
        moto_port: int, remote: str, loaded: LocalStore, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 console's zero-byte "folder" marker and a nested key under refs/tags/ are no
    tags (nor are such keys under snapshots/ or packs/ snapshots or packs): listings skip
    them and say so, and never fail."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    mid = loaded.resolve("t1")

    async def setup() -> None:
        async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as s3:
            await push(loaded, "t1", s3)
            plant(moto_port, s3, "refs/tags/", b"")
            plant(moto_port, s3, "refs/tags/x/y", (mid.hex + "\n").encode())
            plant(moto_port, s3, "snapshots/", b"")
            plant(moto_port, s3, "packs/readme.txt", b"hello")

    trio.run(setup)
    code, out, err = _cli(["remote", "ls", remote, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["tags"] == {"t1": mid.hex}
    foreign = ["packs/readme.txt", "refs/tags/", "refs/tags/x/y", "snapshots/"]
    assert doc["foreign_keys"] == foreign and [s["id"] for s in doc["snapshots"]] == [mid.hex]
    assert "refs/tags/x/y" in err and "warning" in err
    code, out, err = _cli(["remote", "ls", remote], capsys)
    assert code == 0 and "refs/tags/x/y" in err, err
    code, out, err = _cli(["gc", "--remote", remote, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["tags"] == 1 and report["foreign_keys"] == foreign
    assert "refs/tags/x/y" in err and "snapshots/" in err
    assert find_remote(remote, {}) == mid.hex


async def test_a_range_answered_with_a_huge_200_is_refused_unread(
        proxy: FaultProxy, remote: str, loaded: LocalStore) -> None:
    """A server that ignores Range and sends a whole (here 10 GiB) object: the headers
    are checked before the body, which is never read."""
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        pack = sorted((await remote_chunks(s3, None)).pack_sizes)[0]
        proxy.stream_limit = 512 << 20
        proxy.inject("huge", "GET", "/packs/")
        with trio.fail_after(60), pytest.raises(RemoteError, match="ignored the range"):
            await s3.load_range(Handle.of("pack", pack), 0, 4096)
    assert proxy.injected == {"huge": 1}
    # What the socket buffers held when the client hung up, not the body.
    assert proxy.streamed < 64 << 20


def test_pull_from_a_server_ignoring_range_fails_with_one_line(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    trio.run(_push_via, proxy.endpoint, remote, loaded)
    proxy.stream_limit = 512 << 20
    proxy.inject("huge", "GET", "/packs/", times=-1)
    _cli_fails_with_one_line(["--store", str(tmp_path / "other"), "pull", "t1", remote,
                              "--endpoint-url", proxy.endpoint], "ignored the range", capsys)
    assert proxy.streamed < 64 << 20


async def _push_via(endpoint: str, remote: str, store: LocalStore) -> None:
    async with s3_at(endpoint, remote) as s3:
        await push(store, "t1", s3, pack_size=SMALL_PACKS)


async def test_every_whole_object_read_is_bounded(
        proxy: FaultProxy, remote: str, loaded: LocalStore) -> None:
    """A body with no length (chunked, without end) in place of a tag, a manifest, a
    locator or an access list is refused unread: an object's bound is checked against
    its Content-Length, which the HTTP client then holds the body to. An access list
    over its bound (only a prefetch hint) is ignored; the others fail the read."""
    mid = loaded.resolve("t1")
    access = loaded.root / "access"
    access.mkdir()
    (access / mid.hex).write_text("".join(c.hex + "\n" for c in sorted(
        loaded.get_manifest(mid).chunk_ids())))
    proxy.stream_limit = 256 << 20
    async with s3_at(proxy.endpoint, remote) as s3:
        await push(loaded, "t1", s3, pack_size=SMALL_PACKS)
        proxy.inject("endless", "GET", "/access/")
        with trio.fail_after(60):
            snap = await open_remote_snapshot(s3, "t1")
        assert len(snap.order) == len(loaded.get_manifest(mid).chunk_ids())
        for what in ("/refs/tags/", "/snapshots/", "/locate/"):
            proxy.inject("endless", "GET", what)
            with trio.fail_after(60), pytest.raises(RemoteError, match="no Content-Length"):
                await open_remote_snapshot(s3, "t1")
        # An access list that declares 10 GiB (the was 100 MiB of newlines):
        # refused from its Content-Length, ignored.
        proxy.inject("huge", "GET", "/access/")
        with trio.fail_after(60):
            assert len((await open_remote_snapshot(s3, "t1")).order) == len(snap.order)
    assert proxy.injected == {"endless": 4, "huge": 1}
    assert proxy.streamed < 5 * (64 << 20)


def _bounded(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str, str]:
    """Wait for `proc` at most `seconds`; a process still running fails the test (it is
    left running: a reader blocked in a FUSE read cannot be killed)."""
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args!r} still running after {seconds} s")
    return proc.returncode, out, err


def test_a_pull_from_an_endpoint_that_never_answers_ends_with_one_line(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    trio.run(_push_via, proxy.endpoint, remote, loaded)
    proxy.inject("hang", "GET", "/packs/", times=-1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapstore", "--store", str(tmp_path / "other"), "pull", "t1",
         remote, "--endpoint-url", proxy.endpoint, "--read-timeout", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = _bounded(proc, 120)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, err
    assert "no complete answer within 3 s" in lines[0], err
    assert proxy.injected["hang"] >= 1


async def test_cancelling_a_remote_read_cancels_its_request(
        proxy: FaultProxy, remote: str, loaded: LocalStore, tmp_path: Path) -> None:
    """A cancelled read (an unmount, a caller's deadline) hangs up on the endpoint instead
    of leaving the request to run on."""
    want = await _all_chunks(loaded)
    cid, raw = next(iter(want.items()))
    async with open_s3(RemoteURL.parse(remote), proxy.endpoint, read_timeout_s=600) as s3:
        await push(loaded, "t1", s3)
        reader = RemoteChunkReader(LocalStore.open(tmp_path / "empty"), s3,
                                   await open_remote_snapshot(s3, "t1"))
        proxy.inject("hang", "GET", "/packs/")
        with trio.fail_after(60):
            with trio.move_on_after(1):
                await reader.read_chunk(cid, len(raw))
            while proxy.abandoned == 0:
                await trio.sleep(0.05)
        assert await reader.read_chunk(cid, len(raw)) == raw


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_mounted_read_from_an_endpoint_that_never_answers_fails_with_eio(
        proxy: FaultProxy, remote: str, loaded: LocalStore, source: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint takes every ranged GET and never answers: a read through a remote mount
    gets EIO once the read deadline (here 3 s, from the environment) has passed, instead
    of blocking in D state for every attempt's timeout; the mount stays up."""
    trio.run(_push_via, proxy.endpoint, remote, loaded)
    monkeypatch.setenv("SNAPSTORE_READ_TIMEOUT", "3")
    empty = LocalStore.open(tmp_path / "empty")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, _, err = _cli(["--store", str(empty.root), "mount", "t1", str(mnt), "--remote",
                         remote, "--endpoint-url", proxy.endpoint], capsys)
    assert code == 0, err
    read = ("import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try:\n    os.pread(fd, 4096, 0)\n    print('read')\n"
            "except OSError as e:\n    print(e.errno)\n")
    try:
        proxy.inject("hang", "GET", "/packs/", times=-1)
        proc = subprocess.Popen([sys.executable, "-c", read, str(mnt / "checkpoint.img")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        code, out, err = _bounded(proc, 120)
        assert (code, out.strip()) == (0, str(errno.EIO)), err
        proxy.clear()
        assert (mnt / "note.txt").read_text() == "hello\n"
        image = (source / "checkpoint.img").read_bytes()
        with open(mnt / "checkpoint.img", "rb") as f:
            assert f.read(1 << 20) == image[: 1 << 20]
    finally:
        code, _, err = _cli(["--store", str(empty.root), "umount", str(mnt)], capsys)
    assert code == 0, err


def test_pull_replaces_a_damaged_local_chunk_from_the_remote(
        moto_port: int, remote: str, loaded: LocalStore, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk file of a pulled snapshot damaged on disk (and one deleted): pull fetches
    both again, and the snapshot verifies."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    code, _, err = _cli(["--store", str(loaded.root), "push", "t1", remote], capsys)
    assert code == 0, err
    other = LocalStore.open(tmp_path / "other")
    code, _, err = _cli(["--store", str(other.root), "pull", "t1", remote], capsys)
    assert code == 0, err
    bad, gone = sorted(other.get_manifest(other.resolve("t1")).chunk_ids())[:2]
    data = bytearray(other.chunk_path(bad).read_bytes())
    data[len(data) // 2] ^= 0x04
    other.chunk_path(bad).write_bytes(bytes(data))
    other.delete_chunk(gone)
    code, _, _ = _cli(["--store", str(other.root), "verify"], capsys)
    assert code == 1
    code, out, err = _cli(["--store", str(other.root), "pull", "t1", remote, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["chunks_sent"], report["chunks_repaired"]) == (2, 1)
    code, _, err = _cli(["--store", str(other.root), "verify"], capsys)
    assert code == 0, err
    check_store(other)


def test_gc_grace_must_be_a_safe_duration(moto_port: int, remote: str,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    for grace in ("nan", "inf", "1e12", "-1", "0", "60"):
        code, out, err = _cli(["gc", "--remote", remote, "--grace", grace], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (grace, err)
        assert "--grace" in lines[0] and "internal error" not in err, err
    code, _, err = _cli(["gc", "--remote", remote, "--grace", "60"], capsys)
    assert "--force" in err
    code, out, err = _cli(["gc", "--remote", remote, "--grace", "0", "--force", "--json"],
                          capsys)
    assert code == 0, err
    code, out, err = _cli(["gc", "--remote", remote, "--grace", "inf", "--force"], capsys)
    assert code == 2, err


def test_remote_gc_is_the_verb_and_gc_remote_its_older_spelling(
        moto_port: int, remote: str, loaded: LocalStore, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    code, _, err = _cli(["--store", str(loaded.root), "push", "t1", remote], capsys)
    assert code == 0, err
    reports = []
    for argv in (["remote", "gc", remote], ["gc", "--remote", remote]):
        code, out, err = _cli([*argv, "--grace", "0", "--force", "--dry-run", "--json"],
                              capsys)
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0] == reports[1] and reports[0]["kept_snapshots"] == 1
    code, out, err = _cli(["remote", "gc", remote, "--grace", "60"], capsys)
    assert code == 2 and out == "" and "--force" in err


async def test_a_push_beside_a_forced_gc_keeps_its_snapshot_whole(
        proxy: FaultProxy, moto_port: int, remote: str, loaded: LocalStore,
        tmp_path: Path) -> None:
    """gc --grace 0 --force runs while a push waits to write its tag (held by the proxy):
    gc deletes the push's manifest, locator and packs, which nothing names yet. The push
    finds that after its tag and sends them again; the tag it exits 0 with pulls whole."""
    done: list[str] = []

    async def pushing() -> None:
        async with s3_at(proxy.endpoint, remote) as s3:
            done.append((await push(loaded, "t1", s3, pack_size=SMALL_PACKS)).tag_status)

    proxy.inject("gate", "PUT", "/refs/tags/")
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as direct:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                n.start_soon(pushing)
                while proxy.gated == 0:
                    await trio.sleep(0.05)
                g = await remote_gc(direct, grace_s=0, force=True)
                assert g.deleted_snapshots == 1 and g.deleted_packs > 0
                proxy.open_gate()
        assert done == ["created"]
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", direct)
    check_store(other)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "tiny", "4m") as mnt:
        yield mnt


def test_pull_onto_a_full_disk_names_the_store_and_the_cause(
        moto_port: int, remote: str, loaded: LocalStore, tiny_fs: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    code, _, err = _cli(["--store", str(loaded.root), "push", "t1", remote], capsys)
    assert code == 0, err
    root = tiny_fs / "store"
    _cli_fails_with_one_line(["--store", str(root), "pull", "t1", remote],
                             f"the disk of the store {root} is full", capsys)
    other = LocalStore.open(root)
    assert other.get_tag("t1") is None
    check_store(other)


async def test_gc_takes_a_second_look_before_it_sweeps(
        proxy: FaultProxy, moto_port: int, remote: str, loaded: LocalStore,
        tmp_path: Path) -> None:
    """The window a push's own check leaves: gc found a snapshot untagged and its packs
    old, then (held by the proxy at its last index GET, as a long gc is busy reading) a
    push tags that snapshot again, reusing those packs, and checks them: all there. gc
    looks at the tags and manifests again right before it deletes anything, so it keeps
    what the new tag reaches."""
    async with s3_at(f"http://127.0.0.1:{moto_port}", remote) as direct:
        await push(loaded, "t1", direct, pack_size=SMALL_PACKS)
        await direct.remove(Handle("tag", "t1"))
        last = max((await remote_chunks(direct, None)).pack_sizes)
        proxy.inject("gate", "GET", f"/index/{last.hex}")
        report: list[int] = []

        async def collecting() -> None:
            async with s3_at(proxy.endpoint, remote) as s3:
                report.append((await remote_gc(s3, grace_s=0, force=True)).deleted_packs)

        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                n.start_soon(collecting)
                while proxy.gated == 0:
                    await trio.sleep(0.05)
                again = await push(loaded, "t1", direct, pack_size=SMALL_PACKS)
                assert (again.chunks_sent, again.tag_status) == (0, "created")
                proxy.open_gate()
        assert report == [0]
        other = LocalStore.open(tmp_path / "other")
        await pull(other, "t1", direct)
    check_store(other)
