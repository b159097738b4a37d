"""Compiles native/uffd_loader.c; stdlib only, because setup.py loads it before install."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

CFLAGS = ["-std=c11", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror"]


def source_path() -> Path:
    return Path(__file__).resolve().parents[2] / "native" / "uffd_loader.c"


def compile_loader(source: Path, output: Path) -> None:
    """Builds the loader at output; CC and CFLAGS from the environment are honoured."""
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent user never runs a half-written binary.
    # Not snapstore.fileio.write_atomic: the compiler writes the file, and setup.py loads
    # this module alone, before the package is importable.
    tmp = output.with_name(f".{output.name}.{os.getpid()}")
    cmd = [
        *shlex.split(os.environ.get("CC", "cc")),
        *CFLAGS,
        *shlex.split(os.environ.get("CFLAGS", "")),
        "-o",
        str(tmp),
        str(source),
    ]
    try:
        subprocess.run(cmd, check=True)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
