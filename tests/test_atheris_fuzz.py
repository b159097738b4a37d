"""Coverage-guided fuzzing (atheris, libFuzzer) of the two parsers that read bytes other
hosts wrote: manifests and gVisor statefiles.

hypothesis (test_engine, test_statefile) draws inputs from a shape; libFuzzer instead
mutates real manifests and statefiles, keeping each mutation that reaches new lines of the
parser, so it gets past checks a random input rarely passes. Each target runs a fixed
number of inputs from a fixed seed, so a run is bounded and repeatable; a larger run:
SNAPSTORE_FUZZ_RUNS=200000.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from snapstore.ingest import ingest
from snapstore.store.local import LocalStore
from tests.conftest import memory_like
from tests.test_statefile import make_statefile

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris has no wheel for this platform or Python")

REPO = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("SNAPSTORE_FUZZ_RUNS", "20000"))

# The target runs in a process of its own: libFuzzer ends the process when it is done.
# Whatever the parser accepts must also satisfy what the rest of snapstore relies on, so
# each target checks that too; any other exception is a finding.
HARNESS = """
import copy, io, json, random, sys
import atheris
with atheris.instrument_imports(include=["snapstore"]):
    from snapstore import manifest, transcode
    from snapstore.errors import ManifestError


def parse_manifest(data):
    try:
        m = manifest.decode(data)
    except ManifestError:
        return
    for e in m.entries:
        assert not e.path.startswith("/") and ".." not in e.path.split("/"), e.path
        stored = sum(x.size for x in e.extents)
        if e.layout is None:
            assert stored == e.size, e
        else:
            assert (stored, e.size) == (e.layout.raw_size, e.layout.presented_size()), e
    assert manifest.decode(m.encode()) == m


def parse_statefile(data):
    try:
        form = transcode.StoredForm(io.BytesIO(data))
        stored = form.read()
    except transcode.NotAStatefile:
        return
    layout = form.layout()
    presented = b"".join(transcode.present(layout, iter([stored])))
    assert len(presented) == layout.presented_size()
    again = transcode.StoredForm(io.BytesIO(presented))
    assert again.read() == stored and again.layout() == layout


# Byte flips almost never leave JSON valid, and json.loads is C that libFuzzer cannot see
# into; so a manifest that parses as JSON is mutated as a tree: a value replaced by one
# of the kinds of values validation must catch, a number nudged, an item deleted or
# repeated, a key renamed. The parser's coverage still decides which mutants are kept.
KEYS = ["format", "version", "created", "labels", "chunker", "entries", "path", "type",
        "mode", "mtime_ns", "size", "extents", "target", "form", "transcode", "kind",
        "header_size", "block_size", "raw_size", "min_size", "avg_size", "max_size",
        "hole_min", "algorithm"]
VALUES = [None, True, False, 0, 1, -1, 2**31, 2**63, 2**64, -(2**63), 0.5, float("inf"), "",
          "/", "..", "a/../../b", "a//b", "a/./b", "x" * 300, "\\x00", "file", "dir",
          "symlink", "transcoded", "exact", "gvisor-statefile", "0" * 64, "f" * 63, [], {},
          [None, 1], ["0" * 64, 4096]]


def nodes(x, out):
    for k in (list(x) if isinstance(x, dict) else range(len(x)) if isinstance(x, list) else ()):
        out.append((x, k))
        nodes(x[k], out)
    return out


def mutate_manifest(data, max_size, seed):
    rng = random.Random(seed)
    try:
        doc = json.loads(data)
    except ValueError:
        return atheris.Mutate(data, max_size)
    for _ in range(rng.randint(1, 3)):
        found = nodes(doc, [])
        if not found:
            return atheris.Mutate(data, max_size)
        box, key = rng.choice(found)
        value = box[key]
        op = rng.randrange(5)
        if op == 0 or (op == 1 and type(value) is not int):
            box[key] = copy.deepcopy(rng.choice(VALUES))
        elif op == 1:
            box[key] = rng.choice([value + 1, value - 1, value * 2, value + 4096, -value])
        elif op == 2:
            del box[key]
        elif op == 3 and isinstance(box, list):
            box.insert(key, copy.deepcopy(value))
        elif isinstance(box, dict):
            box[rng.choice(KEYS)] = box.pop(key) if rng.random() < 0.5 else rng.choice(VALUES)
    out = json.dumps(doc, allow_nan=True).encode()
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


target = sys.argv.pop(1)
if target == "manifest":
    atheris.Setup(sys.argv, parse_manifest, custom_mutator=mutate_manifest)
else:
    atheris.Setup(sys.argv, parse_statefile)
atheris.Fuzz()
"""


def seed_manifests(tmp_path: Path, image_dir: Path) -> list[bytes]:
    """Real manifests: every kind of entry, and a transcoded statefile."""
    (image_dir / "checkpoint.img").write_bytes(make_statefile(memory_like(300_000, 3)))
    store = LocalStore.open(tmp_path / "store")
    result = ingest(store, image_dir, "seed", labels={"app": "busybox", "host": "h1"})
    return [store.get_manifest(result.snapshot).encode()]


def seed_statefiles() -> list[bytes]:
    """Small real statefiles: one block, several, a short last block, none."""
    return [make_statefile(memory_like(size, seed), block=block)
            for size, seed, block in ((1024, 1, 1024), (2600, 2, 1024), (700, 3, 256),
                                      (0, 4, 512))]


def fuzz(target: str, seeds: list[bytes], corpus: Path, max_len: int) -> str:
    corpus.mkdir()
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, target, f"-runs={RUNS}", "-seed=1234",
         f"-max_len={max_len}", "-timeout=20", "-rss_limit_mb=2048",
         f"-artifact_prefix={corpus.parent}/", str(corpus)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done is not None and int(done.group(1)) >= RUNS, proc.stderr[-2000:]
    return proc.stderr


def test_manifest_parser_under_libfuzzer(tmp_path: Path, image_dir: Path) -> None:
    seeds = seed_manifests(tmp_path, image_dir)
    fuzz("manifest", seeds, tmp_path / "corpus", max_len=max(map(len, seeds)) + 1024)


def test_statefile_parser_under_libfuzzer(tmp_path: Path) -> None:
    fuzz("statefile", seed_statefiles(), tmp_path / "corpus", max_len=8192)
