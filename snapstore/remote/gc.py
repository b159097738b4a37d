"""Remote garbage collection: mark from the tags, sweep what no tag reaches, after a grace.

The grace period is what makes it safe next to pushes that run at the same time: a push
writes chunks, then the manifest, then the tag, so its objects are unreachable until it
ends. gc never deletes an object younger than the grace (by its LastModified), and treats
every manifest younger than the grace as a root, so a push that finishes within the grace
never loses a chunk. docs/remote.md states the one case that is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.remote.settings import DEFAULT_GRACE_S
from snapstore.remote.transfer import fetch_manifest, get_remote_tag
from snapstore.store.s3 import ObjectInfo, S3Store, chunk_id_of_key


@dataclass(frozen=True, slots=True)
class RemoteGcReport:
    tags: int
    kept_snapshots: int
    kept_chunks: int
    deleted_snapshots: int
    deleted_chunks: int
    deleted_bytes: int
    deleted_access_lists: int
    young_unreferenced: int
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _listing(s3: S3Store, prefix: str) -> list[ObjectInfo]:
    return [o async for o in s3.list(prefix)]


async def remote_gc(s3: S3Store, *, grace_s: float = DEFAULT_GRACE_S,
                    dry_run: bool = False) -> RemoteGcReport:
    # Listings come first: an object written after them is not swept by this run at all.
    chunks = await _listing(s3, "chunks/")
    snapshots = await _listing(s3, "snapshots/")
    access = await _listing(s3, "access/")
    tags = await _listing(s3, "refs/tags/")
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)

    roots: set[ChunkId] = set()
    for t in tags:
        name = t.key.removeprefix("refs/tags/")
        try:
            roots.add(await get_remote_tag(s3, name))
        except (CorruptError, NotFoundError) as e:
            raise _stop(f"tag {name!r} is unreadable ({e})") from None
    for o in snapshots:
        mid = _id_of(o.key.removeprefix("snapshots/"))
        if mid is not None and o.last_modified > cutoff:
            roots.add(mid)  # a push in progress: its tag comes after its manifest
    live_chunks: set[ChunkId] = set()
    for mid in sorted(roots):
        try:
            _, m = await fetch_manifest(s3, mid)
        except (CorruptError, NotFoundError) as e:
            # Sweeping with an incomplete mark would delete live chunks.
            raise _stop(f"snapshot {mid.short()} is unreadable ({e})") from None
        live_chunks |= m.chunk_ids()

    def old(o: ObjectInfo) -> bool:
        return o.last_modified <= cutoff

    dead_snaps = [o for o in snapshots if _id_of(o.key.removeprefix("snapshots/")) not in roots
                  and old(o)]
    dead_access = [o for o in access if _id_of(o.key.removeprefix("access/")) not in roots
                   and old(o)]
    unreferenced = [o for o in chunks if chunk_id_of_key(o.key) not in live_chunks]
    dead_chunks = [o for o in unreferenced if old(o)]
    if not dry_run:
        # Manifests before chunks: no manifest is ever left pointing at a deleted chunk.
        await s3.delete_many([o.key for o in dead_snaps + dead_access])
        await s3.delete_many([o.key for o in dead_chunks])
    return RemoteGcReport(
        tags=len(tags),
        kept_snapshots=len(roots),
        kept_chunks=len(chunks) - len(dead_chunks),
        deleted_snapshots=len(dead_snaps),
        deleted_chunks=len(dead_chunks),
        deleted_bytes=sum(o.size for o in dead_chunks),
        deleted_access_lists=len(dead_access),
        young_unreferenced=len(unreferenced) - len(dead_chunks),
        dry_run=dry_run,
    )


def _id_of(name: str) -> ChunkId | None:
    return ChunkId.parse(name) if is_valid_hex_id(name) else None


def _stop(why: str) -> SnapstoreError:
    return SnapstoreError(f"{why}; remote gc stopped without deleting anything")

