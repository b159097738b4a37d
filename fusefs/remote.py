"""A mount of a snapshot in a remote: fusefs over the remote's chunk reader."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs.mount import MountOptions, serve
from snapstore.remote.reader import RemoteChunkReader, RemoteSnapshot
from snapstore.remote.settings import DEFAULT_CACHE_BYTES, DEFAULT_CONNECTIONS
from snapstore.store.local import LocalStore
from snapstore.store.s3 import endpoint_url, open_s3
from snapstore.store.url import RemoteURL

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RemoteMount:
    """A remote mount's settings: where from, disk cache bound, whether to prefetch, and
    the deadline of a read (None: the default)."""

    snapshot: RemoteSnapshot
    remote: str
    endpoint: str | None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    prefetch: bool = False
    read_timeout_s: float | None = None


async def serve_remote(store: LocalStore, how: RemoteMount, mountpoint: Path,
                       options: MountOptions, ready: Callable[[], None]) -> None:
    """Serve a snapshot of a remote with fusefs until unmounted, prefetching behind it."""
    async with open_s3(RemoteURL.parse(how.remote), endpoint_url(how.endpoint),
                       connections=DEFAULT_CONNECTIONS + 4,
                       read_timeout_s=how.read_timeout_s) as s3:
        reader = RemoteChunkReader(store, s3, how.snapshot, how.cache_bytes)
        async with trio.open_nursery() as nursery:
            if how.prefetch:
                nursery.start_soon(reader.prefetch, how.snapshot.order)
            await serve(how.snapshot.manifest, mountpoint, reader, options, ready)
            nursery.cancel_scope.cancel()
        log.info("remote reads: %s", reader.stats.as_dict())
