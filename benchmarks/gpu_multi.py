"""Checkpoint and restore of models that span two GPUs, in both forms a model server takes,
against one GPU's share of the same model alone; in one run.

A decoder-only transformer (hidden 4096, 32 heads, MLP 4x, vocabulary 32768, bf16; its
weights drawn from seeded generators, nothing downloaded) is run three ways:

- pipeline: one process, the first half of the layers on cuda:0 and the second on cuda:1,
  the activations passed through host memory (a peer copy would leave the process
  unrestorable: docs/criu.md);
- job: the same layers tensor-parallel over two ranks, one process per GPU, under one
  launcher process: each rank holds half of every layer's heads and MLP columns and the
  partial sums meet in NCCL all-reduces. The ranks start with the environment the
  checkpoint needs (NCCL's network transport only, torch's TCPStore without libuv);
- share: one process holding one GPU's share of either (half the layers on cuda:0), the
  baseline for "a job restores as fast as one of its GPUs".

Each is checkpointed with `snapstore checkpoint --pid ROOT --tag T` and restored with
`snapstore restore --from T` (the defaults: lazy, snapstore as CRIU's lazy-pages daemon),
the page cache dropped before each restore (cold) or the store's chunk files read into it
(warm). A restore is timed from the command's start to its return (every process running
with its GPU state back and all its memory in) and to the next token. The restored
processes must then generate the tokens their originals predicted for themselves before
the checkpoint (greedy, 16 tokens), and hold the same weights (every parameter's sum) and
token ids.

    python -m benchmarks.gpu_multi --workdir /var/tmp/gm [--layers 40] [--out r.json]

Needs two CUDA GPUs with the driver's checkpoint API, torch, CRIU >= 4, root
(benchmarks/gpu_kit.sh carries what a GPU host lacks).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import drop_caches, gb, median, table
from benchmarks.gpu_restore import (
    PR_SET_CHILD_SUBREAPER,
    SERVE,
    STAGES,
    log,
    read_all,
    request,
    restore_snapstore,
)
from benchmarks.gpu_restore import checkpoint as checkpoint_model
from snapstore.criu.preflight import NCCL_CHECKPOINTABLE
from snapstore.gpu.cuda import open_api
from snapstore.proctree import below, signal_tree

MORE_TOKENS = 15
# The ranks' TCPStore without libuv: libuv holds an io_uring instance, which CRIU cannot dump.
JOB_ENV = {**NCCL_CHECKPOINTABLE, "USE_LIBUV": "0"}

# argv: form name dir layers hidden heads vocab prompt. Form: pipeline, share or rank
# (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment). On SIGUSR1 it reads a
# token count from DIR/NAME.request, generates that many tokens greedily after all it has
# generated so far and (rank 0 or a lone process) writes them to DIR/NAME.answer; for a
# count of 0 its state instead: every parameter's sum and its token ids.
CHILD = r"""
import json, math, os, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
form, name, d = sys.argv[1:4]
layers, hidden, heads, vocab, prompt = map(int, sys.argv[4:9])
rank = int(os.environ.get("RANK", "0"))
log = os.open(f"{d}/{name}.{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(log)
import torch
import torch.nn.functional as F

torch.set_grad_enabled(False)
dist = None
if form == "rank":
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
world = dist.get_world_size() if dist else 1
head_dim = hidden // heads

def randn(shape, seed, dev, scale):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16) * scale

