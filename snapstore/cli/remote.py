"""The remote commands of the `snapstore` CLI: push, pull, remote ls and remote gc."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from rich.filesize import decimal as human

from snapstore.cli.common import (
    Commands,
    Handler,
    add_command,
    open_store,
    parse_size,
    print_json,
)
from snapstore.errors import CorruptError, NotFoundError, UsageError
from snapstore.remote.settings import (
    DEFAULT_GRACE_S,
    DEFAULT_JOBS,
    DEFAULT_PACK_BYTES,
    MAX_PACK_TARGET,
    MIN_GRACE_S,
    check_grace,
)
from snapstore.store.url import DEFAULT_READ_TIMEOUT_S

# The S3 client stack takes a large part of a second to import: handlers import it
# when they run, so that commands without a remote start fast.
if TYPE_CHECKING:
    from snapstore.remote.transfer import TransferReport
    from snapstore.store.s3 import S3Store


def _with_remote(args: argparse.Namespace, remote: str,
                 fn: Callable[[S3Store], Awaitable[int]]) -> int:
    import trio

    from snapstore.store.s3 import endpoint_url, open_s3
    from snapstore.store.url import RemoteURL

    url = RemoteURL.parse(remote)
    jobs = getattr(args, "jobs", DEFAULT_JOBS)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")

    async def main() -> int:
        # A connection per job, plus a few so HEADs of the manifest and tag never queue.
        async with open_s3(url, endpoint_url(args.endpoint_url), connections=jobs + 4,
                           read_timeout_s=args.read_timeout) as s3:
            return await fn(s3)

    return trio.run(main)


def _report(args: argparse.Namespace, verb: str, r: TransferReport) -> int:
    if args.json:
        print_json({
            "snapshot": r.snapshot.hex, "tag": r.tag, "tag_status": r.tag_status,
            "chunks": r.chunks, "chunks_sent": r.chunks_sent, "bytes_sent": r.bytes_sent,
            "packs": r.packs, "seconds": round(r.seconds, 3),
            "chunks_repaired": r.chunks_repaired,
        })
        return 0
    rate = r.bytes_sent / r.seconds if r.seconds else 0.0
    tag = f", tag {r.tag} {r.tag_status}" if r.tag else ""
    repaired = (f", {r.chunks_repaired} damaged local copies replaced"
                if r.chunks_repaired else "")
    print(f"{verb} {r.chunks_sent} of {r.chunks} chunks ({r.packs} packs), "
          f"{human(r.bytes_sent)} in {r.seconds:.2f}s ({human(int(rate))}/s){tag}{repaired}",
          file=sys.stderr)
    print(r.snapshot.hex)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from snapstore.remote.transfer import push

    store = open_store(args)
    if not 0 < args.pack_size <= MAX_PACK_TARGET:
        raise UsageError(f"--pack-size must be between 1 and {MAX_PACK_TARGET >> 20}M")

    async def run(s3: S3Store) -> int:
        r = await push(store, args.ref, s3, force=args.force, jobs=args.jobs,
                       pack_size=args.pack_size)
        return _report(args, "pushed", r)

    return _with_remote(args, args.remote, run)


def cmd_pull(args: argparse.Namespace) -> int:
    from snapstore.remote.transfer import pull

    store = open_store(args, create=True)

    async def run(s3: S3Store) -> int:
        r = await pull(store, args.ref, s3, force=args.force, jobs=args.jobs)
        return _report(args, "pulled", r)

    return _with_remote(args, args.remote, run)


async def remote_listing(s3: S3Store) -> dict[str, Any]:
    """Tags and snapshots of a remote with their sizes (what `remote ls --json` prints)."""
    from snapstore.remote.fetch import (
        fetch_locator,
        fetch_manifest,
        get_remote_tag,
        list_remote_tags,
    )

    foreign: list[str] = []
    packs = {o.id: o.size async for o in s3.list("pack", foreign.append)}
    tags: dict[str, str] = {}
    names, foreign_tags = await list_remote_tags(s3)
    foreign += foreign_tags
    for name in names:
        try:
            tags[name] = (await get_remote_tag(s3, name)).hex
        except (CorruptError, NotFoundError) as e:
            tags[name] = f"unreadable: {e}"
    snaps: list[dict[str, Any]] = []
    async for o in s3.list("manifest", foreign.append):
        doc: dict[str, Any] = {"id": o.name, "tags": sorted(t for t, m in tags.items()
                                                           if m == o.name)}
        try:
            _, m = await fetch_manifest(s3, o.id)
            where = (await fetch_locator(s3, o.id, m.chunk_ids())).chunks
        except (CorruptError, NotFoundError) as e:
            doc["error"] = str(e)
            snaps.append(doc)
            continue
        doc.update(created=m.created, logical_bytes=m.logical_bytes, chunks=len(where),
                   stored_bytes=sum(loc.length for loc in where.values()),
                   missing_chunks=sum(1 for loc in where.values() if loc.pack not in packs))
        snaps.append(doc)
    return {"remote": str(s3.url), "tags": tags, "snapshots": snaps,
            "packs": len(packs), "stored_bytes": sum(packs.values()),
            "foreign_keys": sorted(foreign)}


def _warn_foreign_keys(remote: str, keys: list[str]) -> None:
    for key in keys:
        print(f"snapstore: warning: skipped {remote}/{key}: not an object snapstore writes",
              file=sys.stderr)


def cmd_remote_ls(args: argparse.Namespace) -> int:
    async def run(s3: S3Store) -> int:
        doc = await remote_listing(s3)
        _warn_foreign_keys(doc["remote"], doc["foreign_keys"])
        if args.json:
            print_json(doc)
            return 0
        print(f"{'ID':12}  {'CREATED':25}  {'LOGICAL':>10}  {'STORED':>10}  TAGS")
        for s in doc["snapshots"]:
            if "error" in s:
                print(f"{s['id'][:12]}  unreadable: {s['error']}")
                continue
            missing = f"  ({s['missing_chunks']} chunks missing)" if s["missing_chunks"] else ""
            print(f"{s['id'][:12]}  {s['created']:25}  {human(s['logical_bytes']):>10}  "
                  f"{human(s['stored_bytes']):>10}  {','.join(s['tags'])}{missing}")
        print(f"{len(doc['tags'])} tags, {len(doc['snapshots'])} snapshots, {doc['packs']} "
              f"packs, {human(doc['stored_bytes'])} in {doc['remote']}", file=sys.stderr)
        return 0

    return _with_remote(args, args.remote, run)


def cmd_remote_gc(args: argparse.Namespace) -> int:
    """`snapstore remote gc REMOTE` (or `gc --remote REMOTE`): collect the remote's
    garbage."""
    from snapstore.remote.gc import remote_gc

    check_grace(args.grace, args.force)

    try:
        store = open_store(args)  # only lends its copies of pack indexes
    except NotFoundError:
        store = None

    async def run(s3: S3Store) -> int:
        r = await remote_gc(s3, store, grace_s=args.grace, dry_run=args.dry_run,
                            force=args.force)
        _warn_foreign_keys(str(s3.url), r.foreign_keys)
        if args.json:
            print_json(r.as_dict())
            return 0
        verb = "would delete" if r.dry_run else "deleted"
        print(f"{verb} {r.deleted_snapshots} snapshots, {r.deleted_packs} packs "
              f"({r.deleted_chunks} chunks, {human(r.deleted_bytes)}); kept "
              f"{r.kept_snapshots} snapshots, {r.kept_packs} packs ({r.young_unreferenced} "
              f"unreferenced but younger than the grace; {human(r.dead_bytes_in_kept_packs)} "
              "of unreferenced chunks inside kept packs)")
        return 0

    return _with_remote(args, args.remote, run)


def add_remote_options(sp: argparse.ArgumentParser, jobs: bool = False) -> None:
    """The options of every command that talks to a remote."""
    sp.add_argument("--endpoint-url", metavar="URL",
                    help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    sp.add_argument("--read-timeout", type=float, metavar="SECONDS",
                    help="fail a read from the remote that takes longer, retries included "
                    "(default: $SNAPSTORE_READ_TIMEOUT, else "
                    f"{DEFAULT_READ_TIMEOUT_S:g})")
    if jobs:
        sp.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                        help=f"parallel requests (default {DEFAULT_JOBS})")


def add_gc_options(sp: argparse.ArgumentParser) -> None:
    """`gc --remote REMOTE`, the older spelling of `remote gc REMOTE` (cmd_remote_gc)."""
    sp.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]",
                    help="collect this remote's garbage instead of the local store's "
                    "(the same as `remote gc`)")
    _remote_gc_options(sp, "with --remote: ")


def _remote_gc_options(sp: argparse.ArgumentParser, only: str = "") -> None:
    sp.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                    help=f"{only}never delete objects younger than this "
                    f"(default {DEFAULT_GRACE_S}, a day; at least {MIN_GRACE_S})")
    sp.add_argument("--force", action="store_true",
                    help=f"{only}allow a grace below {MIN_GRACE_S} s (only when no "
                    "push to the remote runs)")
    add_remote_options(sp)


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    """Register push, pull, `remote ls` and `remote gc` on the main parser's subcommands."""
    def add(name: str, func: Handler, help: str,
            parent: Commands[argparse.ArgumentParser] = sub) -> argparse.ArgumentParser:
        return add_command(parent, name, func, help, json_output=True)

    for name, func, what in (("push", cmd_push, "send a snapshot's missing chunks in packs, "
                              "its manifest and its tag to an S3 remote"),
                             ("pull", cmd_pull, "fetch a snapshot's missing chunks, its "
                              "manifest and its tag from an S3 remote")):
        sp = add(name, func, what)
        sp.add_argument("ref", help="tag (set on the other side too) or snapshot id")
        sp.add_argument("remote", metavar="s3://BUCKET[/PREFIX]")
        sp.add_argument("--force", action="store_true",
                        help="move the other side's tag if it names another snapshot")
        add_remote_options(sp, jobs=True)
        if name == "push":
            sp.add_argument("--pack-size", type=parse_size, default=DEFAULT_PACK_BYTES,
                            metavar="BYTES", help="close a pack of chunks at this size "
                            f"(default {DEFAULT_PACK_BYTES >> 20}M, at most "
                            f"{MAX_PACK_TARGET >> 20}M)")
    remote = sub.add_parser("remote", help="inspect an S3 remote, collect its garbage",
                            description="inspect an S3 remote, collect its garbage")
    remote_sub = remote.add_subparsers(dest="remote_command", required=True,
                                       metavar="COMMAND")
    sp = add("ls", cmd_remote_ls, "list a remote's tags and snapshots with sizes", remote_sub)
    sp.add_argument("remote", metavar="s3://BUCKET[/PREFIX]")
    add_remote_options(sp)
    sp = add("gc", cmd_remote_gc, "delete a remote's packs and snapshots no tag reaches",
             remote_sub)
    sp.add_argument("remote", metavar="s3://BUCKET[/PREFIX]")
    sp.add_argument("--dry-run", action="store_true")
    _remote_gc_options(sp)
