"""``select_recipe``: choose a fine-tuning learning rate and length on a validation split of one
training draw, never on test items.

One head of the sweep's design (a measure, a training level, a draw, ``n_train``; the same items
:func:`probekit.finetune.finetune` trains that head on) is split, by a seed derived from the head,
into a validation part (``validation`` of its items) and a training part. For every learning rate
fresh adapters (the head's seed) train on the training part, and after each update count in
``updates`` the validation items are scored: accuracy and mean NLL of the gold choice under the
softmax over its choices, the objective's own loss. Update count 0 is the model without adapters,
i.e. zero-shot on the same items.

At a constant learning rate (``recipe.final_lr_fraction == 1``, the default here) the adapters after
``u`` updates of one long run are exactly those of a run of ``u`` updates (same data order, same
seeds; scoring draws no random numbers), so each learning rate costs one run to ``max(updates)``.
With a decaying rate every (lr, updates) pair is its own run, whose schedule spans the whole epochs
those updates fall in (exactly its updates when they are a multiple of the updates per epoch).

The choice is the (lr, updates) of the lowest validation NLL (ties: fewer updates, then the
smaller lr); accuracy is reported beside it. ``OUT/selection.json`` holds every curve, the
zero-shot point, the split, the recipe and the choice, with the ``probekit finetune`` options that
train the whole draw with it. A rerun into the same OUT keeps the runs already finished.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from probekit.design import head_seed, zero_shot_p
from probekit.errors import ProbekitError
from probekit.finetune.recipe import Recipe, schedule
from probekit.finetune.run import Settings, check_settings, open_run
from probekit.finetune.train import attach_lora, detach_lora, score_items, train_adapters
from probekit.llm.models import settle_model
from probekit.llm.tokens import encode_rows
from probekit.store.outdir import OutputDir, read_json

SELECTION = "selection.json"
FORMAT = "probekit-finetune-selection/1"
#: Defaults of the search: the recipe's lr 1e-4 to 10x it, 10 to 100 updates of 16 items at a constant lr.
LRS = (1e-4, 3e-4, 1e-3)
UPDATES = (10, 20, 50, 100)
SEARCH_RECIPE = Recipe(max_batch=16, final_lr_fraction=1.0)

#: Progress events: (event, fields). "run" (lr, updates, done, total), "update" (done, total, loss),
#: "point" (lr, updates, accuracy, nll), "skip" (lr, updates).
Progress = Callable[[str, Mapping[str, Any]], None]


def validation_split(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, validation positions) into a head's ``rows``: ``round(fraction * n)``
    positions (at least 1, at most n - 1) drawn without replacement by ``seed``, both sorted."""
    n = len(rows)
    k = int(round(fraction * n))
    if not (0.0 < fraction < 1.0 and 1 <= k <= n - 1):
        raise ProbekitError(f"validation fraction {fraction:g} of a {n}-item draw leaves no training or no "
                            "validation items: choose a fraction in (0, 1) that keeps both")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def check_search(lrs: Sequence[float], updates: Sequence[int], validation: float) -> tuple[list[float], list[int]]:
    """The learning rates and update counts, sorted and unique; one line for a bad one or a bad fraction."""
    if not 0.0 < validation < 1.0:
        raise ProbekitError(f"validation fraction {validation:g}: choose a fraction of the draw in (0, 1)")
    lrs = sorted({float(x) for x in lrs})
    counts = sorted({int(u) for u in updates})
    if not lrs or any(not (x > 0 and np.isfinite(x)) for x in lrs):
        raise ProbekitError(f"learning rates {lrs}: give at least one, each positive")
    if not counts or counts[0] < 1:
        raise ProbekitError(f"update counts {counts}: give at least one, each at least 1")
    return lrs, counts


