"""Tests of the userfaultfd page loader, driven through the Python client library."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import mmap
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapstore.cli import uffd as uffd_cli
from snapstore.uffd import page_loader
from snapstore.uffd.build import compile_loader, source_path
from snapstore.uffd.client import PAGE_SIZE, Client, region_json
from tests.conftest import chunk_loader_pids

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not os.path.exists("/proc/sys/vm"),
    reason="the client issues the x86_64 userfaultfd syscall",
)

IMAGE_SIZE = 256 << 20
NPAGES = IMAGE_SIZE // PAGE_SIZE
REPO = Path(__file__).resolve().parents[1]

# A client in its own process: the loader kills its client on fatal errors, and some tests
# kill the client; neither may hit the test runner.
CLIENT_SCRIPT = """
import os, socket, sys, time
from pathlib import Path
from snapstore.uffd.client import Client, connect, open_userfaultfd
mode, path = sys.argv[1], Path(sys.argv[2])
if mode in ("probe", "raw"):
    sock = connect(path)
    if mode == "probe":
        sock.close()
    else:
        fds = {"fd": [open_userfaultfd(0)], "pipe": [os.pipe()[0]], "nofd": []}[sys.argv[4]]
        socket.send_fds(sock, [sys.argv[3].encode()], fds)
    print("sent", flush=True)
    sys.stdin.readline()
    print("alive", flush=True)
    sys.exit()
