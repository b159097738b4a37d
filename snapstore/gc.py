"""Garbage collection: delete chunks and manifests that no tag reaches."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from snapstore.errors import CorruptError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.store.local import LocalStore


@dataclass(frozen=True, slots=True)
class GcReport:
    kept_snapshots: int
    kept_chunks: int
    deleted_snapshots: int
    deleted_chunks: int
    deleted_bytes: int
    deleted_tmp_files: int
    dry_run: bool


def gc(store: LocalStore, dry_run: bool = False) -> GcReport:
    """Mark from the tags, sweep the rest. Holds the store's exclusive lock throughout,
    so it waits for running ingests and no ingest starts until it is done."""
    with store.gc_lock():
        live_manifests: set[ChunkId] = set()
        live_chunks: set[ChunkId] = set()
        for name, mid in store.tags().items():
            try:
                m = store.get_manifest(mid)
            except (CorruptError, NotFoundError) as e:
                # Sweeping with an incomplete mark would delete live chunks.
                raise SnapstoreError(
                    f"tag {name!r} points at an unreadable snapshot ({e}); gc stopped "
                    f"without deleting anything: fix or remove the tag first"
                ) from None
            live_manifests.add(mid)
            live_chunks |= m.chunk_ids()
        dead_manifests = [m for m in store.manifest_ids() if m not in live_manifests]
        dead_chunks = [c for c in store.iter_chunks() if c.cid not in live_chunks]
        tmp = list(store.tmp_files())
        if not dry_run:
            for mid in dead_manifests:
                store.delete_manifest(mid)
            for c in dead_chunks:
                store.delete_chunk(c.cid)
            for p in tmp:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            store.sync()
    return GcReport(
        kept_snapshots=len(live_manifests),
        kept_chunks=len(live_chunks),
        deleted_snapshots=len(dead_manifests),
        deleted_chunks=len(dead_chunks),
        deleted_bytes=sum(c.stored_size for c in dead_chunks),
        deleted_tmp_files=len(tmp),
        dry_run=dry_run,
    )
