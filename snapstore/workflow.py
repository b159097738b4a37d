"""The node agent's workflow that both runtimes (gVisor, CRIU) share: host compatibility
labels, finding the newest matching snapshot locally or in a remote, and a lazy read-only
mount of a snapshot for the restore to read its images from."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import NoMatchError, NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.manifest import Manifest
from snapstore.store.local import LocalStore

# How long a restore waits for the restored task to let go of the mount before leaving it
# mounted.
RELEASE_TIMEOUT = 60.0


def gpu_labels() -> dict[str, str]:
    """GPU model, driver, count and topology of this host (none without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = _nvidia_smi("--query-gpu=name,driver_version", "--format=csv,noheader")
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = out.strip().splitlines()
    if not rows:
        return {}
    name, _, driver = rows[0].partition(",")
    labels = {"gpu.model": name.strip(), "gpu.driver": driver.strip(), "gpu.count": str(len(rows))}
    try:
        links = topology(_nvidia_smi("topo", "-m"), len(rows))
    except (OSError, subprocess.SubprocessError):
        links = ""
    if links:
        labels["gpu.topology"] = links
    return labels


def topology(matrix: str, count: int) -> str:
    """How each pair of the `count` GPUs is linked, from `nvidia-smi topo -m`'s matrix:
    the cells above its diagonal, row by row, comma-separated ("NV18" for two GPUs joined
    by 18 NVLinks; "" for one GPU or a matrix that does not read)."""
    cells: list[str] = []
    for i in range(count):
        row = next((line.split("\t") for line in matrix.splitlines()
                    if line.split("\t", 1)[0].strip() == f"GPU{i}"), None)
        if row is None or len(row) <= count:
            return ""
        cells += [cell.strip() for cell in row[i + 2:count + 1]]
    return ",".join(cells)


def _nvidia_smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


@dataclass(frozen=True, slots=True)
class Found:
    snapshot: ChunkId
    manifest: Manifest
    tags: tuple[str, ...]


def matching(snapshots: Iterable[tuple[ChunkId, Manifest]], labels: dict[str, str]
             ) -> list[tuple[ChunkId, Manifest]]:
    """The snapshots whose labels include all of `labels`, newest first (by creation
    time, then by id, so that the order is the same on every host): what a find in the
    local store and in a remote both pick from."""
    hits = [(mid, m) for mid, m in snapshots
            if all(m.labels.get(k) == v for k, v in labels.items())]
    hits.sort(key=lambda hit: (hit[1].created, hit[0].hex), reverse=True)
    return hits


def find(store: LocalStore, labels: dict[str, str]) -> list[Found]:
    """Tagged snapshots whose labels include all of `labels`, newest first."""
    by_id: dict[ChunkId, list[str]] = {}
    for name, mid in store.tags().items():
        by_id.setdefault(mid, []).append(name)
    readable = []
    for mid in by_id:
        with contextlib.suppress(SnapstoreError):
            readable.append((mid, store.get_manifest(mid)))
    return [Found(mid, m, tuple(by_id[mid])) for mid, m in matching(readable, labels)]


def pick(store: LocalStore, ref: str | None, match: dict[str, str],
         remote: str | None) -> tuple[str, str]:
    """The snapshot to restore and where it is: "local", or the remote URL."""
    if ref is not None:
        try:
            return store.resolve(ref).hex, "local"
        except NotFoundError:
            if remote is None:
                raise
            return ref, remote
    hits = find(store, match)
    if hits:
        return hits[0].snapshot.hex, "local"
    if remote is not None:
        from snapstore.remote.catalog import find_remote

        remote_hit = find_remote(remote, match)
        if remote_hit is not None:
            return remote_hit, remote
    wanted = " ".join(f"{k}={v}" for k, v in match.items()) or "(any)"
    raise NoMatchError(f"no snapshot matches {wanted}")


@contextlib.contextmanager
def mounted(store: LocalStore, snapshot: str, source: str,
            allow_other: bool) -> Iterator[Path]:
    """A read-only mount of `snapshot`, with allow_other when `allow_other` (gVisor's
    sandbox reads it as another user); unmounted on error. On success the caller decides
    when to unmount.

    The mountpoint is in the system's temporary directory, not in the store: the sandbox
    user must be able to reach it, and stores often live in private directories.
    `--prefetch` loads the image while the restorer is still starting, in the order the
    last restore read it.
    """
    mnt = Path(tempfile.mkdtemp(prefix="snapstore-restore-"))
    cmd = [sys.executable, "-m", "snapstore", "--store", str(store.root), "mount", snapshot,
           str(mnt), "--prefetch"]
    if allow_other:
        cmd.append("--allow-other")
    if source != "local":
        cmd += ["--remote", source]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        mnt.rmdir()
        why = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SnapstoreError(f"cannot mount snapshot {snapshot[:12]}: {why}")
    try:
        yield mnt
    except BaseException:
        umount(store, mnt)
        raise


def release(mnt: Path) -> bool:
    """Unmount once nothing uses the mount; False if it stayed busy too long.

    How we know the restore no longer reads it: a plain (not lazy) unmount fails with
    EBUSY while any process holds a file of the mount open or mapped, so the first unmount
    that succeeds proves the restored task let go of the image.
    """
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", "-q", str(mnt)], capture_output=True,
                          check=False).returncode == 0:
            with contextlib.suppress(OSError):
                mnt.rmdir()
            return True
        time.sleep(0.05)
    return False


def umount(store: LocalStore, mnt: Path) -> None:
    """Unmount `mnt` whatever state its daemon is in, and remove the mountpoint."""
    subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store.root), "umount",
                    str(mnt)], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        mnt.rmdir()
