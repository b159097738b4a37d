"""The `snapstore` command line: parses arguments and hands each command to the engine.

Exit status: 0 ok, 1 failure, 2 usage. Results go to stdout (text, or JSON with --json);
progress and errors go to stderr, errors as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.filesize import decimal as human

from snapstore import catalog
from snapstore.cli.common import (
    Handler,
    add_command,
    open_store,
    parse_labels,
    print_json,
    warn_damaged_tags,
)
from snapstore.cli.gpu import add_commands as add_gpu_commands
from snapstore.cli.mount import add_commands as add_mount_commands
from snapstore.cli.remote import add_commands as add_remote_commands
from snapstore.cli.remote import add_gc_options, cmd_remote_gc
from snapstore.cli.runtime import add_commands as add_runtime_commands
from snapstore.cli.uffd import add_commands as add_uffd_commands
from snapstore.errors import SnapstoreError
from snapstore.export import export
from snapstore.gc import gc
from snapstore.store.local import check_tag
from snapstore.verify import verify, verify_tags


def cmd_ingest(args: argparse.Namespace) -> int:
    # The chunker (numpy, pyfastcdc) is imported here: no other command needs it.
    from snapstore.ingest import ingest

    store = open_store(args, create=True)
    r = ingest(store, Path(args.dir), args.tag, parse_labels(args.label),
               transcode=not args.exact)
    if args.json:
        print_json({
            "snapshot": r.snapshot.hex, "tag": args.tag, "files": r.files,
            "logical_bytes": r.logical_bytes, "hole_bytes": r.hole_bytes, "chunks": r.chunks,
            "new_chunks": r.new_chunks, "new_stored_bytes": r.new_stored_bytes,
            "seconds": round(r.seconds, 3),
        })
        return 0
    rate = r.logical_bytes / r.seconds if r.seconds else 0.0
    print(
        f"ingested {r.files} files, {human(r.logical_bytes)} ({human(r.hole_bytes)} holes) "
        f"in {r.seconds:.2f}s ({human(int(rate))}/s): {r.chunks} chunks, {r.new_chunks} new, "
        f"{human(r.new_stored_bytes)} added",
        file=sys.stderr,
    )
    print(r.snapshot.hex)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    warn_damaged_tags(store)
    snaps = catalog.list_snapshots(store)
    if args.json:
        print_json(snaps)
        return 0
    print(f"{'ID':12}  {'CREATED':25}  {'LOGICAL':>10}  {'STORED':>10}  TAGS")
    for s in snaps:
        if "error" in s:
            print(f"{s['id'][:12]}  unreadable: {s['error']}")
            continue
        print(f"{s['id'][:12]}  {s['created']:25}  {human(s['logical_bytes']):>10}  "
              f"{human(s['stored_bytes']):>10}  {','.join(s['tags'])}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    doc = catalog.show_snapshot(store, store.resolve(args.ref))
    if args.json:
        print_json(doc)
        return 0
    print(f"snapshot {doc['id']}")
    print(f"tags     {', '.join(doc['tags']) or '-'}")
    print(f"created  {doc['created']}")
    for k, v in sorted(doc["labels"].items()):
        print(f"label    {k}={v}")
    print(f"files    {doc['files']}, {human(doc['logical_bytes'])} logical, "
          f"{human(doc['hole_bytes'])} holes, {doc['chunks']} unique chunks, "
          f"{human(doc['stored_bytes'])} stored")
    for e in doc["entries"]:
        if e["type"] == "file":
            print(f"  {e['mode']} {human(e['size']):>10} {e['chunks']:>6} chunks "
                  f"{human(e['hole_bytes']):>10} holes  {e['form']:10} {e['path']}")
        elif e["type"] == "symlink":
            print(f"  {e['mode']} {'':>10} {'':>6}        {'':>10}        {'link':10} "
                  f"{e['path']} -> {e['target']}")
        else:
            print(f"  {e['mode']} {'':>10} {'':>6}        {'':>10}        {'dir':10} "
                  f"{e['path']}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = open_store(args)
    m = store.get_manifest(store.resolve(args.ref))
    n = export(store, m, Path(args.dest))
    print(f"exported {human(m.logical_bytes)} ({human(n)} written, the rest holes) "
          f"to {args.dest}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    report = (verify(store, {args.ref: store.resolve(args.ref)}) if args.ref
              else verify_tags(store))
    if args.json:
        print_json({
            "snapshots": report.snapshots, "chunks": report.chunks,
            "bytes_checked": report.bytes_checked,
            "problems": [{"kind": p.what, "id": p.object_id.hex if p.object_id else None,
                          "reason": p.reason, "affects": list(p.affects)}
                         for p in report.problems],
        })
    else:
        for p in report.problems:
            what = f"{p.what} {p.object_id}" if p.object_id else p.what
            print(f"BAD {what}: {p.reason}")
            for where in p.affects:
                print(f"    affects {where}")
        state = f"{len(report.problems)} problems" if report.problems else "all good"
        print(f"checked {report.snapshots} snapshots, {report.chunks} chunks, "
              f"{human(report.bytes_checked)}: {state}", file=sys.stderr)
    return 1 if report.problems else 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args)
    check_tag(args.name)
    with store.writer_lock():
        mid = store.resolve(args.ref)
        store.set_tag(args.name, mid)
    print(f"{args.name} -> {mid}", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = open_store(args)
    if not store.delete_tag(check_tag(args.ref)):
        raise SnapstoreError(f"no tag {args.ref!r}; `snapstore list` shows the tags")
    print(f"removed tag {args.ref}; `snapstore gc` frees what no tag reaches", file=sys.stderr)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    # `gc --remote REMOTE`, the older spelling of `remote gc REMOTE`: the same command.
    if args.remote:
        return cmd_remote_gc(args)
    r = gc(open_store(args), dry_run=args.dry_run)
    for what in r.left_alone:
        print(f"snapstore: warning: left {what}", file=sys.stderr)
    if args.json:
        print_json({k: getattr(r, k) for k in r.__slots__})
        return 0
    verb = "would delete" if r.dry_run else "deleted"
    print(f"{verb} {r.deleted_snapshots} snapshots, {r.deleted_chunks} chunks "
          f"({human(r.deleted_bytes)}), {r.deleted_tmp_files} temporary files, "
          f"{r.deleted_work_dirs} working directories of killed commands; kept "
          f"{r.kept_snapshots} snapshots, {r.kept_chunks} chunks")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = open_store(args)
    warn_damaged_tags(store)
    s = catalog.store_stats(store)
    if args.json:
        print_json(s)
        return 0
    print(f"tags / snapshots   {s['tags']} / {s['snapshots']}")
    print(f"logical            {human(s['logical_bytes'])}")
    print(f"holes              {human(s['hole_bytes'])}")
    print(f"unique chunks      {s['unique_chunks']} ({human(s['unique_bytes'])})")
    print(f"stored             {human(s['stored_bytes'])}")
    print(f"dedup ratio        {s['dedup_ratio']}")
    print(f"logical / stored   {s['reduction_ratio']}")
    print(f"on disk            {s['store_chunks']} chunks, {human(s['store_bytes'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapstore", description=__doc__.splitlines()[0])
    p.add_argument("--store", metavar="DIR",
                   help="store directory (default: $SNAPSTORE_DIR, else ~/.local/share/snapstore)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Handler, help: str, json_flag: bool = False
            ) -> argparse.ArgumentParser:
        return add_command(sub, name, func, help, json_output=json_flag)

    sp = add("ingest", cmd_ingest, "store an image directory as a snapshot", json_flag=True)
    sp.add_argument("dir")
    sp.add_argument("--tag", required=True, help="tag naming the new snapshot")
    sp.add_argument("--label", action="append", default=[], metavar="K=V")
    sp.add_argument("--exact", action="store_true",
                    help="store gVisor statefiles byte-exact instead of transcoded")
    add("list", cmd_list, "list snapshots", json_flag=True)
    add("show", cmd_show, "show a snapshot's files and sizes", json_flag=True).add_argument("ref")
    sp = add("export", cmd_export, "write a snapshot's files to a new directory")
    sp.add_argument("ref")
    sp.add_argument("dest")
    add("verify", cmd_verify, "re-hash every chunk referenced by a snapshot (all tags if none)",
        json_flag=True).add_argument("ref", nargs="?")
    sp = add("tag", cmd_tag, "point a new or existing tag at a snapshot")
    sp.add_argument("ref")
    sp.add_argument("name")
    add("rm", cmd_rm, "remove a tag (gc frees the data)").add_argument("ref")
    sp = add("gc", cmd_gc, "delete chunks and snapshots no tag reaches", json_flag=True)
    sp.add_argument("--dry-run", action="store_true")
    add_gc_options(sp)
    add("stats", cmd_stats, "store totals and dedup ratio", json_flag=True)
    # Commands of the other subsystems register themselves here, one line each.
    add_mount_commands(sub)
    add_remote_commands(sub)
    add_runtime_commands(sub)
    add_uffd_commands(sub)
    add_gpu_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SnapstoreError as e:
        print(f"snapstore: error: {e}", file=sys.stderr)
        return e.exit_status
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"snapstore: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snapstore: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A bug, not bad input: still one line, with the traceback only on request.
        if os.environ.get("SNAPSTORE_DEBUG"):
            raise
        print(f"snapstore: internal error: {type(e).__name__}: {e} "
              "(run with SNAPSTORE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
