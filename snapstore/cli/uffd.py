"""The `uffd-loader` subcommand: runs the native page loader in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapstore.cli.common import (
    Commands,
    add_command,
    open_store,
    positive_int,
)
from snapstore.ids import ChunkId, is_valid_hex_id
from snapstore.store.local import LocalStore
from snapstore.uffd.page_loader import LoaderNotBuiltError, LoaderOptions, run


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "uffd-loader", run_loader,
        help="serve userfaultfd page faults of a restoring process from a memory image",
        description="Listen on a Unix socket for Firecracker's uffd handshake and serve every "
        "missing page from the image; exits 0 when the client goes away.")
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="raw memory image; given more than once, the files one after another "
                   "are the image")
    _loader_options(p)

    p = add_command(
        sub, "uffd-serve", run_serve,
        help="serve page faults from a file of a snapshot in the store",
        description="Serve PATH of snapshot REF as uffd-loader serves an image, straight from "
        "the store's chunks: each is decompressed and hash-checked once, in loader processes, "
        "and nothing is written to disk. Without --hot, every chunk of the file is prefetched: "
        "those a mount of the snapshot read first (its recorded order), then the rest in file "
        "order. A fault on a chunk not loaded yet goes ahead of the prefetch.")
    p.add_argument("ref", help="tag or snapshot id")
    p.add_argument("path", help="the memory image's path inside the snapshot")
    p.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    p.add_argument("--hot", type=Path,
                   help="page indices to prefetch, one per line (only their chunks are)")
    p.add_argument("--record", type=Path, help="write demand-faulted page indices here")
    p.add_argument("--loaders", type=positive_int,
                   help="chunk loader processes for the prefetch (default: two per CPU, at "
                   "most 16; one more is kept for faults)")
    p.add_argument("--stats-json", type=Path, help="write fault and prefetch statistics here")
    p.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]",
                   help="serve REF of this remote, fetching chunks on demand into the store's "
                   "cache, as a lazy remote mount does (the local store may be empty)")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")


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
    import trio

    from snapstore.uffd import serve
    from snapstore.uffd.layout import Layout

    loaders = args.loaders or serve.default_loaders()
    extra: list[str] = []
    for flag, path in (("--record", args.record), ("--stats-json", args.stats_json)):
        if path is not None:
            extra += [flag, str(path)]
    if args.remote is not None:
        store = open_store(args, create=True)
        try:
            status = trio.run(serve.serve_remote, store, args.remote, args.endpoint_url,
                              args.ref, args.path, args.hot, args.socket, loaders, extra)
        except LoaderNotBuiltError as e:
            print(f"snapstore: {e}", file=sys.stderr)
            return 1
        return status if status in (0, 1, 2) else 1
    store = open_store(args)
    mid = store.resolve(args.ref)
    layout = Layout.of(serve.find_file(store.get_manifest(mid), args.path))
    hot = serve.read_hot_list(args.hot, layout.npages) if args.hot is not None else None
    order = serve.prefetch_order(layout, hot, [] if hot is not None else _recorded(store, mid))
    try:
        status = serve.serve_local(store, layout, order, args.socket, loaders, extra)
    except LoaderNotBuiltError as e:
        print(f"snapstore: {e}", file=sys.stderr)
        return 1
    return status if status in (0, 1, 2) else 1


def _recorded(store: LocalStore, mid: ChunkId) -> list[ChunkId]:
    """The chunk order the last mount of the snapshot read, if one recorded it."""
    from fusefs.mount import access_path

    try:
        lines = access_path(store.root, mid).read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    return [ChunkId.parse(line) for line in lines if is_valid_hex_id(line)]


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