def block(i, dev):
    # Layer i's full weights, drawn the same way in every form; a rank keeps its slice.
    s = 1 / math.sqrt(hidden)
    w = {k: randn(shape, 1000 * i + n, dev, s) for n, (k, shape) in enumerate([
        ("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
        ("o", (hidden, hidden)), ("up", (hidden, 4 * hidden)), ("down", (4 * hidden, hidden))])}
    if form == "rank":
        cols = slice(rank * hidden // world, (rank + 1) * hidden // world)
        mlp = slice(rank * 4 * hidden // world, (rank + 1) * 4 * hidden // world)
        # Copies: a slice of rows would be a view keeping the whole matrix alive.
        w = {"q": w["q"][:, cols], "k": w["k"][:, cols], "v": w["v"][:, cols],
             "o": w["o"][cols, :], "up": w["up"][:, mlp], "down": w["down"][mlp, :]}
        w = {k: t.clone() for k, t in w.items()}
    return w

def reduce(x):
    if dist:
        dist.all_reduce(x)
    return x

def run_block(w, x):
    n = x.shape[1]
    h = F.rms_norm(x, (hidden,))
    q, k, v = (h @ w[c] for c in "qkv")
    q, k, v = (t.view(1, n, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + reduce(a.transpose(1, 2).reshape(1, n, -1) @ w["o"])
    h = F.rms_norm(x, (hidden,))
    return x + reduce(F.gelu(h @ w["up"]) @ w["down"])

if form == "pipeline":
    devs = ["cuda:0"] * (layers // 2) + ["cuda:1"] * (layers - layers // 2)
elif form == "share":
    devs = ["cuda:0"] * (layers // 2)
else:
    devs = [f"cuda:{rank}"] * layers
first, last = devs[0], devs[-1]
embed = randn((vocab, hidden), 1, first, 1.0)
head = randn((hidden, vocab), 2, last, 1 / math.sqrt(hidden))
blocks = [block(i, dev) for i, dev in enumerate(devs)]
params = [embed, head] + [t for b in blocks for t in b.values()]

def next_token(ids):
    x = embed[ids.to(first)]
    for w, dev in zip(blocks, devs):
        if x.device != torch.device(dev):
            x = x.cpu().to(dev)  # through host memory, never a peer copy
        x = run_block(w, x)
    token = (F.rms_norm(x[:, -1], (hidden,)) @ head).argmax(-1).view(1, 1)
    if dist:
        dist.broadcast(token, 0)
    return token.cpu()

def generate(ids, n):
    for _ in range(n):
        ids = torch.cat([ids, next_token(ids)], dim=1)
    return ids

ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(3))
predicted = [generate(generate(ids.clone(), 1), 15)[0, prompt:].tolist() for _ in range(2)]
answer_path, request_path = f"{d}/{name}.answer", f"{d}/{name}.request"

def answer(doc):
    if rank == 0:
        with open(answer_path + ".tmp", "w") as f:
            json.dump(doc, f)
        os.rename(answer_path + ".tmp", answer_path)

def state():
    return {"weights": [float(p.float().sum()) for p in params], "ids": ids[0].tolist()}

torch.cuda.synchronize()
answer({"pid": os.getpid(), "params": sum(p.numel() for p in params) * world,
        "gpu_bytes": [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())],
        "predicted": predicted[0], "self_consistent": predicted[0] == predicted[1],
        **state()})
""" + SERVE

# Starts the ranks of a two-GPU job and waits for them.
LAUNCHER = r"""
import os, subprocess, sys
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[1], "rank", *sys.argv[2:]],
                          env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) for r in range(2)]
for p in procs:
    p.wait()
"""


class Workload:
    """One form of the model: its root process (the launcher, for the job), started in a
    session of its own with no terminal and its streams on /dev/null."""

    def __init__(self, work: Path, form: str, args: argparse.Namespace) -> None:
        self.name, self.work = form, work
        self.answer, self.request = work / f"{form}.answer", work / f"{form}.request"
        shape = [str(v) for v in (args.layers, args.hidden, args.heads, args.vocab,
                                  args.prompt)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if form == "job":
            env.update(JOB_ENV, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(20000 + os.getpid() % 20000))
            cmd = [sys.executable, "-c", LAUNCHER, CHILD, form, str(work), *shape]
        else:
            cmd = [sys.executable, "-c", CHILD, form, form, str(work), *shape]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        self.pid = self.proc.pid
        self.ready: dict[str, Any] = {}
        self.pids: list[int] = []

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answer.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                logs = "".join(p.read_text(errors="replace")[-2000:]
                               for p in self.work.glob(f"{self.name}.*.log"))
                raise RuntimeError(f"{self.name} did not start:\n{logs}")
            time.sleep(0.1)
        self.ready = json.loads(self.answer.read_text())
        self.pids = [self.pid, *below(self.pid)]

    def ask(self, root: int, n: int, timeout: float = 300) -> dict[str, Any]:
        """Have the restored tree at `root` generate `n` tokens (0: report its state).
        Every process of the form gets the request: the ranks of a job work together."""
        # A job's launcher is no model process: it would die of the signal.
        return request(self.request, self.answer,
                       below(root) if self.name == "job" else [root], n, timeout)


def end(pids: list[int]) -> None:
    """Kill these processes and reap them (this process is their subreaper): their pids
    are free for the next restore."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.01)


def restore_once(store: Path, w: Workload, warm: bool) -> dict[str, Any]:
    drop_caches()
    if warm:
        read_all(store / "chunks")
    start = time.perf_counter()
    try:
        root, stages, daemon = restore_snapstore(store, w.name, lazy=True)
        running = time.perf_counter() - start
        tokens = w.ask(root, 1)["tokens"]
        first_token = time.perf_counter() - start
        tokens += w.ask(root, MORE_TOKENS)["tokens"]
        state = w.ask(root, 0)
    except Exception as e:
        signal_tree(w.pid, signal.SIGKILL)
        end(w.pids)
        return {"error": str(e)}
    end([root, *below(root)])
    return {"running": running, "first_token": first_token, "stages": stages,
            "daemon": daemon, "pids_equal": root == w.pid,
            "tokens_equal": tokens == w.ready["predicted"],
            "weights_equal": state["weights"] == w.ready["weights"],
            "ids_equal": state["ids"][:len(w.ready["ids"])] == w.ready["ids"]}


def fill_rate(nbytes: int, threads: int) -> tuple[float, float]:
    """GB/s of `threads` threads writing `nbytes` of fresh anonymous memory, the first
    time and the second: what filling a restored process's memory costs this machine at
    best (a virtual machine's memory may be backed only when first touched)."""
    buf = mmap.mmap(-1, nbytes)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    part = nbytes // threads

    def touch(i: int) -> None:
        ctypes.memset(base + i * part, i + 1, part)  # without the GIL

    rates = []
    for _ in range(2):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(touch, range(threads)))
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    buf.close()
    return rates[0], rates[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, default=40, help="layers of the whole model")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1, help="restores of each form, warm and cold")
    ap.add_argument("--forms", default="share,pipeline,job")
    args = ap.parse_args()
    forms = args.forms.split(",")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    info = open_api().describe()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store"
    res: dict[str, Any] = {"gpu": info.to_json() if info else None, "config": {
        k: v for k, v in vars(args).items() if k not in ("workdir", "out")}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))

    threads = min(32, os.cpu_count() or 2)  # as many as the lazy-pages daemon runs
    first, again = fill_rate(16 << 30, threads)
    res["fill_gbps"] = {"first_touch": first, "again": again, "threads": threads}
    log(f"filling 16 GiB of fresh memory with {threads} threads: {first:.2f} GB/s the "
        f"first time, {again:.2f} GB/s the second")
    loads = {form: Workload(work, form, args) for form in forms}
    for w in loads.values():
        w.wait_ready(900)
        res[w.name] = {"params": w.ready["params"], "gpu_bytes": w.ready["gpu_bytes"],
                       "self_consistent": w.ready["self_consistent"]}
        log(f"{w.name}: {w.ready['params'] / 1e9:.2f} B parameters, on the GPUs "
            f"{[gb(b) for b in w.ready['gpu_bytes']]}, pids {w.pids}")
    for w in loads.values():
        ck = checkpoint_model(store, w.proc, w.name)
        end(w.pids[1:])
        res[w.name]["checkpoint"] = ck
        log(f"checkpoint {w.name}: {ck['wall_seconds']:.1f} s, {gb(ck['logical_bytes'])} "
            f"image, {gb(ck['new_stored_bytes'])} stored")
        save()
    for _ in range(args.runs):
        for warm in (True, False):
            for w in loads.values():
                r = restore_once(store, w, warm)
                res[w.name].setdefault("warm" if warm else "cold", []).append(r)
                log(f"{w.name} {'warm' if warm else 'cold'}: {r}")
                save()

    rows = []
    for cache in ("warm", "cold"):
        base = [r["running"] for r in res.get("share", {}).get(cache, []) if "error" not in r]
        for form in forms:
            runs = [r for r in res[form].get(cache, []) if "error" not in r]
            if not runs:
                rows.append([form, cache, "failed", "", "", "", ""])
                continue
            running = median([r["running"] for r in runs])
            rows.append([
                form, cache, f"{running:.2f}",
                f"{median([r['first_token'] for r in runs]):.2f}",
                f"{running / median(base):.2f}x" if base else "",
                " ".join(f"{k} {v:.2f}" for k, v in runs[0]["stages"].items() if k in STAGES),
                "yes" if all(r["tokens_equal"] and r["weights_equal"] and r["ids_equal"]
                             and r["pids_equal"] for r in runs) else "NO"])
    print(table(["form", "cache", "restore to running (s)", "to next token (s)",
                 "vs one GPU's share", "stages (s)", "tokens, weights, ids intact"], rows))
    images = {f: gb(res[f]["checkpoint"]["logical_bytes"]) for f in forms}
    print(f"images: {images}; fresh memory filled at {first:.2f} GB/s ({again:.2f} GB/s "
          f"touched again) by {threads} threads")
    save()
    ok = all("error" not in r and r["tokens_equal"] and r["weights_equal"]
             for form in forms for cache in ("warm", "cold") for r in res[form].get(cache, []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
