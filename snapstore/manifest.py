"""The snapshot manifest: its data model, canonical encoding and hostile-input validation.

docs/format.md is the specification; this module is its only implementation. The checks
a reader applies to labels, paths and times are public (`check_labels`, `check_path`,
`check_mtime`) so that ingest refuses up front, with the same rules, what no reader would
accept.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from snapstore import transcode
from snapstore.chunker_params import ChunkerParams
from snapstore.errors import ManifestError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.transcode import Layout

FORMAT = "snapstore-manifest"
VERSION = 1
MAX_ENTRIES = 1_000_000
MAX_EXTENTS = 50_000_000
MAX_LABELS = 256
MAX_TEXT = 4096
MAX_CHUNK = 16 << 20
MAX_EXTENT = 1 << 62
# Any time a file can have: time_t seconds (int64) and nanoseconds. Wider than int64
# nanoseconds, which end in 2262; ext4 stores times up to 2446.
MIN_MTIME_NS = -(1 << 63) * 10**9
MAX_MTIME_NS = ((1 << 63) - 1) * 10**9 + 999_999_999

Kind = Literal["file", "dir", "symlink"]
Form = Literal["exact", "transcoded"]


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a file's bytes: a stored chunk, or a hole of zeros when `chunk` is None."""

    chunk: ChunkId | None
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    kind: Kind
    mode: int
    mtime_ns: int
    size: int = 0
    extents: tuple[Extent, ...] = ()
    target: str = ""
    form: Form = "exact"
    # For a transcoded file: how its presented bytes derive from the stored ones, which
    # the extents hold (docs/format.md, snapstore/transcode.py).
    layout: Layout | None = None

    @property
    def hole_bytes(self) -> int:
        return sum(e.size for e in self.extents if e.chunk is None)

    @property
    def chunk_count(self) -> int:
        return sum(1 for e in self.extents if e.chunk is not None)

    @property
    def st_mode(self) -> int:
        kind_bits = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
        return kind_bits[self.kind] | self.mode


