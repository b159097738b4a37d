"""Garbage collection: delete chunks and manifests that no tag reaches."""

from __future__ import annotations

import os
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
    deleted_work_dirs: int
    left_alone: tuple[str, ...]
    dry_run: bool


def gc(store: LocalStore, dry_run: bool = False) -> GcReport:
    """Mark from the tags, sweep the rest. Holds the store's exclusive lock throughout,
    so it waits for running ingests and no ingest starts until it is done.

    Everything that can stop it (a damaged tag, an unreadable tagged snapshot, a link
    in place of tmp/ or work/) is checked before the first deletion."""
    with store.gc_lock():
        tags, damaged = store.scan_tags()
        if damaged:
            # Its snapshot is unknown, so nothing can be shown to be unreachable.
            raise SnapstoreError(
                f"{damaged[0]}; gc stopped without deleting anything: point it at a "
                f"snapshot (`snapstore tag REF {damaged[0].name}`) or remove it "
                f"(`snapstore rm {damaged[0].name}`) first"
            )
        live_manifests: set[ChunkId] = set()
        live_chunks: set[ChunkId] = set()
        for name, mid in tags.items():
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
        tmp_fd, work_fd = store.open_sweep_dirs()
        try:
            if not dry_run:
                for mid in dead_manifests:
                    store.delete_manifest(mid)
                for c in dead_chunks:
                    store.delete_chunk(c.cid)
            try:
                tmp = store.sweep_tmp(tmp_fd, dry_run)
                work = store.sweep_work(work_fd, dry_run)
            finally:
                if not dry_run:
                    store.sync()
        finally:
            os.close(tmp_fd)
            os.close(work_fd)
    return GcReport(
        kept_snapshots=len(live_manifests),
        kept_chunks=len(live_chunks),
        deleted_snapshots=len(dead_manifests),
        deleted_chunks=len(dead_chunks),
        deleted_bytes=sum(c.stored_size for c in dead_chunks),
        deleted_tmp_files=tmp.removed,
        deleted_work_dirs=work.removed,
        left_alone=tmp.left + work.left,
        dry_run=dry_run,
    )
