"""Locates the native uffd loader and runs it with options built from Python values."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LoaderNotBuiltError(RuntimeError):
    """The native loader binary is absent (the package was not installed with pip)."""


BINARY = Path(__file__).resolve().parent.parent / "_native" / "uffd_loader"


def binary_path() -> Path:
    if not BINARY.is_file():
        raise LoaderNotBuiltError(
            f"uffd loader binary not found at {BINARY}; build it with `pip install -e .` "
            "or `make -C native`"
        )
    return BINARY


@dataclass(frozen=True)
class LoaderOptions:
    # One file, or files that one after another are the image (a GPU dump's segments).
    image: Path | Sequence[Path]
    socket: Path
    hot: Path | None = None
    record: Path | None = None
    memfd: bool = False
    fault_around_kib: int | None = None
    queue_depth: int | None = None
    prefetch_threads: int | None = None
    # Prefetch I/O: by default each read goes through the page cache when its range is
    # cached and O_DIRECT when not; these force one way.
    buffered: bool = False
    direct: bool = False
    stats_json: Path | None = None


def build_argv(opts: LoaderOptions) -> list[str]:
    images = [opts.image] if isinstance(opts.image, Path) else list(opts.image)
    argv = [str(binary_path())]
    for image in images:
        argv += ["--image", str(image)]
    argv += ["--socket", str(opts.socket)]
    for flag, path in (("--hot", opts.hot), ("--record", opts.record)):
        if path is not None:
            argv += [flag, str(path)]
    if opts.stats_json is not None:
        argv += ["--stats-json", str(opts.stats_json)]
    if opts.fault_around_kib is not None:
        argv += ["--fault-around-kib", str(opts.fault_around_kib)]
    if opts.queue_depth is not None:
        argv += ["--queue-depth", str(opts.queue_depth)]
    if opts.prefetch_threads is not None:
        argv += ["--prefetch-threads", str(opts.prefetch_threads)]
    if opts.memfd:
        argv.append("--memfd")
    if opts.buffered:
        argv.append("--buffered")
    if opts.direct:
        argv.append("--direct")
    return argv


def start(opts: LoaderOptions, **popen: Any) -> subprocess.Popen[Any]:
    """Starts the loader in the background; it exits once its client goes away."""
    return subprocess.Popen(build_argv(opts), **popen)


def run(opts: LoaderOptions) -> int:
    """Runs the loader in the foreground and returns its exit status."""
    return subprocess.run(build_argv(opts), check=False).returncode
