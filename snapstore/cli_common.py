"""Pieces every CLI module uses: the store option, labels, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapstore.errors import UsageError
from snapstore.store.local import LocalStore, default_store_dir


def open_store(args: argparse.Namespace, create: bool = False) -> LocalStore:
    root = Path(args.store) if args.store else default_store_dir()
    return LocalStore.open(root, create=create)


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
