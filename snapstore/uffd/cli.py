"""The `uffd-loader` subcommand: runs the native page loader in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapstore.errors import NotFoundError
from snapstore.uffd.loader import LoaderNotBuiltError, LoaderOptions, run


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "uffd-loader",
        help="serve userfaultfd page faults of a restoring process from a memory image",
        description="Listen on a Unix socket for Firecracker's uffd handshake and serve every "
        "missing page from the image; exits 0 when the client goes away.",
    )
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="raw memory image; given more than once, the files one after another "
                   "are the image")
    _loader_options(p)
    p.set_defaults(func=run_loader)

    p = sub.add_parser(
        "uffd-serve",
        help="serve page faults from a file of a snapshot in the store",
        description="Materialise PATH of snapshot REF (hash-checked) beside the store, then "
        "run the loader on it as uffd-loader does; the copy is removed on exit.",
    )
    p.add_argument("ref", help="tag or snapshot id")
    p.add_argument("path", help="the memory image's path inside the snapshot")
    _loader_options(p)
    p.set_defaults(func=run_serve)


def _loader_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    p.add_argument("--hot", type=Path, help="page indices to prefetch, one per line")
    p.add_argument("--record", type=Path, help="write demand-faulted page indices here")
    p.add_argument("--memfd", action="store_true", help="serve a memfd shared with the client")
    p.add_argument("--fault-around-kib", type=int, help="bytes installed per demand fault")
    p.add_argument("--queue-depth", type=int, help="prefetch reads in flight")
    p.add_argument(
        "--prefetch-threads",
        type=int,
        help="threads reading and installing prefetched pages (default: CPUs, at most 8)",
    )
    io = p.add_mutually_exclusive_group()
    io.add_argument("--buffered", action="store_true",
                    help="prefetch through the page cache only (default: cached ranges "
                    "through it, the others with O_DIRECT)")
    io.add_argument("--direct", action="store_true",
                    help="prefetch with O_DIRECT only, where the file system allows it")
    p.add_argument("--stats-json", type=Path, help="write fault and prefetch statistics here")


def run_serve(args: argparse.Namespace) -> int:
    """Why materialise rather than read through a mount: the loader's prefetch reads with
    O_DIRECT and deep AIO queues, which a disk serves at 2+ GB/s and a FUSE file at a
    fraction of that (benchmarks/RESULTS.md), and faults then hit a local file's page
    cache. The copy costs one sequential write of the image before the loader starts."""
    import tempfile

    from snapstore.cli_common import open_store
    from snapstore.export import export_file

    store = open_store(args)
    m = store.get_manifest(store.resolve(args.ref))
    entry = next((e for e in m.files() if e.path == args.path), None)
    if entry is None:
        raise NotFoundError(f"snapshot {args.ref} has no file {args.path!r}")
    with tempfile.TemporaryDirectory(prefix="uffd-serve-", dir=store.tmp_dir) as tmp:
        image = Path(tmp) / "image"
        export_file(store, entry, image)
        return _run(args, image)


def run_loader(args: argparse.Namespace) -> int:
    return _run(args, args.image)


def _run(args: argparse.Namespace, image: Path | list[Path]) -> int:
    opts = LoaderOptions(
        image=image,
        socket=args.socket,
        hot=args.hot,
        record=args.record,
        memfd=args.memfd,
        fault_around_kib=args.fault_around_kib,
        queue_depth=args.queue_depth,
        prefetch_threads=args.prefetch_threads,
        buffered=args.buffered,
        direct=args.direct,
        stats_json=args.stats_json,
    )
    try:
        status = run(opts)
    except LoaderNotBuiltError as e:
        print(f"snapstore: {e}", file=sys.stderr)
        return 1
    # The loader uses the same convention (0 ok, 1 failure, 2 usage); a signal counts as failure.
    return status if status in (0, 1, 2) else 1
