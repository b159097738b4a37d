"""One conformance suite for every store: the layout's contracts, run on the local store and
on the S3 store (over moto), through a thin adapter each. On S3 a chunk lives in a pack:
the adapter writes one-chunk packs with their index and reads chunks back by ranged GET.

Contracts checked: a chunk object reads back byte-identical; a missing object is
NotFoundError (or absent), never empty bytes; writes are idempotent; a tag names exactly one
manifest and reads back; listing yields each chunk once; deletes are idempotent. Then the
S3 store's own: bounded and ranged GETs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import pytest
import trio

from snapstore import codec
from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.remote.packs import Location, build_pack
from snapstore.remote.transfer import remote_chunks
from snapstore.remote.url import RemoteURL
from snapstore.store.local import MAX_MANIFEST_BYTES, LocalStore
from snapstore.store.s3 import (
    S3Store,
    index_key,
    manifest_key,
    open_s3,
    pack_key,
    tag_key,
)
from tests.s3proxy import make_bucket, moto_server, s3_env


class Layout(Protocol):
    """The verbs both stores offer, keyed the same way."""

    async def put_chunk(self, cid: ChunkId, obj: bytes) -> None: ...
    async def get_chunk_object(self, cid: ChunkId) -> bytes: ...
    async def has_chunk(self, cid: ChunkId) -> bool: ...
    async def chunk_ids(self) -> list[ChunkId]: ...
    async def delete_chunk(self, cid: ChunkId) -> None: ...
    async def put_manifest_object(self, mid: ChunkId, obj: bytes) -> None: ...
    async def get_manifest_object(self, mid: ChunkId) -> bytes: ...
    async def set_tag(self, name: str, mid: ChunkId) -> None: ...
    async def get_tag(self, name: str) -> ChunkId | None: ...


class LocalLayout:
    def __init__(self, store: LocalStore) -> None:
        self.s = store

    async def put_chunk(self, cid: ChunkId, obj: bytes) -> None:
        self.s.put_chunk(cid, obj)

    async def get_chunk_object(self, cid: ChunkId) -> bytes:
        return self.s.get_chunk_object(cid)

    async def has_chunk(self, cid: ChunkId) -> bool:
        return self.s.has_chunk(cid)

    async def chunk_ids(self) -> list[ChunkId]:
        return [c.cid for c in self.s.iter_chunks()]

    async def delete_chunk(self, cid: ChunkId) -> None:
        self.s.delete_chunk(cid)

    async def put_manifest_object(self, mid: ChunkId, obj: bytes) -> None:
        self.s.put_manifest_object(mid, obj)

    async def get_manifest_object(self, mid: ChunkId) -> bytes:
        return self.s.get_manifest_object(mid)

    async def set_tag(self, name: str, mid: ChunkId) -> None:
        self.s.set_tag(name, mid)

    async def get_tag(self, name: str) -> ChunkId | None:
        return self.s.get_tag(name)


class S3Layout:
    def __init__(self, s3: S3Store) -> None:
        self.s = s3

    async def _where(self) -> dict[ChunkId, Location]:
        return (await remote_chunks(self.s, None)).where

    async def put_chunk(self, cid: ChunkId, obj: bytes) -> None:
        pack = build_pack([(cid, obj)])
        await self.s.put(pack_key(pack.pack), pack.data)
        await self.s.put(index_key(pack.pack), pack.index)

    async def get_chunk_object(self, cid: ChunkId) -> bytes:
        at = (await self._where()).get(cid)
        if at is None:
            raise NotFoundError(f"chunk {cid} is in no pack")
        return await self.s.get_range(pack_key(at.pack), at.offset, at.end)

    async def has_chunk(self, cid: ChunkId) -> bool:
        return cid in await self._where()

    async def chunk_ids(self) -> list[ChunkId]:
        return list(await self._where())

    async def delete_chunk(self, cid: ChunkId) -> None:
        at = (await self._where()).get(cid)
        if at is not None:
            await self.s.delete_many([index_key(at.pack), pack_key(at.pack)])

    async def put_manifest_object(self, mid: ChunkId, obj: bytes) -> None:
        await self.s.put(manifest_key(mid), obj)

    async def get_manifest_object(self, mid: ChunkId) -> bytes:
        return await self.s.get(manifest_key(mid), MAX_MANIFEST_BYTES + 1)

    async def set_tag(self, name: str, mid: ChunkId) -> None:
        await self.s.put(tag_key(name), (mid.hex + "\n").encode())

    async def get_tag(self, name: str) -> ChunkId | None:
        try:
            return ChunkId.parse((await self.s.get(tag_key(name), 4096)).decode().strip())
        except NotFoundError:
            return None


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
async def layout(kind: str, tmp_path: Path, port: int) -> AsyncIterator[Layout]:
    if kind == "local":
        yield LocalLayout(LocalStore.open(tmp_path / "suite"))
        return
    bucket = f"suite-{os.getpid()}-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    make_bucket(port, bucket)
    async with open_s3(RemoteURL(bucket, "p"), f"http://127.0.0.1:{port}") as s3:
        yield S3Layout(s3)


def chunk(seed: int, size: int = 100_000) -> tuple[ChunkId, bytes]:
    raw = os.urandom(size) if seed < 0 else bytes([seed % 256]) * size
    return ChunkId.of(raw), codec.encode(raw)


async def test_chunks_round_trip_and_idempotent(kind: str, tmp_path: Path,
                                                moto_port: int) -> None:
    async with layout(kind, tmp_path, moto_port) as st:
        cid, obj = chunk(-1)
        assert not await st.has_chunk(cid)
        await st.put_chunk(cid, obj)
        await st.put_chunk(cid, obj)
        assert await st.has_chunk(cid)
        assert await st.get_chunk_object(cid) == obj
        assert await st.chunk_ids() == [cid]


async def test_missing_objects_are_not_found(kind: str, tmp_path: Path,
                                             moto_port: int) -> None:
    async with layout(kind, tmp_path, moto_port) as st:
        cid, _ = chunk(1)
        with pytest.raises(NotFoundError):
            await st.get_chunk_object(cid)
        with pytest.raises(NotFoundError):
            await st.get_manifest_object(cid)
        assert await st.get_tag("nothing") is None


async def test_listing_and_idempotent_delete(kind: str, tmp_path: Path,
                                             moto_port: int) -> None:
    async with layout(kind, tmp_path, moto_port) as st:
        made = dict(chunk(i, 5000) for i in range(20))
        async with trio.open_nursery() as n:
            for cid, obj in made.items():
                n.start_soon(st.put_chunk, cid, obj)
        assert sorted(await st.chunk_ids()) == sorted(made)
        gone = sorted(made)[0]
        await st.delete_chunk(gone)
        await st.delete_chunk(gone)
        assert not await st.has_chunk(gone)
        assert sorted(await st.chunk_ids()) == sorted(made)[1:]


async def test_manifest_and_tag(kind: str, tmp_path: Path, moto_port: int,
                                store: LocalStore, image_dir: Path) -> None:
    mid = ingest(store, image_dir, "src").snapshot
    obj = store.get_manifest_object(mid)
    async with layout(kind, tmp_path, moto_port) as st:
        await st.put_manifest_object(mid, obj)
        assert await st.get_manifest_object(mid) == obj
        await st.set_tag("v1", mid)
        assert await st.get_tag("v1") == mid
        other, _ = chunk(2)
        await st.set_tag("v1", other)
        assert await st.get_tag("v1") == other


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
        await s3.put("x", data)
        assert await s3.get("x", max_bytes=1000) == data
        with pytest.raises(CorruptError, match="more than"):
            await s3.get("x", max_bytes=999)
        assert await s3.get_range("x", 10, 20) == data[10:20]
        assert await s3.get_range("x", 990, 1100) == data[990:]
        assert await s3.get_range("x", 2000, 2010) == b""
        with pytest.raises(NotFoundError):
            await s3.get_range("y", 0, 10)
