"""Where each object lives in a bucket: keys relative to the remote's prefix.

docs/remote.md lists the layout. Packs fan out over 256 prefixes by their first two hex
digits; every other id-named kind is one key per id under its own prefix.
"""

from __future__ import annotations

from snapstore.errors import UsageError
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.store.backend import Handle, Kind
from snapstore.store.local import check_tag

PREFIXES: dict[Kind, str] = {
    "pack": "packs/",
    "index": "index/",
    "locator": "locate/",
    "manifest": "snapshots/",
    "tag": "refs/tags/",
    "access": "access/",
}


def key_of(h: Handle) -> str:
    """The key of a handle of a bucket kind; its name is checked first (a tag name, or an
    id for the other kinds), so no handle names a key outside its prefix."""
    if h.kind == "tag":
        return PREFIXES["tag"] + check_tag(h.name)
    if h.kind == "pack":
        return f"{PREFIXES['pack']}{h.id.hex[:2]}/{h.id.hex[2:]}"
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
            return check_tag(key.removeprefix(PREFIXES["tag"]))
        except UsageError:
            return None
    oid = id_of_key(key, PREFIXES[kind])
    return None if oid is None else oid.hex
