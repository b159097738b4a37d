"""Process trees as /proc shows them: a process and all it started, and signalling them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them, as their parent links stand now."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def signal_tree(root: int, sig: int) -> None:
    """Send `sig` to `root` and every process below it."""
    for pid in descendants({root}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
