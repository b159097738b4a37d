"""The gVisor workflow against the real runsc: exact and transcoded checkpoints restore."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from snapstore import examples
from snapstore.export import export
from snapstore.ingest import ingest
from snapstore.runsc import Runsc, new_container_id
from snapstore.statefile import memory_of
from snapstore.store.local import LocalStore

pytestmark = pytest.mark.runsc


def wait_counter_above(bundle: Path, value: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (current := examples.read_counter(bundle)) <= value:
        assert time.monotonic() < deadline, f"counter stuck at {current}, expected > {value}"
        time.sleep(0.05)
    return current


def test_exact_ingest_exports_the_checkpoint_byte_identical(
    rs: Runsc, store: LocalStore, tmp_path: Path
) -> None:
    ckpt = examples.checkpoint_busybox(tmp_path, runsc=rs)
    m = store.get_manifest(ingest(store, ckpt.image_dir, "exact", transcode=False).snapshot)
    assert [e.form for e in m.files()] == ["exact"]
    export(store, m, tmp_path / "out")
    original = (ckpt.image_dir / "checkpoint.img").read_bytes()
    assert (tmp_path / "out" / "checkpoint.img").read_bytes() == original


def test_transcoded_checkpoint_restores(rs: Runsc, store: LocalStore, tmp_path: Path) -> None:
    ckpt = examples.checkpoint_busybox(tmp_path, runsc=rs)
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
