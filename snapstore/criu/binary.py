"""The `criu` binary: finding a CRIU >= 4, and running its dump and restore with a
failure reported as one line from its log."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapstore.errors import SnapstoreError

MIN_MAJOR = 4
ENV_VAR = "SNAPSTORE_CRIU"
# Where `make criu` puts it in a checkout (native/criu.sh).
BUILT = Path(__file__).resolve().parents[2] / "build" / "criu" / "criu"
# criu dump and restore of a live tree take seconds; a stuck one must not hang the caller.
TIMEOUT = 600.0
# A tree's TCP connections are dumped and restored with it (an NCCL job's ranks talk over
# loopback connections and to its TCPStore); nothing locks them with iptables, which a GPU
# host may lack: the tree is frozen, and killed quietly (quietkill.py), while they are
# dumped. A file the tree still has open but is deleted (NCCL's shared host buffers) is
# kept in the image up to this size.
DUMP_OPTIONS = ("--tcp-established", "--network-lock", "skip", "--ghost-limit", "1G")


class CriuError(SnapstoreError):
    """CRIU is missing, too old, or a dump or restore failed."""


@dataclass(frozen=True, slots=True)
class Criu:
    path: str
    version: str

    @classmethod
    def find(cls, explicit: str | None = None) -> Criu:
        """The first CRIU >= 4 of: `explicit`, $SNAPSTORE_CRIU, the checkout's
        build/criu/criu, `criu` on PATH. Debian 12's CRIU 3.17 fails on newer kernels, so an
        older one is skipped, not used."""
        tried: list[str] = []
        for candidate in (explicit, os.environ.get(ENV_VAR), str(BUILT), shutil.which("criu")):
            if not candidate or candidate in tried:
                continue
            tried.append(candidate)
            version = _version(candidate)
            if version is not None and int(version.split(".")[0]) >= MIN_MAJOR:
                return cls(candidate, version)
            if explicit is not None:
                raise CriuError(f"{candidate} is not CRIU >= {MIN_MAJOR} "
                                f"(version {version or 'unknown'})")
        raise CriuError(f"no CRIU >= {MIN_MAJOR} found (tried {', '.join(tried) or 'nothing'}); "
                        f"run `make criu` or set {ENV_VAR}")

    def dump(self, pid: int, images: Path, work: Path, leave_running: bool) -> None:
        """Dump the tree rooted at `pid` into `images`; CRIU's log goes to `work`. The tree
        is left running, or else stopped (for the caller to kill once the images are safe,
        or to resume if they cannot be kept)."""
        cmd = [self.path, "dump", "-t", str(pid), "-D", str(images), "-W", str(work),
               "-o", "dump.log", "-v2", *DUMP_OPTIONS,
               "--leave-running" if leave_running else "--leave-stopped"]
        self._run(cmd, work / "dump.log", f"criu dump of pid {pid}")

    def restore(self, images: Path, work: Path, lazy_pages: bool = False) -> int:
        """Restore the tree in `images`, detached; its root's pid once it runs. With
        `lazy_pages`, private anonymous memory is left to the daemon listening in `work`."""
        pidfile = work / "restored.pid"
        cmd = [self.path, "restore", "-D", str(images), "-W", str(work), "-d",
               "-o", "restore.log", "-v2", "--pidfile", str(pidfile), "--tcp-established"]
        if lazy_pages:
            cmd.append("--lazy-pages")
        try:
            self._run(cmd, work / "restore.log", "criu restore")
        except CriuError as e:
            busy = _BUSY_PID_RE.search(str(e))
            if busy:
                raise CriuError(f"criu restore failed: pid {busy.group(1)} is taken by another "
                                "process (a restored tree gets back the pids it had)") from None
            raise
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as e:
            raise CriuError(f"criu restore wrote no pid: {e}") from None

    def _run(self, cmd: list[str], log: Path, what: str) -> None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                                  check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CriuError(f"{what} did not finish in {TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            raise CriuError(f"{what} failed: {_last_error(log, proc.stderr)}")


_ERROR_RE = re.compile(r"Error \([^)]*\): (.*)")
_BUSY_PID_RE = re.compile(r"Can't fork for (\d+): File exists")
_VERSION_RE = re.compile(r"^Version:\s*(\d+(?:\.\d+)*)", re.MULTILINE)


def _version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION_RE.search(out)
    return m.group(1) if m else None


# Error lines CRIU writes that do not name a cause: the summary at the end, and one it
# logs on every run where it may not raise its own descriptor limit.
_NOT_A_CAUSE = ("FAILED", "RLIMIT_NOFILE")


def _last_error(log: Path, stderr: str) -> str:
    """The first `Error (file:line): message` of CRIU's log that names a cause (the later
    ones follow from it); only read after a failure. The restorer's lines carry a prefix
    (`pie: PID: Error (...)`)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = stderr
    errors = [m.group(1).strip() for m in _ERROR_RE.finditer(text)]
    causes = [e for e in errors if not any(word in e for word in _NOT_A_CAUSE)]
    if causes or errors:
        cause = (causes or errors)[0]
        if cause.endswith(f"({-errno.EIO})"):
            cause += (" (an I/O error reading the images: a chunk of the snapshot failed its "
                      "check or could not be fetched)")
        return cause
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no log"
