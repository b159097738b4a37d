"""Example workloads and checkpoint images for the demo, the tests and the benchmarks.

Its one job: build reproducible inputs for snapstore, either real gVisor checkpoints of small
containers (a busybox counter, a Python process holding numpy data) or a synthetic
memory-like image file of any size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from snapstore.gvisor.runsc import Runsc, new_container_id

PAGE_SIZE = 4096
BUSYBOX = Path("/usr/bin/busybox")
# Every applet the counter loop uses must exist as a link, as busybox picks the applet
# from argv[0] and the rootfs has nothing else.
_COUNTER_APPLETS = ("sh", "sleep", "mv", "echo")
# Write then rename, so the host never reads a half-written number.
_COUNTER_SCRIPT = (
    "i=0; while true; do i=$((i+1)); echo $i > /out/counter.tmp; "
    "mv /out/counter.tmp /out/counter; sleep 0.1; done"
)
_WAIT_POLL = 0.05

# The Python workload: allocate the data once, then rewrite a status file every tick with a
# checksum recomputed from memory, so a restored process proves its data survived.
_PYTHON_SCRIPT = """
import hashlib, json, os, sys, time
import numpy as np
mbytes, seed = int(sys.argv[1]), int(sys.argv[2])
n = mbytes * 2**20
rng = np.random.default_rng(seed)
data = np.empty(n, dtype=np.uint8)
# Three quarters seeded random bytes, then zeros, then one 4 KiB page repeated.
r = n * 3 // 4
z = (n - r) // 2
data[:r] = rng.integers(0, 256, r, dtype=np.uint8)
data[r:r + z] = 0
data[r + z:] = np.resize(rng.integers(0, 256, 4096, dtype=np.uint8), n - r - z)
start = hashlib.sha256(data).hexdigest()
tick = 0
while True:
    sha = hashlib.sha256(data).hexdigest()
    status = {"tick": tick, "mbytes": mbytes, "sha256_start": start, "sha256": sha}
    with open("/out/status.tmp", "w") as f:
        json.dump(status, f)
    os.rename("/out/status.tmp", "/out/status")
    tick += 1
    time.sleep(0.5)
"""


# -- OCI bundles ----------------------------------------------------------------------------


def _oci_config(
    args: Sequence[str],
    mounts: Sequence[dict[str, Any]],
    env: Sequence[str] = (),
) -> dict[str, Any]:
    """A minimal OCI runtime spec: read-only rootfs, no terminal, standard pseudo mounts."""
    return {
        "ociVersion": "1.0.0",
        "process": {
            # A terminal would make runsc demand --console-socket for detached containers.
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin", *env],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "snapstore",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            *mounts,
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


def _bind(source: Path, destination: Path | str, readonly: bool) -> dict[str, Any]:
    return {
        "destination": str(destination),
        "type": "bind",
        "source": str(source),
        "options": ["rbind", "ro" if readonly else "rw"],
    }


def _write_config(bundle: Path, config: dict[str, Any]) -> None:
    (bundle / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _out_dir(bundle: Path) -> Path:
    """The host directory bind-mounted at /out, where the workloads report."""
    return bundle / "out"


def busybox_counter_bundle(directory: Path | str) -> Path:
    """An OCI bundle whose shell loop writes an incrementing counter every ~0.1 s.

    The counter lives in the shell's memory, so it survives checkpoint/restore; it is
    mirrored to ``<bundle>/out/counter`` on the host through a bind mount (served by the
    gofer, so the host sees it live). Read it with :func:`read_counter`.
    """
    bundle = Path(directory).absolute()
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bundle / "rootfs" / "out").mkdir(exist_ok=True)
    out = _out_dir(bundle)
    out.mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    for applet in _COUNTER_APPLETS:
        link = bin_dir / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    _write_config(
        bundle,
        _oci_config(["/bin/sh", "-c", _COUNTER_SCRIPT], [_bind(out, "/out", readonly=False)]),
    )
    return bundle


def read_counter(bundle: Path | str) -> int:
    """The counter last written by a :func:`busybox_counter_bundle` container (0 if none)."""
    try:
        return int((_out_dir(Path(bundle)) / "counter").read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _numpy_site_dir() -> Path:
    """The directory holding the caller's numpy package, which the sandbox must import."""
    return Path(np.__file__).resolve().parent.parent


def _host_paths_for_python(python: Path) -> list[Path]:
    """Host directories the interpreter and numpy need, deduplicated and outermost only."""
    candidates = [
        Path(sys.base_prefix),
        Path(sys.prefix),
        _numpy_site_dir(),
        python.parent,
        python.resolve().parent,
        Path("/usr"),
    ]
    paths: list[Path] = []
    for path in sorted({p.absolute() for p in candidates}, key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(kept) for kept in paths):
            paths.append(path)
    return paths


