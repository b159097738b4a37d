"""The mount, umount and mount-stats commands, registered into the snapstore CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.filesize import decimal as human

from snapstore.cli.common import (
    Commands,
    add_command,
    open_store,
    parse_size,
    positive_int,
    print_json,
    store_root,
)
from snapstore.cli.remote import add_remote_options
from snapstore.errors import SnapstoreError
from snapstore.ids import ChunkId
from snapstore.remote.settings import DEFAULT_CACHE_BYTES
from snapstore.store.local import LocalStore

# pyfuse3, trio and the S3 stack are imported by the handlers that use them, so that
# every other snapstore command starts without them.
if TYPE_CHECKING:
    from fusefs.mount import MountOptions
    from fusefs.remote import RemoteMount
    from snapstore.manifest import Manifest

# Measured on the 2-vCPU machine (docs/mount.md): a cold read ran faster with 8 loaders
# than with 4 in three batches of four, and 12 or 16 gained nothing more. A loader blocks
# on its chunk file's read, so loaders outnumber cores; a forked one costs 2.3 MB (PSS).
LOAD_PROCESSES = 8


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    help = "mount a snapshot read-only with FUSE, loading chunks on demand"
    sp = add_command(sub, "mount", cmd_mount, help)
    sp.add_argument("ref", help="tag or snapshot id")
    sp.add_argument("mountpoint")
    sp.add_argument("--allow-other", action="store_true",
                    help="let other users read the files, within their modes (runsc restore "
                         "needs it; see docs/mount.md)")
    sp.add_argument("--foreground", action="store_true",
                    help="serve in this process until unmounted or interrupted")
    sp.add_argument("--cache-mem", type=parse_size, default=512 << 20, metavar="BYTES",
                    help="memory for decompressed chunks (default 512M)")
    sp.add_argument("--load-processes", type=positive_int, default=LOAD_PROCESSES,
                    metavar="N", help="processes that load chunks of a local snapshot "
                                      f"(default {LOAD_PROCESSES})")
    sp.add_argument("--metrics", type=parse_address, metavar="HOST:PORT",
                    help="serve Prometheus text metrics on this address")
    add_remote_mount_options(sp)

    help = "unmount a snapshot, also after its daemon died"
    sp = add_command(sub, "umount", cmd_umount, help)
    sp.add_argument("mountpoint")

    help = "show a mount's reads, cache hits and chunk load latency"
    sp = add_command(sub, "mount-stats", cmd_mount_stats, help, json_output=True)
    sp.add_argument("mountpoint")


def add_remote_mount_options(sp: argparse.ArgumentParser) -> None:
    """The options that make `mount` read a snapshot of a remote, chunk by chunk."""
    sp.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]",
                    help="read the snapshot from this remote, fetching chunks on demand "
                    "(the local store may be empty)")
    sp.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE_BYTES, metavar="BYTES",
                    help="with --remote: disk for fetched chunks in STORE/cache, least "
                    "recently used evicted first (default 4G)")
    sp.add_argument("--prefetch", action="store_true",
                    help="load the snapshot in the background, in the order it was read "
                    "last time, behind demand reads: from a remote into the disk cache, "
                    "from the local store into the memory cache (as much as --cache-mem holds)")
    add_remote_options(sp)


def remote_mount(args: argparse.Namespace) -> RemoteMount | None:
    """The remote side of a `mount` command line, resolved; None for a local mount."""
    if args.remote is None:
        return None
    from fusefs.remote import RemoteMount
    from snapstore.remote.reader import load_remote_snapshot
    from snapstore.store.s3 import read_timeout

    deadline = read_timeout(args.read_timeout)
    snap = load_remote_snapshot(args.ref, args.remote, args.endpoint_url, deadline)
    return RemoteMount(snap, args.remote, args.endpoint_url, args.cache_size, args.prefetch,
                       deadline)


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    from fusefs.mount import (
        MountOptions,
        MountPaths,
        access_path,
        check_mountpoint,
        daemonize,
        read_state,
        write_state,
    )

    store = open_store(args, create=args.remote is not None)
    remote = remote_mount(args)
    if remote is not None:
        mid, m = remote.snapshot.snapshot, remote.snapshot.manifest
    else:
        mid = store.resolve(args.ref)
        m = store.get_manifest(mid)
    mountpoint = Path(args.mountpoint)
    check_mountpoint(mountpoint)
    paths = MountPaths.of(store.root, mountpoint)
    options = MountOptions(
        allow_other=args.allow_other,
        cache_bytes=args.cache_mem,
        fsname=f"snapstore:{args.ref}",
        stats_path=paths.stats,
        access_path=access_path(store.root, mid),
        metrics=args.metrics,
        warm=_warm_order(store, mid, m) if args.prefetch and remote is None else (),
    )

    def run(ready: Callable[[], None]) -> None:
        try:
            # Recorded before mounting: a record that cannot be written (a full disk)
            # fails the mount before there is a mount to take down.
            write_state(paths, mountpoint, mid)
            if remote is not None:
                # Only here: a host without the S3 stack mounts from its local store.
                from fusefs.remote import serve_remote

                trio.run(serve_remote, store, remote, mountpoint, options, ready)
            else:
                trio.run(_serve_local, store, m, mountpoint, options, args.load_processes,
                         ready)
        finally:
            state = read_state(paths)
            if state and state.get("pid") == os.getpid():
                paths.state.unlink(missing_ok=True)

    if args.foreground:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
        run(lambda: print(f"mounted {args.ref} at {mountpoint}", file=sys.stderr))
        return 0
    daemonize(run, paths.log)
    print(f"mounted {args.ref} ({mid.short()}) at {mountpoint}; log: {paths.log}",
          file=sys.stderr)
    return 0


async def _serve_local(
    store: LocalStore, m: Manifest, mountpoint: Path, options: MountOptions,
    processes: int, ready: Callable[[], None],
) -> None:
    from fusefs.mount import serve
    from snapstore.store.chunk_loader import ProcessChunkReader

    async with ProcessChunkReader(store, processes) as reader:
        await serve(m, mountpoint, reader, options, ready)


def _warm_order(store: LocalStore, mid: ChunkId, m: Manifest) -> tuple[tuple[ChunkId, int], ...]:
    """A local `--prefetch`: the chunks in the order the last mount read them, then the
    rest in file order, to be loaded into the memory cache before they are asked for."""
    from fusefs.mount import access_path
    from snapstore.manifest import prefetch_order

    try:
        recorded = access_path(store.root, mid).read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        recorded = []
    return tuple(prefetch_order(m, recorded))


def cmd_umount(args: argparse.Namespace) -> int:
    from fusefs.mount import MountPaths, is_mounted, read_state, unmount

    mountpoint = Path(args.mountpoint)
    paths = MountPaths.of(store_root(args), mountpoint)
    if not is_mounted(mountpoint) and read_state(paths) is None:
        raise SnapstoreError(f"nothing is mounted at {mountpoint}")
    how = unmount(mountpoint, paths)
    print(f"unmounted {mountpoint} ({how})", file=sys.stderr)
    return 0


def cmd_mount_stats(args: argparse.Namespace) -> int:
    from fusefs.mount import MountPaths, is_mounted, read_state

    mountpoint = Path(args.mountpoint)
    paths = MountPaths.of(store_root(args), mountpoint)
    try:
        doc = json.loads(paths.stats.read_text())
    except FileNotFoundError:
        raise SnapstoreError(f"no mount stats for {mountpoint}: not mounted by snapstore "
                             "with this store") from None
    except ValueError as e:
        raise SnapstoreError(f"unreadable stats file {paths.stats}: {e}") from None
    state = read_state(paths)
    doc["mountpoint"] = str(mountpoint)
    doc["snapshot"] = state.get("snapshot") if state else None
    doc["mounted"] = is_mounted(mountpoint)
    if args.json:
        print_json(doc)
        return 0
    hits, misses = doc["cache_hits"], doc["cache_misses"]
    ratio = hits / (hits + misses) if hits + misses else 0.0
    snap = ChunkId.parse(doc["snapshot"]).short() if doc["snapshot"] else "-"
    print(f"mount        {mountpoint} ({'mounted' if doc['mounted'] else 'not mounted'}), "
          f"snapshot {snap}, pid {doc['pid']}, {time.time() - doc['updated']:.0f}s ago")
    print(f"reads        {doc['reads']}, {human(doc['bytes_served'])} served, "
          f"{doc['read_errors']} failed")
    print(f"cache        {hits} hits, {misses} misses ({ratio:.1%} hits), {doc['coalesced']} "
          f"joined a load; {doc['cache_chunks']} chunks, {human(doc['cache_bytes'])}")
    print(f"chunk loads  {doc['chunk_loads']} ({human(doc['bytes_loaded'])}), "
          f"{doc['prefetches']} prefetched, {doc['load_errors']} failed")
    print(f"load latency p50 {doc['load_latency_p50_ms']} ms, "
          f"p99 {doc['load_latency_p99_ms']} ms")
    return 0
