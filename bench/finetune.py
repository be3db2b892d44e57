"""Fine-tuning throughput: the packed training step and scoring against per-choice versions of the same.

On the same real ARC questions (../shared/data if present, else the bundled sample), the same
model with the same fresh LoRA adapters, one run measures:

* train packed     -- one optimizer update over ``--items`` items: each item's prompt once plus its
                      choices under the 4-D mask (``probekit.finetune.train.item_nll``), micro
                      batches of ``--micro-batch`` items, backward, clip, AdamW step;
* train per-choice -- the same update with every (item, choice) as its own sequence
                      (``tests.reference.score_choices_naive``);
* score packed / per-choice -- the same items scored without gradients.

Modes are interleaved repetition by repetition (rotating order), so load from other processes hits
both alike; the median of the per-repetition ratios is reported. Floors (2 CPU cores, SmolLM2-135M):
packed >= 2x per-choice for updates/s and for scored items/s. Peak memory (max RSS of this process)
is printed beside the model's size.

Example:
    python bench/finetune.py --items 8 --micro-batch 4 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # for tests.reference: the per-choice reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=8, help="items per optimizer update (and scored)")
    ap.add_argument("--micro-batch", type=int, default=4, help="items per forward")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from probekit.data import load_dataset
    from probekit.extract.inputs import limit_items
    from probekit.finetune import Recipe
    from probekit.finetune.train import adapter_parameters, attach_lora, gold_nll, item_nll, make_optimizer
    from probekit.llm.batches import length_batches
    from probekit.llm.models import ModelSpec, load_model
    from probekit.llm.tokens import encode_rows
    from tests.reference import score_choices_naive

    items = (load_dataset("arc", data_dir=SHARED) if (SHARED / "arc" / "arc_all_splits.jsonl").is_file()
             else load_dataset("bundled"))
    items = limit_items(items, args.items)
    lm = load_model(ModelSpec(dtype="float32", device="cpu", cache_root=REPO / "cache",
                              threads=args.threads or None))
    enc = encode_rows(lm, items.table, items.prompt_template, lm.rules)
    labels = items.table["label"].to_numpy()
    recipe = Recipe(micro_batch=args.micro_batch)
    model = attach_lora(lm, recipe, seed=0)
    params = [p for _, p in adapter_parameters(model)]
    opt, sched, _ = make_optimizer(model, recipe, None, updates=1000)
    parts = length_batches(enc, args.micro_batch)

    def packed_loss(idx):
        return item_nll(lm, [enc[i] for i in idx], labels[idx])

    def naive_loss(idx):
        return gold_nll(score_choices_naive(lm, [enc[i] for i in idx]), labels[idx])

    def train_step(loss_of) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for idx in parts:
                (loss_of(np.asarray(idx)).sum() / len(enc)).backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        return time.perf_counter() - t

    def score(loss_of) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for idx in parts:
                loss_of(np.asarray(idx))
        return time.perf_counter() - t

    modes = {"train packed": lambda: train_step(packed_loss), "train per-choice": lambda: train_step(naive_loss),
             "score packed": lambda: score(packed_loss), "score per-choice": lambda: score(naive_loss)}
    modes["score packed"]()  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for r in range(args.reps):
        for m in names[r % len(names):] + names[:r % len(names)]:
            seconds[m].append(modes[m]())
    train_ratio = statistics.median(n / p for p, n in zip(seconds["train packed"], seconds["train per-choice"]))
    score_ratio = statistics.median(n / p for p, n in zip(seconds["score packed"], seconds["score per-choice"]))
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens_packed = sum(e.n_tokens_shared for e in enc)
    tokens_naive = sum(e.n_tokens_naive for e in enc)
    result = {
        "items": len(enc), "micro_batch": args.micro_batch, "reps": args.reps, "threads": torch.get_num_threads(),
        "tokens_per_update": {"packed": tokens_packed, "per_choice": tokens_naive},
        "updates_per_s": {m.split()[1]: round(1 / statistics.median(seconds[m]), 4) for m in names if "train" in m},
        "scored_items_per_s": {m.split()[1]: round(len(enc) / statistics.median(seconds[m]), 3)
                               for m in names if "score" in m},
        "packed_over_per_choice": {"train": round(train_ratio, 2), "score": round(score_ratio, 2)},
        "floor_2x_met": {"train": train_ratio >= 2, "score": score_ratio >= 2},
        "peak_rss_mib": round(peak / 2**20, 1), "model_mib": round(model_bytes / 2**20, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
