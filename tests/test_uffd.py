"""Tests of the userfaultfd page loader, driven through the Python client library."""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import signal
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

from snapstore.uffd import cli, loader
from snapstore.uffd.build import compile_loader, source_path
from snapstore.uffd.client import PAGE_SIZE, Client, region_json

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
if mode == "raw":
    sock = connect(path)
    fds = {"fd": [open_userfaultfd(0)], "pipe": [os.pipe()[0]], "nofd": []}[sys.argv[4]]
    socket.send_fds(sock, [sys.argv[3].encode()], fds)
    time.sleep(60)
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
    if not loader.BINARY.is_file():
        compile_loader(source_path(), loader.BINARY)
    return loader.binary_path()


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
    tmp_path: Path, image: Path, **options: Any
) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """Runs a loader for the block; after it, the loader must have exited 0 and left stats."""
    sock = tmp_path / "loader.sock"
    stats = tmp_path / "stats.json"
    opts = loader.LoaderOptions(image=image, socket=sock, stats_json=stats, **options)
    proc = loader.start(opts, stderr=subprocess.PIPE)
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


def start_loader(tmp_path: Path, image: Path, **options: Any) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp_path / "loader.sock"
    opts = loader.LoaderOptions(image=image, socket=sock, **options)
    return loader.start(opts, stderr=subprocess.PIPE, text=True), sock


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
}


@pytest.mark.parametrize("case", sorted(BAD_HANDSHAKES))
def test_malformed_handshake_fails_and_kills_client(
    tmp_path: Path, image: Image, case: str
) -> None:
    payload, fd, reason = BAD_HANDSHAKES[case]
    proc, sock = start_loader(tmp_path, image.path)
    with spawn_client("raw", str(sock), payload, fd) as client:
        _, err = proc.communicate(timeout=30)
        # The client must not be left waiting on a loader that gave up.
        assert client.wait(timeout=30) == -signal.SIGKILL
    assert proc.returncode == 1
    assert err.count("\n") == 1 and reason in err, err


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
    proc = subprocess.run([str(loader.binary_path()), "--image"], capture_output=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"usage:")


def test_cli_subcommand(tmp_path: Path, image: Image) -> None:
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
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
    cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["uffd-loader", "--image", str(tmp_path / "missing"), "--socket", str(tmp_path / "s")]
    )
    assert args.func(args) == 1
    assert "missing" in capfd.readouterr().err


def test_uffd_serve_from_the_store(tmp_path: Path, image: Image) -> None:
    from snapstore.cli import main
    from snapstore.ingest import ingest
    from snapstore.store.local import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "mem.img").symlink_to(image.path)
    (src / "copy.img").write_bytes(image.data)
    store = LocalStore.open(tmp_path / "store")
    ingest(store, src, "mem")
    sock = tmp_path / "serve.sock"
    status: list[int] = []
    argv = ["--store", str(store.root), "uffd-serve", "mem", "copy.img", "--socket", str(sock)]
    runner = threading.Thread(target=lambda: status.append(main(argv)))
    runner.start()
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with Client(sock, [(0, IMAGE_SIZE)]) as client:
        client.touch(shuffled_pages(seed=5, fraction=0.1))
        assert_all_pages(client, image)
    runner.join(timeout=60)
    assert status == [0]
    assert list(store.tmp_files()) == []
    assert main(["--store", str(store.root), "uffd-serve", "mem", "nope.img", "--socket",
                 str(sock)]) == 1


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
