"""GPU dumps: write a live process's memory (GPU memory included) as page files and a table.

A dump directory holds the page space, the process's private readable regions one after
another with all-zero pages left as holes, cut into segment files (`pages-0000.img`, ...) so
that threads write to several files at once, and `dump.json`, the region table and metadata
(docs/gpu.md). For a CUDA process the driver first moves GPU memory into host memory
(snapstore.gpu.cuda), so the page space holds it too; the process is stopped while its memory
is read.
"""

from __future__ import annotations

import contextlib
import enum
import json
import mmap
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from snapstore.errors import SnapstoreError, UsageError
from snapstore.fileio import pwrite_all, write_atomic
from snapstore.gpu import vmread
from snapstore.gpu.cuda import CheckpointApi, NoCudaContext, ProcessState, open_api

FORMAT = "snapstore-gpu-dump"
VERSION = 2
TABLE_FILE = "dump.json"
PAGE = mmap.PAGESIZE
# The kernel serialises buffered writes to one file (its inode lock): 16 threads write 2.8 GB/s
# into one file and 16 GB/s into 16 (benchmarks/RESULTS.md), so the page space is cut in files
# of this size and the threads spread over them.
SEGMENT = 256 << 20
# Bounded by what a command line holds: the loader takes each file as an argument.
MAX_SEGMENTS = 4096
# Reads this large keep /proc/PID/mem at memory bandwidth; one buffer per thread is reused,
# because first touches of fresh memory are slow.
BLOCK = 8 << 20
_PRESENT = np.uint64(1 << 63)
_SWAPPED = np.uint64(1 << 62)
# Kernel-provided mappings: not the process's data, and some cannot be read at all.
_SPECIAL = {"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]"}
_STOP_TIMEOUT = 10.0


class After(enum.Enum):
    """What happens to the process once its memory is written."""

    STOP = "stop"  # left stopped with its CUDA state restored; SIGCONT resumes it
    RUN = "run"  # resumed (--leave-running)
    KILL = "kill"  # SIGKILLed (--kill); its GPU memory is freed with it


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.path in ("", "[heap]", "[stack]") or self.path.startswith(
            ("[anon:", "[stack:", "/dev/zero")
        )


@dataclass(slots=True)
class Region:
    """A region of the page space: `size` bytes of memory at `start` are at its `offset`."""

    start: int
    size: int
    prot: str
    offset: int
    path: str
    data_bytes: int = 0
    unreadable_bytes: int = 0
    # Untouched pages of anonymous memory read as zeros, so the pagemap can skip them.
    anonymous: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start, "size": self.size, "prot": self.prot, "offset": self.offset,
            "path": self.path, "data_bytes": self.data_bytes,
            "unreadable_bytes": self.unreadable_bytes,
        }


def segment_name(index: int) -> str:
    return f"pages-{index:04d}.img"


