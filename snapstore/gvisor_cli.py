"""CLI of the gVisor workflow: `checkpoint`, `find` and `restore`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapstore.cli_common import open_store, parse_labels, print_json, warn_damaged_tags

# snapstore.gvisor (ingest, the chunker, mounts) is imported by the handlers that use it,
# so that other commands start without it.


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help = "checkpoint a running gVisor container into the store"
    sp = sub.add_parser("checkpoint", help=help, description=help)
    sp.add_argument("container")
    sp.add_argument("--tag", required=True)
    sp.add_argument("--label", action="append", default=[], metavar="K=V")
    sp.add_argument("--leave-running", action="store_true",
                    help="restart the container from the checkpoint afterwards")
    _runsc_options(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_checkpoint)

    help = "list snapshots whose labels match, newest first"
    sp = sub.add_parser("find", help=help, description=help)
    sp.add_argument("--label", action="append", default=[], metavar="K=V")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_find)

    help = ("restore a container from the newest matching snapshot through a lazy mount; "
            "start it cold if there is none or the restore fails")
    sp = sub.add_parser("restore", help=help, description=help)
    sp.add_argument("container")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--from", dest="ref", metavar="REF", help="tag or snapshot id")
    which.add_argument("--match", action="append", metavar="K=V",
                       help="pick the newest snapshot with these labels")
    sp.add_argument("--bundle", required=True, type=Path, help="the container's OCI bundle")
    sp.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]",
                    help="look there when the local store has no match; mount lazily")
    sp.add_argument("--no-fallback", action="store_true",
                    help="fail instead of starting the container cold")
    _runsc_options(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_restore)


def _runsc_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--runsc", metavar="PATH", help="runsc binary (default: runsc on PATH)")
    sp.add_argument("--runsc-arg", action="append", default=[], metavar="ARG",
                    help="global runsc flag, e.g. --runsc-arg=--root=/run/runsc (repeatable)")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from snapstore import gvisor

    store = open_store(args, create=True)
    runsc = gvisor.runsc_from_args(args.runsc, args.runsc_arg)
    r = gvisor.checkpoint(store, runsc, args.container, args.tag, parse_labels(args.label),
                          leave_running=args.leave_running)
    if args.json:
        print_json({"snapshot": r.snapshot.hex, "tag": args.tag, "seconds": round(r.seconds, 3),
                    "logical_bytes": r.logical_bytes, "new_stored_bytes": r.new_stored_bytes})
    else:
        print(f"checkpointed {args.container} as {args.tag} in {r.seconds:.2f}s",
              file=sys.stderr)
        print(r.snapshot.hex)
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from snapstore import gvisor

    store = open_store(args)
    warn_damaged_tags(store)
    hits = gvisor.find(store, parse_labels(args.label))
    if args.json:
        print_json([{"id": f.snapshot.hex, "tags": list(f.tags), "created": f.manifest.created,
                     "labels": f.manifest.labels} for f in hits])
        return 0
    for f in hits:
        labels = " ".join(f"{k}={v}" for k, v in sorted(f.manifest.labels.items()))
        print(f"{f.snapshot.short()}  {f.manifest.created}  {','.join(f.tags)}  {labels}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from snapstore import gvisor

    store = open_store(args, create=True)
    runsc = gvisor.runsc_from_args(args.runsc, args.runsc_arg)
    r = gvisor.restore(store, runsc, args.container, args.bundle, args.ref,
                       parse_labels(args.match or []), remote=args.remote,
                       fallback=not args.no_fallback)
    if args.json:
        print_json({k: getattr(r, k) for k in r.__slots__})
    elif r.path == "restore":
        print(f"restored {args.container} from snapshot {r.snapshot and r.snapshot[:12]} "
              f"({r.source}) in {r.seconds:.2f}s", file=sys.stderr)
    else:
        print(f"started {args.container} cold in {r.seconds:.2f}s: {r.reason}", file=sys.stderr)
    if r.mount_left:
        print(f"snapstore: warning: the image is still in use; left mounted at {r.mount_left}",
              file=sys.stderr)
    return 0
