"""Finding snapshots in a remote by their labels, for restores on a host that has none."""

from __future__ import annotations

import contextlib

import trio

from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest
from snapstore.remote.fetch import (
    fetch_manifest,
    get_remote_tag,
    list_remote_tags,
    resolve_remote,
)
from snapstore.store.s3 import S3Store, endpoint_url, open_s3
from snapstore.store.url import RemoteURL
from snapstore.workflow import matching


async def find_in(s3: S3Store, labels: dict[str, str]) -> ChunkId | None:
    """The newest tagged snapshot of the remote whose labels include `labels`."""
    snapshots: dict[ChunkId, Manifest] = {}
    names, _ = await list_remote_tags(s3)
    for name in names:
        with contextlib.suppress(CorruptError, NotFoundError):
            mid = await get_remote_tag(s3, name)
            if mid not in snapshots:
                _, snapshots[mid] = await fetch_manifest(s3, mid)
    hits = matching(snapshots.items(), labels)
    return hits[0][0] if hits else None


def find_remote(remote: str, labels: dict[str, str], endpoint: str | None = None) -> str | None:
    """Hex id of the newest matching snapshot in `remote`, or None."""
    async def main() -> ChunkId | None:
        async with open_s3(RemoteURL.parse(remote), endpoint_url(endpoint)) as s3:
            return await find_in(s3, labels)

    found = trio.run(main)
    return found.hex if found else None


def remote_manifest(remote: str, ref: str, endpoint: str | None = None) -> Manifest:
    """The manifest of `ref` (a snapshot's hex id, or a tag) in `remote`, checked."""
    async def main() -> Manifest:
        async with open_s3(RemoteURL.parse(remote), endpoint_url(endpoint)) as s3:
            mid, _ = await resolve_remote(s3, ref)
            _, manifest = await fetch_manifest(s3, mid)
            return manifest

    return trio.run(main)
