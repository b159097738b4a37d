"""One conformance suite for every store: the contracts of the store interface
(snapstore/store/backend.py), run through it on the local store and on the S3 store (over
moto). Each store's content-addressed kind is used as it is: a chunk object on the local
store, a one-chunk pack on S3, whose chunk is read back by a ranged load.

Contracts checked: an object reads back byte-identical, and a range of it; a missing object
is NotFoundError (or absent), never empty bytes; saves of content-addressed objects are
idempotent; a tag names exactly one manifest, reads back and is replaced whole; a create
writes only what is not there, and of racing creates exactly one wins; listing yields each
object once with its size and age, and reports strays instead of yielding them; removes
are idempotent, of one object or many; a kind the store does not keep is refused. Then the
S3 store's own: bounded and ranged GETs, deletes in batches.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from snapstore import codec
from snapstore.errors import CorruptError, NotFoundError, UsageError
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.remote.packs import build_pack
from snapstore.store import s3 as s3_module
from snapstore.store.backend import Backend, Handle, Kind
from snapstore.store.local import MAX_MANIFEST_BYTES, LocalStore
from snapstore.store.local_backend import LocalBackend
from snapstore.store.s3 import S3Store, open_s3
from snapstore.store.url import RemoteURL
from tests.s3proxy import FaultProxy, make_bucket, moto_server, put_object, s3_env


@dataclass(frozen=True)
class Blob:
    """A content-addressed object a store keeps, and where in it a chunk object lies."""

    handle: Handle
    data: bytes
    chunk: bytes
    start: int


def blob(st: Backend, seed: int, size: int = 100_000) -> Blob:
    """A chunk as the store keeps it: a chunk object of its own, or a one-chunk pack."""
    raw = os.urandom(size) if seed < 0 else bytes([seed % 256]) * size
    cid, obj = ChunkId.of(raw), codec.encode(raw)
    if "chunk" in st.kinds:
        return Blob(Handle.of("chunk", cid), obj, obj, 0)
    pack = build_pack([(cid, obj)])
    return Blob(Handle.of("pack", pack.pack), pack.data, obj, pack.chunks[0][1].offset)


async def names(st: Backend, kind: Kind) -> list[str]:
    return [o.name async for o in st.list(kind)]


def plant(st: Backend, port: int, place: str, data: bytes) -> None:
    """Put `data` at `place` (a path in the store, a key under the remote's prefix) the
    way another program would, past the store's verbs."""
    if isinstance(st, LocalBackend):
        path = st.store.root / place
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        assert isinstance(st, S3Store)
        put_object(port, st.url.bucket, st.url.key(place), data)


@pytest.fixture(scope="session")
def moto_port() -> Iterator[int]:
    with moto_server() as port:
        yield port


@pytest.fixture(params=["local", "s3"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    return str(request.param)


@asynccontextmanager
async def backend(kind: str, tmp_path: Path, port: int) -> AsyncIterator[Backend]:
    if kind == "local":
        yield LocalBackend(LocalStore.open(tmp_path / "suite"))
        return
    bucket = f"suite-{os.getpid()}-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    make_bucket(port, bucket)
    async with open_s3(RemoteURL(bucket, "p"), f"http://127.0.0.1:{port}") as s3:
        yield s3


async def test_objects_round_trip_and_idempotent(kind: str, tmp_path: Path,
                                                 moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        b = blob(st, -1)
        assert await st.stat(b.handle) is None
        await st.save(b.handle, b.data)
        await st.save(b.handle, b.data)
        assert await st.stat(b.handle) == len(b.data)
        assert await st.load(b.handle, len(b.data)) == b.data
        got = await st.load_range(b.handle, b.start, b.start + len(b.chunk))
        assert got == b.chunk
        [info] = [o async for o in st.list(b.handle.kind)]
        assert (info.name, info.size) == (b.handle.name, len(b.data))
        assert abs(info.modified - datetime.now(UTC)) < timedelta(minutes=1)


async def test_loads_are_bounded_and_ranges_end_where_the_object_does(
        kind: str, tmp_path: Path, moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        b = blob(st, -1, 1000)
        await st.save(b.handle, b.data)
        n = len(b.data)
        with pytest.raises(CorruptError, match="more than"):
            await st.load(b.handle, n - 1)
        assert await st.load_range(b.handle, 10, 20) == b.data[10:20]
        assert await st.load_range(b.handle, n - 10, n + 100) == b.data[-10:]
        assert await st.load_range(b.handle, n + 10, n + 20) == b""


async def test_missing_objects_are_not_found(kind: str, tmp_path: Path,
                                             moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        b = blob(st, 1)
        with pytest.raises(NotFoundError):
            await st.load(b.handle, len(b.data))
        with pytest.raises(NotFoundError):
            await st.load_range(b.handle, 0, 10)
        with pytest.raises(NotFoundError):
            await st.load(Handle("manifest", b.handle.name), MAX_MANIFEST_BYTES + 1)
        with pytest.raises(NotFoundError):
            await st.load(Handle("tag", "nothing"), 4096)
        assert await st.stat(Handle("tag", "nothing")) is None


async def test_listing_and_idempotent_remove(kind: str, tmp_path: Path,
                                             moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        made = {b.handle: b.data for b in (blob(st, i, 5000) for i in range(20))}
        async with trio.open_nursery() as n:
            for h, data in made.items():
                n.start_soon(st.save, h, data)
        kind_of = next(iter(made)).kind
        assert sorted(await names(st, kind_of)) == sorted(h.name for h in made)
        gone, *kept = sorted(made, key=lambda h: h.name)
        await st.remove(gone)
        await st.remove(gone)
        assert await st.stat(gone) is None
        assert sorted(await names(st, kind_of)) == [h.name for h in kept]
        await st.remove(*kept[:10], gone)
        await st.remove()
        assert sorted(await names(st, kind_of)) == [h.name for h in kept[10:]]


async def test_create_writes_only_what_is_not_there(kind: str, tmp_path: Path,
                                                    moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        b = blob(st, 3)
        assert await st.create(b.handle, b.data)
        assert not await st.create(b.handle, b.data)
        assert await st.load(b.handle, len(b.data)) == b.data
        tag = Handle("tag", "v1")
        first, second = blob(st, 4).handle.id, blob(st, 5).handle.id
        assert await st.create(tag, (first.hex + "\n").encode())
        assert not await st.create(tag, (second.hex + "\n").encode())
        assert (await st.load(tag, 4096)).decode().strip() == first.hex


async def test_of_racing_creates_exactly_one_wins(kind: str, tmp_path: Path,
                                                  moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        targets = [blob(st, i).handle.id for i in range(8)]
        won: list[ChunkId] = []

        async def create(target: ChunkId) -> None:
            if await st.create(Handle("tag", "race"), (target.hex + "\n").encode()):
                won.append(target)

        async with trio.open_nursery() as n:
            for target in targets:
                n.start_soon(create, target)
        assert len(won) == 1
        assert (await st.load(Handle("tag", "race"), 4096)).decode().strip() == won[0].hex


async def test_listing_reports_strays_and_skips_them(kind: str, tmp_path: Path,
                                                     moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        b = blob(st, 6)
        await st.save(b.handle, b.data)
        # (where a stray is put, where the listing reports it) for each kind
        where = "chunks/ab/" if kind == "local" else "packs/ab/"
        nested = ("refs/tags/x/y", "refs/tags/x" if kind == "local" else "refs/tags/x/y")
        marker = "refs/tags/.hidden" if kind == "local" else "refs/tags/"
        strays: dict[Kind, list[tuple[str, str]]] = {
            b.handle.kind: [(where + "readme.txt", where + "readme.txt"),
                            (where + "c" * 63, where + "c" * 63)],
            "tag": [nested, (marker, marker)]}
        for pairs in strays.values():
            for place, _ in pairs:
                plant(st, moto_port, place, b"stray\n")
        for k, pairs in strays.items():
            found: list[str] = []
            assert [o.name async for o in st.list(k, found.append)] == (
                [b.handle.name] if k == b.handle.kind else [])
            assert sorted(found) == sorted(reported for _, reported in pairs)


async def test_manifest_and_tag(kind: str, tmp_path: Path, moto_port: int,
                                store: LocalStore, image_dir: Path) -> None:
    mid = ingest(store, image_dir, "src").snapshot
    obj = store.get_manifest_object(mid)
    async with backend(kind, tmp_path, moto_port) as st:
        await st.save(Handle.of("manifest", mid), obj)
        assert await st.load(Handle.of("manifest", mid), MAX_MANIFEST_BYTES + 1) == obj
        assert await names(st, "manifest") == [mid.hex]
        tag = Handle("tag", "v1")
        await st.save(tag, (mid.hex + "\n").encode())
        assert ChunkId.parse((await st.load(tag, 4096)).decode().strip()) == mid
        other = blob(st, 2).handle.id
        await st.save(tag, (other.hex + "\n").encode())
        assert ChunkId.parse((await st.load(tag, 4096)).decode().strip()) == other
        assert await names(st, "tag") == ["v1"]
        await st.remove(tag)
        await st.remove(tag)
        assert await names(st, "tag") == []


async def test_a_kind_the_store_does_not_keep_is_refused(kind: str, tmp_path: Path,
                                                         moto_port: int) -> None:
    async with backend(kind, tmp_path, moto_port) as st:
        foreign: Kind = "pack" if "chunk" in st.kinds else "chunk"
        with pytest.raises(UsageError, match="no objects of kind"):
            await st.stat(Handle.of(foreign, ChunkId.of(b"x")))
        with pytest.raises(UsageError, match="no objects of kind"):
            await names(st, foreign)


@asynccontextmanager
async def s3_only(tmp_path: Path, port: int) -> AsyncIterator[S3Store]:
    bucket = f"s3only-{os.getpid()}-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    make_bucket(port, bucket)
    async with open_s3(RemoteURL(bucket, "p"), f"http://127.0.0.1:{port}") as s3:
        yield s3


async def test_s3_get_is_bounded_and_ranges_end_where_the_object_does(
        tmp_path: Path, moto_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    async with s3_only(tmp_path, moto_port) as s3:
        data = os.urandom(1000)
        x, y = Handle.of("access", ChunkId.of(b"x")), Handle.of("access", ChunkId.of(b"y"))
        await s3.save(x, data)
        assert await s3.load(x, max_bytes=1000) == data
        with pytest.raises(CorruptError, match="more than"):
            await s3.load(x, max_bytes=999)
        assert await s3.load_range(x, 10, 20) == data[10:20]
        assert await s3.load_range(x, 990, 1100) == data[990:]
        assert await s3.load_range(x, 2000, 2010) == b""
        with pytest.raises(NotFoundError):
            await s3.load_range(y, 0, 10)


async def test_s3_removes_in_batches(tmp_path: Path, moto_port: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)
    bucket = f"batches-{os.getpid()}"
    make_bucket(moto_port, bucket)
    proxy = FaultProxy(moto_port)
    try:
        async with open_s3(RemoteURL(bucket, "p"), proxy.endpoint) as s3:
            made = [Handle.of("index", ChunkId.of(b"%d" % i)) for i in range(6)]
            for h in made:
                await s3.save(h, b"x")
            before = proxy.requests
            await s3.remove(*made[1:])
            assert proxy.requests - before == 3
            assert [o.name async for o in s3.list("index")] == [made[0].name]
    finally:
        proxy.close()