def python_numpy_bundle(
    directory: Path | str, mbytes: int = 64, seed: int = 0, python: Path | str | None = None
) -> Path:
    """An OCI bundle whose Python process holds ``mbytes`` MiB of numpy data, then ticks.

    The rootfs is empty apart from mount points: the interpreter (``sys.executable`` by
    default), its prefix, the venv and numpy's site-packages are bind-mounted read-only at
    their host paths, so whatever interpreter runs this function also runs in the sandbox.
    Every 0.5 s the process writes ``{"tick", "mbytes", "sha256_start", "sha256"}`` (the
    data's hash when allocated and now) to ``<bundle>/out/status`` (see :func:`read_status`).
    """
    bundle = Path(directory).absolute()
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    out = _out_dir(bundle)
    out.mkdir(exist_ok=True)
    (rootfs / "out").mkdir(exist_ok=True)
    interpreter = Path(python or sys.executable).absolute()

    mounts = [_bind(out, "/out", readonly=False)]
    for path in _host_paths_for_python(interpreter):
        (rootfs / path.relative_to("/")).mkdir(parents=True, exist_ok=True)
        mounts.append(_bind(path, path, readonly=True))
    # /lib, /lib64, /bin are symlinks into /usr on merged-/usr systems: copy the link so the
    # dynamic loader path baked into the interpreter resolves; bind real directories.
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        host = Path("/") / name
        target = rootfs / name
        if host.is_symlink():
            if not target.is_symlink():
                target.symlink_to(os.readlink(host))
        elif host.is_dir():
            target.mkdir(exist_ok=True)
            mounts.append(_bind(host, host, readonly=True))

    env = [
        "PYTHONDONTWRITEBYTECODE=1",
        f"PYTHONPATH={_numpy_site_dir()}",
        # numpy's bundled OpenBLAS starts one thread per CPU at import; one is plenty here.
        "OPENBLAS_NUM_THREADS=1",
    ]
    args = [str(interpreter), "-c", _PYTHON_SCRIPT, str(mbytes), str(seed)]
    _write_config(bundle, _oci_config(args, mounts, env))
    return bundle


def read_status(bundle: Path | str) -> dict[str, Any] | None:
    """The last status of a :func:`python_numpy_bundle` process, or None before the first."""
    try:
        status: dict[str, Any] = json.loads((_out_dir(Path(bundle)) / "status").read_text())
    except FileNotFoundError:
        return None
    return status


# -- synthetic memory image -----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryImageLayout:
    """Page counts of a generated memory image, by kind."""

    pages: int
    zero_pages: int
    random_pages: int
    repeated_pages: int
    runs: int
    repeated_page: bytes


