"""The built-in example (`make demo`): store a real runsc checkpoint and a memory image.

It checkpoints a busybox container with runsc, stores the checkpoint, restores the
container with runsc from a lazy FUSE mount of it, generates a memory-like image and an
edited copy, ingests them, shows what was stored and how much deduplicated, exports
everything back and checks it.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from snapstore import examples
from snapstore.cli import main as cli
from snapstore.runsc import Runsc, new_container_id
from snapstore.statefile import memory_of

PAGE = 4096


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(store: Path, *args: str) -> None:
    print(f"$ snapstore {' '.join(args)}", flush=True)
    code = cli(["--store", str(store), *args])
    sys.stdout.flush()
    if code != 0:
        raise SystemExit(f"demo: `snapstore {' '.join(args)}` exited {code}")


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
    ckpt = examples.checkpoint_busybox(work / "busybox")
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
        while examples.read_counter(ckpt.bundle) <= ckpt.counter + 5:
            if time.monotonic() > deadline:
                raise SystemExit("demo: the restored counter did not move")
            time.sleep(0.1)
        print(f"counter stopped at {ckpt.counter}; restored, it went on to "
              f"{examples.read_counter(ckpt.bundle)}")
        rs.destroy(cid)

    step(f"generate a {image_mib} MiB memory-like image and an edited copy")
    mem1, mem2 = work / "memory-1", work / "memory-2"
    mem1.mkdir()
    mem2.mkdir()
    examples.memory_image(mem1 / "pages.img", image_mib << 20, seed=1)
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
