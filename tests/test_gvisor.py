"""The gVisor workflow against the real runsc: exact and transcoded checkpoints restore."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples import workloads
from snapstore.cli import main
from snapstore.export import export
from snapstore.gvisor.runsc import Runsc, new_container_id
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from snapstore.transcode import memory_of
from tests.conftest import wait_counter_above
from tests.s3proxy import make_bucket, moto_server, s3_env

pytestmark = pytest.mark.runsc


def test_exact_ingest_exports_the_checkpoint_byte_identical(
    rs: Runsc, store: LocalStore, tmp_path: Path
) -> None:
    ckpt = workloads.checkpoint_busybox(tmp_path, runsc=rs)
    m = store.get_manifest(ingest(store, ckpt.image_dir, "exact", transcode=False).snapshot)
    assert [e.form for e in m.files()] == ["exact"]
    export(store, m, tmp_path / "out")
    original = (ckpt.image_dir / "checkpoint.img").read_bytes()
    assert (tmp_path / "out" / "checkpoint.img").read_bytes() == original


def test_transcoded_checkpoint_restores(rs: Runsc, store: LocalStore, tmp_path: Path) -> None:
    ckpt = workloads.checkpoint_busybox(tmp_path, runsc=rs)
    m = store.get_manifest(ingest(store, ckpt.image_dir, "t").snapshot)
    assert [e.form for e in m.files()] == ["transcoded"]
    out = tmp_path / "out"
    export(store, m, out)
    assert memory_of(out / "checkpoint.img") == memory_of(ckpt.image_dir / "checkpoint.img")
    cid = new_container_id()
    try:
        rs.restore(cid, ckpt.bundle, out)
        wait_counter_above(ckpt.bundle, ckpt.counter)
    finally:
        rs.destroy(cid)


def restore_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if "snapstore-restore-" in line.split()[1]]


@dataclass(frozen=True)
class Checkpointed:
    """A busybox counter checkpointed by `snapstore checkpoint`, its container deleted."""

    store: Path
    bundle: Path
    cid: str
    counter: int
    runsc_arg: str


@pytest.fixture
def checkpointed(rs: Runsc, tmp_path: Path) -> Iterator[Checkpointed]:
    store = tmp_path / "store"
    runsc_arg = f"--runsc-arg=--root={rs.root}"
    bundle = workloads.busybox_counter_bundle(tmp_path / "bundle")
    cid = new_container_id()
    rs.run(cid, bundle)
    try:
        wait_counter_above(bundle, 20)
        assert main(["--store", str(store), "checkpoint", cid, "--tag", "counter",
                     "--label", "app=counter", runsc_arg]) == 0
        counter = workloads.read_counter(bundle)
        rs.delete(cid)
        yield Checkpointed(store, bundle, cid, counter, runsc_arg)
    finally:
        rs.destroy(cid)
    assert restore_mounts() == []


def test_checkpoint_restore_cycle_and_fallback(
    rs: Runsc, checkpointed: Checkpointed, capsys: pytest.CaptureFixture[str]
) -> None:
    c = checkpointed
    capsys.readouterr()
    assert main(["--store", str(c.store), "find", "--label", "app=counter", "--json"]) == 0
    [hit] = json.loads(capsys.readouterr().out)
    assert hit["labels"]["arch"] and hit["labels"]["runsc.version"]

    assert main(["--store", str(c.store), "restore", c.cid, "--match", "app=counter",
                 "--bundle", str(c.bundle), c.runsc_arg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == "restore", report["reason"]
    assert report["snapshot"] == hit["id"]
    assert wait_counter_above(c.bundle, c.counter) > c.counter
    assert report["mount_left"] is None and restore_mounts() == []
    rs.destroy(c.cid)

    assert main(["--store", str(c.store), "restore", c.cid, "--match", "app=other",
                 "--bundle", str(c.bundle), c.runsc_arg, "--no-fallback"]) == 1
    assert "no snapshot matches app=other" in capsys.readouterr().err
    assert rs.containers() == []

    (c.bundle / "out" / "counter").unlink()
    assert main(["--store", str(c.store), "restore", c.cid, "--match", "app=other",
                 "--bundle", str(c.bundle), c.runsc_arg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == "cold" and "no snapshot matches" in report["reason"]
    assert 0 < wait_counter_above(c.bundle, 0) < c.counter


def test_restore_from_a_snapshot_only_in_s3(
    checkpointed: Checkpointed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    c = checkpointed
    with moto_server() as port:
        make_bucket(port, "snaps")
        for k, v in s3_env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        remote = "s3://snaps/node"
        assert main(["--store", str(c.store), "push", "counter", remote]) == 0
        capsys.readouterr()
        assert main(["--store", str(tmp_path / "empty-host"), "restore", c.cid, "--match",
                     "app=counter", "--bundle", str(c.bundle), "--remote", remote,
                     c.runsc_arg, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["path"] == "restore", report["reason"]
        assert report["source"] == remote
        assert wait_counter_above(c.bundle, c.counter) > c.counter
        assert restore_mounts() == []
