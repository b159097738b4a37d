"""The inode table: a manifest turned into numbered nodes with their stat fields.

Built once per mount and never changed (a snapshot is immutable), so every lookup is a
dict access and no lock is needed.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from bisect import bisect_right
from dataclasses import dataclass, field

from snapstore.manifest import Entry, Extent, Manifest
from snapstore.transcode import Layout

ROOT_INODE = 1
_ROOT_MODE = 0o755


@dataclass(slots=True)
class Node:
    """One file, directory or symlink of the snapshot."""

    inode: int
    path: str
    kind: str
    st_mode: int
    mtime_ns: int
    size: int
    parent: int
    extents: tuple[Extent, ...] = ()
    # starts[i] is the file offset of extents[i]; bisect on it finds an offset's extent.
    starts: tuple[int, ...] = ()
    target: str = ""
    # Transcoded files only: how the bytes presented (`size` of them) derive from the
    # stored bytes the extents hold (snapstore/transcode.py).
    layout: Layout | None = None
    # Directories only: children in manifest (sorted) order, and by name.
    children: list[int] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)
    subdirs: int = 0

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def nlink(self) -> int:
        return 2 + self.subdirs if self.kind == "dir" else 1

    @property
    def blocks(self) -> int:
        """512-byte blocks of data, holes excluded, as du counts a sparse file."""
        stored = sum(x.size for x in self.extents if x.chunk is not None)
        return (stored + 511) // 512

    @property
    def stored_size(self) -> int:
        return self.layout.raw_size if self.layout is not None else self.size

    def extent_at(self, offset: int) -> int:
        """Index of the extent that holds stored byte `offset` (0 <= offset < stored_size)."""
        return bisect_right(self.starts, offset) - 1


def _error(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class InodeTable:
    """Every node of one manifest by inode number; the root directory is ROOT_INODE."""

    def __init__(self, m: Manifest) -> None:
        newest = max((e.mtime_ns for e in m.entries), default=0)
        root = Node(ROOT_INODE, "", "dir", stat.S_IFDIR | _ROOT_MODE, newest, 0, ROOT_INODE)
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        by_path: dict[str, int] = {"": ROOT_INODE}
        numbers = itertools.count(ROOT_INODE + 1)
        # The manifest lists parents before children (decode() enforces it).
        for e in m.entries:
            parent_path, _, name = e.path.rpartition("/")
            parent = self._nodes[by_path[parent_path]]
            node = _node(next(numbers), parent.inode, e)
            self._nodes[node.inode] = node
            by_path[e.path] = node.inode
            parent.children.append(node.inode)
            parent.by_name[name] = node.inode
            if e.kind == "dir":
                parent.subdirs += 1

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise _error(errno.ENOENT, f"inode {inode}")
        return node

    def lookup(self, parent: int, name: str) -> Node:
        d = self.directory(parent)
        if name == ".":
            return d
        if name == "..":
            return self.get(d.parent)
        child = d.by_name.get(name)
        if child is None:
            raise _error(errno.ENOENT, name)
        return self._nodes[child]

    def directory(self, inode: int) -> Node:
        node = self.get(inode)
        if node.kind != "dir":
            raise _error(errno.ENOTDIR, node.path)
        return node

    def file(self, inode: int) -> Node:
        node = self.get(inode)
        if node.kind == "dir":
            raise _error(errno.EISDIR, node.path)
        if node.kind != "file":
            raise _error(errno.EINVAL, node.path)
        return node

    @property
    def total_bytes(self) -> int:
        return sum(n.size for n in self._nodes.values() if n.kind == "file")


def _node(inode: int, parent: int, e: Entry) -> Node:
    if e.kind == "file":
        starts = tuple(itertools.accumulate((x.size for x in e.extents[:-1]), initial=0))
        return Node(inode, e.path, "file", e.st_mode, e.mtime_ns, e.size, parent,
                    extents=e.extents, starts=starts if e.extents else (), layout=e.layout)
    if e.kind == "symlink":
        return Node(inode, e.path, "symlink", e.st_mode, e.mtime_ns,
                    len(os.fsencode(e.target)), parent, target=e.target)
    return Node(inode, e.path, "dir", e.st_mode, e.mtime_ns, 0, parent)
