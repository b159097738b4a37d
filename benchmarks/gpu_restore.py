"""Restore of a GPU model process checkpointed with CRIU: upstream `criu restore` from a
plain image directory followed by the CUDA restore, against `snapstore restore` from the
store, eager and lazy, in one run; and what a second process of the same model adds.

Two processes build the same Qwen2-architecture model from a config with seed 0 (nothing
is downloaded; the default shapes are Qwen3-8B's: 36 layers, hidden 4096, intermediate
12288, vocabulary 151936, 8.2 B parameters, 16.4 GB in bf16 on the GPU) and generate
greedily from one seeded prompt. Process A is checkpointed into the store (`snapstore
checkpoint`: CUDA Lock and Checkpoint, `criu dump`, ingest); the snapshot is exported to a
plain directory; then A is restored three ways, the page cache dropped before each, the
restored process killed and reaped after each (this process is the subreaper, so A's pid
is free again):

- upstream: `criu restore -D PLAIN -d`, then CUDA Restore and Unlock through
  snapstore.gpu.cuda, as a script driving CRIU would;
- `snapstore restore --from T --eager` (CRIU reads every page through a mount);
- `snapstore restore --from T` (lazy, the default: snapstore is CRIU's lazy-pages daemon,
  reading the pages from the store; CRIU reads the rest from a staged directory).

Each is timed from the start of its command to the process running with its GPU state back
(the command's return; for the lazy restore, also all its memory in), and to its next token
(the answer to a one-token request). Beside the times: the cores the machine kept busy
meanwhile (/proc/stat), and for a lazy restore its daemon's figures (`restore --json`): the
fill rate from the tasks' resuming to the last page in, the demand faults, how long event
reads waited for copies in flight, and the copy processes' shares of their time during the
fill: reading chunks, installing pages, waiting for their next range. The stages end with
the command's own time ("command"); the rest of the time to running is the command's
start-up (the interpreter and its imports) and exit. Then 15 more tokens are asked for and
compared with the reference: what A itself generated from a copy of its state before the
checkpoint (the same two calls on a copy of its token ids), twice, the same both times. The
restored process must also hold exactly the state A had: every parameter's sum and the
token ids. The tokens alone do not prove it either way: on the H200 two processes of the
8 B model, run side by side with the same weights and prompt, generated different tokens
(process B, started fresh beside A, answers the same two requests; reported, not required).
Last, B is checkpointed into the same store: how much does it add?

Needs a CUDA GPU with the driver's checkpoint API, torch and transformers, CRIU >= 4 and a
FUSE mount; run as root (benchmarks/gpu_kit.sh carries what a GPU host lacks):

    python -m benchmarks.gpu_restore --workdir /var/tmp/gr [--layers 36] [--out r.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import CpuTimes, drop_caches, du, gb, kill_and_reap, snapstore_cmd, table
from snapstore.criu.binary import Criu
from snapstore.criu.images import PAGE_SIZE, read_pagemap
from snapstore.export import export
from snapstore.gpu.cuda import CheckpointApi, open_api
from snapstore.store.local import LocalStore

PR_SET_CHILD_SUBREAPER = 36
# The restored process is asked for one token (its "next token", timed), then this many.
MORE_TOKENS = 15
STAGES = ("find", "stage", "mount", "criu_restore", "cuda_restore", "memory_complete")

# How a model program ends, once ready: it answers requests until it is killed. It needs
# answer(doc), state(), generate(ids, n), ids and request_path. From here on nothing is
# written to the log: CRIU refuses to restore a file whose size changed since the dump,
# and every restore starts from the same image.
SERVE = r"""
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.dup2(null, 2)
os.close(null)
while True:
    signal.sigwait({signal.SIGUSR1})
    try:
        with open(request_path) as f:
            n = int(f.read())
        if n == 0:
            answer(state())
            continue
        start = time.perf_counter()
        ids = generate(ids, n)
        torch.cuda.synchronize()
        answer({"tokens": ids[0, -n:].tolist(), "seconds": time.perf_counter() - start})
    except Exception as e:
        answer({"error": repr(e)})
