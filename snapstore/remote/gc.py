"""Remote garbage collection: mark from the tags, delete packs that hold nothing live.

The grace period is what makes it safe next to pushes that run at the same time: a push
writes packs and their indexes, then the locator, the manifest and the tag, so its
objects are unreachable until it ends. gc never deletes a pack younger than the grace
(by its LastModified), and treats every manifest younger than the grace as a root, so a
push that finishes within the grace never loses a chunk. Right before it deletes, gc looks
at the tags and manifests again, for a push that reused old packs while gc read the
bucket. docs/remote.md states the one case that is left, and that packs are not
rewritten (dead chunks in live packs stay).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.remote.cache import PackIndexCopies
from snapstore.remote.fetch import (
    fetch_index,
    fetch_locator,
    fetch_manifest,
    get_remote_tag,
    list_remote_tags,
)
from snapstore.remote.packs import PackIndex
from snapstore.remote.settings import DEFAULT_GRACE_S, check_grace
from snapstore.store.backend import Handle, Kind, ObjectInfo
from snapstore.store.local import LocalStore
from snapstore.store.s3 import S3Store


@dataclass(frozen=True, slots=True)
class RemoteGcReport:
    tags: int
    kept_snapshots: int
    kept_packs: int
    deleted_snapshots: int
    deleted_packs: int
    deleted_chunks: int
    deleted_bytes: int
    deleted_access_lists: int
    deleted_indexes: int
    dead_bytes_in_kept_packs: int
    young_unreferenced: int
    dry_run: bool
    # Keys under the layout's prefixes that name nothing snapstore writes (a folder
    # marker, a nested or misnamed key): not roots, never deleted, reported.
    foreign_keys: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _listing(s3: S3Store, kind: Kind, foreign: list[str]) -> dict[ChunkId, ObjectInfo]:
    """The objects of `kind` by id; keys that are no id go to `foreign`."""
    return {o.id: o async for o in s3.list(kind, foreign.append)}


async def remote_gc(s3: S3Store, store: LocalStore | None = None, *,
                    grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
                    force: bool = False) -> RemoteGcReport:
    """Collect `s3`'s garbage; `store`, if given, lends its copies of pack indexes. A
    grace below MIN_GRACE_S is refused (UsageError) unless `force`."""
    check_grace(grace_s, force)
    copies = PackIndexCopies(store) if store is not None else None
    # Listings come first: an object written after them is not swept by this run at all.
    # Indexes before packs: a push writes a pack before its index, so every index listed
    # here has its pack listed below unless the pack was deleted behind gc's back.
    foreign: list[str] = []
    indexes = await _listing(s3, "index", foreign)
    packs = await _listing(s3, "pack", foreign)
    snapshots = await _listing(s3, "manifest", foreign)
    locators = await _listing(s3, "locator", foreign)
    access = await _listing(s3, "access", foreign)
    tags, foreign_tags = await list_remote_tags(s3)
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)

    # A push in progress: its tag comes after its manifest.
    roots = await _tagged(s3, tags) | {mid for mid, o in snapshots.items()
                                       if o.modified > cutoff}
    live_chunks: set[ChunkId] = set()
    live_packs: set[ChunkId] = set()
    await _mark(s3, roots, live_chunks, live_packs)
    contents: dict[ChunkId, PackIndex] = {}
    for pack in sorted(set(indexes) & set(packs)):
        try:
            contents[pack] = await fetch_index(s3, copies, pack)
        except (CorruptError, NotFoundError) as e:
            raise _stop(f"the index of pack {pack.short()} is unreadable ({e})") from None
    # A second look at the tags and manifests, right before the sweep: a push that ran
    # while gc read the bucket may have tagged a snapshot whose old packs it reused (the
    # first look found them dead) and checked them already. Its tag or manifest shows
    # now, so what it reaches stays; docs/remote.md says what is left.
    tags_now, _ = await list_remote_tags(s3)
    later = await _tagged(s3, tags_now) | {
        mid for mid in await _listing(s3, "manifest", []) if mid not in snapshots}
    await _mark(s3, later - roots, live_chunks, live_packs)
    roots |= later

    def old(o: ObjectInfo) -> bool:
        return o.modified <= cutoff

    def holds_live(pack: ChunkId) -> bool:
        index = contents.get(pack)
        return pack in live_packs or (
            index is not None and any(cid in live_chunks for cid, _ in index.chunks))

    dead_snaps = [mid for mid, o in snapshots.items() if mid not in roots and old(o)]
    dead_locators = [mid for mid, o in locators.items() if mid not in roots and old(o)]
    dead_access = [mid for mid, o in access.items() if mid not in roots and old(o)]
    unreferenced = [p for p in packs if not holds_live(p)]
    dead_packs = [p for p in unreferenced if old(packs[p])]
    # An index whose pack is gone would make pushes skip chunks no pack holds.
    orphans = [p for p in indexes if p not in packs]
    kept = set(packs) - set(dead_packs)
    dead_bytes = sum(loc.length for p, index in contents.items() if p in kept
                     for cid, loc in index.chunks if cid not in live_chunks)
    if not dry_run:
        # The reverse of the write order: what names an object goes before the object,
        # so nothing is ever left pointing at a deleted one.
        await s3.remove(*(Handle.of("manifest", m) for m in dead_snaps),
                        *(Handle.of("access", m) for m in dead_access))
        await s3.remove(*(Handle.of("locator", m) for m in dead_locators))
        await s3.remove(*(Handle.of("index", p) for p in dead_packs + orphans if p in indexes))
        await s3.remove(*(Handle.of("pack", p) for p in dead_packs))
        for p in dead_packs + orphans:
            if copies is not None:
                copies.delete(p)
    return RemoteGcReport(
        tags=len(tags),
        kept_snapshots=len(roots),
        kept_packs=len(kept),
        deleted_snapshots=len(dead_snaps),
        deleted_packs=len(dead_packs),
        deleted_chunks=sum(len(contents[p].chunks) for p in dead_packs if p in contents),
        deleted_bytes=sum(packs[p].size for p in dead_packs),
        deleted_access_lists=len(dead_access),
        deleted_indexes=len([p for p in dead_packs + orphans if p in indexes]),
        dead_bytes_in_kept_packs=dead_bytes,
        young_unreferenced=len(unreferenced) - len(dead_packs),
        dry_run=dry_run,
        foreign_keys=sorted(foreign + foreign_tags),
    )


async def _tagged(s3: S3Store, tags: list[str]) -> set[ChunkId]:
    """The snapshots `tags` name."""
    out: set[ChunkId] = set()
    for name in tags:
        try:
            out.add(await get_remote_tag(s3, name))
        except (CorruptError, NotFoundError) as e:
            raise _stop(f"tag {name!r} is unreadable ({e})") from None
    return out


async def _mark(s3: S3Store, roots: set[ChunkId], live_chunks: set[ChunkId],
                live_packs: set[ChunkId]) -> None:
    """Add the chunks of `roots` and the packs their locators name to the live sets."""
    for mid in sorted(roots):
        try:
            _, m = await fetch_manifest(s3, mid)
            live_chunks |= m.chunk_ids()
            # The packs a root's locator names stay even if their index is gone.
            live_packs |= set((await fetch_locator(s3, mid, m.chunk_ids())).packs)
        except (CorruptError, NotFoundError) as e:
            # Sweeping with an incomplete mark would delete live chunks.
            raise _stop(f"snapshot {mid.short()} is unreadable ({e})") from None


def _stop(why: str) -> SnapstoreError:
    return SnapstoreError(f"{why}; remote gc stopped without deleting anything")
