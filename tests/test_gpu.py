"""GPU dumps: maps parsing, the memory dump of a live CPU process, the CUDA call order (with a
fake driver), ingest/export of a dump, loading it back through the uffd loader, and the CLI.
The real-GPU test skips where there is no GPU or no cuda.bindings."""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapstore import cli
from snapstore.errors import SnapstoreError, UsageError
from snapstore.export import export
from snapstore.gpu import cuda
from snapstore.gpu.dump import (
    PAGE,
    SEGMENT,
    TABLE_FILE,
    After,
    Dump,
    Mapping,
    Region,
    dump_process,
    parse_maps,
    plan,
    read_dump,
)
from snapstore.gpu.load_dump import (
    _verify_chunks,
    load,
    load_snapshot,
    mappings,
    materialize,
    open_snapshot,
)
from snapstore.ids import ChunkId
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.uffd import page_loader
from snapstore.uffd.client import MappedRegion
from snapstore.uffd.layout import Layout
from tests.conftest import FakeDriver

# Segments of an odd size: blocks are cut at segment ends in the middle of regions.
SMALL_SEGMENT = (3 << 20) + 5 * PAGE

# The child fills known memory and reports where it is: one JSON line, then it waits.
CHILD = r"""
import hashlib, json, os, sys, time
import numpy as np
rng = np.random.default_rng(11)
data = rng.integers(0, 256, size=24 << 20, dtype=np.uint8)
half = np.zeros(8 << 20, dtype=np.uint8)
half[: 4 << 20] = 7                   # a region whose second half stays zero
zeros = np.zeros(32 << 20, dtype=np.uint8)  # never touched: all holes
arrays = {"data": data, "half": half, "zeros": zeros}
print(json.dumps({k: [a.ctypes.data, a.nbytes, hashlib.sha256(a.tobytes()).hexdigest()]
                  for k, a in arrays.items()}), flush=True)
for line in sys.stdin:
    print("alive", flush=True)
"""


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.arrays: dict[str, list[Any]] = json.loads(self.proc.stdout.readline())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> str:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    def ping(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.proc.kill()
    c.proc.communicate()


def memory_at(d: Dump, addr: int, size: int) -> bytes:
    """Bytes of the dumped process at `addr`, read through the region table (an array can
    span neighbouring regions)."""
    out = bytearray()
    for r in d.regions:
        lo, hi = max(addr, r.start), min(addr + size, r.start + r.size)
        if lo < hi:
            assert lo == addr + len(out), f"{lo:#x} is in no dumped region"
            out += d.read(r.offset + lo - r.start, hi - lo)
    assert len(out) == size, f"{addr:#x}+{size} is not all dumped"
    return bytes(out)


def no_cuda() -> cuda.CheckpointApi:
    return cuda.NoCuda("no driver in this test")


# -- pure logic -------------------------------------------------------------------------


def test_parse_maps_skips_malformed_lines() -> None:
    text = "\n".join([
        "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 ",
        "7f0000002000-7f0000003000 r--p 00000000 08:01 123     /usr/lib/libc.so.6",
        "garbage",
        "zz-7f0000004000 rw-p 00000000 00:00 0",
        "7f0000005000-7f0000004000 rw-p 00000000 00:00 0",
        "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0       [stack]",
        "7f0000010000-7f0000011000 rw-s 00000000 00:05 9       /dev/nvidia0",
        "7f0000020000-7f0000021000 rw-p 00000000 00:00 0       /path with spaces (deleted)",
    ])
    maps = parse_maps(text)
    assert [m.path for m in maps] == ["", "/usr/lib/libc.so.6", "[stack]", "/dev/nvidia0",
                                     "/path with spaces (deleted)"]
    assert maps[0] == Mapping(0x7F0000000000, 0x7F0000002000, "rw-p", "")


def test_plan_selects_private_readable_memory() -> None:
    maps = [
        Mapping(0x1000, 0x3000, "rw-p", ""),
        Mapping(0x3000, 0x4000, "r-xp", "/usr/bin/python3"),
        Mapping(0x4000, 0x5000, "rw-p", "/usr/bin/python3"),
        Mapping(0x5000, 0x6000, "---p", ""),
        Mapping(0x6000, 0x7000, "rw-s", "/dev/shm/x"),
        Mapping(0x7000, 0x8000, "rw-p", "/dev/nvidia-uvm"),
        Mapping(0x8000, 0x9000, "r--p", "[vvar]"),
        Mapping(0x9000, 0xA000, "r--p", "[anon:cuda]"),
    ]
    regions, skipped = plan(maps)
    assert [(r.start, r.offset) for r in regions] == [(0x1000, 0), (0x4000, 0x2000),
                                                      (0x9000, 0x3000)]
    assert [s["reason"] for s in skipped] == ["read-only file mapping", "not readable", "shared",
                                             "device mapping", "kernel mapping"]


def test_mappings_merge_neighbours_past_the_loader_limit() -> None:
    regions = tuple(Region(0x10000 * i, PAGE, "rw-p", PAGE * i, "") for i in range(200))
    d = Dump(Path("."), 200 * PAGE, SEGMENT, regions, {})
    layout = mappings(d, limit=64)
    assert len(layout) <= 64
    assert layout[0][0] == 0 and sum(size for _, size in layout) == 200 * PAGE
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(layout))
    three = Dump(Path("."), 3 * PAGE, SEGMENT, regions[:3], {})
    assert mappings(three) == [(0, PAGE), (PAGE, PAGE), (2 * PAGE, PAGE)]


