"""The built-in example (`make demo`): store a real runsc checkpoint, a CRIU checkpoint
and a memory image.

It checkpoints a busybox container with runsc, stores the checkpoint, restores the
container with runsc from a lazy FUSE mount of it; checkpoints a counting process with
CRIU and restores it with snapstore as CRIU's lazy-pages daemon; generates a memory-like image
and an edited copy, ingests them, shows what was stored and how much deduplicated,
exports everything back and checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import filecmp
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from examples import workloads
from snapstore.cli import main as cli
from snapstore.gvisor.runsc import Runsc, new_container_id
from snapstore.transcode import memory_of

PAGE = 4096
PR_SET_CHILD_SUBREAPER = 36
# Counts into a file, once per 0.1 s; no terminal, no child (a dumped child killed with its
# parent would stay a zombie under an init that does not reap, holding its pid), nothing
# open but /dev/null: CRIU dumps it.
COUNTER = """
import os, sys, time
i = 0
while True:
    i += 1
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(i))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.1)
"""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(store: Path, *args: str) -> str:
    """Run a snapstore command as a user would; what it printed on stdout."""
    print(f"$ snapstore {' '.join(args)}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["--store", str(store), *args])
    print(out.getvalue(), end="", flush=True)
    if code != 0:
        raise SystemExit(f"demo: `snapstore {' '.join(args)}` exited {code}")
    return out.getvalue()


def wait_count_above(path: Path, value: int) -> int:
    deadline = time.monotonic() + 30
    while not path.exists() or int(path.read_text() or 0) <= value:
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the counter in {path} did not pass {value}")
        time.sleep(0.05)
    return int(path.read_text())


def criu_round_trip(store: Path, work: Path) -> None:
    step("checkpoint a counting process with CRIU, restore it from the store")
    counter = work / "criu-counter"
    proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(counter)],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_count_above(counter, 5)
    run(store, "checkpoint", "--pid", str(proc.pid), "--tag", "counter",
        "--label", "kind=criu")
    proc.wait()
    stopped = int(counter.read_text())
    # The restored shell is left to the nearest subreaper: this process, which reaps it.
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = int(run(store, "restore", "--from", "counter").split()[-1])
    try:
        print(f"counter stopped at {stopped}; restored as pid {pid}, it went on to "
              f"{wait_count_above(counter, stopped + 5)}")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    for name in cmp.common_files:
        if not filecmp.cmp(a / name, b / name, shallow=False):
            return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def demo(work: Path, image_mib: int) -> None:
    store = work / "store"
    step("checkpoint a busybox container that counts, with runsc")
    ckpt = workloads.checkpoint_busybox(work / "busybox")
    print(f"checkpoint.img: {(ckpt.image_dir / 'checkpoint.img').stat().st_size} bytes, "
          f"counter stopped at {ckpt.counter}")
    run(store, "ingest", str(ckpt.image_dir), "--tag", "busybox-counter",
        "--label", "kind=runsc")
    run(store, "ingest", "--exact", str(ckpt.image_dir), "--tag", "busybox-counter-exact",
        "--label", "kind=runsc")

    step("restore the counter with runsc straight from a lazy mount of the snapshot")
    with Runsc.private(parent=work) as rs:
        cid = new_container_id("demo")
        run(store, "restore", cid, "--from", "busybox-counter", "--bundle", str(ckpt.bundle),
            f"--runsc-arg=--root={rs.root}", "--no-fallback")
        deadline = time.monotonic() + 30
        while workloads.read_counter(ckpt.bundle) <= ckpt.counter + 5:
            if time.monotonic() > deadline:
                raise SystemExit("demo: the restored counter did not move")
            time.sleep(0.1)
        print(f"counter stopped at {ckpt.counter}; restored, it went on to "
              f"{workloads.read_counter(ckpt.bundle)}")
        rs.destroy(cid)

    criu_round_trip(store, work)

    step(f"generate a {image_mib} MiB memory-like image and an edited copy")
    mem1, mem2 = work / "memory-1", work / "memory-2"
    mem1.mkdir()
    mem2.mkdir()
    workloads.memory_image(mem1 / "pages.img", image_mib << 20, seed=1)
    with (mem1 / "pages.img").open("rb") as src, (mem2 / "pages.img").open("wb") as dst:
        dst.write(os.urandom(PAGE))
        shutil.copyfileobj(src, dst, 16 << 20)
        dst.seek(dst.tell() // 2)
        dst.write(os.urandom(1 << 20))
    run(store, "ingest", str(mem1), "--tag", "memory-v1", "--label", "kind=memory")
    run(store, "ingest", str(mem2), "--tag", "memory-v2", "--label", "kind=memory")

    step("what the store holds")
    run(store, "list")
    run(store, "show", "memory-v2")
    run(store, "stats")

    step("export everything back and compare")
    for tag, original in (("busybox-counter-exact", ckpt.image_dir), ("memory-v1", mem1),
                          ("memory-v2", mem2)):
        out = work / f"export-{tag}"
        run(store, "export", tag, str(out))
        if not same_tree(original, out):
            raise SystemExit(f"demo: export of {tag} differs from its source")
        print(f"{tag}: byte-identical")
    out = work / "export-busybox-counter"
    run(store, "export", "busybox-counter", str(out))
    if memory_of(out / "checkpoint.img") != memory_of(ckpt.image_dir / "checkpoint.img"):
        raise SystemExit("demo: the transcoded statefile does not hold the same memory")
    print("busybox-counter: transcoded statefile, same header and memory as the original")
    run(store, "verify")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    ap.add_argument("--image-mib", type=int, default=512)
    args = ap.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
        demo(args.workdir, args.image_mib)
        return
    with tempfile.TemporaryDirectory(prefix="snapstore-demo-") as tmp:
        demo(Path(tmp), args.image_mib)


if __name__ == "__main__":
    main()