size = int(sys.argv[3])
client = Client(path, [(0, size)], memfd=sys.argv[4] == "memfd")
client.connect()
client.touch(range(64))
print("touched", flush=True)
sys.stdin.readline()
client.touch(range(64, size // 4096))
"""


@dataclass(frozen=True)
class Image:
    path: Path
    data: mmap.mmap


@pytest.fixture(scope="session", autouse=True)
def loader_binary() -> Path:
    # A fresh clone installed with `pip install -e .` has it; otherwise build it like setup.py.
    if not page_loader.BINARY.is_file():
        compile_loader(source_path(), page_loader.BINARY)
    return page_loader.binary_path()


def write_image(path: Path, npages: int, seed: int) -> None:
    """Memory-like pages: random, all-zero and copies of a few repeated patterns."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=npages, p=[0.5, 0.25, 0.25])
    patterns = np.frombuffer(rng.bytes(16 * PAGE_SIZE), dtype=np.uint8).reshape(16, PAGE_SIZE)
    pages = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    random = kinds == 0
    pages[random] = np.frombuffer(rng.bytes(int(random.sum()) * PAGE_SIZE), dtype=np.uint8).reshape(
        -1, PAGE_SIZE
    )
    repeated = np.flatnonzero(kinds == 2)
    pages[repeated] = patterns[rng.integers(0, 16, size=repeated.size)]
    path.write_bytes(pages.tobytes())


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    path = tmp_path_factory.mktemp("uffd") / "image.raw"
    write_image(path, NPAGES, seed=1234)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        yield Image(path, data)


@pytest.fixture(scope="session")
def page_digests(image: Image) -> list[bytes]:
    with memoryview(image.data) as mv:
        return [
            hashlib.sha1(mv[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]).digest() for p in range(NPAGES)
        ]


@contextmanager
def serving(
    tmp_path: Path, image: Path | list[Path], **options: Any
) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """Runs a loader for the block; after it, the loader must have exited 0 and left stats."""
    sock = tmp_path / "loader.sock"
    stats = tmp_path / "stats.json"
    opts = page_loader.LoaderOptions(image=image, socket=sock, stats_json=stats, **options)
    proc = page_loader.start(opts, stderr=subprocess.PIPE)
    collected: list[dict[str, Any]] = []
    try:
        yield sock, collected
    finally:
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err.decode()
    collected.append(json.loads(stats.read_text()))
    assert not sock.exists()


def assert_all_pages(client: Client, image: Image, chunk: int = 1 << 20) -> None:
    for off in range(0, IMAGE_SIZE, chunk):
        got = client.read(off, chunk)
        if got != image.data[off : off + chunk]:
            bad = next(
                p
                for p in range(chunk // PAGE_SIZE)
                if got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
                != image.data[off + p * PAGE_SIZE : off + (p + 1) * PAGE_SIZE]
            )
            pytest.fail(f"page {off // PAGE_SIZE + bad} differs from the image")


def shuffled_pages(seed: int, fraction: float = 1.0) -> list[int]:
    rng = np.random.default_rng(seed)
    pages = rng.permutation(NPAGES)[: int(NPAGES * fraction)]
    return [int(p) for p in pages]


def write_list(path: Path, pages: list[int]) -> Path:
    path.write_text("".join(f"{p}\n" for p in pages))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
def test_every_page_without_prefetch(tmp_path: Path, image: Image, memfd: bool) -> None:
    with (
        serving(tmp_path, image.path, memfd=memfd) as (sock, stats),
        Client(sock, [(0, IMAGE_SIZE)], memfd=memfd) as client,
    ):
        client.touch(shuffled_pages(seed=1))
        assert_all_pages(client, image)
    assert stats[0]["demand_faults"] > 0
    assert stats[0]["prefetch_pages"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
def test_every_page_with_full_prefetch(tmp_path: Path, image: Image, memfd: bool) -> None:
    hot = write_list(tmp_path / "hot", list(range(NPAGES)))
    with (
        serving(tmp_path, image.path, hot=hot, memfd=memfd) as (sock, stats),
        Client(sock, [(0, IMAGE_SIZE)], memfd=memfd) as client,
    ):
        assert_all_pages(client, image)
    assert stats[0]["prefetch_pages"] + stats[0]["demand_pages"] >= NPAGES


@pytest.mark.slow
def test_every_page_with_partial_hot_list_and_two_regions(tmp_path: Path, image: Image) -> None:
    hot = write_list(tmp_path / "hot", shuffled_pages(seed=2, fraction=0.3))
    half = IMAGE_SIZE // 2
    with (
        serving(tmp_path, image.path, hot=hot, queue_depth=4) as (sock, stats),
        Client(sock, [(half, half), (0, half)]) as client,
    ):
        client.touch(shuffled_pages(seed=3))
        assert_all_pages(client, image)
    assert stats[0]["prefetch_pages"] > 0


@pytest.mark.slow
def test_four_threads_fault_at_once(
    tmp_path: Path, image: Image, page_digests: list[bytes]
) -> None:
    order = shuffled_pages(seed=4)
    bad: list[int] = []

    def worker(client: Client, pages: list[int]) -> None:
        mm = client.regions[0].mm
        # hashlib drops the GIL on buffers this size, so the four threads really fault together.
        with memoryview(mm) as mv:
            bad.extend(
                p
                for p in pages
                if hashlib.sha1(mv[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]).digest() != page_digests[p]
            )

    with (
        serving(tmp_path, image.path, fault_around_kib=16) as (sock, _),
        Client(sock, [(0, IMAGE_SIZE)]) as client,
    ):
        threads = [threading.Thread(target=worker, args=(client, order[i::4])) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert_all_pages(client, image)
    assert bad == []


@pytest.mark.slow
def test_recorded_list_replayed(tmp_path: Path, image: Image) -> None:
    working_set = shuffled_pages(seed=5, fraction=0.2)
    record = tmp_path / "record"
    with (
        serving(tmp_path, image.path, record=record, fault_around_kib=0) as (sock, _),
        Client(sock, [(0, IMAGE_SIZE)]) as client,
    ):
        client.touch(working_set)
    assert [int(line) for line in record.read_text().split()] == working_set

    with (
        serving(tmp_path, image.path, hot=record) as (sock, stats),
        Client(sock, [(0, IMAGE_SIZE)]) as client,
    ):
        client.touch(working_set)
        assert_all_pages(client, image)
    assert stats[0]["prefetch_pages"] > 0


@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
def test_removed_pages_read_as_zero(tmp_path: Path, image: Image, memfd: bool) -> None:
    nonzero = next(p for p in range(NPAGES) if any(image.data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]))
    off = nonzero * PAGE_SIZE
    with (
        serving(tmp_path, image.path, memfd=memfd) as (sock, stats),
        Client(sock, [(0, IMAGE_SIZE)], memfd=memfd) as client,
    ):
        mm = client.regions[0].mm
        assert client.read(off, PAGE_SIZE) == image.data[off : off + PAGE_SIZE]
        mm[off] = mm[off] ^ 0xFF
        mm.madvise(mmap.MADV_DONTNEED, off, PAGE_SIZE)
        # Anonymous memory is zero after MADV_DONTNEED; a shared memfd keeps its page cache.
        expected = bytearray(image.data[off : off + PAGE_SIZE])
        expected[0] ^= 0xFF
        assert client.read(off, PAGE_SIZE) == (bytes(expected) if memfd else bytes(PAGE_SIZE))
        if memfd:
            mm.madvise(mmap.MADV_REMOVE, off, PAGE_SIZE)
            assert client.read(off, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert stats[0]["removed_pages"] > 0


def test_discards_during_prefetch_read_as_zero(tmp_path: Path, image: Image) -> None:
    """Pages the client discards while the prefetch threads install the hot list read as zeros
    (as anonymous memory does after MADV_DONTNEED), whether the discard came before or after
    their prefetch; every other page is the image's."""
    rng = np.random.default_rng(9)
    hot = write_list(tmp_path / "hot", [int(p) for p in rng.permutation(NPAGES)])
    gone: set[int] = set()
    with (
        serving(tmp_path, image.path, hot=hot) as (sock, stats),
        Client(sock, [(0, IMAGE_SIZE)]) as client,
    ):
        mm = client.regions[0].mm
        for first in rng.integers(0, NPAGES - 8, 400).tolist():
            mm.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE, 4 * PAGE_SIZE)
            gone.update(range(first, first + 4))
        expected = bytearray(image.data)
        for p in gone:
            expected[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        got = client.read(0, IMAGE_SIZE)
        bad = [p for p in range(NPAGES)
               if got[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
               != expected[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]]
        assert bad == [], f"{len(bad)} wrong pages, first {bad[:5]}"
    assert stats[0]["removed_pages"] > 0 and stats[0]["prefetch_pages"] > 0


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_prefetch_picks_the_page_cache_or_o_direct(tmp_path: Path, image: Image,
                                                   cached: bool) -> None:
    """Without --buffered or --direct, a prefetch read of a cached range goes through the page
    cache (O_DIRECT would read the disk instead) and one of an uncached range with O_DIRECT."""
    size = 32 << 20
    path = tmp_path / "image.raw"
    path.write_bytes(image.data[:size])
    fd = os.open(path, os.O_RDONLY)
    try:
        if cached:
            os.pread(fd, size, 0)
        else:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    hot = write_list(tmp_path / "hot", list(range(size // PAGE_SIZE))[::-1])
    with serving(tmp_path, path, hot=hot) as (sock, stats), Client(sock, [(0, size)]) as c:
        assert c.read(0, size) == image.data[:size]
    assert stats[0]["prefetch_bytes"] > 0
    if cached:
        assert stats[0]["direct_bytes"] == 0
    else:
        assert stats[0]["direct_bytes"] > 0


@pytest.mark.parametrize("flag", ["buffered", "direct"])
def test_io_overrides(tmp_path: Path, image: Image, flag: str) -> None:
    """--buffered and --direct force one way whatever the page cache holds."""
    size = 8 << 20
    path = tmp_path / "image.raw"
    path.write_bytes(image.data[:size])
    hot = write_list(tmp_path / "hot", list(range(size // PAGE_SIZE)))
    opts = {flag: True}
    with serving(tmp_path, path, hot=hot, **opts) as (sock, stats), Client(sock, [(0, size)]) as c:
        assert c.read(0, size) == image.data[:size]
    direct, total = stats[0]["direct_bytes"], stats[0]["prefetch_bytes"]
    assert total > 0 and direct == (total if flag == "direct" else 0)
    both = subprocess.run([str(page_loader.binary_path()), "--image", str(path), "--socket",
                           str(tmp_path / "s"), "--buffered", "--direct"],
                          capture_output=True, check=False)
    assert both.returncode == 2


@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
def test_image_in_several_files(tmp_path: Path, image: Image, memfd: bool) -> None:
    # Files of uneven page counts, one of a single page: prefetch reads and fault-around
    # windows meet file ends, and the second region starts inside a file.
    cuts = [0, 1, 4099, 20000, NPAGES // 2 + 3, NPAGES]
    parts = []
    for i, (a, z) in enumerate(itertools.pairwise(cuts)):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(image.data[a * PAGE_SIZE : z * PAGE_SIZE])
    hot = write_list(tmp_path / "hot", shuffled_pages(seed=6, fraction=0.5))
    half = IMAGE_SIZE // 2
    with (
        serving(tmp_path, parts, hot=hot, memfd=memfd) as (sock, stats),
        Client(sock, [(half, half), (0, half)], memfd=memfd) as client,
    ):
        client.touch(shuffled_pages(seed=7))
        assert_all_pages(client, image)
    assert stats[0]["prefetch_pages"] > 0 and stats[0]["demand_faults"] > 0


def test_many_image_files_under_a_low_open_file_limit(tmp_path: Path, image: Image) -> None:
    # 300 files of 4 pages, opened twice each, under a soft limit of 64: the loader raises it.
    parts = []
    for i in range(300):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(image.data[i * 4 * PAGE_SIZE : (i + 1) * 4 * PAGE_SIZE])
    size = 1200 * PAGE_SIZE
    sock = tmp_path / "loader.sock"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    opts = page_loader.LoaderOptions(image=parts, socket=sock,
                                hot=write_list(tmp_path / "hot", list(range(0, 1200, 2))))
    proc = page_loader.start(opts, stderr=subprocess.PIPE,
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    with Client(sock, [(0, size)]) as client:
        assert client.read(0, size) == image.data[:size]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


@contextmanager
def spawn_client(*args: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def answers(client: subprocess.Popen[str]) -> bool:
    """Whether a raw or probe client is still alive once the loader has exited: a SIGKILL the
    loader sent lands before the client can read its stdin again."""
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("ping\n")
        client.stdin.flush()
    except BrokenPipeError:
        return False
    return client.stdout.readline() == "alive\n"


def start_loader(tmp_path: Path, image: Path, **options: Any) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp_path / "loader.sock"
    opts = page_loader.LoaderOptions(image=image, socket=sock, **options)
    return page_loader.start(opts, stderr=subprocess.PIPE, text=True), sock


@pytest.mark.parametrize("prefetch", [False, True], ids=["lazy", "prefetching"])
@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
def test_client_killed_mid_run(tmp_path: Path, image: Image, prefetch: bool, memfd: bool) -> None:
    hot = write_list(tmp_path / "hot", list(range(NPAGES))) if prefetch else None
    proc, sock = start_loader(tmp_path, image.path, hot=hot, memfd=memfd, queue_depth=1)
    with spawn_client("touch", str(sock), str(IMAGE_SIZE), "memfd" if memfd else "anon") as client:
        assert client.stdout is not None
        assert client.stdout.readline() == "touched\n"
        os.kill(client.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == ""
    assert not sock.exists()


BAD_HANDSHAKES = {
    "bad-json": ("[{not json", "fd", "malformed handshake"),
    "not-an-array": ('{"size": 4096}', "fd", "malformed handshake"),
    "missing-fd": (region_json([(1 << 30, 4096, 0)]).decode(), "nofd", "file descriptor"),
    "not-a-uffd": (region_json([(1 << 30, 4096, 0)]).decode(), "pipe", "not a userfaultfd"),
    "outside-image": (region_json([(1 << 30, 8192, IMAGE_SIZE - 4096)]).decode(), "fd", "outside"),
    "offset-overflow": (region_json([(1 << 30, 8192, 2**64 - 4096)]).decode(), "fd", "outside"),
    "base-overflow": (region_json([(2**64 - 4096, 8192, 0)]).decode(), "fd", "overflows"),
    "bad-page-size": (
        json.dumps(
            [{"base_host_virt_addr": 1 << 30, "size": 2 << 20, "offset": 0, "page_size": 2 << 20}]
        ),
        "fd",
        "page size",
    ),
    "unaligned": (region_json([(1 << 30, 100, 0)]).decode(), "fd", "multiples of the page size"),
    "escape-in-key": (
        '[{"base_host_virt_addr\\"": 1, "size": 4096, "offset": 0, "page_size": 4096}]',
        "fd",
        "escape in a key",
    ),
    "signed-value": (
        '[{"base_host_virt_addr": 1073741824, "size": -4096, "offset": 0, "page_size": 4096}]',
        "fd",
        "not an unsigned 64-bit integer",
    ),
    "value-past-64-bits": (
        '[{"base_host_virt_addr": 18446744073709551616, "size": 4096, "offset": 0, '
        '"page_size": 4096}]',
        "fd",
        "not an unsigned 64-bit integer",
    ),
    "trailing-data": (region_json([(1 << 30, 4096, 0)]).decode() + " x", "fd", "trailing data"),
    "no-regions": (" [ ] ", "fd", "no regions"),
    "page-sizes-differ": (
        '[{"base_host_virt_addr": 1073741824, "size": 4096, "offset": 0, "page_size": 4096, '
        '"page_size_kib": 4}]',
        "fd",
        "page_size 4096 != page_size_kib 4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HANDSHAKES))
def test_malformed_handshake_fails_and_kills_client(
    tmp_path: Path, image: Image, case: str
) -> None:
    payload, fd, reason = BAD_HANDSHAKES[case]
    proc, sock = start_loader(tmp_path, image.path)
    with spawn_client("raw", str(sock), payload, fd) as client:
        _, err = proc.communicate(timeout=30)
        if fd == "fd":
            # It handed over its uffd: it must not be left waiting on a loader that gave up.
            assert client.wait(timeout=30) == -signal.SIGKILL
        else:
            # No uffd, so nothing of it waits on the loader: it is left alone.
            assert client.stdout is not None and client.stdout.readline() == "sent\n"
            assert answers(client)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and reason in err, err


def test_liveness_probe_is_not_killed(tmp_path: Path, image: Image) -> None:
    """A peer that connects and closes without a handshake registered nothing and cannot
    hang; the loader gives up on it with one line but must not kill it."""
    proc, sock = start_loader(tmp_path, image.path)
    with spawn_client("probe", str(sock)) as probe:
        assert probe.stdout is not None
        assert probe.stdout.readline() == "sent\n"
        _, err = proc.communicate(timeout=30)
        assert answers(probe)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "without one" in err, err


ACCEPTED_HANDSHAKES = {
    "spaced": ' [ {{ "base_host_virt_addr" : {base} ,\n "size":{size},"offset" : 0,'
              '"page_size_kib":4096 }} ] \n',
    "unknown-keys": '[{{"base_host_virt_addr": {base}, "size": {size}, "offset": 0, '
                    '"page_size": 4096, "mem_slot": 7, "": 0}}]',
    "page-size-only": '[{{"size": {size}, "base_host_virt_addr": {base}, "offset": 0, '
                      '"page_size": 4096}}]',
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_HANDSHAKES))
def test_handshake_spellings_are_accepted(tmp_path: Path, image: Image, case: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Key order, white space, unknown keys and either page-size key: all Firecracker sends."""
    from snapstore.uffd import client as client_module

    def spelled(regions: Any) -> bytes:
        ((base, size, _),) = list(regions)
        return ACCEPTED_HANDSHAKES[case].format(base=base, size=size).encode()

    monkeypatch.setattr(client_module, "region_json", spelled)
    with serving(tmp_path, image.path) as (sock, _), Client(sock, [(0, 1 << 20)]) as client:
        assert client.read(0, 1 << 20) == image.data[: 1 << 20]


def test_image_not_a_whole_number_of_pages(tmp_path: Path) -> None:
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(PAGE_SIZE * 4 + 100))
    proc, _ = start_loader(tmp_path, path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "image truncated" in err


def test_image_truncated_while_serving(tmp_path: Path) -> None:
    path = tmp_path / "image.raw"
    write_image(path, 1024, seed=6)
    proc, sock = start_loader(tmp_path, path, fault_around_kib=4)
    with spawn_client("touch", str(sock), str(1024 * PAGE_SIZE), "anon") as client:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "touched\n"
        os.truncate(path, 512 * PAGE_SIZE)
        client.stdin.write("go\n")
        client.stdin.flush()
        _, err = proc.communicate(timeout=30)
        assert client.wait(timeout=30) == -signal.SIGKILL
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "image truncated" in err


def test_bad_hot_list(tmp_path: Path, image: Image) -> None:
    hot = write_list(tmp_path / "hot", [NPAGES])
    proc, _ = start_loader(tmp_path, image.path, hot=hot)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "past the image end" in err


def test_usage_error() -> None:
    proc = subprocess.run([str(page_loader.binary_path()), "--image"], capture_output=True,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"usage:")


def test_cli_subcommand(tmp_path: Path, image: Image) -> None:
    parser = argparse.ArgumentParser()
    uffd_cli.add_commands(parser.add_subparsers())
    sock = tmp_path / "cli.sock"
    argv = ["uffd-loader", "--image", str(image.path), "--socket", str(sock)]
    args = parser.parse_args([*argv, "--fault-around-kib", "0"])
    status: list[int] = []
    runner = threading.Thread(target=lambda: status.append(args.func(args)))
    runner.start()
    with Client(sock, [(0, 1 << 20)]) as client:
        assert client.read(0, 1 << 20) == image.data[: 1 << 20]
    runner.join(timeout=30)
    assert status == [0]


def test_cli_reports_failure(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    uffd_cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["uffd-loader", "--image", str(tmp_path / "missing"), "--socket", str(tmp_path / "s")]
    )
    assert args.func(args) == 1
    assert "missing" in capfd.readouterr().err


# A restoring process for uffd-serve: it must not share a process with the feeder, whose
# Python would wait for the GIL that the faulting thread holds.
SERVE_CLIENT = """
import random, sys
from pathlib import Path
from snapstore.uffd.client import PAGE_SIZE, Client
sock, image, touch = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), int(sys.argv[3])
size = -(-len(image) // PAGE_SIZE) * PAGE_SIZE
image += bytes(size - len(image))
pages = list(range(size // PAGE_SIZE))
random.Random(7).shuffle(pages)
with Client(sock, [(0, size)]) as client:
    print("connected", flush=True)
    for n, p in enumerate(pages[:touch] if touch >= 0 else pages):
        if client.read(p * PAGE_SIZE, PAGE_SIZE) != image[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]:
            print("bad", p, flush=True)
    print("done", flush=True)
"""
SERVE_IMAGE = 48 << 20


@dataclass
class Served:
    store: Any
    image: Path
    sock: Path


@pytest.fixture
def served(tmp_path: Path) -> Served:
    from snapstore.ingest import ingest
    from snapstore.store.local import LocalStore
    from tests.conftest import memory_like

    src = tmp_path / "src"
    src.mkdir()
    # Not a whole number of pages: the last page is the file's tail and zeros.
    (src / "mem.img").write_bytes(memory_like(SERVE_IMAGE, seed=11) + b"tail")
    store = LocalStore.open(tmp_path / "store")
    ingest(store, src, "mem")
    return Served(store, src / "mem.img", tmp_path / "serve.sock")


def start_serve(s: Served, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "snapstore", "--store", str(s.store.root), "uffd-serve", "mem",
         "mem.img", "--socket", str(s.sock), *args],
        stderr=subprocess.PIPE, text=True, env=env)


def serve_client(s: Served, touch: int = -1) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", SERVE_CLIENT, str(s.sock), str(s.image),
                             str(touch)], stdout=subprocess.PIPE, text=True, env=env)


def loader_pids(s: Served) -> list[int]:
    """The chunk loader processes serving this test's store."""
    return chunk_loader_pids(s.store.root)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


@pytest.mark.parametrize("hot", [False, True], ids=["recorded-or-file-order", "hot-list"])
def test_uffd_serve_every_page_from_the_store(tmp_path: Path, served: Served, hot: bool) -> None:
    npages = -(-(SERVE_IMAGE + 4) // PAGE_SIZE)
    args = ["--stats-json", str(tmp_path / "stats.json")]
    if hot:
        pages = np.random.default_rng(3).permutation(npages)[: npages // 5]
        args += ["--hot", str(write_list(tmp_path / "hot", [int(p) for p in pages]))]
    serve = start_serve(served, *args)
    with serve_client(served) as client:
        out, _ = client.communicate(timeout=60)
    status, err = finish(serve)
    assert out == "connected\ndone\n"
    assert client.returncode == 0
    assert status == 0, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["chunks"] > 0 and stats["zero_pages"] > 0
    # Nothing on disk: no export, no working directory.
    assert list(served.store.tmp_dir.iterdir()) == []
    assert loader_pids(served) == []


# Discards pages while the loader prefetches the store's chunks: a discarded page reads as
# zeros (as anonymous memory does after MADV_DONTNEED), whether its chunk came before or after.
DISCARD_CLIENT = """
import mmap, random, sys
from pathlib import Path
from snapstore.uffd.client import PAGE_SIZE, Client
sock, image = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
size = -(-len(image) // PAGE_SIZE) * PAGE_SIZE
image += bytes(size - len(image))
rng = random.Random(5)
gone = set()
with Client(sock, [(0, size)]) as client:
    mm = client.regions[0].mm
    for _ in range(400):
        first = rng.randrange(size // PAGE_SIZE - 8)
        n = rng.randrange(1, 8)
        mm.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE, n * PAGE_SIZE)
        gone.update(range(first, first + n))
    bad = [p for p in range(size // PAGE_SIZE)
           if client.read(p * PAGE_SIZE, PAGE_SIZE)
           != (bytes(PAGE_SIZE) if p in gone else image[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])]
    print("bad", bad[:5], len(bad), "discarded", len(gone), flush=True)
"""


def test_uffd_serve_discards_during_prefetch_read_as_zero(tmp_path: Path, served: Served) -> None:
    serve = start_serve(served, "--stats-json", str(tmp_path / "stats.json"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", DISCARD_CLIENT, str(served.sock),
                           str(served.image)], stdout=subprocess.PIPE, text=True,
                          env=env) as client:
        out, _ = client.communicate(timeout=60)
    status, err = finish(serve)
    assert out.startswith("bad [] 0 discarded"), out
    assert client.returncode == 0 and status == 0, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["removed_pages"] > 0 and stats["prefetch_pages"] > 0


@pytest.mark.parametrize("threads", ["1", "4"])
def test_uffd_serve_installs_on_the_main_thread_or_install_threads(
        tmp_path: Path, served: Served, threads: str) -> None:
    """One prefetch thread: the main thread installs every chunk; more: install threads take
    the prefetched chunks. Every page is right either way."""
    from snapstore.uffd import serve as serve_module
    from snapstore.uffd.layout import Layout

    m = served.store.get_manifest(served.store.resolve("mem"))
    layout = Layout.of(serve_module.find_file(m, "mem.img"))
    stats = tmp_path / "stats.json"
    with serve_client(served) as client:
        status = serve_module.serve_local(
            served.store, layout, range(len(layout.chunks)), served.sock, 2,
            ["--prefetch-threads", threads, "--stats-json", str(stats)])
        out, _ = client.communicate(timeout=60)
    assert status == 0 and out == "connected\ndone\n", out
    assert json.loads(stats.read_text())["prefetch_pages"] > 0


def test_uffd_serve_refuses_what_it_cannot_serve(served: Served) -> None:
    from snapstore.cli import main

    root = str(served.store.root)
    sock = str(served.sock)
    assert main(["--store", root, "uffd-serve", "mem", "nope.img", "--socket", sock]) == 1
    bad = served.sock.with_name("hot")
    bad.write_text("12\nx\n")
    assert main(["--store", root, "uffd-serve", "mem", "mem.img", "--socket", sock,
                 "--hot", str(bad)]) == 2


def test_uffd_serve_corrupt_chunk_kills_the_client(served: Served) -> None:
    """A chunk that fails its hash is never installed: the client that needs it is killed
    (it cannot go on without the page), never given a wrong byte, never left hanging."""
    victim = next(served.store.chunk_path(x.chunk) for e in
                  served.store.get_manifest(served.store.resolve("mem")).files()
                  for x in e.extents[len(e.extents) // 2:] if x.chunk is not None)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(blob))
    serve = start_serve(served)
    with serve_client(served) as client:
        out, _ = client.communicate(timeout=60)
    status, err = finish(serve)
    assert client.returncode == -signal.SIGKILL
    assert "bad" not in out
    assert status == 1
    assert err.count("\n") == 1 and "uffd_loader: chunk" in err, err
    assert loader_pids(served) == []


def test_uffd_serve_survives_a_killed_loader_process(served: Served) -> None:
    serve = start_serve(served, "--loaders", "1")
    with serve_client(served) as client:
        assert client.stdout is not None
        assert client.stdout.readline() == "connected\n"
        # Both started: the first forks the second once it has opened the store.
        deadline = time.monotonic() + 30
        while len(pids := loader_pids(served)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, _ = client.communicate(timeout=60)
    status, err = finish(serve)
    # A load in flight fails once and is tried again on the loader started in its place.
    assert out == "done\n" and client.returncode == 0, err
    assert status == 0, err


def test_uffd_serve_client_gone_early(served: Served) -> None:
    serve = start_serve(served)
    with serve_client(served, touch=50) as client:
        out, _ = client.communicate(timeout=60)
    status, err = finish(serve)
    assert out == "connected\ndone\n" and client.returncode == 0
    assert status == 0, err
    assert loader_pids(served) == []
    assert list(served.store.tmp_dir.iterdir()) == []


def test_uffd_serve_from_a_remote(tmp_path: Path, served: Served,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--remote: an empty local store, chunks fetched on demand from the bucket."""
    from snapstore.cli import main
    from tests.s3proxy import make_bucket, moto_server, s3_env

    with moto_server() as port:
        make_bucket(port, "uffd")
        for k, v in {**s3_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        assert main(["--store", str(served.store.root), "push", "mem", "s3://uffd/x"]) == 0
        serve = subprocess.Popen(
            [sys.executable, "-m", "snapstore", "--store", str(tmp_path / "empty"),
             "uffd-serve", "mem", "mem.img", "--socket", str(served.sock), "--remote",
             "s3://uffd/x"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        with serve_client(served) as client:
            out, _ = client.communicate(timeout=120)
        status, err = finish(serve)
    assert out == "connected\ndone\n" and client.returncode == 0, err
    assert status == 0, err


FEEDER_ANSWERS = {
    "unsealed": "without a sealed memfd of its size",
    "wrong-size": "without a sealed memfd of its size",
    "no-memfd": "without a sealed memfd of its size",
    "unknown-index": "outside the protocol",
    "closes": "the chunk feeder went away",
}


@pytest.mark.parametrize("answer", sorted(FEEDER_ANSWERS))
def test_loader_refuses_a_hostile_feeder(tmp_path: Path, served: Served, answer: str) -> None:
    """The loader installs only from a sealed memfd of the chunk's size that answers a chunk
    it asked for; anything else ends it with one line and kills the client, never a page
    from bytes that could change or that belong elsewhere."""
    import fcntl

    from snapstore.uffd import serve as serve_module
    from snapstore.uffd.layout import Layout

    m = served.store.get_manifest(served.store.resolve("mem"))
    layout = Layout.of(serve_module.find_file(m, "mem.img"))
    proc, feeder = serve_module.start_loader(layout, [], served.sock, 1,
                                             stderr=subprocess.PIPE)
    with serve_client(served, touch=-1) as client:
        feeder.settimeout(30)
        (index,) = serve_module.REQUEST.unpack(feeder.recv(8))
        index &= ~serve_module.DEMAND
        _, size = layout.chunks[index]
        fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size if answer != "wrong-size" else size + 1)
        if answer != "unsealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK)
        reply = serve_module.REPLY.pack(index + len(layout.chunks) * (answer == "unknown-index"),
                                        serve_module.OK)
        if answer == "closes":
            feeder.close()
        elif answer == "no-memfd":
            feeder.send(reply)
        else:
            socket.send_fds(feeder, [reply], [fd])
        os.close(fd)
        out, _ = client.communicate(timeout=60)
        _, err = proc.communicate(timeout=30)
    feeder.close()
    assert proc.returncode == 1
    assert err.count(b"\n") == 1 and FEEDER_ANSWERS[answer].encode() in err, err
    assert client.returncode == -signal.SIGKILL
    assert "bad" not in out


handshake_fields = st.fixed_dictionaries(
    {},
    optional={
        "base_host_virt_addr": st.integers(-(2**65), 2**65),
        "size": st.integers(-(2**65), 2**65),
        "offset": st.integers(-(2**65), 2**65),
        "page_size": st.sampled_from([0, 1, 4096, 4097, 2 << 20, -4096]),
        "page_size_kib": st.integers(-5, 5000),
    },
)
handshakes = st.one_of(
    st.lists(handshake_fields, max_size=3).map(json.dumps),
    # Raw text travels as a command-line argument of the client, which cannot hold NUL.
    st.text(st.characters(exclude_characters="\x00"), max_size=200),
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=4)
    .map(json.dumps),
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=handshakes)
def test_fuzzed_handshakes_end_cleanly(tmp_path: Path, image: Image, payload: str) -> None:
    """Whatever arrives, the loader exits 0 or 1 with at most one line, and never hangs."""
    for leftover in tmp_path.glob("loader.sock"):
        leftover.unlink()
    proc, sock = start_loader(tmp_path, image.path)
    with spawn_client("raw", str(sock), payload or " ", "fd") as client:
        try:
            _, err = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            # Accepted as a handshake (no regions, say): it ends when the client goes away.
            client.kill()
            _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 1), err
    assert err.count("\n") <= 1, err


UNMAP_DURING_PREFETCH = """
import sys, time
from pathlib import Path
from snapstore.uffd import client as client_module
from snapstore.uffd.client import Client
# Without UNMAP events the loader learns of the unmap only from UFFDIO_COPY's ENOENT, the
# race a busy many-core machine produces with them.
client_module._FEATURE_EVENT_UNMAP = 0
client = Client(Path(sys.argv[1]), [(0, int(sys.argv[2]))])
client.connect()
client.touch(range(64))
for r in client.regions:
    r.mm.close()
time.sleep(0.5)
client.close()
print("alive", flush=True)
"""


def test_client_unmapping_during_prefetch_is_not_an_error(tmp_path: Path, image: Image) -> None:
    """The loader may find a range gone (ENOENT) before it reads an UNMAP event, or with
    none coming: it must neither fail nor kill a client that only unmapped its memory."""
    hot = write_list(tmp_path / "hot", list(range(NPAGES)))
    proc, sock = start_loader(tmp_path, image.path, hot=hot, queue_depth=1, buffered=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    client = subprocess.run([sys.executable, "-c", UNMAP_DURING_PREFETCH, str(sock),
                             str(IMAGE_SIZE)], capture_output=True, text=True, env=env,
                            timeout=60)
    _, err = proc.communicate(timeout=30)
    assert client.returncode == 0 and client.stdout == "alive\n", client.stderr
    assert proc.returncode == 0, err


# ======================================================================================
# Hot-list fuzzing
#
# Whatever the hot list holds, the loader either refuses it at start (exit 1, one line,
# before it listens) or serves every page of the image right; it never hangs and never
# serves a wrong byte. A hot list decides only what is prefetched and in which order, so
# a list the loader accepts must not change a single byte a client reads.
# ======================================================================================

FUZZ_PAGES = 64
FUZZ_DEADLINE = 20.0

# One long-lived client process serves every case, so a case costs a loader start rather
# than an interpreter start. Each stdin line is a JSON request: socket, regions as
# (image offset, size) pairs, memfd, and whether to fault the pages in reverse order; the
# answer is the JSON list of pages that differ from the image.
FUZZ_CLIENT = """
import json, sys
from pathlib import Path
from snapstore.uffd.client import PAGE_SIZE, Client
image = Path(sys.argv[1]).read_bytes()
for line in sys.stdin:
    req = json.loads(line)
    regions = [tuple(r) for r in req["regions"]]
    with Client(Path(req["socket"]), regions, memfd=req["memfd"]) as client:
        pages = [p for off, size in regions
                 for p in range(off // PAGE_SIZE, (off + size) // PAGE_SIZE)]
        if req["reverse"]:
            pages.reverse()
        bad = [p for p in pages
               if client.read(p * PAGE_SIZE, PAGE_SIZE) != image[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]]
    print(json.dumps(bad), flush=True)
"""


class HotListRig:
    """A small image, a hot-list file and the client process that reads every case back."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.image = directory / "image.raw"
        write_image(self.image, FUZZ_PAGES, seed=77)
        self.hot = directory / "hot"
        self.socket = directory / "loader.sock"
        self.client: subprocess.Popen[str] | None = None

    def _client(self) -> subprocess.Popen[str]:
        # A client the loader killed (the failure it may report after a handshake) is
        # replaced, so that one bad case does not end the run.
        if self.client is None or self.client.poll() is not None:
            self.client = subprocess.Popen(
                [sys.executable, "-c", FUZZ_CLIENT, str(self.image)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        return self.client

    def _answer(self, client: subprocess.Popen[str]) -> str | None:
        """The client's next line, or None if it does not come within the deadline (the
        client is then killed: a fault nobody serves never returns)."""
        assert client.stdout is not None
        stdout = client.stdout
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()))
        reader.start()
        reader.join(FUZZ_DEADLINE)
        if reader.is_alive():
            client.kill()
            reader.join()
            return None
        return line[0]

    def run(self, hot: bytes, regions: list[tuple[int, int]], memfd: bool, reverse: bool,
            **options: Any) -> str | None:
        """Runs one case; None when the loader refused the list at start, else the
        client's answer. Fails the test on every other outcome."""
        self.hot.write_bytes(hot)
        self.socket.unlink(missing_ok=True)
        opts = page_loader.LoaderOptions(image=self.image, socket=self.socket, hot=self.hot,
                                    memfd=memfd, **options)
        proc = page_loader.start(opts, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + FUZZ_DEADLINE
            while not self.socket.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "the loader neither listens nor exits"
                time.sleep(0.002)
            if not self.socket.exists():
                err = proc.communicate(timeout=FUZZ_DEADLINE)[1]
                assert proc.returncode == 1, (proc.returncode, err)
                assert err.startswith("uffd_loader: hot list line ") and err.count("\n") == 1, err
                return None
            client = self._client()
            assert client.stdin is not None
            client.stdin.write(json.dumps({"socket": str(self.socket), "regions": regions,
                                           "memfd": memfd, "reverse": reverse}) + "\n")
            client.stdin.flush()
            answer = self._answer(client)
            assert answer is not None, f"the client hung for {FUZZ_DEADLINE:.0f} s"
            assert answer != "", "the loader killed its client"
            err = proc.communicate(timeout=FUZZ_DEADLINE)[1]
            assert (proc.returncode, err) == (0, ""), (proc.returncode, err)
            return answer
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def close(self) -> None:
        if self.client is not None:
            self.client.kill()
            self.client.communicate()


@pytest.fixture(scope="module")
def hot_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HotListRig]:
    rig = HotListRig(tmp_path_factory.mktemp("hotfuzz"))
    yield rig
    rig.close()


def documented_valid(hot: bytes) -> bool:
    """docs/uffd.md: one decimal page index per line, blank lines ignored, anything else
    an error."""
    lines = hot.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return all(not line or (line.isdigit() and int(line) < FUZZ_PAGES) for line in lines)


index = st.integers(0, FUZZ_PAGES - 1).map(str)
hot_line = st.one_of(
    index,
    st.just(""),
    st.integers(FUZZ_PAGES, 2**64 + 2).map(str),  # past the image, up to and past 2**64
    st.integers(2**64, 10**40).map(str),  # overflows 64 bits
    st.integers(-(2**70), -1).map(str),
    st.builds(lambda zeros, i: "0" * zeros + i, st.integers(0, 200), index),  # long lines
    st.integers(60, 4000).map(lambda n: "7" * n),
    st.builds(lambda pre, i, post: pre + i + post,
              st.sampled_from(["", " ", "\t", "+", "-", "\f", "\v", "\r"]), index,
              st.sampled_from(["", " ", "\t", "\r", ".0", "x"])),
    st.builds(lambda i, tail: i + "\x00" + tail, index, st.text(max_size=8)),  # NUL bytes
    st.sampled_from(["0x10", "1e3", "0b1", "nan", "-0", "+0", "\u0661", "\u00bd", "\x00"]),
    st.text(max_size=70),
)
hot_lists = st.one_of(
    # Lists the docs call valid: unsorted, with duplicates and blank lines.
    st.lists(st.one_of(index, index, index, st.just("")), max_size=3 * FUZZ_PAGES)
    .map(lambda lines: "".join(line + "\n" for line in lines).encode()),
    st.builds(lambda lines, sep, end: (sep.join(lines) + (sep if end else "")).encode(),
              st.lists(hot_line, max_size=40), st.sampled_from(["\n", "\r\n"]), st.booleans()),
    st.binary(max_size=300),
)
layouts = {
    "whole": [(0, FUZZ_PAGES * PAGE_SIZE)],
    # Hot pages in the second half are outside every region.
    "first-half": [(0, FUZZ_PAGES // 2 * PAGE_SIZE)],
    "two-swapped": [(FUZZ_PAGES // 2 * PAGE_SIZE, FUZZ_PAGES // 2 * PAGE_SIZE),
                    (0, FUZZ_PAGES // 2 * PAGE_SIZE)],
}


@settings(max_examples=int(os.environ.get("SNAPSTORE_HOT_FUZZ_CASES", "300")), deadline=None)
@given(hot=hot_lists, layout=st.sampled_from(sorted(layouts)), memfd=st.booleans(),
       reverse=st.booleans(), fault_around_kib=st.sampled_from([0, 4, 64]),
       prefetch_threads=st.sampled_from([1, 2, 4]), queue_depth=st.sampled_from([1, 8]))
def test_fuzzed_hot_lists_are_refused_or_served_right(
    hot_rig: HotListRig, hot: bytes, layout: str, memfd: bool, reverse: bool,
    fault_around_kib: int, prefetch_threads: int, queue_depth: int,
) -> None:
    answer = hot_rig.run(hot, layouts[layout], memfd, reverse,
                         fault_around_kib=fault_around_kib, prefetch_threads=prefetch_threads,
                         queue_depth=queue_depth)
    valid = documented_valid(hot)
    assert (answer is not None) is valid, f"{'refused' if valid else 'served'}: {hot!r}"
    assert answer is None or json.loads(answer) == [], f"pages served wrong: {answer.strip()}"


# The cases docs/uffd.md decides: whole lines of decimal digits, blank lines skipped.
HOT_LIST_CASES = [
    pytest.param(b"", False, id="empty"),
    pytest.param(b"\n\n3\n\n", False, id="blank-lines"),
    pytest.param(b"1\n2", False, id="no-final-newline"),
    pytest.param(b"5\n5\n63\n0\n5\n1\n", False, id="unsorted-duplicates"),
    pytest.param(b"0" * 70 + b"12\n", False, id="long-line-leading-zeros"),
    pytest.param(b"64\n", True, id="past-the-end"),
    pytest.param(b"18446744073709551616\n", True, id="overflow"),
    pytest.param(b"-1\n", True, id="negative"),
    pytest.param(b"1\r\n", True, id="crlf"),
    pytest.param(b"0x10\n", True, id="hex"),
    pytest.param(b"7" * 4000 + b"\n", True, id="long-digits"),
    pytest.param(b"\x00\n", True, id="nul-line"),
    pytest.param(b"5\x00junk\n", True, id="nul-then-junk"),
    pytest.param(b"0" * 62 + b"64\n", True, id="long-line-past-the-end"),
    pytest.param(b"+5\n", True, id="plus-sign"),
    pytest.param(b" 5\n", True, id="leading-space"),
]


@pytest.mark.parametrize(("hot", "refused"), HOT_LIST_CASES)
def test_hot_list_format_as_documented(hot_rig: HotListRig, hot: bytes, refused: bool) -> None:
    """Refused exactly when docs/uffd.md says the list is malformed; served right if not."""
    assert documented_valid(hot) is not refused
    answer = hot_rig.run(hot, layouts["whole"], memfd=False, reverse=False)
    assert (answer is None) is refused, "refused" if answer is None else "served"
    assert answer is None or json.loads(answer) == []
