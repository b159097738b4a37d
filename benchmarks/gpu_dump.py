"""Benchmark of GPU dumps: dump two model-serving processes, store both, load one back.

Starts two processes that build the same Llama-style model from a config with a fixed seed
(nothing is downloaded) in bf16 on the GPU and run a short generation with different prompts,
so the KV cache is live. Each is dumped with `--leave-running` and asked to check its weights
afterwards; both dumps are ingested into one store (how much does the second add?); the
second is loaded back through the uffd loader from its dump directory and from the store,
every byte checked. With `--two-gpus` the processes run on GPUs 0 and 1, are dumped at the
same time, and both dumps are also loaded back from the store at the same time (a two-process
job restoring). Needs a CUDA GPU, torch and transformers; run as root.

    python benchmarks/gpu_dump.py --workdir DIR [--out FILE.json] [--two-gpus] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import gbps, table
from snapstore.gpu.cuda import open_api
from snapstore.gpu.dump import After, dump_process, read_dump
from snapstore.gpu.load_dump import load, materialize
from snapstore.ingest import ingest
from snapstore.store.local import LocalStore

CHILD = r"""
import json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

hidden, inter, layers, batch, prompt, new, prompt_seed = map(int, sys.argv[1:8])
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=hidden // 128,
                  num_key_value_heads=hidden // 128, max_position_embeddings=4096)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).eval()
gen = torch.Generator(device="cuda").manual_seed(prompt_seed)
ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda", generator=gen)
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
cache = out.past_key_values  # kept alive: the KV cache is part of the process's state

def digest():
    with torch.no_grad():
        w = sum(float(p.float().sum()) for p in model.parameters())
        s = float(out.sequences.float().sum())
    torch.cuda.synchronize()
    return [w, s]

torch.cuda.synchronize()
print(json.dumps({"pid": os.getpid(), "digest": digest(),
                  "params": sum(p.numel() for p in model.parameters()),
                  "reserved": torch.cuda.memory_reserved()}), flush=True)
for line in sys.stdin:
    print(json.dumps({"digest": digest()}), flush=True)
"""


def gpu_used_mib(pid: int) -> int | None:
    """The GPU memory nvidia-smi says `pid` holds."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        p, _, mib = line.partition(",")
        if p.strip() == str(pid):
            return int(mib)
    return 0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_child(
    args: argparse.Namespace, prompt_seed: int, gpu: int | None
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", CHILD, str(args.hidden), str(args.intermediate),
            str(args.layers), str(args.batch), str(args.prompt), str(args.new_tokens),
            str(prompt_seed)]
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)