@dataclass(frozen=True, slots=True)
class Manifest:
    created: str
    chunker: ChunkerParams
    entries: tuple[Entry, ...]
    labels: dict[str, str] = field(default_factory=dict)

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.kind == "file")

    def chunk_ids(self) -> set[ChunkId]:
        return {x.chunk for e in self.files() for x in e.extents if x.chunk is not None}

    def chunk_sizes(self) -> dict[ChunkId, int]:
        return {x.chunk: x.size for e in self.files() for x in e.extents if x.chunk is not None}

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.files())

    @property
    def hole_bytes(self) -> int:
        return sum(e.hole_bytes for e in self.files())

    def encode(self) -> bytes:
        """The canonical bytes: the manifest id is their hash."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "labels": self.labels,
            "chunker": self.chunker.to_json(),
            "entries": [_entry_json(e) for e in self.entries],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _entry_json(e: Entry) -> dict[str, Any]:
    d: dict[str, Any] = {"path": e.path, "type": e.kind, "mode": e.mode, "mtime_ns": e.mtime_ns}
    if e.kind == "file":
        d["size"] = e.size
        d["extents"] = [[x.chunk.hex if x.chunk else None, x.size] for x in e.extents]
        d["form"] = e.form
        if e.layout is not None:
            d["transcode"] = e.layout.to_json()
    elif e.kind == "symlink":
        d["target"] = e.target
    return d


def decode(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; every problem is a ManifestError naming it."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    _require(isinstance(doc, dict), "manifest is not a JSON object")
    _require(doc.get("format") == FORMAT, "not a snapstore manifest")
    version = doc.get("version")
    _require(version == VERSION, f"manifest format version {version!r} is not supported "
             f"(this snapstore reads version {VERSION}); upgrade snapstore")
    created = doc.get("created")
    _require(isinstance(created, str) and len(created) < 64, "bad 'created' field")
    return Manifest(
        created=created,
        chunker=_chunker(doc.get("chunker")),
        entries=tuple(_entries(doc.get("entries"))),
        labels=check_labels(doc.get("labels")),
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ManifestError(message)


def _chunker(d: Any) -> ChunkerParams:
    _require(isinstance(d, dict), "bad 'chunker' field")
    try:
        return ChunkerParams(**d)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"bad chunker parameters: {e}") from None


def check_labels(d: Any) -> dict[str, str]:
    """Labels are at most MAX_LABELS string pairs, keys not empty, neither over MAX_TEXT."""
    _require(isinstance(d, dict), "bad 'labels' field")
    _require(len(d) <= MAX_LABELS, f"{len(d)} labels: at most {MAX_LABELS} are allowed")
    for k, v in d.items():
        _require(isinstance(k, str) and isinstance(v, str) and len(k) > 0,
                 f"bad label {k!r:.40}")
        _require(len(k) <= MAX_TEXT and len(v) <= MAX_TEXT,
                 f"label {k!r:.40} is too long: a key or value has at most {MAX_TEXT} "
                 "characters")
    return dict(d)


def check_path(path: Any) -> str:
    """A manifest path is relative, normalised and free of NUL, '.' and '..' components."""
    _require(isinstance(path, str) and 0 < len(path) <= MAX_TEXT, "bad path in manifest")
    _require("\0" not in path, f"path with a NUL byte in manifest: {path!r:.80}")
    _require(not path.startswith("/"), f"absolute path in manifest: {path!r:.80}")
    parts = path.split("/")
    _require(all(p not in ("", ".", "..") for p in parts),
             f"path with an empty, '.' or '..' component in manifest: {path!r:.80}")
    return str(path)


def check_mtime(v: Any, path: str) -> int:
    _require(isinstance(v, int) and not isinstance(v, bool)
             and MIN_MTIME_NS <= v <= MAX_MTIME_NS, f"bad mtime of {path!r:.80}")
    return int(v)


def _int(v: Any, what: str, hi: int = 1 << 62) -> int:
    _require(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi, f"bad {what}")
    return int(v)


def _entries(items: Any) -> Iterable[Entry]:
    _require(isinstance(items, list) and len(items) <= MAX_ENTRIES, "bad 'entries' field")
    seen: dict[str, str] = {}
    total_extents = 0
    for d in items:
        _require(isinstance(d, dict), "bad entry in manifest")
        path = check_path(d.get("path"))
        _require(path not in seen, f"duplicate path in manifest: {path!r:.80}")
        parent = path.rpartition("/")[0]
        _require(not parent or seen.get(parent) == "dir",
                 f"{path!r:.80} comes before its parent directory in the manifest")
        kind = d.get("type")
        mode = _int(d.get("mode"), f"mode of {path!r:.80}", 0o7777)
        mtime = check_mtime(d.get("mtime_ns"), path)
        seen[path] = kind
        if kind == "dir":
            yield Entry(path, "dir", mode, mtime)
        elif kind == "symlink":
            target = d.get("target")
            _require(isinstance(target, str) and 0 < len(target) <= MAX_TEXT
                     and "\0" not in target, f"bad symlink target of {path!r:.80}")
            yield Entry(path, "symlink", mode, mtime, target=target)
        elif kind == "file":
            size = _int(d.get("size"), f"size of {path!r:.80}")
            raw = d.get("extents")
            _require(isinstance(raw, list), f"bad extents of {path!r:.80}")
            total_extents += len(raw)
            _require(total_extents <= MAX_EXTENTS, "manifest has too many extents")
            extents = tuple(_extent(x, path) for x in raw)
            stored = sum(x.size for x in extents)
            form = d.get("form", "exact")
            layout = None
            if form == "transcoded":
                layout = _layout(d.get("transcode"), path)
                _require(stored == layout.raw_size and size == layout.presented_size(),
                         f"transcoded sizes of {path!r:.80} do not add up")
            else:
                _require(form == "exact", f"bad form of {path!r:.80}")
                _require(stored == size,
                         f"extents of {path!r:.80} do not add up to its size {size}")
            yield Entry(path, "file", mode, mtime, size, extents, form=form, layout=layout)
        else:
            raise ManifestError(f"unknown entry type {kind!r:.20} for {path!r:.80}")


def _layout(d: Any, path: str) -> Layout:
    _require(isinstance(d, dict) and d.get("kind") == transcode.KIND,
             f"unknown transcoding of {path!r:.80}")
    head = _int(d.get("header_size"), f"header size of {path!r:.80}")
    block = _int(d.get("block_size"), f"block size of {path!r:.80}", 64 << 20)
    raw = _int(d.get("raw_size"), f"stored size of {path!r:.80}")
    _require(block > 0 and head <= raw, f"bad transcoding of {path!r:.80}")
    return Layout(head, block, raw)


def _extent(x: Any, path: str) -> Extent:
    # The hot path of loading a manifest (once per chunk): plain checks, and messages
    # only built when something is wrong.
    if type(x) is list and len(x) == 2:
        cid, size = x
        if type(size) is int and 0 < size <= MAX_EXTENT:
            if cid is None:
                return Extent(None, size)
            if size <= MAX_CHUNK and type(cid) is str and is_valid_hex_id(cid):
                return Extent(ChunkId(bytes.fromhex(cid)), size)
    raise ManifestError(f"bad extent {_extent_problem(x)} in {path!r:.80}")


def _extent_problem(x: Any) -> str:
    if not (isinstance(x, list) and len(x) == 2):
        return f"{x!r:.60} (not an [id, size] pair)"
    cid, size = x
    if not (type(size) is int and 0 < size <= MAX_EXTENT):
        return f"size {size!r:.30}"
    if size > MAX_CHUNK:
        return f"chunk of {size} bytes (over {MAX_CHUNK})"
    return f"{cid!r:.80}: not a valid id"


def prefetch_order(m: Manifest, recorded: Iterable[str]) -> list[tuple[ChunkId, int]]:
    """The recorded first-read order (chunk hex per line) first, then the rest in file
    order. Lines that are not chunks of `m` are skipped: the list comes from the remote."""
    sizes = m.chunk_sizes()
    out: list[tuple[ChunkId, int]] = []
    seen: set[ChunkId] = set()

    def add(cid: ChunkId) -> None:
        if cid in sizes and cid not in seen:
            seen.add(cid)
            out.append((cid, sizes[cid]))

    for line in recorded:
        if is_valid_hex_id(line.strip()):
            add(ChunkId.parse(line.strip()))
    for entry in m.files():
        for x in entry.extents:
            if x.chunk is not None:
                add(x.chunk)
    return out