def select_recipe(
    cache,
    items,
    out: str | os.PathLike,
    model=None,
    *,
    measure: str,
    level: str = "easy",
    draw: int = 0,
    n_train: int = 160,
    seed: int = 0,
    lrs: Sequence[float] = LRS,
    updates: Sequence[int] = UPDATES,
    validation: float = 0.2,
    recipe: Recipe | None = None,
    cutoffs=None,
    verify: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Search learning rates x update counts on a validation split of one training draw; write and
    return ``OUT/selection.json`` (see the module docstring).

    ``cache``, ``items``, ``model``, ``seed``, ``cutoffs``: as for :func:`probekit.finetune.finetune`;
    the head is ``measure`` at training ``level``, draw ``draw`` of ``n_train`` items. ``recipe``:
    every other setting (default :data:`SEARCH_RECIPE`: the study's, with 16 items per update and a
    constant lr); its ``lr``, ``min_updates`` and ``epochs`` are replaced by the search's.

    Example:
        >>> select_recipe("cache/smollm2__arc", load_dataset("arc"), "results/ft-select", measure="grade")
    """
    t0 = time.perf_counter()
    lrs, counts = check_search(lrs, updates, validation)
    recipe = recipe or SEARCH_RECIPE
    constant = recipe.final_lr_fraction == 1.0
    emit = progress or (lambda event, fields: None)
    s = Settings("population", (int(n_train),), (0.0,), int(draw) + 1, seed, (level,), None, cutoffs, recipe, False,
                 None, None)
    check_settings(s)
    model = settle_model(model, 0, 1, train=True)
    with OutputDir(out, (SELECTION,), "selection directory", own=lambda e: e == SELECTION or e.startswith("."),
                   share=True, exclusive=True) as held:
        run = open_run(cache, items, model, [measure], s, verify)
        head = next((h for h in run.heads if h.draw == int(draw)), None)
        if head is None:
            raise ProbekitError(f"no draw {draw} of {measure}/{level} with {n_train} items in {run.cache.path}")
        hseed = head_seed(seed, head.name)
        fit, val = validation_split(head.rows, validation, hseed)
        lm = run.lm
        encoded = encode_rows(lm, run.questions.table.iloc[head.rows], run.template, lm.rules)
        train_enc = [encoded[i] for i in fit]
        val_enc = [encoded[i] for i in val]
        val_rows = head.rows[val]
        gold = run.frame.gold[val_rows]
        n_choices = run.frame.n_choices[val_rows]
        width = int(run.frame.n_choices.max())
        per_epoch = schedule(len(fit), replace(recipe, min_updates=0, epochs=1)).updates_per_epoch
        key = {"cache_manifest_sha256": run.cache.manifest_sha256, "head": head.name, "seed": int(seed),
               "validation": float(validation), "recipe": replace(recipe, lr=1.0, min_updates=0, epochs=1).describe(),
               "model": {k: lm.identity.get(k) for k in ("id", "weights_sha256", "revision", "dtype", "quantization")}}
        old = read_json(Path(out) / SELECTION)
        points: dict[tuple[float, int], dict] = {}
        before = 0.0  # seconds spent by earlier invocations of this search
        if isinstance(old, dict) and old.get("key") == key:
            points = {(float(p["lr"]), int(p["updates"])): p for p in old.get("points", [])}
            before = float(old.get("seconds", 0.0))

        def point(lr: float, done: int, train_loss: float | None) -> dict:
            scores = score_items(lm, val_enc, recipe.eval_batch, width)
            p, correct = zero_shot_p(scores, n_choices, gold)
            nll = -np.log(np.maximum(p.astype(np.float64), 1e-300))  # the objective's NLL of the gold choice
            return {"lr": lr, "updates": done, "epochs": round(done / per_epoch, 3),
                    "accuracy": float(correct.mean()), "nll": float(nll.mean()), "p_gold": float(p.mean()),
                    "train_loss": train_loss}

        def save(zero: dict | None) -> dict[str, Any]:
            record = _selection(key, head, fit, val, run, recipe, lrs, counts, constant, zero, points, per_epoch,
                                before + time.perf_counter() - t0)
            held.write_json(SELECTION, record)
            return record

        zero = old.get("zero_shot") if isinstance(old, dict) and old.get("key") == key else None
        if zero is None:
            zero = point(0.0, 0, None)
            zero.pop("lr")
            save(zero)
        runs = [(lr, list(counts)) for lr in lrs] if constant else [(lr, [c]) for lr in lrs for c in counts]
        for lr, marks in runs:
            if all((lr, c) in points for c in marks):
                emit("skip", {"lr": lr, "updates": marks})
                continue
            last = max(marks)
            r = replace(recipe, lr=lr, min_updates=last, epochs=1)
            emit("run", {"lr": lr, "updates": last})
            losses: list[float] = []
            peft_model = attach_lora(lm, r, hseed)
            try:
                def mark(done: int, lr=lr, losses=losses) -> None:
                    if done:
                        points[(lr, done)] = point(lr, done, losses[-1])
                        emit("point", points[(lr, done)])

                def update(done: int, total: int, loss: float, losses=losses) -> None:
                    losses.append(loss)
                    emit("update", {"done": done, "total": total, "loss": loss})

                train_adapters(lm, peft_model, train_enc, head.labels[fit], r, hseed,
                               quantize=lm.quantize, max_updates=last, checkpoints=marks, on_checkpoint=mark,
                               on_update=update)
            finally:
                detach_lora(lm, peft_model)
            save(zero)
        return save(zero)  # every point in: the choice, and the time of a resumed search too


def _selection(key, head, fit, val, run, recipe: Recipe, lrs, counts, constant: bool, zero, points, per_epoch: int,
               seconds: float) -> dict[str, Any]:
    """``selection.json``: the search, every point so far, and the choice once every point is in."""
    ordered = [points[k] for k in sorted(points)]
    done = all((lr, c) in points for lr in lrs for c in counts)
    best = min(ordered, key=lambda p: (round(p["nll"], 12), p["updates"], p["lr"])) if done and ordered else None
    chosen = None
    if best is not None:
        chosen = {**best, "beats_zero_shot_nll": bool(zero and best["nll"] < zero["nll"]),
                  "finetune_options": _options(recipe, best, head.n_train)}
    return {
        "format": FORMAT, "key": key, "dataset": run.dataset, "cache": str(run.cache.path.resolve()),
        "head": {"name": head.name, "measure": head.measures[0], "train_level": head.train_level, "draw": head.draw,
                 "n_train": head.n_train},
        "split": {"train": int(len(fit)), "validation": int(len(val)), "updates_per_epoch": per_epoch,
                  "validation_ids": [str(run.frame.ids[head.rows[i]]) for i in val],
                  "rule": "validation items drawn from the head's training draw by its seed; test items never scored"},
        "search": {"lrs": list(lrs), "updates": list(counts), "constant_lr": constant,
                   "runs": "one per lr, scored at each update count" if constant else "one per (lr, updates)"},
        "recipe": recipe.describe(), "criterion": "lowest validation NLL of the gold choice; ties: fewer updates, "
                                                  "then smaller lr",
        "zero_shot": zero, "points": ordered, "complete": done, "chosen": chosen,
        "seconds": round(seconds, 3),  # every invocation of this search, model loading included
    }


def _options(recipe: Recipe, best: Mapping[str, Any], n_train: int) -> str:
    """The ``probekit finetune`` options that train a whole ``n_train``-item draw with the chosen
    setting (its update count exactly when it is a multiple of that draw's updates per epoch)."""
    per_epoch = schedule(n_train, replace(recipe, min_updates=0, epochs=1)).updates_per_epoch
    return (f"--lr {best['lr']:g} --max-batch {recipe.max_batch} --min-updates {best['updates']} --epochs 1 "
            f"--final-lr-fraction {recipe.final_lr_fraction:g}"
            + ("" if best["updates"] % per_epoch == 0 else
               f"  (a {n_train}-item draw has {per_epoch} updates per epoch: the run rounds up)"))
