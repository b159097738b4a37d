"""The node agent's workflow: checkpoint a gVisor container into the store, find a
compatible snapshot, restore from a lazy mount of it, and fall back to a cold start."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import SnapstoreError
from snapstore.gvisor.runsc import Runsc, RunscError
from snapstore.ingest import IngestResult, check_labels, ingest
from snapstore.store.local import LocalStore
from snapstore.workflow import gpu_labels, mounted, pick, release

DEFAULT_RUNSC_ROOT = "/var/run/runsc"


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
    labels.update(gpu_labels())
    return labels


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
        snapshot, source = pick(store, ref, match, remote)
        mount_left = _restore_from_mount(store, runsc, container, bundle, snapshot, source)
        return RestoreReport("restore", time.monotonic() - start, snapshot, source,
                             mount_left=mount_left)
    except SnapstoreError as e:
        if not fallback:
            raise SnapstoreError(f"restore failed and --no-fallback was given: {e}") from None
        reason = str(e)
    runsc.run(container, bundle)
    return RestoreReport("cold", time.monotonic() - start, reason=reason)


def _restore_from_mount(store: LocalStore, runsc: Runsc, container: str, bundle: Path,
                        snapshot: str, source: str) -> str | None:
    with mounted(store, snapshot, source, allow_other=True) as mnt:
        try:
            runsc.restore(container, bundle, mnt)
        except RunscError:
            runsc.destroy(container)
            raise
        return None if release(mnt) else str(mnt)


