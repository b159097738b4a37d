"""What every command module shares: registration, the store root, JSON output, parsers."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from snapstore.errors import UsageError
from snapstore.store.local import LocalStore, default_store_dir

Handler = Callable[[argparse.Namespace], int]
Commands = argparse._SubParsersAction  # the main parser's subcommands


def add_command(sub: Commands[argparse.ArgumentParser], name: str, func: Handler, help: str,
                *, description: str | None = None, json_output: bool = False
                ) -> argparse.ArgumentParser:
    """Register command `name`, run by `func`; `json_output` gives it `--json`."""
    sp = sub.add_parser(name, help=help, description=description or help)
    sp.set_defaults(func=func)
    if json_output:
        sp.add_argument("--json", action="store_true", help="print JSON")
    return sp


def store_root(args: argparse.Namespace) -> Path:
    """The store directory: --store, else $SNAPSTORE_DIR, else the user's default."""
    return Path(args.store) if args.store else default_store_dir()


def open_store(args: argparse.Namespace, create: bool = False) -> LocalStore:
    return LocalStore.open(store_root(args), create=create)


def warn_damaged_tags(store: LocalStore) -> None:
    """Name each damaged tag on stderr; the command goes on with the others."""
    for bad in store.damaged_tags():
        print(f"snapstore: warning: {bad}; left out", file=sys.stderr)


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"a label is KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def parse_size(text: str) -> int:
    """BYTES, or a number with a binary suffix: 512M, 2G, 64KiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]
