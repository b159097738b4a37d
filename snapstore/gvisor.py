"""The node agent's workflow: checkpoint a gVisor container into the store, find a
compatible snapshot, restore from a lazy mount of it, and fall back to a cold start."""

from __future__ import annotations

import contextlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import NotFoundError, SnapstoreError
from snapstore.ids import ChunkId
from snapstore.ingest import IngestResult, check_labels, ingest
from snapstore.manifest import Manifest
from snapstore.runsc import Runsc, RunscError
from snapstore.store.local import LocalStore

DEFAULT_RUNSC_ROOT = "/var/run/runsc"
# How long restore waits for runsc to let go of the mount before leaving it mounted.
RELEASE_TIMEOUT = 60.0


def runsc_from_args(binary: str | None, runsc_args: Sequence[str]) -> Runsc:
    """A Runsc for the user's binary and global flags; `--root` among them picks the root."""
    root = DEFAULT_RUNSC_ROOT
    rest: list[str] = []
    for arg in runsc_args:
        if arg.startswith("--root="):
            root = arg.split("=", 1)[1]
        elif arg != "--network=none":
            rest.append(arg)
    return Runsc(root, binary=binary, extra_args=rest)


def compat_labels(runsc: Runsc) -> dict[str, str]:
    """What decides whether a snapshot can restore on a host."""
    labels = {
        "runsc.version": runsc.version().removeprefix("runsc version "),
        "kernel": platform.release(),
        "arch": platform.machine(),
    }
    labels.update(_gpu_labels())
    return labels


def _gpu_labels() -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out:
        return {}
    name, _, driver = out[0].partition(",")
    return {"gpu.model": name.strip(), "gpu.driver": driver.strip(), "gpu.count": str(len(out))}


def checkpoint(
    store: LocalStore,
    runsc: Runsc,
    container: str,
    tag: str,
    labels: dict[str, str],
    leave_running: bool = False,
) -> IngestResult:
    """Checkpoint `container` into a working directory of the store, ingest it and
    remove the working directory, whatever happens (gc removes one a kill left)."""
    all_labels = check_labels({**compat_labels(runsc), **labels})
    with store.work_dir("checkpoint") as work:
        runsc.checkpoint(container, work, leave_running=leave_running)
        return ingest(store, work, tag, all_labels)


@dataclass(frozen=True, slots=True)
class Found:
    snapshot: ChunkId
    manifest: Manifest
    tags: tuple[str, ...]


def find(store: LocalStore, labels: dict[str, str]) -> list[Found]:
    """Tagged snapshots whose labels include all of `labels`, newest first."""
    by_id: dict[ChunkId, list[str]] = {}
    for name, mid in store.tags().items():
        by_id.setdefault(mid, []).append(name)
    found = []
    for mid, tags in by_id.items():
        with contextlib.suppress(SnapstoreError):
            m = store.get_manifest(mid)
            if all(m.labels.get(k) == v for k, v in labels.items()):
                found.append(Found(mid, m, tuple(tags)))
    found.sort(key=lambda f: (f.manifest.created, f.snapshot.hex), reverse=True)
    return found


@dataclass(frozen=True, slots=True)
class RestoreReport:
    path: str  # "restore" or "cold"
    seconds: float
    snapshot: str | None = None
    source: str | None = None  # "local" or the remote
    reason: str | None = None
    mount_left: str | None = None


def restore(
    store: LocalStore,
    runsc: Runsc,
    container: str,
    bundle: Path,
    ref: str | None,
    match: dict[str, str],
    remote: str | None = None,
    fallback: bool = True,
) -> RestoreReport:
    """Restore `container` from the newest compatible snapshot, else start it cold.

    A failed restore leaves no mount and no container behind before the cold start.
    """
    start = time.monotonic()
    try:
        snapshot, source = _pick(store, ref, match, remote)
        mount_left = _restore_from_mount(store, runsc, container, bundle, snapshot, source)
        return RestoreReport("restore", time.monotonic() - start, snapshot, source,
                             mount_left=mount_left)
    except SnapstoreError as e:
        if not fallback:
            raise SnapstoreError(f"restore failed and --no-fallback was given: {e}") from None
        reason = str(e)
    runsc.run(container, bundle)
    return RestoreReport("cold", time.monotonic() - start, reason=reason)


def _pick(store: LocalStore, ref: str | None, match: dict[str, str],
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
    raise NotFoundError(f"no snapshot matches {wanted}")


def _restore_from_mount(store: LocalStore, runsc: Runsc, container: str, bundle: Path,
                        snapshot: str, source: str) -> str | None:
    with _mounted(store, snapshot, source) as mnt:
        try:
            runsc.restore(container, bundle, mnt)
        except RunscError:
            runsc.destroy(container)
            raise
        return None if _release(mnt) else str(mnt)


@contextlib.contextmanager
def _mounted(store: LocalStore, snapshot: str, source: str) -> Iterator[Path]:
    """A read-only mount of `snapshot` with allow_other (the sandbox reads it as another
    user); unmounted on error. On success the caller decides when to unmount.

    The mountpoint is in the system's temporary directory, not in the store: the sandbox
    user must be able to reach it, and stores often live in private directories.
    `--prefetch` loads the image while runsc is still starting its sandbox, in the order
    the last restore read it.
    """
    mnt = Path(tempfile.mkdtemp(prefix="snapstore-restore-"))
    cmd = [sys.executable, "-m", "snapstore", "--store", str(store.root), "mount", snapshot,
           str(mnt), "--allow-other", "--prefetch"]
    if source != "local":
        cmd += ["--remote", source]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        mnt.rmdir()
        raise SnapstoreError(f"cannot mount snapshot {snapshot[:12]}: "
                             f"{proc.stderr.strip().splitlines()[-1:] or ['?']}")
    try:
        yield mnt
    except BaseException:
        _umount(store, mnt)
        raise


def _release(mnt: Path) -> bool:
    """Unmount once nothing uses the mount; False if it stayed busy too long.

    How we know runsc no longer reads it: a plain (not lazy) unmount fails with EBUSY
    while any process holds a file of the mount open or mapped, so the first unmount that
    succeeds proves the restored sandbox let go of the image.
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


def _umount(store: LocalStore, mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "snapstore", "--store", str(store.root), "umount",
                    str(mnt)], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        mnt.rmdir()
