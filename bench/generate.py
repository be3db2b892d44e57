"""Chain-of-thought generation throughput: batched shared-prefix decoding vs one generate call per item.

On the same real GSM8k test items and k-shot prompt (k demonstrations of one draw from the easy
level of num_steps, the prompts ``probekit generate`` builds), one run measures generated tokens
per second of:

* plain    -- one ``model.generate`` call per item with its full k-shot prompt (greedy);
* batched  -- :func:`probekit.cot.decode.generate`: the demonstrations' prefix run once, its
              key/value cache reused by every left-padded batch.

Both decode ``--new-tokens`` tokens per item (or stop at the end-of-sequence token), with no
answer-line stop, so they generate the same tokens; the bench checks that they do. The two modes
alternate over ``--reps`` repetitions (load from other processes hits both alike) and the ratio of
their summed times is printed, in wall time and in this process's CPU time (with one torch thread
the CPU time is the work done, whatever share of the machine other jobs leave).

Floor (2 CPU cores, SmolLM2-135M, k=8): batched >= 3x plain in generated tokens/s.

Example:
    python bench/generate.py --items 16 --k 8 --new-tokens 32 --batch-size 16 --reps 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from probekit.cot.decode import generate
    from probekit.cot.run import demo_rows, gold_answer, test_sample
    from probekit.data import load_dataset
    from probekit.data.prompts import render_cot
    from probekit.llm.models import ModelSpec, load_model
    from probekit.llm.tokens import encode_prompt

    lm = load_model(ModelSpec(dtype="float32", device="cpu", cache_root=REPO / "cache", threads=args.threads))
    items = load_dataset("gsm8k", SHARED)
    table = items.table
    demo = demo_rows(items, "num_steps", "easy", args.k, seed=0, draw=0)
    rows = [r for r in test_sample(items, "num_steps", 3 * args.items, seed=0) if r not in set(demo)][:args.items]
    examples = [(table["question"].iat[r], table["reasoning"].iat[r], gold_answer(items, r)) for r in demo]
    prompts = [encode_prompt(lm.tokenizer, render_cot(examples, table["question"].iat[r]), lm.rules) for r in rows]
    eos = lm.tokenizer.eos_token_id

    def plain() -> list[list[int]]:
        out = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.inference_mode():
                seq = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                        do_sample=False, pad_token_id=lm.pad_id)[0, len(p):].tolist()
            out.append(seq[:seq.index(eos)] if eos in seq else seq)
        return out

    def batched() -> list[list[int]]:
        gens, _ = generate(lm, prompts, args.new_tokens, batch_size=args.batch_size, stop="none")
        return [g.ids for g in gens]

    times = {"plain": 0.0, "batched": 0.0}
    cpu = {"plain": 0.0, "batched": 0.0}
    outputs = {}
    for rep in range(args.reps):
        for mode in (("plain", "batched") if rep % 2 == 0 else ("batched", "plain")):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[mode] = (plain if mode == "plain" else batched)()
            times[mode] += time.perf_counter() - t0
            cpu[mode] += time.process_time() - c0
    tokens = sum(len(s) + (len(s) < args.new_tokens) for s in outputs["plain"])  # an eos counts as generated
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["batched"]))
    print(f"GSM8k, k={args.k}: {len(prompts)} items, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens each, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.reps} rep(s)")
    for mode in times:
        print(f"  {mode:8s} {tokens * args.reps / times[mode]:8.1f} generated tok/s  ({times[mode]:.1f} s wall, "
              f"{cpu[mode]:.1f} s CPU: {tokens * args.reps / cpu[mode]:.1f} tok per CPU second)")
    print(f"  ratio batched / plain: {times['plain'] / times['batched']:.2f}x wall, {cpu['plain'] / cpu['batched']:.2f}x CPU "
          f"(floor 3x); identical generations: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
