"""The `uffd-loader` subcommand: runs the native page loader in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapstore.uffd.loader import LoaderNotBuiltError, LoaderOptions, run


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "uffd-loader",
        help="serve userfaultfd page faults of a restoring process from a memory image",
        description="Listen on a Unix socket for Firecracker's uffd handshake and serve every "
        "missing page from the image; exits 0 when the client goes away.",
    )
    p.add_argument("--image", type=Path, required=True, help="raw memory image")
    p.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    p.add_argument("--hot", type=Path, help="page indices to prefetch, one per line")
    p.add_argument("--record", type=Path, help="write demand-faulted page indices here")
    p.add_argument("--memfd", action="store_true", help="serve a memfd shared with the client")
    p.add_argument("--fault-around-kib", type=int, help="bytes installed per demand fault")
    p.add_argument("--queue-depth", type=int, help="prefetch reads in flight")
    p.add_argument("--buffered", action="store_true", help="prefetch without O_DIRECT")
    p.add_argument("--stats-json", type=Path, help="write fault and prefetch statistics here")
    p.set_defaults(func=run_loader)


def run_loader(args: argparse.Namespace) -> int:
    opts = LoaderOptions(
        image=args.image,
        socket=args.socket,
        hot=args.hot,
        record=args.record,
        memfd=args.memfd,
        fault_around_kib=args.fault_around_kib,
        queue_depth=args.queue_depth,
        buffered=args.buffered,
        stats_json=args.stats_json,
    )
    try:
        status = run(opts)
    except LoaderNotBuiltError as e:
        print(f"snapstore: {e}", file=sys.stderr)
        return 1
    # The loader uses the same convention (0 ok, 1 failure, 2 usage); a signal counts as failure.
    return status if status in (0, 1, 2) else 1