"""

# argv: answer request log layers hidden intermediate vocab prompt warm more.
# On SIGUSR1 it reads a token count from REQUEST, generates that many tokens greedily after
# all it has generated so far, and writes them as JSON to ANSWER (written whole, renamed);
# for a count of 0 it answers its state instead: every parameter's sum, and its token ids.
CHILD = r"""
import json, os, signal, sys, time
# Requests arrive as SIGUSR1, taken with sigwait in the main thread: blocked before torch
# starts a thread, so that every thread inherits the mask and none runs a handler.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
answer_path, request_path, log_path = sys.argv[1:4]
layers, hidden, inter, vocab, prompt, warm, more = map(int, sys.argv[4:11])
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(log)

def answer(doc):
    with open(answer_path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.rename(answer_path + ".tmp", answer_path)

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=hidden // 128,
                  num_key_value_heads=8, max_position_embeddings=8192,
                  tie_word_embeddings=False)
with torch.device("cuda"):
    model = Qwen2ForCausalLM(cfg).eval()
gen = torch.Generator(device="cuda").manual_seed(1)
ids = torch.randint(0, vocab, (1, prompt), device="cuda", generator=gen)

def generate(ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)

ids = generate(ids, warm)
# The answers to the next two requests, computed as they will be, on a copy of the ids;
# twice, to show the process computes them the same way each time.
predicted = [generate(generate(ids.clone(), 1), more)[0, ids.shape[1]:].tolist()
             for _ in range(2)]

def state():
    with torch.no_grad():
        weights = [float(p.float().sum()) for p in model.parameters()]
    return {"weights": weights, "ids": ids[0].tolist()}

torch.cuda.synchronize()
answer({"pid": os.getpid(), "params": sum(p.numel() for p in model.parameters()),
        "gpu_reserved": torch.cuda.memory_reserved(), "warm": ids[0, prompt:].tolist(),
        "predicted": predicted[0], "self_consistent": predicted[0] == predicted[1],
        **state()})
""" + SERVE


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Model:
    """One model process, started in its own session with no terminal and its standard
    streams on files (CRIU dumps neither a terminal nor a pipe to a process outside)."""

    def __init__(self, work: Path, name: str, args: argparse.Namespace) -> None:
        self.answer = work / f"{name}.answer"
        self.request = work / f"{name}.request"
        self.log = work / f"{name}.log"
        env = dict(os.environ)
        # The model needs nothing of snapstore's: it gets the host's own packages.
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.answer), str(self.request), str(self.log),
             str(args.layers), str(args.hidden), str(args.intermediate), str(args.vocab),
             str(args.prompt), str(args.warm), str(MORE_TOKENS)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=env)
        self.pid = self.proc.pid
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.answer.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
                raise RuntimeError(f"model process {self.pid} did not start:\n{tail}")
            time.sleep(0.1)
        self.ready = json.loads(self.answer.read_text())
        return self.ready

    def ask(self, pid: int, n: int, timeout: float = 300) -> list[int]:
        """Have process `pid` (this model, or a restore of it) generate `n` more tokens."""
        tokens: list[int] = self.request_answer(pid, n, timeout)["tokens"]
        return tokens

    def state(self, pid: int) -> dict[str, Any]:
        """Every parameter's sum and the token ids, as process `pid` holds them now."""
        return self.request_answer(pid, 0, 300)

    def request_answer(self, pid: int, n: int, timeout: float) -> dict[str, Any]:
        return request(self.request, self.answer, [pid], n, timeout)


