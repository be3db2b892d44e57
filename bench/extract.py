"""Extraction throughput: per-choice passes vs prefix sharing vs a bare forward, side by side.

On the same real ARC questions (../shared/data if present, else the bundled sample) and the same
model, one run measures:

* naive    -- every (item, choice) as its own sequence ``prompt + choice`` (the reference path);
* shared   -- the prompt once per item, all choices packed after it (``capture_batch``);
* bare     -- the same packed forward and choice log-probs (logits at the scored positions), with
              no hidden states captured and nothing written;
* body     -- the packed forward of the transformer body alone (no logits at all);
* fullhead -- bare with the output projection over every position (a plain causal-LM forward's
              logits), the choice log-probs taken from them: what projecting at the scored positions
              alone saves, large for a large vocabulary (Gemma-3-270M: 262k entries);
* extract  -- the whole pipeline (tokenise, prefix-shared capture of middle+last layers at both
              sites, log-probs, float16 HDF5 shards with manifest and sha256) into a fresh directory.

naive, shared and bare are interleaved batch by batch (rotating order) and averaged over the
repetitions; each pipeline run sits between two bare passes and the median of the per-repetition
ratios is reported, so load from other processes hits every mode alike. Peak memory (max RSS) is
measured in child processes that run the whole pipeline on 1x and 4x the items with the same shard
size: a bounded pipeline peaks at about the same memory.

Floors (2 CPU cores, SmolLM2-135M, 4-choice ARC prompts): shared >= 2.5x naive in items/s, and
extract <= 10% slower than bare.

Example:
    python bench/extract.py --items 32 --batch-size 8 --reps 3
    python bench/extract.py --model gemma3-270m --items 16 --reps 2 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # for tests.reference: the per-choice and bare-forward references


def load_items(n: int):
    from probekit.data import load_dataset
    from probekit.extract.inputs import limit_items

    if (SHARED / "arc" / "arc_all_splits.jsonl").is_file():
        items = load_dataset("arc", data_dir=SHARED)
    else:
        items = load_dataset("bundled")
    return limit_items(items, n)


def load_lm(threads: int | None, model: str | None = None):
    from probekit.llm.models import ModelSpec, load_model

    return load_model(ModelSpec(model=model, dtype="float32", device="cpu", cache_root=REPO / "cache",
                                threads=threads or None))


def child(n: int, threads: int | None, shard_size: int, batch_size: int, model: str | None = None) -> None:
    """Run the whole pipeline on n items; print (JSON) the RSS after loading and its peak while extracting."""
    import threading

    import psutil

    from probekit.extract.run import extract

    lm = load_lm(threads, model)
    items = load_items(n)
    proc = psutil.Process()
    base = proc.memory_info().rss / 2**20
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            stop.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    with tempfile.TemporaryDirectory() as tmp:
        s = extract(items, Path(tmp) / "c", lm, batch_size=batch_size, shard_size=shard_size, store_dtype="float16",
                    progress=False)
    stop.set()
    th.join()
    print(json.dumps({"items": n, "rss_loaded_mib": base, "rss_peak_mib": peak[0], "seconds": s.seconds,
                      "max_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--model", default=None, help="what probekit extract --model takes (default: the offline SmolLM2)")
    ap.add_argument("--shard-size", type=int, default=16, help="shard size of the pipeline and memory runs")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1x/4x peak-memory child runs")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.threads, args.shard_size, args.batch_size, args.model)
        return

    import torch

    from probekit.extract.capture import capture_batch
    from probekit.extract.run import extract
    from probekit.layers import resolve_layers
    from probekit.llm.batches import length_batches
    from probekit.llm.tokens import encode_rows
    from tests.reference import bare_forward, capture_naive, full_head_forward

    lm = load_lm(args.threads, args.model)
    items = load_items(args.items)
    table = items.table
    enc = encode_rows(lm, table, items.prompt_template, lm.rules)
    layers = resolve_layers("middle_and_last", lm.n_layers)
    sites = ["answer_end", "question_end"]
    C = items.max_choices
    batches = [[enc[i] for i in idx] for idx in length_batches(enc, args.batch_size)]
    shared_tokens = sum(e.n_tokens_shared for e in enc)
    naive_tokens = sum(e.n_tokens_naive for e in enc)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))

    def run_bare():
        for b in batches:
            bare_forward(lm, b)

    counter = iter(range(10**6))

    def run_extract():
        # one shard holding every item, so batches are exactly those of the other modes
        extract(items, tmp / f"c{next(counter)}", lm, layers=layers, sites=sites, batch_size=args.batch_size,
                shard_size=len(enc), store_dtype="float16", progress=False)  # auto would run a first batch twice

    # warm-up
    capture_batch(lm, batches[0], layers, sites, C)
    bare_forward(lm, batches[0])
    capture_naive(lm, batches[0][:1], layers, sites, C)
    full_head_forward(lm, batches[0])
    # naive / shared / bare: interleaved batch by batch (rotating order), so load from other
    # processes hits all three alike
    per_batch = {"naive": 0.0, "shared": 0.0, "bare": 0.0, "body": 0.0, "fullhead": 0.0}
    fns = {"naive": lambda b: capture_naive(lm, b, layers, sites, C),
           "shared": lambda b: capture_batch(lm, b, layers, sites, C),
           "bare": lambda b: bare_forward(lm, b),
           "body": lambda b: bare_forward(lm, b, scores=False),
           "fullhead": lambda b: full_head_forward(lm, b)}
    order = list(fns)
    for rep in range(args.reps):
        for bi, b in enumerate(batches):
            k = (rep + bi) % len(order)
            for m in order[k:] + order[:k]:
                t0 = time.perf_counter()
                fns[m](b)
                per_batch[m] += time.perf_counter() - t0
    med = {m: v / args.reps for m, v in per_batch.items()}
    # the whole pipeline (tokenise + capture + float16 HDF5 shards): each run between two bare passes
    ratios, ext_times = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        run_bare()
        t1 = time.perf_counter()
        run_extract()
        t2 = time.perf_counter()
        run_bare()
        t3 = time.perf_counter()
        ratios.append((t2 - t1) / ((t1 - t0 + t3 - t2) / 2))
        ext_times.append(t2 - t1)
    med["extract"] = statistics.median(ext_times)
    modes = ["naive", "shared", "bare", "body", "fullhead", "extract"]
    n = len(enc)
    tok = {"naive": naive_tokens, "shared": shared_tokens, "bare": shared_tokens, "body": shared_tokens,
           "fullhead": shared_tokens, "extract": shared_tokens}
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    print(f"model {lm.name} (float32, CPU, torch threads {torch.get_num_threads()}, vocabulary {vocab:,}), "
          f"{n} ARC items ({items.name}), {C} choices max, batch {args.batch_size}, layers {layers}, sites {sites}, "
          f"{args.reps} reps")
    print(f"{'mode':8s} {'seconds':>8s} {'items/s':>8s} {'tokens run':>10s} {'tokens/s':>9s}")
    for m in modes:
        print(f"{m:8s} {med[m]:8.2f} {n / med[m]:8.2f} {tok[m]:10d} {tok[m] / med[m]:9.0f}")
    print(f"prefix sharing vs naive (items/s): {med['naive'] / med['shared']:.2f}x  (floor 2.5x); "
          f"tokens run {naive_tokens / shared_tokens:.2f}x fewer")
    print(f"capture alone vs bare forward: {100 * (med['shared'] / med['bare'] - 1):+.1f}%; "
          f"choice scoring (logits) vs body alone: {100 * (med['bare'] / med['body'] - 1):+.1f}%")
    print(f"output projection at the scored positions vs at every position (bare vs fullhead, items/s): "
          f"{med['fullhead'] / med['bare']:.2f}x")
    print(f"capture + writing (whole pipeline) vs bare forward: {100 * (statistics.median(ratios) - 1):+.1f}% "
          f"(median of per-rep ratios {', '.join(f'{r:.2f}' for r in ratios)}; ceiling +10%)")

    if not args.no_memory:
        for k in (1, 4):
            cmd = [sys.executable, __file__, "--child", str(k * n), "--shard-size", str(args.shard_size),
                   "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else []) \
                + (["--model", args.model] if args.model else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if res.returncode != 0:
                print(f"memory run {k}x failed: {res.stderr[-400:]}")
                continue
            info = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"memory {k}x ({info['items']} items, shard {args.shard_size}): RSS with model loaded "
                  f"{info['rss_loaded_mib']:.0f} MiB, peak while extracting {info['rss_peak_mib']:.0f} MiB "
                  f"(+{info['rss_peak_mib'] - info['rss_loaded_mib']:.0f} MiB); process max RSS incl. loading "
                  f"{info['max_rss_process_mib']:.0f} MiB")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
