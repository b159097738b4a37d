"""Where each object lives in a bucket: keys relative to the remote's prefix.

docs/remote.md lists the layout. Packs fan out over 256 prefixes by their first two hex
digits; every other id-named kind is one key per id under its own prefix.
"""

from __future__ import annotations

from snapstore.errors import UsageError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.store.backend import Handle, Kind
from snapstore.store.local import check_tag

TAGS_PREFIX = "refs/tags/"

PREFIXES: dict[Kind, str] = {
    "pack": "packs/",
    "index": "index/",
    "locator": "locate/",
    "manifest": "snapshots/",
    "tag": TAGS_PREFIX,
    "access": "access/",
}


def pack_key(pack: ChunkId) -> str:
    return f"{PREFIXES['pack']}{pack.hex[:2]}/{pack.hex[2:]}"


def index_key(pack: ChunkId) -> str:
    return PREFIXES["index"] + pack.hex


def locator_key(mid: ChunkId) -> str:
    return PREFIXES["locator"] + mid.hex


def manifest_key(mid: ChunkId) -> str:
    return PREFIXES["manifest"] + mid.hex


def tag_key(name: str) -> str:
    return TAGS_PREFIX + name


def access_key(mid: ChunkId) -> str:
    return PREFIXES["access"] + mid.hex


def key_of(h: Handle) -> str:
    """The key of a handle of a bucket kind; its name is checked first (a tag name, or an
    id for the other kinds), so no handle names a key outside its prefix."""
    if h.kind == "tag":
        return tag_key(check_tag(h.name))
    if h.kind == "pack":
        return pack_key(h.id)
    return PREFIXES[h.kind] + h.id.hex


def id_of_key(key: str, prefix: str) -> ChunkId | None:
    """The id a listed key names under `prefix` ('packs/' split 2/62, else one name), or
    None for a stray object: listed names are checked before they become ids."""
    name = key.removeprefix(prefix)
    if name == key:
        return None
    if prefix == PREFIXES["pack"]:
        head, sep, tail = name.partition("/")
        if not sep or len(head) != 2:
            return None
        name = head + tail
    return ChunkId.parse(name) if is_valid_hex_id(name) else None


def name_of_key(kind: Kind, key: str) -> str | None:
    """The handle name a listed key of `kind` has, or None for a stray object (a key
    under refs/tags/ whose rest is no tag name, such as a console's folder marker)."""
    if kind == "tag":
        try:
            return check_tag(key.removeprefix(TAGS_PREFIX))
        except UsageError:
            return None
    oid = id_of_key(key, PREFIXES[kind])
    return None if oid is None else oid.hex
