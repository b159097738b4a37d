"""Typed wrapper around the gVisor ``runsc`` command line.

Its one job: start, checkpoint, restore and reliably clean up runsc containers, turning
every failure into a single :class:`RunscError` that names the command, its exit status and
runsc's own last words. See docs/runsc.md for the runsc behaviour this module works around.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import SnapstoreError

DEFAULT_BINARY = "/usr/bin/runsc"
# Short commands (state, checkpoint of a small sandbox, delete) finish in well under a second;
# the limit only stops a wedged sandbox from hanging a test suite forever.
DEFAULT_TIMEOUT = 120.0
_STDERR_TAIL_LINES = 5
_CGROUP_ROOT = Path("/sys/fs/cgroup")


class RunscError(SnapstoreError):
    """A runsc command failed; ``str()`` gives the command, exit status and stderr tail."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        # A runsc that panics ends with a Go stack trace; the reason is in the lines before.
        reasons = [line for line in lines if not _is_stack_line(line)]
        self.stderr_tail = (reasons or lines)[-_STDERR_TAIL_LINES:]
        status = "timed out" if returncode is None else f"exit status {returncode}"
        detail = "; ".join(self.stderr_tail) or "no error output"
        super().__init__(
            f"runsc {_subcommand(self.argv)} failed ({status}): {detail} "
            f"[command: {' '.join(self.argv)}]"
        )

    @property
    def not_found(self) -> bool:
        """True when runsc says the container does not exist."""
        return any("does not exist" in line for line in self.stderr_tail)


def _is_stack_line(line: str) -> bool:
    """A line of a Go panic's stack trace: file:line lines, goroutine headers, frames."""
    if line[0].isspace() or line.startswith(("goroutine ", "panic(", "created by ")):
        return True
    # A frame is a call with its arguments and carries no "reason: detail" text.
    return line.rstrip().endswith(")") and "(" in line and ": " not in line


def _subcommand(argv: Sequence[str]) -> str:
    return next((a for a in argv[1:] if not a.startswith("-")), "?")


@dataclass(frozen=True)
class ContainerState:
    """The parts of ``runsc state`` output that callers use."""

    id: str
    status: str
    pid: int
    bundle: Path


def new_container_id(prefix: str = "snapstore") -> str:
    """A container id unique across runsc roots.

    runsc names the container's cgroups after its id when the spec has no cgroupsPath, so
    two roots using the same id would share (and fight over) one cgroup.
    """
    return f"{prefix}-{secrets.token_hex(6)}"


