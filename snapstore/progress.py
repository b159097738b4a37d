"""Progress display for long operations, on stderr, only when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Advance(Protocol):
    def __call__(self, nbytes: int, items: int = 0) -> None: ...


@contextmanager
def byte_progress(label: str, total: int, unit: str = "chunks") -> Iterator[Advance]:
    """Yield a callback taking (bytes done, items done); draws bytes, items, rate and ETA."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[items]} " + unit),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task(label, total=total, items=0)
        count = 0

        def advance(nbytes: int, items: int = 0) -> None:
            nonlocal count
            count += items
            progress.update(task, advance=nbytes, items=count)

        yield advance
