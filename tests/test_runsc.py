"""Tests of the runsc wrapper and the example workloads, against the real runsc."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest

from examples import workloads
from snapstore.gvisor.runsc import Runsc, RunscError, new_container_id
from tests.conftest import alive, wait_counter_above, wait_until

MiB = 2**20


# -- memory_image ---------------------------------------------------------------------------


def _classify(path: Path, repeated_page: bytes) -> tuple[Counter[str], int]:
    kinds: Counter[str] = Counter()
    runs = 0
    previous = ""
    zero = bytes(workloads.PAGE_SIZE)
    with path.open("rb") as f:
        while page := f.read(workloads.PAGE_SIZE):
            kind = "zero" if page == zero else "repeated" if page == repeated_page else "random"
            kinds[kind] += 1
            runs += kind != previous
            previous = kind
    return kinds, runs


def test_memory_image_composition(tmp_path: Path) -> None:
    path = tmp_path / "memory.img"
    layout = workloads.memory_image(path, 8 * MiB, seed=3)

    assert path.stat().st_size == 8 * MiB
    pages = 8 * MiB // workloads.PAGE_SIZE
    assert layout.pages == pages
    assert (layout.zero_pages, layout.random_pages, layout.repeated_pages) == (
        round(pages * 0.4),
        round(pages * 0.3),
        pages - round(pages * 0.4) - round(pages * 0.3),
    )
    kinds, runs = _classify(path, layout.repeated_page)
    assert kinds == Counter(
        zero=layout.zero_pages, random=layout.random_pages, repeated=layout.repeated_pages
    )
    # Clustered: far fewer kind changes than pages, as adjacent runs of one kind merge.
    assert runs <= layout.runs < pages / 4


def test_memory_image_is_deterministic(tmp_path: Path) -> None:
    def digest(name: str, seed: int) -> str:
        path = tmp_path / name
        workloads.memory_image(path, 2 * MiB, seed=seed)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest("a.img", 7) == digest("b.img", 7)
    assert digest("c.img", 8) != digest("a.img", 7)


def test_memory_image_rejects_partial_pages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        workloads.memory_image(tmp_path / "bad.img", 4096 + 1)


# -- runsc wrapper --------------------------------------------------------------------------


@pytest.mark.runsc
def test_version(rs: Runsc) -> None:
    assert rs.version().startswith("runsc version")


@pytest.mark.runsc
def test_error_message_names_command_status_and_cause(rs: Runsc) -> None:
    with pytest.raises(RunscError) as info:
        rs.state("no-such-container")
    err = info.value
    assert err.returncode == 128
    assert err.not_found
    message = str(err)
    assert message.startswith("runsc state failed (exit status 128): ")
    assert "does not exist" in message
    assert "--network=none" in message


@pytest.mark.runsc
def test_run_error_from_detached_start_is_reported(rs: Runsc, tmp_path: Path) -> None:
    with pytest.raises(RunscError, match=r"runsc run failed .*config\.json"):
        rs.run(new_container_id(), tmp_path / "not-a-bundle")
    assert rs.containers() == []


@pytest.mark.runsc
def test_destroy_tolerates_missing_container(rs: Runsc, tmp_path: Path) -> None:
    """Destroying a container that never existed, or one already destroyed, raises
    nothing and leaves the others alone; destroying a running one removes it, its
    sandbox process and its cgroups."""
    bundle = workloads.busybox_counter_bundle(tmp_path / "bundle")
    with rs.container(bundle) as cid:
        wait_counter_above(bundle, 0)
        rs.destroy("never-created")
        rs.destroy(new_container_id())
        assert rs.containers() == [cid] and rs.state(cid).status == "running"
        wait_counter_above(bundle, workloads.read_counter(bundle))
        sandbox = rs.state(cid).pid
        rs.destroy(cid)
        assert rs.containers() == []
        wait_until(lambda: not alive(sandbox), "the sandbox process to exit")
        assert not any(Path("/sys/fs/cgroup").glob(f"*/{cid}"))
        rs.destroy(cid)
    with pytest.raises(RunscError) as info:
        rs.state(cid)
    assert info.value.not_found


@pytest.mark.runsc
def test_checkpoint_busybox(rs: Runsc, tmp_path: Path) -> None:
    image_dir, bundle, counter = workloads.checkpoint_busybox(tmp_path, runsc=rs)

    image = image_dir / "checkpoint.img"
    assert 100_000 < image.stat().st_size < 20 * MiB
    assert counter >= 5
    assert rs.containers() == []
    assert (bundle / "config.json").exists()


@pytest.mark.runsc
def test_restore_from_plain_dir_counter_keeps_rising(rs: Runsc, tmp_path: Path) -> None:
    bundle = workloads.busybox_counter_bundle(tmp_path / "bundle")
    cid = new_container_id()
    rs.run(cid, bundle)
    try:
        wait_counter_above(bundle, 3)
        rs.checkpoint(cid, tmp_path / "image")
        assert rs.state(cid).status == "stopped"
        stopped_at = workloads.read_counter(bundle)
        rs.delete(cid)

        rs.restore(cid, bundle, tmp_path / "image")
        assert rs.state(cid).status == "running"
        resumed = wait_counter_above(bundle, stopped_at)
        # A fresh start would count from 1 again; a restored shell resumes right after.
        assert resumed <= stopped_at + 3
        wait_counter_above(bundle, resumed + 3)
    finally:
        rs.destroy(cid)
    assert rs.containers() == []


@pytest.mark.runsc
def test_counter_cycle(rs: Runsc, tmp_path: Path) -> None:
    cycle = workloads.counter_cycle(tmp_path, runsc=rs)
    assert cycle.at_checkpoint < cycle.after_restore < cycle.later


@pytest.mark.runsc
def test_checkpoint_leave_running(rs: Runsc, tmp_path: Path) -> None:
    bundle = workloads.busybox_counter_bundle(tmp_path / "bundle")
    with rs.container(bundle) as cid:
        wait_counter_above(bundle, 3)
        image = rs.checkpoint(cid, tmp_path / "image", leave_running=True)
        assert image.stat().st_size > 0
        assert rs.state(cid).status == "running"
        wait_counter_above(bundle, workloads.read_counter(bundle) + 2)
    assert rs.containers() == []


@pytest.mark.runsc
def test_kill_then_delete(rs: Runsc, tmp_path: Path) -> None:
    bundle = workloads.busybox_counter_bundle(tmp_path / "bundle")
    cid = new_container_id()
    rs.run(cid, bundle)
    try:
        rs.kill(cid, "KILL")
        deadline = time.monotonic() + 30
        while rs.state(cid).status != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rs.delete(cid, force=True)
    finally:
        rs.destroy(cid)
    assert rs.containers() == []


@pytest.mark.runsc
@pytest.mark.slow
def test_two_python_checkpoints(rs: Runsc, tmp_path: Path) -> None:
    mbytes = 16
    first, second = workloads.two_python_checkpoints(tmp_path, mbytes=mbytes, runsc=rs)

    sizes = [(d / "checkpoint.img").stat().st_size for d in (first, second)]
    # The image is compressed: the random three quarters of the data cannot shrink, and the
    # interpreter adds some tens of MB at most.
    for size in sizes:
        assert mbytes * 3 // 4 * MiB < size < (mbytes + 64) * MiB
    assert (first / "checkpoint.img").read_bytes() != (second / "checkpoint.img").read_bytes()
    status = workloads.read_status(tmp_path / "python-bundle")
    assert status is not None
    # The restored process kept running and its data survived the checkpoint and restore.
    assert status["tick"] >= 2
    assert status["sha256"] == status["sha256_start"]
    assert status["mbytes"] == mbytes
    assert rs.containers() == []