def request(request_path: Path, answer_path: Path, pids: list[int], n: int,
            timeout: float) -> dict[str, Any]:
    """Write request `n`, signal `pids` (SIGUSR1) and wait for their answer."""
    answer_path.unlink(missing_ok=True)
    request_path.write_text(str(n))
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not answer_path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pids[0]} did not answer")
        time.sleep(0.001)
    doc: dict[str, Any] = json.loads(answer_path.read_text())
    if "error" in doc:
        raise RuntimeError(f"pid {pids[0]} failed to answer: {doc['error']}")
    return doc



def checkpoint(store: Path, root: subprocess.Popen[bytes], tag: str) -> dict[str, Any]:
    """`snapstore checkpoint` of the tree at `root`, a child of this process."""
    start = time.perf_counter()
    proc = subprocess.run(snapstore_cmd(store, "checkpoint", "--pid", str(root.pid), "--tag",
                                        tag, "--json"),
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint of pid {root.pid} failed: {proc.stderr.strip()}")
    root.wait(timeout=60)  # CRIU killed it after the dump: reap it, its pid is free
    doc: dict[str, Any] = json.loads(proc.stdout)
    doc["wall_seconds"] = seconds
    return doc


def lazy_bytes(images: Path) -> int:
    """Bytes of the pages CRIU leaves to a lazy-pages daemon (private anonymous memory)."""
    return sum(x.nr_pages * PAGE_SIZE for p in images.glob("pagemap-*.img")
               for x in read_pagemap(p).lazy_extents())


def read_all(root: Path) -> None:
    """Read every file under `root` into the page cache (16 at a time)."""
    def read(path: str) -> None:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass

    paths = [os.path.join(d, name) for d, _, names in os.walk(root) for name in names]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(read, paths))


def restore_upstream(criu: Criu, plain: Path, work: Path, api: CheckpointApi) -> int:
    """`criu restore -d` from the plain directory, then the CUDA restore."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    pid = criu.restore(plain, work)
    api.restore(pid)
    api.unlock(pid)
    return pid


def restore_snapstore(store: Path, tag: str, lazy: bool,
                      ) -> tuple[int, dict[str, float], dict[str, Any] | None]:
    """The restored pid, the command's stages (and its own time, from its start-up's end
    to its return, as "command") and its lazy-pages daemon's figures."""
    cmd = snapstore_cmd(store, "restore", "--from", tag, "--json") + ([] if lazy else ["--eager"])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-1500:]}")
    doc = json.loads(proc.stdout)
    stages: dict[str, float] = doc["stages"]
    # In the order they ran (the JSON's keys are sorted).
    return (int(doc["pid"]), {**{k: stages[k] for k in STAGES if k in stages},
                              "command": doc["seconds"]}, doc.get("lazy"))


