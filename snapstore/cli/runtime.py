"""CLI of the node agent's workflow for both runtimes: `checkpoint`, `find` and `restore`.

A gVisor container is named by its container id (and restored with its OCI bundle); a
CRIU process tree by `--pid` (and restored with neither).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from snapstore.cli.common import (
    Commands,
    add_command,
    open_store,
    parse_labels,
    positive_int,
    print_json,
    warn_damaged_tags,
)
from snapstore.errors import UsageError
from snapstore.store.local import LocalStore

# The runtimes (ingest, the chunker, mounts) are imported by the handlers that use them,
# so that other commands start without them.


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    help = ("checkpoint a running gVisor container (CONTAINER) or a process tree "
            "(--pid, with CRIU, its CUDA state on any number of GPUs with it) into the "
            "store; exit 5 when the tree is set up in a way its checkpoint could not "
            "restore (nothing is done to it)")
    sp = add_command(sub, "checkpoint", cmd_checkpoint, help, json_output=True)
    sp.add_argument("container", nargs="?", help="gVisor container id")
    sp.add_argument("--pid", type=int, help="root of a process tree to checkpoint with CRIU")
    sp.add_argument("--tag", required=True)
    sp.add_argument("--label", action="append", default=[], metavar="K=V")
    sp.add_argument("--leave-running", action="store_true",
                    help="keep the container or process running after the checkpoint")
    _runsc_options(sp)
    _criu_options(sp)

    help = "list snapshots whose labels match, newest first"
    sp = add_command(sub, "find", cmd_find, help, json_output=True)
    sp.add_argument("--label", action="append", default=[], metavar="K=V")

    help = ("restore from the newest matching snapshot: a gVisor container (CONTAINER "
            "--bundle) through a lazy mount, else a CRIU process tree, its memory served by "
            "snapstore; exit 3 when no snapshot matches, 4 when the restore fails")
    sp = add_command(sub, "restore", cmd_restore, help, json_output=True)
    sp.add_argument("container", nargs="?", help="gVisor container id")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--from", dest="ref", metavar="REF", help="tag or snapshot id")
    which.add_argument("--match", action="append", metavar="K=V",
                       help="pick the newest snapshot with these labels")
    sp.add_argument("--bundle", type=Path, help="the gVisor container's OCI bundle")
    sp.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]",
                    help="look there when the local store has no match; mount lazily")
    sp.add_argument("--no-fallback", action="store_true",
                    help="gVisor: fail instead of starting the container cold")
    sp.add_argument("--cold-start", metavar="COMMAND",
                    help="CRIU: when no snapshot matches or the restore fails, start COMMAND "
                         "(split like a shell would, not run by one) instead")
    sp.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                    help="CRIU: restore N copies side by side, each in a pid and network "
                         "namespace of its own")
    sp.add_argument("--eager", action="store_true",
                    help="CRIU: let criu read every page itself through a mount, instead of "
                         "snapstore serving the memory as CRIU's lazy-pages daemon")
    _runsc_options(sp)
    _criu_options(sp)


def _runsc_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--runsc", metavar="PATH", help="runsc binary (default: runsc on PATH)")
    sp.add_argument("--runsc-arg", action="append", default=[], metavar="ARG",
                    help="global runsc flag, e.g. --runsc-arg=--root=/run/runsc (repeatable)")


def _criu_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--criu", metavar="PATH",
                    help="CRIU >= 4 binary (default: $SNAPSTORE_CRIU, `make criu`'s, or PATH)")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    if (args.container is None) == (args.pid is None):
        raise UsageError("give a gVisor CONTAINER or --pid PID, not both or neither")
    store = open_store(args, create=True)
    labels = parse_labels(args.label)
    if args.pid is not None:
        from snapstore.criu import workflow as criu_workflow
        from snapstore.criu.binary import Criu

        r = criu_workflow.checkpoint(store, Criu.find(args.criu), args.pid, args.tag, labels,
                                     leave_running=args.leave_running)
        what = f"pid {args.pid}"
    else:
        from snapstore.gvisor import workflow as gvisor

        runsc = gvisor.runsc_from_args(args.runsc, args.runsc_arg)
        r = gvisor.checkpoint(store, runsc, args.container, args.tag, labels,
                              leave_running=args.leave_running)
        what = args.container
    if args.json:
        print_json({"snapshot": r.snapshot.hex, "tag": args.tag, "seconds": round(r.seconds, 3),
                    "logical_bytes": r.logical_bytes, "new_stored_bytes": r.new_stored_bytes})
    else:
        print(f"checkpointed {what} as {args.tag} in {r.seconds:.2f}s", file=sys.stderr)
        print(r.snapshot.hex)
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from snapstore import workflow

    store = open_store(args)
    warn_damaged_tags(store)
    hits = workflow.find(store, parse_labels(args.label))
    if args.json:
        print_json([{"id": f.snapshot.hex, "tags": list(f.tags), "created": f.manifest.created,
                     "labels": f.manifest.labels} for f in hits])
        return 0
    for f in hits:
        labels = " ".join(f"{k}={v}" for k, v in sorted(f.manifest.labels.items()))
        print(f"{f.snapshot.short()}  {f.manifest.created}  {','.join(f.tags)}  {labels}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.container is None:
        if args.bundle is not None:
            raise UsageError("--bundle restores a gVisor CONTAINER; name the container")
        return _restore_process(args)
    if args.bundle is None:
        raise UsageError("a gVisor restore needs --bundle (the container's OCI bundle)")
    from snapstore.gvisor import workflow as gvisor

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
    _warn_mount_left(r.mount_left)
    return 0


def _restore_process(args: argparse.Namespace) -> int:
    from snapstore.criu import workflow as criu_workflow
    from snapstore.criu.binary import Criu

    store = open_store(args, create=True)
    match = parse_labels(args.match or [])
    if args.replicas > 1:
        if args.cold_start is not None:
            raise UsageError("--cold-start restores one process; not with --replicas")
        return _restore_replicas(args, store, match)
    if args.cold_start is not None:
        try:
            command = shlex.split(args.cold_start)
        except ValueError as e:
            raise UsageError(f"--cold-start: {e}") from None
        if not command:
            raise UsageError("--cold-start needs a command")
        r = criu_workflow.restore_or_start(store, args.criu, args.ref, match, command,
                                           remote=args.remote, lazy=not args.eager)
    else:
        r = criu_workflow.restore(store, Criu.find(args.criu), args.ref, match,
                                  remote=args.remote, lazy=not args.eager)
    if args.json:
        print_json({k: getattr(r, k) for k in r.__slots__})
    elif r.path == "cold":
        print(f"started pid {r.pid} cold in {r.seconds:.2f}s: {r.reason}", file=sys.stderr)
        print(r.pid)
    else:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in r.stages.items())
        print(f"restored pid {r.pid} from snapshot {(r.snapshot or '')[:12]} ({r.source}) "
              f"in {r.seconds:.2f}s: {stages}{_lazy_figures(r.lazy)}", file=sys.stderr)
        print(r.pid)
    _warn_mount_left(r.mount_left)
    return 0


def _lazy_figures(lazy: dict[str, int | float | None] | None) -> str:
    """The end of the text line when the daemon served the pages, e.g.
    `; lazy pages: 21.1 GB in 10.59s (1.99 GB/s), 141 faults`."""
    if not lazy or not lazy["fill_seconds"]:
        return ""
    total = int(lazy["prefetched_bytes"] or 0) + int(lazy["fault_bytes"] or 0)
    fill = float(lazy["fill_seconds"])
    return (f"; lazy pages: {total / 1e9:.1f} GB in {fill:.2f}s ({total / fill / 1e9:.2f} GB/s), "
            f"{lazy['faults']} faults")


def _restore_replicas(args: argparse.Namespace, store: LocalStore,
                      match: dict[str, str]) -> int:
    from snapstore.criu.binary import Criu
    from snapstore.criu.replicas import restore_replicas

    r = restore_replicas(store, Criu.find(args.criu), args.ref, match, args.replicas,
                         remote=args.remote, lazy=not args.eager)
    if args.json:
        print_json({"snapshot": r.snapshot, "source": r.source, "seconds": r.seconds,
                    "stages": r.stages, "mount_left": r.mount_left,
                    "replicas": [{"pid": x.pid, "ns_pid": x.ns_pid, "keeper": x.keeper}
                                 for x in r.replicas]})
    else:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in r.stages.items())
        print(f"restored {len(r.replicas)} replicas of snapshot {r.snapshot[:12]} "
              f"({r.source}) in {r.seconds:.2f}s: {stages}", file=sys.stderr)
        for x in r.replicas:
            print(x.pid)
    _warn_mount_left(r.mount_left)
    return 0


def _warn_mount_left(mount_left: str | None) -> None:
    if mount_left:
        print(f"snapstore: warning: the image is still in use; left mounted at {mount_left}",
              file=sys.stderr)