def ask(child: subprocess.Popen[str], line: str | None = None) -> dict[str, Any]:
    assert child.stdin is not None and child.stdout is not None
    if line is not None:
        child.stdin.write(line + "\n")
        child.stdin.flush()
    reply = child.stdout.readline()
    if not reply:
        raise RuntimeError(f"model process {child.pid} exited ({child.wait()})")
    doc: dict[str, Any] = json.loads(reply)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--two-gpus", action="store_true",
                    help="one process per GPU, dumped and loaded in parallel")
    args = ap.parse_args()

    api = open_api()
    info = api.describe()
    res: dict[str, Any] = {"driver": info.to_json() if info else None,
                           "config": {k: v for k, v in vars(args).items() if k not in
                                      ("workdir", "out")}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(res, indent=1) + "\n")

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    children = [start_child(args, seed, seed - 1 if args.two_gpus else None) for seed in (1, 2)]
    try:
        t = time.perf_counter()
        ready = [ask(c) for c in children]
        res["model_start_seconds"] = round(time.perf_counter() - t, 1)
        res["params"] = ready[0]["params"]

        def dump_one(i: int) -> None:
            name, child, hello = "ab"[i], children[i], ready[i]
            pid = child.pid
            before = {"gpu_mib": gpu_used_mib(pid), "rss": rss_bytes(pid),
                      "torch_reserved": hello["reserved"]}
            outdir = args.workdir / f"dump-{name}"
            r = dump_process(pid, outdir, after=After.RUN, api=api,
                             log=lambda line: print(line, file=sys.stderr))
            t = time.perf_counter()
            for path in read_dump(outdir).pages_paths:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            fsync = time.perf_counter() - t
            check = ask(child, "check")
            res[f"dump_{name}"] = {
                "before": before, "after_gpu_mib": gpu_used_mib(pid), "cuda": r.cuda,
                "note": r.note, "regions": r.regions, "bytes": r.bytes,
                "data_bytes": r.data_bytes,
                "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
                "write_gbps": gbps(r.data_bytes, r.seconds["write"]),
                "total_gbps": gbps(r.data_bytes, r.seconds["total"]),
                "fsync_seconds": round(fsync, 3),
                "weights_intact": check["digest"] == hello["digest"],
            }
            print(json.dumps(res[f"dump_{name}"]), file=sys.stderr)

        t = time.perf_counter()
        with ThreadPoolExecutor(2 if args.two_gpus else 1) as pool:
            list(pool.map(dump_one, range(2)))
        if args.two_gpus:
            data = res["dump_a"]["data_bytes"] + res["dump_b"]["data_bytes"]
            wall = time.perf_counter() - t
            res["parallel_dump"] = {"seconds": round(wall, 3), "data_bytes": data,
                                    "gbps_incl_fsync_and_check": gbps(data, wall)}
        save()
    finally:
        for c in children:
            c.kill()
            c.wait()

    store = LocalStore.open(args.workdir / "store", create=True)
    for name in "ab":
        ir = ingest(store, args.workdir / f"dump-{name}", f"gpu-{name}")
        res[f"ingest_{name}"] = {
            "logical_bytes": ir.logical_bytes, "hole_bytes": ir.hole_bytes,
            "chunks": ir.chunks, "new_chunks": ir.new_chunks,
            "new_stored_bytes": ir.new_stored_bytes, "seconds": round(ir.seconds, 3),
            "gbps_logical": gbps(ir.logical_bytes, ir.seconds),
            "gbps_data": gbps(ir.logical_bytes - ir.hole_bytes, ir.seconds),
        }
        print(json.dumps(res[f"ingest_{name}"]), file=sys.stderr)
        save()
    b = res["ingest_b"]
    res["second_adds"] = {
        "of_data": round(b["new_stored_bytes"] / (b["logical_bytes"] - b["hole_bytes"]), 4),
        "of_first_stored": round(b["new_stored_bytes"] / res["ingest_a"]["new_stored_bytes"], 4),
    }

    dump_b = read_dump(args.workdir / "dump-b")
    lr = load(dump_b, args.workdir)
    res["load_from_dump_dir"] = {"data_bytes": lr.data_bytes, "seconds": round(lr.load_seconds, 3),
                                 "gbps": gbps(lr.data_bytes, lr.load_seconds),
                                 "verified": lr.verified, "loader": lr.loader_stats}
    save()
    shutil.rmtree(args.workdir / "dump-a")
    t = time.perf_counter()
    mat = materialize(store, store.get_manifest(store.resolve("gpu-b")), args.workdir / "mat")
    mat_s = time.perf_counter() - t
    lr = load(mat, args.workdir)
    res["load_from_store"] = {
        "data_bytes": lr.data_bytes, "materialize_seconds": round(mat_s, 3),
        "materialize_gbps": gbps(lr.data_bytes, mat_s), "load_seconds": round(lr.load_seconds, 3),
        "load_gbps": gbps(lr.data_bytes, lr.load_seconds),
        "end_to_end_gbps": gbps(lr.data_bytes, mat_s + lr.load_seconds),
        "verified": lr.verified, "loader": lr.loader_stats}
    save()
    if args.two_gpus:
        res["parallel_load"] = parallel_load(store, args.workdir)
        save()
    rows = [
        ["dump a (write / incl. CUDA lock+checkpoint+restore)",
         f"{res['dump_a']['write_gbps']} / {res['dump_a']['total_gbps']} GB/s"],
        ["dump b (write / total)",
         f"{res['dump_b']['write_gbps']} / {res['dump_b']['total_gbps']} GB/s"],
        ["ingest a / b (data bytes)",
         f"{res['ingest_a']['gbps_data']} / {res['ingest_b']['gbps_data']} GB/s"],
        ["second process adds (of its data)", f"{res['second_adds']['of_data']:.1%}"],
        ["load from dump dir", f"{res['load_from_dump_dir']['gbps']} GB/s"],
        ["load from store (materialise / uffd / end to end)",
         f"{res['load_from_store']['materialize_gbps']} / {res['load_from_store']['load_gbps']}"
         f" / {res['load_from_store']['end_to_end_gbps']} GB/s"],
    ]
    if args.two_gpus:
        pd, pl = res["parallel_dump"], res["parallel_load"]
        rows += [
            ["two dumps at once (wall, incl. fsync and weight check)",
             f"{pd['seconds']} s, {pd['gbps_incl_fsync_and_check']} GB/s"],
            ["two loads at once from the store (uffd, slower of the two)",
             f"{pl['seconds']} s, {pl['gbps']} GB/s together"],
        ]
    print(table(["what", "figure"], rows))
    return 0


def parallel_load(store: LocalStore, workdir: Path) -> dict[str, Any]:
    """Both dumps materialised from the store, then loaded through two loaders at once."""
    dumps = []
    for name in "ab":
        shutil.rmtree(workdir / f"mat-{name}", ignore_errors=True)
        m = store.get_manifest(store.resolve(f"gpu-{name}"))
        dumps.append(materialize(store, m, workdir / f"mat-{name}"))
    for name in "ab":
        (workdir / f"load-{name}").mkdir(exist_ok=True)
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: load(dumps[i], workdir / f"load-{'ab'[i]}"), range(2)))
    wall = time.perf_counter() - t
    data = sum(r.data_bytes for r in results)
    # Each load's own timing runs from the handshake to the last page installed; the wall time
    # adds starting the client processes and comparing every byte afterwards.
    slowest = max(r.load_seconds for r in results)
    return {"seconds": round(slowest, 3), "data_bytes": data, "gbps": gbps(data, slowest),
            "each_gbps": [gbps(r.data_bytes, r.load_seconds) for r in results],
            "wall_seconds_with_client_start_and_verify": round(wall, 3),
            "verified": all(r.verified for r in results)}


if __name__ == "__main__":
    sys.exit(main())