def test_no_cuda_api_reports_no_context() -> None:
    with pytest.raises(cuda.NoCudaContext):
        no_cuda().get_state(1)


# -- dumping a live process ---------------------------------------------------------------


def test_dump_reproduces_memory_and_leaves_process_stopped(child: Child, tmp_path: Path) -> None:
    r = dump_process(child.pid, tmp_path / "d", api=no_cuda())
    assert child.state() in "Tt"
    assert not r.cuda and "no CUDA state" in r.note
    d = read_dump(tmp_path / "d")
    for name, (addr, size, digest) in child.arrays.items():
        assert hashlib.sha256(memory_at(d, addr, size)).hexdigest() == digest, name
    meta = json.loads((tmp_path / "d" / "dump.json").read_text())
    assert meta["pid"] == child.pid and meta["cuda"] is None
    assert sum(reg.data_bytes for reg in d.regions) == r.data_bytes
    # Zero pages are holes: the untouched 32 MiB and half of `half` take no disk space.
    used = sum(os.stat(p).st_blocks for p in d.pages_paths) * 512
    assert used < r.bytes - (32 << 20)
    assert r.data_bytes >= (24 << 20) + (4 << 20)
    os.kill(child.pid, signal.SIGCONT)
    assert child.ping() == "alive"


# A private file mapping whose file shrank under it: page 0 was written (now private memory),
# pages 1-3 lie past the file's end, so every read of them faults.
SHRUNK = r"""
import ctypes, mmap, os, sys, tempfile
fd, path = tempfile.mkstemp()
os.unlink(path)
os.ftruncate(fd, 4 * mmap.PAGESIZE)
m = mmap.mmap(fd, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
m[:5] = b"first"
os.ftruncate(fd, mmap.PAGESIZE)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


def test_dump_unreadable_pages_become_zeros_and_are_counted(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SHRUNK], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        addr = int(proc.stdout.readline())
        dump_process(proc.pid, tmp_path / "d", after=After.RUN, api=no_cuda())
    finally:
        proc.kill()
        proc.communicate()
    d = read_dump(tmp_path / "d")
    region = next(r for r in d.regions if r.start == addr)
    assert region.size == 4 * PAGE and region.unreadable_bytes == 3 * PAGE
    assert memory_at(d, addr, 4 * PAGE) == b"first" + bytes(4 * PAGE - 5)


def test_dump_leave_running_and_kill(child: Child, tmp_path: Path) -> None:
    dump_process(child.pid, tmp_path / "a", after=After.RUN, api=no_cuda())
    assert child.ping() == "alive"
    dump_process(child.pid, tmp_path / "b", after=After.KILL, api=no_cuda())
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert read_dump(tmp_path / "b").pages_size > 0


def test_cuda_calls_follow_the_driver_state_machine(child: Child, tmp_path: Path) -> None:
    fake = FakeDriver({child.pid})
    r = dump_process(child.pid, tmp_path / "d", after=After.STOP, api=fake)
    assert fake.names() == ["lock", "checkpoint", "restore", "unlock"]
    assert fake.state[child.pid] is cuda.ProcessState.RUNNING and child.state() in "Tt"
    meta = json.loads((tmp_path / "d" / "dump.json").read_text())
    assert r.cuda and meta["cuda"]["gpus"][0]["name"] == "Fake GPU"


def test_failed_dump_resumes_process_and_restores_cuda(child: Child, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDriver({child.pid})

    def broken(*args: object) -> int:
        raise SnapstoreError("disk full")

    monkeypatch.setattr("snapstore.gpu.dump.write_pages", broken)
    with pytest.raises(SnapstoreError, match="disk full"):
        dump_process(child.pid, tmp_path / "d", after=After.KILL, api=fake)
    assert fake.names() == ["lock", "checkpoint", "restore", "unlock"]
    assert child.ping() == "alive"
    assert not (tmp_path / "d").exists()


def test_bad_pid_and_bad_outdir(child: Child, tmp_path: Path) -> None:
    with pytest.raises(SnapstoreError, match="no process 999999999"):
        dump_process(999999999, tmp_path / "x", api=no_cuda())
    with pytest.raises(UsageError):
        dump_process(0, tmp_path / "x", api=no_cuda())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SnapstoreError, match="not an empty directory"):
        dump_process(child.pid, tmp_path / "full", api=no_cuda())


def test_dump_ingests_and_exports_byte_identical(child: Child, tmp_path: Path,
                                                 store: LocalStore) -> None:
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    ingest(store, tmp_path / "d", "gpu")
    out = tmp_path / "out"
    export(store, store.get_manifest(store.resolve("gpu")), out)
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == [TABLE_FILE] + [p.name for p in read_dump(tmp_path / "d").pages_paths]
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    made = materialize(store, store.get_manifest(store.resolve("gpu")), tmp_path / "mat")
    for name in names:
        assert (made.directory / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


def test_segmented_dump_reproduces_memory(child: Child, tmp_path: Path) -> None:
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    d = read_dump(tmp_path / "d")
    assert d.segment_size == SMALL_SEGMENT and len(d.pages_paths) > 8
    assert [p.stat().st_size for p in d.pages_paths[:-1]] == [SMALL_SEGMENT] * (
        len(d.pages_paths) - 1)
    for name, (addr, size, digest) in child.arrays.items():
        assert hashlib.sha256(memory_at(d, addr, size)).hexdigest() == digest, name
    with pytest.raises(UsageError, match="multiple"):
        dump_process(child.pid, tmp_path / "e", api=no_cuda(), segment_size=PAGE + 1)


@pytest.mark.parametrize("change, message", [
    ({"pages_files": ["../x"]}, "bad segment list"),
    ({"segment_size": PAGE + 1}, "bad segment list"),
    ({"segment_size": PAGE}, "bad segment list"),  # the file list no longer matches
    ({"pages_files": None}, "bad segment list"),
])
def test_read_dump_rejects_a_bad_segment_list(child: Child, tmp_path: Path,
                                              change: dict[str, Any], message: str) -> None:
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    table = tmp_path / "d" / TABLE_FILE
    table.write_text(json.dumps({**json.loads(table.read_text()), **change}))
    with pytest.raises(SnapstoreError, match=message):
        read_dump(tmp_path / "d")


def test_segment_writers_raise_the_open_file_limit() -> None:
    # In a child: the limits are the process's own.
    src = ("import resource\n"
           "from snapstore.errors import SnapstoreError\n"
           "from snapstore.gpu.dump import allow_open_files\n"
           "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))\n"
           "allow_open_files(1000)\n"
           "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1000)\n"
           "try:\n"
           "    allow_open_files(5000)\n"
           "except SnapstoreError as e:\n"
           "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "True"
    assert "more than the limit of 4096; use larger segments" in out[1]


def test_read_dump_rejects_missing_or_short_segments(child: Child, tmp_path: Path) -> None:
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    paths = read_dump(tmp_path / "d").pages_paths
    os.truncate(paths[1], SMALL_SEGMENT - PAGE)
    with pytest.raises(SnapstoreError, match="the table says"):
        read_dump(tmp_path / "d")
    paths[1].unlink()
    with pytest.raises(SnapstoreError, match=f"holds no {paths[1].name}"):
        read_dump(tmp_path / "d")


def test_materialize_refuses_a_table_naming_paths_outside(child: Child, tmp_path: Path,
                                                          store: LocalStore) -> None:
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda())
    table = tmp_path / "d" / TABLE_FILE
    doc = json.loads(table.read_text())
    first = doc["pages_files"][0]
    (tmp_path / "d" / first).rename(tmp_path / "escaped.img")
    table.write_text(json.dumps({**doc, "pages_files": ["../escaped.img"]}))
    ingest(store, tmp_path / "d", "bad")
    (tmp_path / "mat").mkdir()
    with pytest.raises(SnapstoreError, match="bad segment list"):
        materialize(store, store.get_manifest(store.resolve("bad")), tmp_path / "mat" / "d")
    assert not (tmp_path / "mat" / "escaped.img").exists()


# -- loading it back ----------------------------------------------------------------------


def _need_loader() -> None:
    try:
        page_loader.binary_path()
    except page_loader.LoaderNotBuiltError as err:
        pytest.skip(str(err))


def test_load_through_uffd_loader_is_page_exact(child: Child, tmp_path: Path,
                                                store: LocalStore) -> None:
    _need_loader()
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda())
    work = tmp_path / "w"
    work.mkdir()
    r = load(read_dump(tmp_path / "d"), work)
    assert r.verified and r.data_bytes > 0
    dump_process(child.pid, tmp_path / "s", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    work_s = tmp_path / "ws"
    work_s.mkdir()
    assert load(read_dump(tmp_path / "s"), work_s).verified
    ingest(store, tmp_path / "d", "gpu")
    work2 = tmp_path / "w2"
    work2.mkdir()
    made = materialize(store, store.get_manifest(store.resolve("gpu")), work2 / "dump")
    assert load(made, work2).verified


def test_cli_dump_and_load(child: Child, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    _need_loader()
    monkeypatch.setattr(cuda, "open_api", no_cuda)
    monkeypatch.setattr("snapstore.gpu.dump.open_api", no_cuda)
    st = str(tmp_path / "store")
    assert cli.main(["gpu-dump", str(child.pid), str(tmp_path / "d"), "--leave-running"]) == 0
    assert "no CUDA state" in capsys.readouterr().err
    assert cli.main(["--store", st, "ingest", str(tmp_path / "d"), "--tag", "g"]) == 0
    capsys.readouterr()
    assert cli.main(["--store", st, "gpu-load", "g", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True
    assert 0 < doc["load_seconds"] < doc["end_to_end_seconds"]
    assert cli.main(["--store", st, "gpu-load", "g"]) == 0
    assert "end to end" in capsys.readouterr().err
    assert cli.main(["gpu-dump", "999999999", str(tmp_path / "e")]) == 1
    assert "no process 999999999" in capsys.readouterr().err


def test_load_from_the_store_without_materialising(child: Child, tmp_path: Path,
                                                   store: LocalStore) -> None:
    """Served from the chunks: page exact (checked against the chunk ids), segments in
    several files, end-to-end time with its stages, nothing written under the store."""
    _need_loader()
    dump_process(child.pid, tmp_path / "s", after=After.RUN, api=no_cuda(),
                 segment_size=SMALL_SEGMENT)
    ingest(store, tmp_path / "s", "gpu")
    mid = store.resolve("gpu")
    dump, layout = open_snapshot(store, store.get_manifest(mid))
    assert len(dump.pages_paths) > 1
    work = tmp_path / "w"
    work.mkdir()
    r = load_snapshot(store, mid, dump, layout, work)
    assert r.verified and r.data_bytes == sum(size for _, size in layout.chunks) > 0
    assert r.loader_stats["chunks"] == len(layout.chunks)
    assert 0 < r.load_seconds < r.end_to_end
    assert "install (handshake to last page)" in r.stages
    assert list(store.tmp_dir.iterdir()) == []


class _Memory:
    """Stands in for a client: two mappings, one after the other in the page space."""

    def __init__(self, data: bytes) -> None:
        half = len(data) // 2 // PAGE * PAGE
        self.regions = []
        for off, part in ((0, data[:half]), (half, data[half:])):
            mm = mmap.mmap(-1, len(part))
            mm[:] = part
            self.regions.append(MappedRegion(off, len(part), mm, 0))


def test_chunk_verification_catches_a_wrong_byte() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.bytes(5000), rng.bytes(7000)
    image = bytearray(a + bytes(3192) + b + bytes(4096 * 4 - 5000 - 3192 - 7000 + 4096))
    layout = Layout(len(image), [(ChunkId.of(a), len(a)), (ChunkId.of(b), len(b))],
                    np.array([0, 8192], dtype=np.uint64))
    _verify_chunks(_Memory(bytes(image)), layout)  # type: ignore[arg-type]
    for pos in (4999, 8192 + 6000, 6000, len(image) - 1):
        bad = bytearray(image)
        bad[pos] ^= 1
        with pytest.raises(SnapstoreError, match=r"differs|not zero"):
            _verify_chunks(_Memory(bytes(bad)), layout)  # type: ignore[arg-type]


def test_cli_load_from_a_corrupt_store_fails_with_one_line(
        child: Child, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need_loader()
    st = tmp_path / "store"
    dump_process(child.pid, tmp_path / "d", after=After.RUN, api=no_cuda())
    assert cli.main(["--store", str(st), "ingest", str(tmp_path / "d"), "--tag", "g"]) == 0
    store = LocalStore.open(st)
    _, layout = open_snapshot(store, store.get_manifest(store.resolve("g")))
    victim = store.chunk_path(layout.chunks[len(layout.chunks) // 2][0])
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(blob))
    capsys.readouterr()
    assert cli.main(["--store", str(st), "gpu-load", "g"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "load failed" in err, err


# -- a real GPU ----------------------------------------------------------------------------


def test_real_cuda_process_round_trip(tmp_path: Path) -> None:
    api = cuda.open_api()
    if isinstance(api, cuda.NoCuda):
        pytest.skip(f"needs a GPU and cuda.bindings: {api.reason}")
    pytest.importorskip("torch")
    _need_loader()
    # Integers, so that the GPU's sum is exact (a float32 sum of these rounds).
    src = ("import sys, torch\n"
           "x = torch.arange(1 << 24, device='cuda', dtype=torch.int64)\n"
           "torch.cuda.synchronize(); print('ready', flush=True)\n"
           "for line in sys.stdin: print(int(x.sum()), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        r = dump_process(proc.pid, tmp_path / "d", after=After.RUN, api=api)
        assert r.cuda and r.data_bytes >= 64 << 20
        time.sleep(0.1)
        proc.stdin.write("sum\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) == sum(range(1 << 24))
    finally:
        proc.kill()
        proc.communicate()
    work = tmp_path / "w"
    work.mkdir()
    assert load(read_dump(tmp_path / "d"), work).verified
