"""The pyfuse3 request handlers: look up the inode table, delegate reads.

Every handler goes through `_handler`, the one place where errors become FUSEError:
an exception escaping a pyfuse3 handler would end the whole mount.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    StatvfsData,
    XAttrNameT,
)

from fusefs.inodes import InodeTable, Node
from fusefs.reader import SnapshotReader, Stream
from snapstore.errors import SnapstoreError

log = logging.getLogger(__name__)

# The content never changes while mounted, so the kernel may cache names and
# attributes for as long as it likes; a day bounds memory held for idle mounts.
CACHE_TIMEOUT = 24 * 3600.0
_BLOCK = 4096

P = ParamSpec("P")
R = TypeVar("R")
Ops = TypeVar("Ops", bound="SnapshotOps")


def _handler(
    fn: Callable[Concatenate[Ops, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Ops, P], Coroutine[Any, Any, R]]:
    """Map what a handler raises to an errno: OSError keeps its errno, a snapstore error
    (a chunk that is missing or fails its check) is EIO, anything else is EIO and logged
    with its traceback. Cancellation passes through untouched."""

    @functools.wraps(fn)
    async def wrapper(self: Ops, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except SnapstoreError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class SnapshotOps(pyfuse3.Operations):
    """A read-only view of one snapshot."""

    def __init__(self, table: InodeTable, reader: SnapshotReader) -> None:
        super().__init__()
        self._table = table
        self._reader = reader
        self._files: dict[int, tuple[Node, Stream]] = {}
        self._handles = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self.initialized = trio.Event()

    def init(self) -> None:
        # Called while the kernel's INIT request is answered; the reply goes out as soon
        # as this returns, so settings INIT would overwrite must wait for this event.
        self.initialized.set()

    def attributes(self, node: Node) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = InodeT(node.inode)
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = ModeT(node.st_mode)
        a.st_nlink = node.nlink
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = _BLOCK
        a.st_blocks = node.blocks
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = node.mtime_ns
        return a

    # -- names and attributes ----------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return self.attributes(self._table.lookup(parent_inode, os.fsdecode(name)))

    @_handler
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self.attributes(self._table.get(inode))

    @_handler
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        node = self._table.get(inode)
        if node.kind != "symlink":
            raise OSError(errno.EINVAL, "not a symlink")
        return FileNameT(os.fsencode(node.target))

    @_handler
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return FileHandleT(self._table.directory(inode).inode)

    @_handler
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        children = self._table.directory(fh).children
        for i in range(start_id, len(children)):
            child = self._table.get(children[i])
            name = FileNameT(os.fsencode(child.name))
            if not pyfuse3.readdir_reply(token, name, self.attributes(child), i + 1):
                break

    @_handler
    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    @_handler
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        s = StatvfsData()
        s.f_bsize = s.f_frsize = _BLOCK
        s.f_blocks = (self._table.total_bytes + _BLOCK - 1) // _BLOCK
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._table)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- file contents -----------------------------------------------------------------

    @_handler
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = self._table.file(inode)
        fh = next(self._handles)
        self._files[fh] = (node, Stream())
        # keep_cache: the bytes never change, so pages cached by an earlier open stay valid.
        return FileInfo(fh=FileHandleT(fh), keep_cache=True)

    @_handler
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        node, stream = self._open_file(fh)
        data = await self._reader.read(node, off, size, stream)
        # pyfuse3 replies from any contiguous buffer; handing it the cached chunk's
        # memoryview saves copying every byte served once more.
        return cast(bytes, data)

    @_handler
    async def release(self, fh: FileHandleT) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            self._reader.forget(f[1])

    def _open_file(self, fh: int) -> tuple[Node, Stream]:
        f = self._files.get(fh)
        if f is None:
            raise OSError(errno.EBADF, f"no open file {fh}")
        return f

    @_handler
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        self._table.get(inode)
        return []
