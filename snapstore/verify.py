"""Verify: re-read and re-hash every chunk that snapshots reference."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from snapstore.errors import CorruptError, NotFoundError
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest
from snapstore.store.local import LocalStore


@dataclass(frozen=True, slots=True)
class Problem:
    """A bad or missing chunk (or manifest) and the files it affects."""

    what: str
    object_id: ChunkId | None  # None for a damaged tag, which names no object
    reason: str
    affects: tuple[str, ...] = ()


@dataclass(slots=True)
class VerifyReport:
    snapshots: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)


def verify_tags(
    store: LocalStore,
    workers: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every tag: a damaged tag file is a problem, the others' snapshots are checked."""
    tags, damaged = store.scan_tags()
    report = verify(store, tags, workers, on_chunk)
    report.problems[:0] = [Problem("tag", None, str(bad), (bad.name,)) for bad in damaged]
    return report


def verify(
    store: LocalStore,
    snapshots: dict[str, ChunkId],
    workers: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the named snapshots (name -> manifest id): manifests, then every chunk once."""
    report = VerifyReport()
    users: dict[ChunkId, list[str]] = defaultdict(list)
    sizes: dict[ChunkId, int] = {}
    for name, mid in snapshots.items():
        try:
            m: Manifest = store.get_manifest(mid)
        except (CorruptError, NotFoundError) as e:
            report.problems.append(Problem("snapshot", mid, str(e), (name,)))
            continue
        report.snapshots += 1
        for entry in m.files():
            for x in entry.extents:
                if x.chunk is not None:
                    sizes[x.chunk] = x.size
                    where = f"{name}:{entry.path}"
                    if not users[x.chunk] or users[x.chunk][-1] != where:
                        users[x.chunk].append(where)

    def check(cid: ChunkId) -> Problem | None:
        try:
            store.get_chunk(cid, sizes[cid])
        except (CorruptError, NotFoundError) as e:
            return Problem("chunk", cid, str(e), tuple(users[cid]))
        finally:
            if on_chunk:
                on_chunk(sizes[cid])
        return None

    with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
        for problem in pool.map(check, sorted(sizes)):
            if problem:
                report.problems.append(problem)
    report.chunks = len(sizes)
    report.bytes_checked = sum(sizes.values())
    return report