def segment_count(pages_size: int, segment_size: int) -> int:
    """How many segment files a page space has; an empty one still has one (empty) file."""
    return max(1, -(-pages_size // segment_size))


def segment_names(pages_size: int, segment_size: int) -> list[str]:
    return [segment_name(i) for i in range(segment_count(pages_size, segment_size))]


def segment_bytes(index: int, pages_size: int, segment_size: int) -> int:
    """The size of segment file `index`: `segment_size`, the last one less."""
    return min(segment_size, pages_size - index * segment_size)


def allow_open_files(count: int) -> None:
    """Raise the soft limit on open files so that `count` more fit (writers keep every
    segment file open), up to the hard limit; past it, say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + count + 16
    if want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise SnapstoreError(f"{count} segment files need {want} open files, more than the "
                             f"limit of {hard}; use larger segments")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass(frozen=True, slots=True)
class Dump:
    """A dump directory's table, as read back."""

    directory: Path
    pages_size: int
    segment_size: int
    regions: tuple[Region, ...]
    meta: dict[str, Any]

    @property
    def pages_paths(self) -> list[Path]:
        """The segment files, in order: one after another they are the page space."""
        return [self.directory / n for n in segment_names(self.pages_size, self.segment_size)]

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes of the page space at `offset`, across segment files."""
        out = bytearray()
        while size > 0:
            index, pos = divmod(offset, self.segment_size)
            n = min(size, self.segment_size - pos)
            with (self.directory / segment_name(index)).open("rb") as f:
                f.seek(pos)
                got = f.read(n)
            if len(got) != n:
                raise SnapstoreError(f"{segment_name(index)} is shorter than its table says")
            out += got
            offset, size = offset + n, size - n
        return bytes(out)


@dataclass(slots=True)
class DumpResult:
    directory: Path
    regions: int
    bytes: int
    data_bytes: int
    cuda: bool
    note: str
    seconds: dict[str, float] = field(default_factory=dict)


def parse_maps(text: str) -> list[Mapping]:
    """The mappings of a /proc/PID/maps text; lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or len(fields[1]) != 4:
            continue
        lo, dash, hi = fields[0].partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        if not dash or end <= start or start % PAGE or end % PAGE:
            continue
        out.append(Mapping(start, end, fields[1], fields[5] if len(fields) == 6 else ""))
    return out


def skip_reason(m: Mapping) -> str | None:
    """Why a mapping is left out of the dump, or None to dump it."""
    if m.perms[3] != "p":
        return "shared"
    if m.perms[0] != "r":
        return "not readable"
    if m.path in _SPECIAL:
        return "kernel mapping"
    if m.end > 1 << 63:
        return "above the user address space"
    if m.path.startswith("/dev/") and not m.path.startswith("/dev/zero"):
        return "device mapping"
    if not m.anonymous and m.perms[1] != "w":
        # Read-only file mappings (code, constants) come back from the file itself.
        return "read-only file mapping"
    return None


def plan(maps: list[Mapping]) -> tuple[list[Region], list[dict[str, Any]]]:
    """The regions to dump at consecutive page space offsets, and the mappings left out."""
    regions: list[Region] = []
    skipped: list[dict[str, Any]] = []
    offset = 0
    for m in maps:
        reason = skip_reason(m)
        if reason:
            skipped.append({"start": m.start, "size": m.size, "prot": m.perms, "path": m.path,
                            "reason": reason})
            continue
        regions.append(Region(m.start, m.size, m.perms, offset, m.path, anonymous=m.anonymous))
        offset += m.size
    return regions, skipped


# -- reading memory -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Block:
    region: Region
    start: int  # memory address
    size: int
    offset: int  # page space offset


def _blocks(regions: list[Region], segment_size: int) -> list[_Block]:
    """The regions in blocks of at most BLOCK bytes, none across a segment boundary, ordered
    round robin over the segments (the first block of each segment, then the second...), so
    threads taking them in order write to different files."""
    out = []
    for r in regions:
        pos = 0
        while pos < r.size:
            offset = r.offset + pos
            n = min(BLOCK, r.size - pos, segment_size - offset % segment_size)
            out.append(_Block(r, r.start + pos, n, offset))
            pos += n
    out.sort(key=lambda b: (b.offset % segment_size, b.offset // segment_size))
    return out


class _Reader:
    """Copies blocks from a stopped process into the segment files, zero pages left as holes."""

    def __init__(self, pid: int, out_fds: list[int], segment_size: int) -> None:
        self.pid = pid
        self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.pagemap: int | None = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.pagemap = None
        self.out = out_fds
        self.segment_size = segment_size
        self.local = threading.local()

    def close(self) -> None:
        os.close(self.mem)
        if self.pagemap is not None:
            os.close(self.pagemap)

    def _buffer(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        buf: np.ndarray[Any, np.dtype[np.uint8]] | None = getattr(self.local, "buf", None)
        if buf is None:
            buf = np.zeros(BLOCK, dtype=np.uint8)
            self.local.buf = buf
        return buf

    def _untouched(self, b: _Block) -> bool:
        """True when no page of an anonymous block was ever touched, so all of it reads zero."""
        if self.pagemap is None or not b.region.anonymous:
            return False
        n = b.size // PAGE
        try:
            raw = os.pread(self.pagemap, n * 8, b.start // PAGE * 8)
        except OSError:
            return False
        if len(raw) != n * 8:
            return False
        entries = np.frombuffer(raw, dtype=np.uint64)
        return not bool(np.any(entries & (_PRESENT | _SWAPPED)))

    def copy(self, b: _Block) -> tuple[int, int]:
        """(data bytes written, unreadable bytes) of one block."""
        if self._untouched(b):
            return 0, 0
        view = self._buffer()[: b.size]
        unreadable = self._read(view, b.start)
        pages = view.view(np.uint64).reshape(-1, PAGE // 8)
        nonzero = pages.any(axis=1)
        if not nonzero.any():
            return 0, unreadable
        # Runs of non-zero pages: edges of the boolean mask.
        edges = np.flatnonzero(np.diff(nonzero.astype(np.int8), prepend=0, append=0))
        written = 0
        mv = memoryview(view)  # type: ignore[arg-type]
        index, pos = divmod(b.offset, self.segment_size)
        for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            a, z = lo * PAGE, hi * PAGE
            pwrite_all(self.out[index], mv[a:z], pos + a)
            written += z - a
        return written, unreadable

    def _read(self, view: np.ndarray[Any, np.dtype[np.uint8]], addr: int) -> int:
        """Fill `view` from memory at `addr`; pages that cannot be read become zeros."""
        mv = memoryview(view)  # type: ignore[arg-type]
        n = vmread.read(self.pid, view.ctypes.data, len(mv), addr)
        if n < len(mv):
            with contextlib.suppress(OSError):
                n += os.preadv(self.mem, [mv[n:]], addr + n)
        if n == len(mv):
            return 0
        # Some page in the block refused (a guard or device page): go page by page.
        unreadable = 0
        for pos in range(n - n % PAGE, len(mv), PAGE):
            page = mv[pos : pos + PAGE]
            try:
                got = os.preadv(self.mem, [page], addr + pos)
            except OSError:
                got = 0
            if got != PAGE:
                view[pos : pos + PAGE] = 0
                unreadable += PAGE
        return unreadable


def write_pages(
    pid: int, regions: list[Region], outdir: Path, threads: int, segment_size: int = SEGMENT
) -> int:
    """Write the regions' memory to new sparse segment files; returns the data bytes written."""
    total = sum(r.size for r in regions)
    names = segment_names(total, segment_size)
    allow_open_files(len(names))
    fds: list[int] = []
    try:
        for i, name in enumerate(names):
            fds.append(os.open(outdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600))
            os.ftruncate(fds[-1], segment_bytes(i, total, segment_size))
        reader = _Reader(pid, fds, segment_size)
        try:
            lock = threading.Lock()

            def work(b: _Block) -> None:
                data, bad = reader.copy(b)
                with lock:
                    b.region.data_bytes += data
                    b.region.unreadable_bytes += bad

            with ThreadPoolExecutor(threads, thread_name_prefix="gpu-dump") as pool:
                # list() re-raises the first worker error here.
                list(pool.map(work, _blocks(regions, segment_size)))
        finally:
            reader.close()
    finally:
        for fd in fds:
            os.close(fd)
    return sum(r.data_bytes for r in regions)


# -- the process ------------------------------------------------------------------------


def check_pid(pid: int) -> None:
    if pid <= 0:
        raise UsageError(f"PID must be a positive number, got {pid}")
    if pid == os.getpid():
        raise UsageError("gpu-dump cannot dump itself")
    try:
        os.stat(f"/proc/{pid}")
    except FileNotFoundError:
        raise SnapstoreError(f"no process {pid}") from None


def read_maps(pid: int) -> list[Mapping]:
    try:
        return parse_maps(Path(f"/proc/{pid}/maps").read_text())
    except FileNotFoundError:
        raise SnapstoreError(f"no process {pid}") from None
    except PermissionError:
        raise SnapstoreError(f"not allowed to read the memory of process {pid}; run as root "
                             "or as its owner") from None


def _thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            # The command name may hold spaces and parentheses; the state follows the last ')'.
            states.append(stat[stat.rindex(")") + 2])
    return states


def stop(pid: int, timeout: float = _STOP_TIMEOUT) -> None:
    """SIGSTOP the process and wait until every thread of it has stopped."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        raise SnapstoreError(f"process {pid} exited") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = _thread_states(pid)
        except FileNotFoundError:
            raise SnapstoreError(f"process {pid} exited") from None
        if states and all(s in "TtZX" for s in states):
            if "Z" in states[:1] or "X" in states[:1]:
                raise SnapstoreError(f"process {pid} exited")
            return
        if time.monotonic() > deadline:
            raise SnapstoreError(f"process {pid} did not stop within {timeout:.0f}s "
                                 "(a thread is in uninterruptible sleep)")
        time.sleep(0.001)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def dump_process(
    pid: int,
    outdir: Path,
    after: After = After.STOP,
    api: CheckpointApi | None = None,
    threads: int | None = None,
    lock_timeout_ms: int = 10_000,
    segment_size: int = SEGMENT,
    log: Callable[[str], None] = lambda _: None,
) -> DumpResult:
    """Dump process `pid` into the new directory `outdir`, then leave it as `after` says.

    If anything fails, the process is resumed with its CUDA state restored (it is never
    killed without a complete dump) and `outdir` is removed.
    """
    check_pid(pid)
    if segment_size <= 0 or segment_size % PAGE:
        raise UsageError(f"the segment size must be a positive multiple of {PAGE} bytes")
    _create_outdir(outdir)
    threads = threads or min(16, os.cpu_count() or 2)
    api = api or open_api()
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    cuda = False
    note = ""
    try:
        state = api.get_state(pid)
    except NoCudaContext as err:
        note = f"process {pid} has no CUDA state ({err}); dumping host memory only"
    else:
        if state is not ProcessState.RUNNING:
            raise SnapstoreError(f"process {pid}'s CUDA state is {state.name.lower()}; "
                                 "gpu-dump needs it running")
        cuda = True
    stopped = False
    checkpointed = False
    try:
        if cuda:
            t = time.perf_counter()
            api.lock(pid, lock_timeout_ms)
            seconds["lock"] = time.perf_counter() - t
            t = time.perf_counter()
            try:
                api.checkpoint(pid)
            except BaseException:
                api.unlock(pid)
                raise
            checkpointed = True
            seconds["checkpoint"] = time.perf_counter() - t
            log(f"checkpointed CUDA state of {pid} in {seconds['checkpoint']:.2f}s")
        t = time.perf_counter()
        stop(pid)
        stopped = True
        seconds["stop"] = time.perf_counter() - t
        t = time.perf_counter()
        regions, skipped = plan(read_maps(pid))
        pages_size = sum(r.size for r in regions)
        if segment_count(pages_size, segment_size) > MAX_SEGMENTS:
            raise UsageError(f"{segment_size} byte segments would make more than "
                             f"{MAX_SEGMENTS} files; choose larger ones")
        data = write_pages(pid, regions, outdir, threads, segment_size)
        seconds["write"] = time.perf_counter() - t
        if not Path(f"/proc/{pid}").exists():
            raise SnapstoreError(f"process {pid} exited during the dump")
        driver = api.describe() if cuda else None
        meta: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "page_size": PAGE,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": pid, "comm": _comm(pid), "pages_size": pages_size,
            "segment_size": segment_size, "pages_files": segment_names(pages_size, segment_size),
            "data_bytes": data,
            "cuda": driver.to_json() if driver else None, "note": note,
            "regions": [r.to_json() for r in regions], "skipped": skipped,
        }
        if after is After.KILL:
            _signal(pid, signal.SIGKILL)
        else:
            _resume(api, pid, cuda, seconds)
            if after is After.STOP:
                stop(pid)
        stopped = checkpointed = False
        seconds["total"] = time.perf_counter() - t_start
        meta["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        _write_json_atomic(outdir / TABLE_FILE, meta)
    except BaseException:
        if checkpointed or stopped:
            with contextlib.suppress(SnapstoreError):
                _resume(api, pid, checkpointed, seconds)
        for path in [outdir / TABLE_FILE, *outdir.glob("pages-*.img")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            outdir.rmdir()
        raise
    return DumpResult(outdir, len(regions), meta["pages_size"], data, cuda, note, seconds)


def _resume(api: CheckpointApi, pid: int, cuda: bool, seconds: dict[str, float]) -> None:
    # The driver restores through a thread inside the process, so it must run first.
    _signal(pid, signal.SIGCONT)
    if cuda:
        t = time.perf_counter()
        api.restore(pid)
        api.unlock(pid)
        seconds["restore"] = time.perf_counter() - t


def _create_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir()
    except FileExistsError:
        if not outdir.is_dir() or any(outdir.iterdir()):
            raise SnapstoreError(f"{outdir} exists and is not an empty directory") from None
    except OSError as err:
        raise SnapstoreError(f"cannot create {outdir}: {err.strerror}") from None


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    # Not durable, like the page files (a dump is for measuring loads, not for keeping).
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode(), durable=False)


# -- reading a dump back --------------------------------------------------------------------


def load_table(path: Path) -> dict[str, Any]:
    """A dump table's JSON, checked for its format and version only."""
    try:
        return parse_table(path.read_bytes(), path)
    except FileNotFoundError:
        raise SnapstoreError(f"{path.parent} holds no {path.name}; is it a gpu-dump?") from None
    except OSError as err:
        raise SnapstoreError(f"cannot read {path}: {err}") from None


def parse_table(text: bytes, where: Path) -> dict[str, Any]:
    """The JSON of a dump table read from `where`, checked for its format and version only."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise SnapstoreError(f"cannot read {where}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise SnapstoreError(f"{where} is not a {FORMAT} version {VERSION}")
    return doc


def segment_files(doc: dict[str, Any], where: Path) -> list[str]:
    """The table's segment file names, which must be exactly those its sizes call for (so a
    table cannot name a path outside its directory)."""
    try:
        pages_size = int(doc["pages_size"])
        segment_size = int(doc["segment_size"])
        if pages_size < 0 or segment_size <= 0 or segment_size % PAGE:
            raise ValueError(f"segment_size {segment_size} is not a positive multiple of {PAGE}")
        if segment_count(pages_size, segment_size) > MAX_SEGMENTS:
            raise ValueError(f"more than {MAX_SEGMENTS} segment files")
        names = segment_names(pages_size, segment_size)
        if doc["pages_files"] != names:
            raise ValueError(f"pages_files must be {names[0]} to {names[-1]}")
    except (KeyError, TypeError, ValueError) as err:
        raise SnapstoreError(f"bad segment list in {where}: {err}") from None
    return names


def read_dump(directory: Path) -> Dump:
    """A dump directory's table, checked: regions tile the page space in order, page aligned,
    and the segment files are the ones the sizes call for, each of its size."""
    def size_of(name: str) -> int | None:
        try:
            return (directory / name).stat().st_size
        except FileNotFoundError:
            return None

    return check_dump(load_table(directory / TABLE_FILE), directory, size_of)


def check_dump(doc: dict[str, Any], directory: Path,
               size_of: Callable[[str], int | None]) -> Dump:
    """A dump's table `doc`, checked as `read_dump` says, where `size_of` gives the size of a
    file of the dump (None if it has none)."""
    if doc.get("page_size") != PAGE:
        raise SnapstoreError(f"dump page size {doc.get('page_size')} differs from this "
                             f"system's {PAGE}")
    regions = []
    offset = 0
    try:
        for r in doc["regions"]:
            region = Region(int(r["start"]), int(r["size"]), str(r["prot"]), int(r["offset"]),
                            str(r["path"]), int(r["data_bytes"]), int(r["unreadable_bytes"]))
            if region.offset != offset or region.size <= 0 or region.size % PAGE:
                raise ValueError(f"region at {region.start:#x} is out of place")
            offset += region.size
            regions.append(region)
        pages_size = int(doc["pages_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise SnapstoreError(f"bad region table in {directory / TABLE_FILE}: {err}") from None
    names = segment_files(doc, directory / TABLE_FILE)
    segment_size = int(doc["segment_size"])
    if pages_size != offset:
        raise SnapstoreError(f"{directory / TABLE_FILE}: regions cover {offset} bytes, "
                             f"pages_size says {pages_size}")
    for i, name in enumerate(names):
        want = segment_bytes(i, pages_size, segment_size)
        actual = size_of(name)
        if actual is None:
            raise SnapstoreError(f"{directory} holds no {name}")
        if actual != want:
            raise SnapstoreError(f"{directory / name} is {actual} bytes, the table says {want}")
    return Dump(directory, pages_size, segment_size, tuple(regions), doc)