def _run_lengths(rng: np.random.Generator, total: int, mean: float) -> np.ndarray[Any, Any]:
    """Geometric run lengths (>= 1) adding up to exactly ``total`` pages."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = rng.geometric(1.0 / mean, size=int(total / mean * 1.5) + 16).astype(np.int64)
    while lengths.sum() < total:
        lengths = np.concatenate([lengths, rng.geometric(1.0 / mean, size=len(lengths))])
    cut = int(np.searchsorted(np.cumsum(lengths), total))
    lengths = lengths[: cut + 1].copy()
    lengths[-1] -= int(lengths.sum()) - total
    return lengths


def memory_image(
    path: Path | str,
    size: int,
    seed: int = 0,
    mean_run_pages: float = 16.0,
    fractions: tuple[float, float, float] = (0.4, 0.3, 0.3),
) -> MemoryImageLayout:
    """Write a memory-like image: 4 KiB pages in clustered runs of zero/random/repeated pages.

    ``fractions`` are the exact shares of zero, random and repeated pages (rounded to whole
    pages); runs have geometric lengths (mean ``mean_run_pages``) and are shuffled, as real
    memory clusters like pages together. The same (size, seed) gives the same bytes. The
    file is streamed in writes of at most 1 MiB; only the run table (a few MB for 4 GiB)
    grows with ``size``: 4 GiB takes ~40 MB RSS.
    """
    if size < 0 or size % PAGE_SIZE:
        raise ValueError(f"size must be a non-negative multiple of {PAGE_SIZE}, got {size}")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative shares summing to 1: {fractions}")
    pages = size // PAGE_SIZE
    zero = round(pages * fractions[0])
    rand = min(round(pages * fractions[1]), pages - zero)
    counts = (zero, rand, pages - zero - rand)

    rng = np.random.default_rng(seed)
    repeated_page = rng.bytes(PAGE_SIZE)
    per_kind = [_run_lengths(rng, count, mean_run_pages) for count in counts]
    kinds = np.concatenate(
        [np.full(len(runs), kind, dtype=np.int8) for kind, runs in enumerate(per_kind)]
    )
    lengths = np.concatenate(per_kind)
    order = rng.permutation(len(lengths))
    kinds, lengths = kinds[order], lengths[order]

    # Chunks keep each write at most 256 pages (1 MiB) however long a run is.
    chunk_pages = 256
    zero_chunk = bytes(PAGE_SIZE * chunk_pages)
    repeated_chunk = repeated_page * chunk_pages
    with Path(path).open("wb") as f:
        for kind, length in zip(kinds.tolist(), lengths.tolist(), strict=True):
            left = length
            while left:
                n = min(left, chunk_pages)
                if kind == 0:
                    f.write(zero_chunk[: n * PAGE_SIZE])
                elif kind == 1:
                    f.write(rng.bytes(n * PAGE_SIZE))
                else:
                    f.write(repeated_chunk[: n * PAGE_SIZE])
                left -= n
    return MemoryImageLayout(
        pages=pages,
        zero_pages=counts[0],
        random_pages=counts[1],
        repeated_pages=counts[2],
        runs=len(lengths),
        repeated_page=repeated_page,
    )


# -- real checkpoints -----------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(_WAIT_POLL)


@contextlib.contextmanager
def _runsc_for(workdir: Path, runsc: Runsc | None) -> Iterator[Runsc]:
    if runsc is not None:
        yield runsc
    else:
        with Runsc.private(parent=workdir) as private:
            yield private


class BusyboxCheckpoint(NamedTuple):
    """A busybox counter checkpoint: the image dir, its bundle and the counter it stopped at."""

    image_dir: Path
    bundle: Path
    counter: int


def checkpoint_busybox(
    workdir: Path | str, runsc: Runsc | None = None, min_counter: int = 5
) -> BusyboxCheckpoint:
    """Run the busybox counter until it reaches ``min_counter``, checkpoint it, delete it.

    Returns the image dir (holding ``checkpoint.img``, ~0.5 MB), the bundle to restore it
    with and the counter value at the checkpoint.
    """
    work = Path(workdir).absolute()
    bundle = busybox_counter_bundle(work / "busybox-bundle")
    image_dir = work / "busybox-image"
    with _runsc_for(work, runsc) as rs, rs.container(bundle) as cid:
        _wait_for(lambda: read_counter(bundle) >= min_counter, 30, "the counter to start")
        rs.checkpoint(cid, image_dir)
        counter = read_counter(bundle)
    return BusyboxCheckpoint(image_dir, bundle, counter)


def two_python_checkpoints(
    workdir: Path | str,
    mbytes: int = 64,
    interval: float = 2.0,
    runsc: Runsc | None = None,
) -> tuple[Path, Path]:
    """Two successive checkpoints of one Python/numpy process: checkpoint, restore, wait,
    checkpoint. Returns the two image dirs (each holding ``checkpoint.img``)."""
    work = Path(workdir).absolute()
    bundle = python_numpy_bundle(work / "python-bundle", mbytes=mbytes)
    first, second = work / "python-image-1", work / "python-image-2"
    with _runsc_for(work, runsc) as rs, rs.container(bundle) as cid:
        _wait_for(lambda: read_status(bundle) is not None, 120, "the Python workload to start")
        rs.checkpoint(cid, first)
        rs.delete(cid)
        rs.restore(cid, bundle, first)
        time.sleep(interval)
        rs.checkpoint(cid, second)
    return first, second


class CounterCycle(NamedTuple):
    """Counter values seen around a checkpoint/delete/restore cycle."""

    at_checkpoint: int
    after_restore: int
    later: int


class CounterCycleError(RuntimeError):
    """The restored counter did not continue from where it stopped."""


def counter_cycle(
    workdir: Path | str, runsc: Runsc | None = None, settle: float = 1.0
) -> CounterCycle:
    """Run the busybox counter, checkpoint it, delete it, restore it from the image dir and
    check that the counter continues from where it stopped and keeps rising.

    Raises :class:`CounterCycleError` otherwise. A counter restarted from scratch would
    fall back to 1; a restored one resumes at (or just above) the checkpointed value.
    """
    work = Path(workdir).absolute()
    with _runsc_for(work, runsc) as rs:
        checkpoint = checkpoint_busybox(work, runsc=rs)
        with contextlib.ExitStack() as stack:
            cid = new_container_id()
            stack.callback(rs.destroy, cid)
            rs.restore(cid, checkpoint.bundle, checkpoint.image_dir)
            _wait_for(
                lambda: read_counter(checkpoint.bundle) != checkpoint.counter,
                30,
                "the restored counter to move",
            )
            after = read_counter(checkpoint.bundle)
            time.sleep(settle)
            later = read_counter(checkpoint.bundle)
    cycle = CounterCycle(checkpoint.counter, after, later)
    if not checkpoint.counter < after < later:
        raise CounterCycleError(f"counter did not continue after restore: {cycle}")
    return cycle


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.workloads counter-cycle|busybox|python|memory WORKDIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in {"counter-cycle", "busybox", "python", "memory"}:
        print(main.__doc__, file=sys.stderr)
        return 2
    what, work = args[0], Path(args[1])
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result: object
    if what == "counter-cycle":
        result = counter_cycle(work)
    elif what == "busybox":
        result = checkpoint_busybox(work)
    elif what == "python":
        result = two_python_checkpoints(work)
    else:
        result = memory_image(work / "memory.img", 64 * 2**20)
    print(f"{result!r} ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
