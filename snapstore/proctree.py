"""Process trees as /proc shows them: a process's children, everything below it, and
signalling a whole tree; and how a helper process of ours ended, or stopping one."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

# What reading a process's /proc files raises once it is gone: ENOENT, or ESRCH while it
# exits; UNREADABLE adds a process that is not ours to read.
GONE = (FileNotFoundError, ProcessLookupError)
UNREADABLE = (*GONE, PermissionError)


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (none if it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except GONE:
        return []
    found: list[int] = []
    for task in tasks:
        with contextlib.suppress(*GONE):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    return found


def below(pid: int) -> list[int]:
    """Every process below `pid`, its children first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def signal_tree(root: int, sig: int) -> None:
    """Send `sig` to `root` and every process below it."""
    for pid in [root, *below(root)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def fd_targets(pid: int) -> dict[int, str]:
    """What each open descriptor of `pid` points at, as /proc shows it (none if it is
    gone or not ours to read)."""
    found: dict[int, str] = {}
    with contextlib.suppress(*UNREADABLE):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return found


def socket_inode(target: str) -> str | None:
    """The inode of a descriptor target that is a socket (`socket:[N]`), else None."""
    return target[len("socket:["):-1] if target.startswith("socket:[") else None


def how_it_ended(proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """" (exit status N)" or " (killed by signal N)" once `proc` has ended, waiting up to
    `timeout` for it (its sockets may close a moment before its exit status is there);
    None while it runs."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return f" (killed by signal {-code})" if code < 0 else f" (exit status {code})"


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to `timeout` for `proc` to end, then kill it; reaped either way."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