class Runsc:
    """One runsc binary bound to one state root; always ``--network=none``.

    Detached containers inherit the stdio of the runsc command that starts them, so their
    stdout/stderr go to a per-container log file (``stdio_log``) instead of a pipe: a pipe
    would stay open until the sandbox dies and block any reader waiting for EOF.
    """

    def __init__(
        self,
        root: Path | str,
        binary: Path | str | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.root = Path(root).absolute()
        self.binary = (
            str(binary) if binary is not None else (shutil.which("runsc") or DEFAULT_BINARY)
        )
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.log_dir = self.root / "stdio"
        # Sandbox pids of containers checkpointed (hence stopping) but not yet deleted.
        self._exiting: dict[str, int] = {}

    @classmethod
    @contextlib.contextmanager
    def private(
        cls,
        parent: Path | str | None = None,
        binary: Path | str | None = None,
        extra_args: Sequence[str] = (),
    ) -> Iterator[Runsc]:
        """A Runsc with a fresh private root; every container in it is destroyed on exit."""
        root = Path(tempfile.mkdtemp(prefix="runsc-root-", dir=parent))
        runsc = cls(root, binary=binary, extra_args=extra_args)
        try:
            yield runsc
        finally:
            runsc.destroy_all()
            shutil.rmtree(root, ignore_errors=True)

    # -- command plumbing -------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        """The full command line for a runsc subcommand with this wrapper's global flags."""
        return [self.binary, f"--root={self.root}", "--network=none", *self.extra_args, *args]

    def _call(self, *args: str, timeout: float | None = None) -> str:
        """Run a subcommand that does not leave processes behind; return its stdout."""
        argv = self.argv(*args)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RunscError(argv, None, _text(exc.stderr)) from exc
        if proc.returncode != 0:
            raise RunscError(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def stdio_log(self, container_id: str) -> Path:
        """Where the container's stdout and stderr (and runsc's start-up errors) go."""
        return self.log_dir / f"{container_id}.log"

    def _start(self, args: Sequence[str], container_id: str, detach: bool) -> int | None:
        """Run ``run``/``restore``; stdio goes to the container's log file, never a pipe."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.stdio_log(container_id)
        argv = self.argv(*args)
        with log_path.open("ab") as log:
            start = log.tell()
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    timeout=self.timeout if detach else None,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RunscError(argv, None, _read_from(log_path, start)) from exc
        if detach and proc.returncode != 0:
            raise RunscError(argv, proc.returncode, _read_from(log_path, start))
        return None if detach else proc.returncode

    # -- subcommands ------------------------------------------------------------------------

    def run(self, container_id: str, bundle: Path | str, detach: bool = True) -> int | None:
        """Create and start a container from an OCI bundle.

        Detached: returns None once the container runs. Attached: blocks until it exits and
        returns runsc's exit status (the container's, or 128 when runsc itself failed).
        The bundle's process must not ask for a terminal (``process.terminal`` false):
        runsc would then require ``--console-socket``.
        """
        args = ["run", f"--bundle={Path(bundle).absolute()}"]
        if detach:
            args.append("--detach")
        return self._start([*args, container_id], container_id, detach)

    def restore(
        self,
        container_id: str,
        bundle: Path | str,
        image_dir: Path | str,
        detach: bool = True,
    ) -> int | None:
        """Restore a container from ``image_dir/checkpoint.img``; returns like :meth:`run`.

        The id must not exist in this root: restoring over an existing (even stopped)
        container fails and leaves that container's state half-removed.
        """
        args = [
            "restore",
            f"--bundle={Path(bundle).absolute()}",
            f"--image-path={Path(image_dir).absolute()}",
        ]
        if detach:
            args.append("--detach")
        return self._start([*args, container_id], container_id, detach)

    def checkpoint(
        self, container_id: str, image_dir: Path | str, leave_running: bool = False
    ) -> Path:
        """Write ``image_dir/checkpoint.img`` and return its path.

        The container stops after the checkpoint. ``leave_running`` restarts it from the new
        image under the same id (checkpoint, delete, restore --detach). runsc's own
        ``--leave-running`` is not used: it restores the sandbox as a child of the checkpoint
        command, which then never returns, and killing it kills the sandbox's gofer.
        """
        image = Path(image_dir).absolute()
        image.mkdir(parents=True, exist_ok=True)
        before = self.state(container_id)
        self._call("checkpoint", f"--image-path={image}", container_id)
        self._exiting[container_id] = before.pid
        if leave_running:
            bundle = before.bundle
            self.delete(container_id)
            self.restore(container_id, bundle, image)
        return image / "checkpoint.img"

    def kill(self, container_id: str, sig: str | int = "KILL", all_processes: bool = False) -> None:
        """Send a signal to the container's init process (or every process with ``all``)."""
        args = ["kill"]
        if all_processes:
            args.append("--all")
        self._call(*args, container_id, str(sig))

    def delete(self, container_id: str, force: bool = False) -> None:
        """Delete a stopped container (``force``: a running one too, killing it)."""
        args = ["delete"]
        if force:
            args.append("--force")
        # After a checkpoint runsc already reports "stopped", but its sandbox process lingers
        # until reaped, and runsc delete treats it as running until then: without --force it
        # refuses ("cannot delete container that is not stopped"), with it, it waits.
        pid = self._exiting.pop(container_id, -1)
        if not _wait_gone(pid, self.timeout):
            raise RunscError(
                self.argv(*args, container_id), None, f"checkpointed sandbox {pid} did not exit"
            )
        self._call(*args, container_id)

    def state(self, container_id: str) -> ContainerState:
        """Status (``running``/``stopped``/``created``...), sandbox pid and bundle path."""
        raw = json.loads(self._call("state", container_id))
        return ContainerState(
            id=str(raw["id"]),
            status=str(raw["status"]),
            pid=int(raw.get("pid", -1)),
            bundle=Path(raw["bundle"]),
        )

    def containers(self) -> list[str]:
        """Ids of every container known to this root."""
        if not self.root.exists():
            return []
        return self._call("list", "--quiet").split()

    def version(self) -> str:
        """The first line of ``runsc --version``, e.g. ``runsc version 0.0~20221219.0``."""
        argv = [self.binary, "--version"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        if proc.returncode != 0:
            raise RunscError(argv, proc.returncode, proc.stderr)
        return proc.stdout.splitlines()[0].strip()

    # -- cleanup ----------------------------------------------------------------------------

    def destroy(self, container_id: str) -> None:
        """Remove a container whatever state it is in; never raises for a missing one.

        ``delete --force`` alone is not enough: it can time out on a sandbox that lost its
        gofer, and a failed restore can drop the state file while the cgroups stay.
        """
        pid = -1
        with contextlib.suppress(RunscError):
            pid = self.state(container_id).pid
        try:
            self.delete(container_id, force=True)
        except RunscError as exc:
            if not exc.not_found:
                _kill_sandbox(pid)
                with contextlib.suppress(RunscError):
                    self.delete(container_id, force=True)
        _kill_sandbox(pid)
        for path in self.root.glob(f"{container_id}_sandbox:*"):
            path.unlink(missing_ok=True)
        _remove_cgroups(container_id)

    def destroy_all(self) -> None:
        """Destroy every container in this root (for end-of-test cleanup)."""
        ids: list[str] = []
        with contextlib.suppress(RunscError):
            ids = self.containers()
        for container_id in ids:
            self.destroy(container_id)

    @contextlib.contextmanager
    def container(self, bundle: Path | str, container_id: str | None = None) -> Iterator[str]:
        """Run a detached container for the duration of a ``with`` block; yields its id."""
        cid = container_id or new_container_id()
        try:
            self.run(cid, bundle, detach=True)
            yield cid
        finally:
            self.destroy(cid)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` no longer exists, zombie included (runsc probes it with kill 0)."""
    deadline = time.monotonic() + timeout
    while pid > 0 and Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _kill_sandbox(pid: int) -> None:
    # Only a runsc sandbox process is killed: the pid comes from runsc state, but it may
    # have been reused by an unrelated process since.
    if pid <= 0:
        return
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return
    if comm == "runsc-sandbox":
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_cgroups(container_id: str) -> None:
    # runsc creates /sys/fs/cgroup/<controller>/<id> when the spec has no cgroupsPath; an
    # empty one left after a failed restore would block a later container of the same id.
    if not _CGROUP_ROOT.is_dir():
        return
    for controller in _CGROUP_ROOT.iterdir():
        with contextlib.suppress(OSError):
            (controller / container_id).rmdir()


__all__ = [
    "DEFAULT_BINARY",
    "ContainerState",
    "Runsc",
    "RunscError",
    "new_container_id",
]
