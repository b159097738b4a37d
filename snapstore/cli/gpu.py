"""The `gpu-dump` and `gpu-load` subcommands."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from rich.filesize import decimal as human

from snapstore.cli.common import (
    Commands,
    add_command,
    open_store,
    print_json,
)
from snapstore.errors import SnapstoreError
from snapstore.uffd.page_loader import LoaderNotBuiltError

# The dump and load modules (numpy, the CUDA bindings) are imported by the handlers, so
# that other commands start without them.
_FATES = {"stop": "left stopped (kill -CONT resumes it)", "run": "resumed", "kill": "killed"}


def add_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "gpu-dump", cmd_gpu_dump,
        help="write a process's memory, GPU memory included, as a dump directory (memory "
             "only, to measure loading; `checkpoint --pid` checkpoints the process)",
        description="Checkpoint the CUDA state of process PID into its host memory, stop it, "
        "write its private memory to OUTDIR (segment files pages-NNNN.img + dump.json), then "
        "restore its CUDA state. By default the process is left stopped (SIGCONT resumes it).",
        json_output=True)
    p.add_argument("pid", type=int, metavar="PID")
    p.add_argument("outdir", type=Path, metavar="OUTDIR")
    after = p.add_mutually_exclusive_group()
    after.add_argument("--leave-running", dest="after", action="store_const", const="run",
                       help="resume the process after the dump")
    after.add_argument("--kill", dest="after", action="store_const", const="kill",
                       help="kill the process after the dump")
    p.add_argument("--threads", type=int, help="reader threads (default: cores, at most 16)")
    p.add_argument("--segment-mib", type=int,
                   help="size of each segment file (default 256); threads write several at once")
    p.add_argument("--lock-timeout-ms", type=int, default=10_000,
                   help="how long the CUDA lock waits for running GPU work")
    p.set_defaults(after="stop")

    p = add_command(
        sub, "gpu-load", cmd_gpu_load,
        help="fill fresh memory from a GPU dump through the uffd loader, checked (a stand-in "
             "process; `restore` brings a checkpointed process back)",
        description="Load REF (a snapshot of a gpu-dump directory, or the directory itself) "
        "into a fresh process's memory through the uffd loader and check every byte; with "
        "--socket, serve an outside client instead.",
        json_output=True)
    p.add_argument("ref", metavar="REF")
    p.add_argument("--socket", type=Path,
                   help="serve an outside client on this Unix socket (runs until it leaves)")
    p.add_argument("--workdir", type=Path,
                   help="where the loader's socket and statistics go (default: a temporary "
                   "directory, removed afterwards)")
    p.add_argument("--no-verify", action="store_true", help="skip the byte check")
    p.add_argument("--direct-io", action="store_true",
                   help="prefetch a dump directory with O_DIRECT only (default: O_DIRECT "
                   "where its pages are not cached)")


def cmd_gpu_dump(args: argparse.Namespace) -> int:
    from snapstore.gpu.dump import SEGMENT, After, dump_process

    r = dump_process(args.pid, args.outdir, after=After(args.after), threads=args.threads,
                     lock_timeout_ms=args.lock_timeout_ms,
                     segment_size=args.segment_mib << 20 if args.segment_mib else SEGMENT,
                     log=lambda line: print(line, file=sys.stderr))
    if args.json:
        print_json({"directory": str(r.directory), "regions": r.regions, "bytes": r.bytes,
                    "data_bytes": r.data_bytes, "cuda": r.cuda, "note": r.note,
                    "seconds": {k: round(v, 4) for k, v in r.seconds.items()}})
        return 0
    if r.note:
        print(r.note, file=sys.stderr)
    write = r.seconds.get("write", 0.0)
    rate = r.data_bytes / write if write else 0.0
    print(f"dumped {r.regions} regions, {human(r.bytes)} ({human(r.data_bytes)} data) in "
          f"{r.seconds['total']:.2f}s, memory written at {human(int(rate))}/s; process "
          f"{args.pid} {_FATES[args.after]}", file=sys.stderr)
    print(r.directory)
    return 0


def cmd_gpu_load(args: argparse.Namespace) -> int:
    from snapstore.gpu.dump import TABLE_FILE, read_dump
    from snapstore.gpu.load_dump import (
        load,
        load_snapshot,
        open_snapshot,
        process_start,
        serve,
        serve_snapshot,
        start_snapshot_client,
    )

    started = process_start()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="snapstore-gpu-load-")) if own_workdir \
        else args.workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if (Path(args.ref) / TABLE_FILE).is_file():
            dump = read_dump(Path(args.ref))
            if args.socket is not None:
                print(f"serving {dump.directory} on {args.socket}; regions in "
                      f"{dump.directory / TABLE_FILE}", file=sys.stderr)
                return _status(serve(dump, workdir, args.socket, direct=args.direct_io))
            r = load(dump, workdir, verify=not args.no_verify, direct=args.direct_io,
                     started=started)
        elif args.socket is not None:
            store = open_store(args)
            _, layout = open_snapshot(store, store.get_manifest(store.resolve(args.ref)))
            print(f"serving {args.ref} on {args.socket}; regions in its {TABLE_FILE}",
                  file=sys.stderr)
            return _status(serve_snapshot(store, layout, args.socket, []))
        else:
            store = open_store(args)
            mid = store.resolve(args.ref)
            client = start_snapshot_client(store.root, mid.hex, workdir, not args.no_verify)
            try:
                dump, layout = open_snapshot(store, store.get_manifest(mid))
            except BaseException:
                client.kill()
                client.wait()
                raise
            r = load_snapshot(store, mid, dump, layout, workdir, verify=not args.no_verify,
                              started=started, client=client)
    except LoaderNotBuiltError as err:
        raise SnapstoreError(str(err)) from None
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print_json({"bytes": r.bytes, "data_bytes": r.data_bytes, "mappings": r.mappings,
                    "end_to_end_seconds": round(r.end_to_end, 4),
                    "stages": {k: round(v, 4) for k, v in r.stages.items()},
                    "load_seconds": round(r.load_seconds, 4), "verified": r.verified,
                    "loader": r.loader_stats})
        return 0
    rate = r.bytes / r.end_to_end if r.end_to_end else 0.0
    check = "every byte checked" if r.verified else "not checked"
    print(f"loaded {human(r.bytes)} ({human(r.data_bytes)} data) into {r.mappings} mappings "
          f"in {r.end_to_end:.2f}s end to end ({human(int(rate))}/s), {check}; "
          + ", ".join(f"{k} {v:.3f}s" for k, v in r.stages.items()), file=sys.stderr)
    return 0


def _status(status: int) -> int:
    # The loader's convention is the CLI's (0 ok, 1 failure, 2 usage); a signal is a failure.
    return status if status in (0, 1, 2) else 1
