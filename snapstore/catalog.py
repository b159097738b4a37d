"""Read-only views of a store: snapshot summaries, snapshot details and store statistics.

Each view is a plain dict, so the CLI prints the same data as text or as --json.
"""

from __future__ import annotations

from typing import Any

from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest
from snapstore.store.local import LocalStore


def snapshot_summary(store: LocalStore, mid: ChunkId, m: Manifest,
                     tags: list[str]) -> dict[str, Any]:
    chunks = m.chunk_sizes()
    stored = sum(_stored_size(store, c) for c in chunks)
    return {
        "id": mid.hex,
        "tags": tags,
        "created": m.created,
        "labels": m.labels,
        "files": sum(1 for _ in m.files()),
        "logical_bytes": m.logical_bytes,
        "hole_bytes": m.hole_bytes,
        "chunks": len(chunks),
        "unique_bytes": sum(chunks.values()),
        "stored_bytes": stored,
    }


def list_snapshots(store: LocalStore) -> list[dict[str, Any]]:
    """Every snapshot in the store, tagged or not, newest first."""
    by_id: dict[ChunkId, list[str]] = {}
    for name, mid in store.tags().items():
        by_id.setdefault(mid, []).append(name)
    out = []
    for mid in store.manifest_ids():
        try:
            m = store.get_manifest(mid)
        except (CorruptError, NotFoundError) as e:
            out.append({"id": mid.hex, "tags": by_id.get(mid, []), "error": str(e)})
            continue
        out.append(snapshot_summary(store, mid, m, by_id.get(mid, [])))
    out.sort(key=lambda s: (s.get("created", ""), s["id"]), reverse=True)
    return out


def show_snapshot(store: LocalStore, mid: ChunkId) -> dict[str, Any]:
    m = store.get_manifest(mid)
    tags = [n for n, t in store.tags().items() if t == mid]
    doc = snapshot_summary(store, mid, m, tags)
    doc["chunker"] = m.chunker.to_json()
    doc["entries"] = [
        {
            "path": e.path,
            "type": e.kind,
            "mode": f"{e.mode:04o}",
            **({"size": e.size, "chunks": e.chunk_count, "hole_bytes": e.hole_bytes,
                "form": e.form} if e.kind == "file" else {}),
            **({"target": e.target} if e.kind == "symlink" else {}),
        }
        for e in m.entries
    ]
    return doc


def store_stats(store: LocalStore) -> dict[str, Any]:
    """Totals over the tagged snapshots and over what is on disk."""
    logical = holes = 0
    referenced: dict[ChunkId, int] = {}
    tags = store.tags()
    for mid in set(tags.values()):
        m = store.get_manifest(mid)
        logical += m.logical_bytes
        holes += m.hole_bytes
        referenced.update(m.chunk_sizes())
    on_disk = {c.cid: c.stored_size for c in store.iter_chunks()}
    unique = sum(referenced.values())
    stored = sum(on_disk.get(c, 0) for c in referenced)
    return {
        "tags": len(tags),
        "snapshots": len(set(tags.values())),
        "logical_bytes": logical,
        "hole_bytes": holes,
        "unique_chunks": len(referenced),
        "unique_bytes": unique,
        "stored_bytes": stored,
        "store_chunks": len(on_disk),
        "store_bytes": sum(on_disk.values()),
        "dedup_ratio": round((logical - holes) / unique, 3) if unique else None,
        "reduction_ratio": round(logical / stored, 3) if stored else None,
    }


def _stored_size(store: LocalStore, cid: ChunkId) -> int:
    try:
        return store.chunk_path(cid).stat().st_size
    except FileNotFoundError:
        return 0
