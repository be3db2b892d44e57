"""Zero-shot accuracy on random ARC questions: the paper's "0040" prompt vs the cloze prompt, and Gemma without BOS.

For each model (the offline SmolLM2-135M-Instruct and Gemma-3-270M) the same random ARC questions are
scored as `probekit extract` scores them (the prompt once, every choice's summed answer-token log-prob,
the argmax is the prediction) with the template "0040" (choices listed, then the answer text) and
"cloze" (`Question: {q}\\nAnswer:` then the answer text). For Gemma the cloze prompt is also scored
without the BOS token its tokenizer adds, to show what BOS is worth.

Example:
    python bench/zero_shot.py --items 200 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def accuracy(lm, table, template: str, rules, batch_size: int) -> tuple[float, float]:
    """(accuracy, seconds) of the argmax of the choice log-prob sums."""
    from probekit.extract.capture import capture_batch
    from probekit.llm.batches import length_batches
    from probekit.llm.tokens import encode_rows

    t0 = time.perf_counter()
    enc = encode_rows(lm, table, template, rules)
    c = max(len(e.choices) for e in enc)
    pred = np.zeros(len(enc), dtype=int)
    for idx in length_batches(enc, batch_size):
        pred[idx] = capture_batch(lm, [enc[i] for i in idx], [], [], c).choice_sum.argmax(1)
    return float((pred == table["label"].to_numpy()).mean()), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--data-dir", default=str(SHARED), help="folder with arc/ (default ../shared/data)")
    args = ap.parse_args()

    from probekit.data import load_dataset
    from probekit.llm.models import ModelSpec, load_model

    items = load_dataset("arc", data_dir=args.data_dir)
    rows = np.sort(np.random.default_rng(args.seed).choice(len(items.table), args.items, replace=False))
    table = items.table.iloc[rows].reset_index(drop=True)
    chance = float((1 / table["choices"].map(len)).mean())
    print(f"{args.items} random ARC questions (seed {args.seed}, of {len(items.table)}); chance {100 * chance:.1f}%")
    print(f"{'model':24s} {'template':8s} {'BOS':4s} {'accuracy':>8s} {'seconds':>8s}")
    for model in (None, "gemma3-270m"):
        lm = load_model(ModelSpec(model=model, dtype="float32", device="cpu", cache_root=REPO / "cache",
                                  threads=args.threads))
        runs = [("0040", lm.rules), ("cloze", lm.rules)]
        if lm.rules.bos_id is not None:
            runs.append(("cloze", dataclasses.replace(lm.rules, bos_id=None)))
        for template, rules in runs:
            acc, secs = accuracy(lm, table, template, rules, args.batch_size)
            bos = "yes" if rules.bos_id is not None else "no"
            print(f"{lm.name:24s} {template:8s} {bos:4s} {100 * acc:7.1f}% {secs:8.1f}")
            sys.stdout.flush()
        del lm


if __name__ == "__main__":
    main()
