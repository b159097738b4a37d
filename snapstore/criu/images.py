"""What the lazy-pages daemon reads of a CRIU image: a task's pagemap (which virtual
address ranges have pages in which pages file, at what offset, and which are lazy) and
the bounds of its memory areas (a UFFDIO_COPY may not cross one).

CRIU images are a magic header and then entries, each a 32-bit length and a protobuf
message. The messages needed here are declared to the protobuf library below with the
field numbers of CRIU's `images/pagemap.proto` and `images/mm.proto`; fields not declared
are skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from snapstore.errors import CorruptError

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
MM_MAGIC = 0x57492820
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
PAGE_SIZE = 4096
# A pagemap entry is a few varints; an mm entry lists every memory area of the task.
MAX_PAGEMAP_ENTRY = 64
MAX_MM_ENTRY = 64 << 20


def _message_classes() -> tuple[Any, Any, Any]:
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="snapstore_criu_images.proto",
                                               package="snapstore.criu", syntax="proto2")
    messages = {
        "PagemapHead": [("pages_id", 1, f.TYPE_UINT32)],
        "PagemapEntry": [("vaddr", 1, f.TYPE_UINT64), ("compat_nr_pages", 2, f.TYPE_UINT32),
                         ("in_parent", 3, f.TYPE_BOOL), ("flags", 4, f.TYPE_UINT32),
                         ("nr_pages", 5, f.TYPE_UINT64)],
        "VmaEntry": [("start", 1, f.TYPE_UINT64), ("end", 2, f.TYPE_UINT64)],
    }
    for name, fields in messages.items():
        m = proto.message_type.add(name=name)
        for field_name, number, kind in fields:
            m.field.add(name=field_name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    mm = proto.message_type.add(name="MmEntry")
    mm.field.add(name="vmas", number=14, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                 type_name=".snapstore.criu.VmaEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    head_cls, entry_cls, mm_cls = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"snapstore.criu.{name}"))
        for name in ("PagemapHead", "PagemapEntry", "MmEntry"))
    return head_cls, entry_cls, mm_cls


_Head, _Entry, _Mm = _message_classes()


@dataclass(frozen=True, slots=True)
class Extent:
    """`nr_pages` pages at `vaddr`, stored at `offset` of the pages file when present."""

    vaddr: int
    nr_pages: int
    flags: int
    offset: int

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY) and bool(self.flags & PE_PRESENT)

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Pagemap:
    pages_id: int
    extents: tuple[Extent, ...]

    @property
    def pages_file(self) -> str:
        return f"pages-{self.pages_id}.img"

    def lazy_extents(self) -> list[Extent]:
        return [e for e in self.extents if e.lazy]


def _entries(path: Path, magic: int, max_entry: int) -> list[bytes]:
    """The raw protobuf entries of a CRIU image; CorruptError, naming it, if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptError(f"cannot read {path.name}: {e.strerror}") from None
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, magic):
        raise CorruptError(f"{path.name} is not the CRIU image it should be")
    pos = 8
    messages: list[bytes] = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise CorruptError(f"{path.name} is truncated")
        (size,) = struct.unpack_from("<I", data, pos)
        if size > max_entry or pos + 4 + size > len(data):
            raise CorruptError(f"{path.name} has a bad entry at byte {pos}")
        messages.append(data[pos + 4:pos + 4 + size])
        pos += 4 + size
    if not messages:
        raise CorruptError(f"{path.name} has no entries")
    return messages


def read_vma_bounds(path: Path) -> list[tuple[int, int]]:
    """The [start, end) of every memory area in `mm-PID.img`, sorted."""
    try:
        mm = _Mm.FromString(_entries(path, MM_MAGIC, MAX_MM_ENTRY)[0])
    except CorruptError:
        raise
    except Exception as err:  # the protobuf library's DecodeError and friends
        raise CorruptError(f"{path.name} does not decode: {err}") from None
    bounds = sorted((int(v.start), int(v.end)) for v in mm.vmas)
    if any(start >= end for start, end in bounds):
        raise CorruptError(f"{path.name} has an empty or reversed memory area")
    return bounds


def read_pagemap(path: Path) -> Pagemap:
    """Parse `pagemap-PID.img`; CorruptError, naming the file, if it is not one."""
    messages = _entries(path, PAGEMAP_MAGIC, MAX_PAGEMAP_ENTRY)
    try:
        head = _Head.FromString(messages[0])
        extents = []
        offset = 0
        for raw in messages[1:]:
            entry = _Entry.FromString(raw)
            nr = int(entry.nr_pages) or int(entry.compat_nr_pages)
            flags = int(entry.flags)
            if entry.in_parent:
                flags |= PE_PARENT
            extents.append(Extent(int(entry.vaddr), nr, flags, offset))
            # Only present pages are in this pages file, in pagemap order.
            if flags & PE_PRESENT:
                offset += nr * PAGE_SIZE
    except Exception as err:  # the protobuf library's DecodeError and friends
        raise CorruptError(f"{path.name} does not decode: {err}") from None
    for x in extents:
        if x.vaddr % PAGE_SIZE or x.end > 1 << 64:
            raise CorruptError(f"{path.name} has an entry at a bad address {x.vaddr:#x}")
    return Pagemap(int(head.pages_id), tuple(extents))
