"""The `snapstore` command line: one module per group of commands, registered in `main`."""

from snapstore.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