def daemon_figures(d: dict[str, Any] | None) -> str:
    """The lazy-pages daemon's fill rate (from the tasks' resuming to the last page in),
    its demand faults and the seconds its event reads waited for copies."""
    if not d or not d.get("fill_seconds"):
        return ""
    rate = (d["prefetched_bytes"] + d["fault_bytes"]) / d["fill_seconds"] / 1e9
    text = f"{rate:.2f} GB/s, {d['faults']} faults, waits {d['event_wait_seconds']:.2f} s"
    if d.get("copiers"):
        # Where the copy processes' time went, as a share of their time during the fill.
        whole = d["copiers"] * d["fill_seconds"]
        text += "; copiers: " + ", ".join(
            f"{name} {d[key] / whole:.0%}" for name, key in (
                ("read", "copy_read_seconds"), ("install", "copy_install_seconds"),
                ("wait", "copy_wait_seconds")))
        # Their reading time in core-seconds: what a change to the chunk path moves, and
        # less noisy than the time to running (RESULTS.md, runs 20 to 24).
        text += f"; read {d['copy_read_seconds']:.1f} core-s"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--warm", type=int, default=32, help="tokens generated before the checkpoint")
    ap.add_argument("--runs", type=int, default=1, help="restores of each kind")
    ap.add_argument("--cases", default="upstream,eager,lazy",
                    help="which restores, in the order of each round; lazy-cached is lazy "
                         "with the store's chunk files read into the page cache first")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if not set(cases) <= {"upstream", "eager", "lazy", "lazy-cached"}:
        ap.error("--cases: a list of upstream, eager, lazy, lazy-cached")

    libc = ctypes.CDLL(None, use_errno=True)
    # What CRIU restores detached is left to the nearest subreaper: this process, so that
    # it can reap each restored tree and the pid is free for the next restore.
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    api = open_api()
    info = api.describe()
    criu = Criu.find()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store"
    res: dict[str, Any] = {
        "gpu": info.to_json() if info else None, "criu": criu.version,
        "config": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))

    log(f"GPU {info.gpus[0].name if info and info.gpus else '?'}, CRIU {criu.version}; "
        "starting two model processes")
    a, b = Model(work, "a", args), Model(work, "b", args)
    a.wait_ready(900)
    b.wait_ready(900)
    res["params"] = a.ready["params"]
    res["gpu_reserved"] = a.ready["gpu_reserved"]
    log(f"models ready: {a.ready['params'] / 1e9:.2f} B parameters, "
        f"{gb(a.ready['gpu_reserved'])} reserved on the GPU each")
    # The reference is A's own prediction: a fresh process of the same weights need not
    # generate the same tokens (module docstring), while A computed it twice, the same way.
    reference: list[int] = a.ready["predicted"]
    fresh = b.ask(b.pid, 1) + b.ask(b.pid, MORE_TOKENS)
    res["reference"], res["fresh_process_tokens"] = reference, fresh
    res["same_weights"] = a.ready["weights"] == b.ready["weights"]
    res["self_consistent"] = a.ready["self_consistent"]
    res["same_warm_tokens"] = a.ready["warm"] == b.ready["warm"]
    log(f"reference (A's own prediction, self-consistent: {a.ready['self_consistent']}): "
        f"{reference}; fresh process B: {fresh}; same weights {res['same_weights']}, "
        f"same tokens before: {res['same_warm_tokens']}")
    if not a.ready["self_consistent"]:
        log("WARNING: A generated two different continuations of one state: the token "
            "check below means nothing, the timings still do")

    ck_a = checkpoint(store, a.proc, "gpu-a")
    res["checkpoint_a"] = ck_a
    log(f"checkpoint A: {ck_a['wall_seconds']:.1f} s, {gb(ck_a['logical_bytes'])} image, "
        f"{gb(ck_a['new_stored_bytes'])} stored (ingest {ck_a['seconds']:.1f} s)")
    save()
    local = LocalStore.open(store)
    plain = work / "plain"
    start = time.perf_counter()
    export(local, local.get_manifest(local.resolve("gpu-a")), plain)
    res["export_seconds"] = time.perf_counter() - start
    image_bytes = du(plain)
    lazy = lazy_bytes(plain)
    res["image_bytes"], res["lazy_bytes"] = image_bytes, lazy
    log(f"exported to a plain directory in {res['export_seconds']:.1f} s: {gb(image_bytes)}, "
        f"{gb(lazy)} of it private anonymous memory (lazy)")

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    res["restores"] = runs
    for _ in range(args.runs):
        for case in cases:
            drop_caches()
            if case == "lazy-cached":
                read_all(store / "chunks")
            stages: dict[str, float] = {}
            daemon: dict[str, Any] | None = None
            cpu = CpuTimes.now()
            start = time.perf_counter()
            try:
                if case == "upstream":
                    pid = restore_upstream(criu, plain, work / "criu-work", api)
                else:
                    pid, stages, daemon = restore_snapstore(store, "gpu-a", lazy=case != "eager")
                running = time.perf_counter() - start
                busy = CpuTimes.now().since(cpu)
                tokens = a.ask(pid, 1)
                first_token = time.perf_counter() - start
                tokens += a.ask(pid, MORE_TOKENS)
                restored = a.state(pid)
            except Exception as e:
                # One way failing says nothing about the others: record it and go on.
                runs[case].append({"error": str(e)})
                log(f"{case}: FAILED: {e}")
                kill_and_reap(a.pid)
                continue
            finally:
                save()
            kill_and_reap(pid)
            before = a.ready["ids"]
            run = {"running": running, "first_token": first_token, "stages": stages,
                   "daemon": daemon, "cpu": busy,
                   "tokens": tokens, "tokens_equal": tokens == reference and pid == a.pid,
                   # Exact, unlike the tokens: every parameter's sum, and the ids it held.
                   "weights_equal": restored["weights"] == a.ready["weights"],
                   "ids_equal": restored["ids"][:len(before)] == before}
            runs[case].append(run)
            log(f"{case}: running with its GPU state in {running:.2f} s, next token at "
                f"{first_token:.2f} s, stages {stages}, daemon {daemon}, CPU {busy}, "
                f"tokens equal: {run['tokens_equal']}, "
                f"weights equal: {run['weights_equal']}, ids equal: {run['ids_equal']}")
            save()
    shutil.rmtree(plain)

    ck_b = checkpoint(store, b.proc, "gpu-b")
    res["checkpoint_b"] = ck_b
    added = ck_b["new_stored_bytes"] / ck_b["logical_bytes"]
    log(f"checkpoint B: {ck_b['wall_seconds']:.1f} s, {gb(ck_b['logical_bytes'])} image, "
        f"added {gb(ck_b['new_stored_bytes'])} = {added:.1%} of it")
    save()

    print(f"GPU: {info.gpus[0].name if info and info.gpus else '?'} (driver "
          f"{info.driver_version if info else '?'}), CRIU {criu.version}; model "
          f"{res['params'] / 1e9:.2f} B parameters, {gb(res['gpu_reserved'])} on the GPU; "
          f"image {gb(image_bytes)} ({gb(lazy)} lazy); page cache dropped before each "
          "restore (lazy-cached: then the store's chunk files read in)")
    done = {case: [r for r in case_runs if "error" not in r] for case, case_runs in runs.items()}
    base = min(r["running"] for r in done["upstream"]) if done.get("upstream") else None
    base_token = min(r["first_token"] for r in done["upstream"]) if base else None
    rows = []
    for case, case_runs in runs.items():
        for r in case_runs:
            if "error" in r:
                rows.append([case, "failed", "", "", "", r["error"][:300], "", "", "", ""])
                continue
            rows.append([
                case, f"{r['running']:.2f}", f"{r['first_token']:.2f}",
                f"{base / r['running']:.2f}x" if base else "",
                f"{base_token / r['first_token']:.2f}x" if base_token else "",
                " ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()),
                daemon_figures(r.get("daemon")),
                f"{r['cpu']['busy_cores']:.1f} ({r['cpu']['kernel_share']:.0%} kernel)",
                "yes" if r["tokens_equal"] else "NO",
                "yes" if r["weights_equal"] and r["ids_equal"] else "NO"])
    print(table(["restore", "to running, GPU state back (s)", "to next token (s)",
                 "speed vs upstream (running)", "speed vs upstream (token)",
                 "stages (s)", "daemon: fill rate, faults, event waits, copiers' time",
                 f"busy cores (of {os.cpu_count()})",
                 "16 tokens = reference", "weights and ids intact"], rows))
    print(f"checkpoint A {ck_a['wall_seconds']:.1f} s ({gb(ck_a['logical_bytes'])} image, "
          f"{gb(ck_a['new_stored_bytes'])} stored); checkpoint B of the same model added "
          f"{gb(ck_b['new_stored_bytes'])} = {added:.1%} of its "
          f"{gb(ck_b['logical_bytes'])} image; same weights in A and B: "
          f"{res['same_weights']}; the fresh process's 16 tokens = the reference: "
          f"{fresh == reference}")
    save()
    ok = all(r.get("weights_equal") and r.get("ids_equal")
             for case_runs in runs.values() for r in case_runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
