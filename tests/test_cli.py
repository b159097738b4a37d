"""The command line: exit statuses, --json documents, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapstore.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_list_show_stats_json(capsys: pytest.CaptureFixture[str], image_dir: Path,
                                     tmp_path: Path) -> None:
    s = str(tmp_path / "store")
    code, out, err = run(capsys, "--store", s, "ingest", str(image_dir), "--tag", "a",
                         "--label", "model=m1", "--label", "gpu=")
    assert code == 0 and len(out.strip()) == 64 and "ingested" in err
    code, out, _ = run(capsys, "--store", s, "list", "--json")
    [snap] = json.loads(out)
    assert snap["tags"] == ["a"] and snap["labels"] == {"model": "m1", "gpu": ""}
    assert snap["logical_bytes"] > snap["stored_bytes"] > 0
    code, out, _ = run(capsys, "--store", s, "show", snap["id"][:8], "--json")
    doc = json.loads(out)
    assert {e["path"] for e in doc["entries"]} >= {"checkpoint.img", "link", "sub"}
    assert next(e for e in doc["entries"] if e["path"] == "sparse.img")["hole_bytes"] == 5 << 20
    code, out, _ = run(capsys, "--store", s, "stats", "--json")
    stats = json.loads(out)
    assert stats["snapshots"] == 1 and stats["dedup_ratio"] >= 1
    code, out, _ = run(capsys, "--store", s, "show", "a")
    assert code == 0 and "checkpoint.img" in out and "link -> sub/pages.img" in out


def test_tag_rm_gc_verify(capsys: pytest.CaptureFixture[str], image_dir: Path,
                          tmp_path: Path) -> None:
    s = str(tmp_path / "store")
    run(capsys, "--store", s, "ingest", str(image_dir), "--tag", "a")
    assert run(capsys, "--store", s, "tag", "a", "b")[0] == 0
    assert run(capsys, "--store", s, "rm", "a")[0] == 0
    code, out, _ = run(capsys, "--store", s, "gc", "--json")
    assert code == 0 and json.loads(out)["deleted_chunks"] == 0
    assert run(capsys, "--store", s, "verify", "b")[0] == 0
    assert run(capsys, "--store", s, "rm", "b")[0] == 0
    code, out, _ = run(capsys, "--store", s, "gc", "--dry-run")
    assert code == 0 and "would delete 1 snapshots" in out
    code, out, err = run(capsys, "--store", s, "export", "b", str(tmp_path / "x"))
    assert code == 1 and "no tag or snapshot 'b'" in err


def test_verify_exit_status_names_the_damage(capsys: pytest.CaptureFixture[str],
                                            image_dir: Path, tmp_path: Path) -> None:
    s = tmp_path / "store"
    run(capsys, "--store", str(s), "ingest", str(image_dir), "--tag", "a")
    victim = max((s / "chunks").rglob("*"), key=lambda p: p.stat().st_size)
    victim.unlink()
    code, out, _ = run(capsys, "--store", str(s), "verify", "--json")
    doc = json.loads(out)
    assert code == 1 and len(doc["problems"]) == 1
    assert doc["problems"][0]["id"] == victim.parent.name + victim.name
    assert any(a.startswith("a:") for a in doc["problems"][0]["affects"])


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], image_dir: Path,
                             tmp_path: Path) -> None:
    s = str(tmp_path / "store")
    code, _, err = run(capsys, "--store", s, "ingest", str(image_dir), "--tag", "../x")
    assert code == 2 and "invalid tag name" in err
    code, _, err = run(capsys, "--store", s, "ingest", str(image_dir), "--tag", "t",
                       "--label", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_store_from_environment_and_no_traceback(tmp_path: Path, image_dir: Path) -> None:
    env = {**os.environ, "SNAPSTORE_DIR": str(tmp_path / "envstore")}
    ok = subprocess.run([sys.executable, "-m", "snapstore", "ingest", str(image_dir), "--tag",
                         "e"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "envstore" / "refs" / "tags" / "e").exists()
    bad = subprocess.run([sys.executable, "-m", "snapstore", "export", "e", str(image_dir)],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "snapstore", "--store",
                              str(tmp_path / "none"), "list"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no snapstore store" in missing.stderr
