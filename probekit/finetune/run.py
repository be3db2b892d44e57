"""``finetune``: LoRA fine-tuning on the sweep's training draws, scored on the sweep's test items.

For every head of :func:`probekit.design.plan.plan` (the same function, seed and keys the sweep
uses, so training rows and labels are the sweep's), fresh adapters are attached from a seed,
trained on the head's items (:mod:`probekit.finetune.train`), and every other probe item (or those
of ``test_levels``) is scored with the adapted model. Rows go into ``RES/results.parquet`` with
``method`` "finetune" (no site, layer or solver), beside the cache's zero-shot rows;
``RES/sweep.json`` records the recipe, model, dataset and cache (:class:`~probekit.store.results.RunRecord`).
The run reads the design (:mod:`probekit.design`), never the probe engine: it imports no JAX.

The run is resumable: each finished head's rows are written atomically as ``RES/parts/<head>.parquet``
(:meth:`probekit.store.results.ResultsWriter.write_part`); a rerun with the same settings skips
them, and the final commit merges every part into ``results.parquet``. A directory holding a run
with other settings is refused.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment; no process group is needed, each
fine-tune is independent) rank r trains the heads ``i % world_size == r`` (rank 0 also writes the
zero-shot part) into the same directory; the rank that finishes last merges every part into one
table (:meth:`~probekit.store.results.ResultsWriter.merge`), and ``sweep.json`` sums the ranks' counts
(parts, per-rank locks and the merge: :mod:`probekit.store.parts`, shared with ``probekit generate``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from probekit.data.levels import LEVELS, Cutoff
from probekit.design import (
    FrameRows,
    Head,
    head_seed,
    item_frame,
    load_items,
    open_cache,
    plan,
    tested_rows,
    zero_shot_p,
    zero_shot_tables,
)
from probekit.errors import ProbekitError
from probekit.finetune.recipe import Recipe, schedule
from probekit.finetune.train import (
    attach_lora,
    check_targets,
    detach_lora,
    library_versions,
    score_items,
    train_adapters,
)
from probekit.llm.batches import dist_env, rank_share
from probekit.llm.models import LoadedModel, ModelSpec, prepare_model, settle_model
from probekit.llm.tokens import check_table_context, encode_rows
from probekit.llm.weights import DEFAULT_NAME
from probekit.store import Cache
from probekit.store.outdir import check_dir_target
from probekit.store.results import CACHE_HASH_KEY, EXPERIMENTS, ResultsWriter, RunRecord, holding_results

METHOD = "finetune"

#: Progress events: (event, fields). Events: "start" (heads, updates), "head" (name, updates),
#: "update" (done, total, loss), "scored" (name, items), "skip" (name).
Progress = Callable[[str, Mapping[str, Any]], None]


def part_key(head: Head) -> str:
    """The file name (without suffix) of a head's part: its name with "/" as "__"."""
    return head.name.replace("/", "__")


def cache_questions(items, cache: Cache):
    """The question set's rows in the cache's item order, checked against the cache's fingerprint."""
    table = items.table.reset_index(drop=True)
    ids = cache.items["id"].astype(str).to_numpy()
    position = {str(i): k for k, i in enumerate(table["id"].astype(str))}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ProbekitError(f"dataset {items.name!r} lacks item {missing[0]!r} of cache {cache.path} "
                            f"({len(missing)} missing): pass the dataset the cache was extracted from")
    chosen = replace(items, table=table.iloc[[position[i] for i in ids]].reset_index(drop=True))
    recorded = cache.manifest.get("dataset", {}).get("fingerprint")
    if recorded and chosen.fingerprint != recorded:
        raise ProbekitError(f"dataset {items.name!r} differs from the one cache {cache.path} was extracted from "
                            "(fingerprints differ): pass the same questions, measures and pools")
    return chosen


def model_for_cache(cache: Cache, spec: ModelSpec | None = None) -> ModelSpec:
    """``spec`` (default: every setting "auto") for the model a cache was extracted with (its recorded
    folder or id, and revision)."""
    spec = spec or ModelSpec()
    ident = cache.manifest.get("model", {})
    path = ident.get("path")
    if path and Path(path).is_dir():
        source = path
    else:  # the offline default converted elsewhere is converted again here
        source = None if ident.get("id") == DEFAULT_NAME else ident.get("id")
    return replace(spec, model=source, revision=spec.revision or ident.get("revision") or None)


def _same_weights(cache_model: Mapping[str, Any], loaded: Mapping[str, Any]) -> bool:
    for key in ("weights_sha256", "revision"):
        if cache_model.get(key) and loaded.get(key):
            return cache_model[key] == loaded[key]
    return cache_model.get("id") == loaded.get("id")




def _test_levels(frame, head: Head, test_levels: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Per measure of the head, the test rows to score: every probe item outside the head's pool,
    or only those at ``test_levels`` of that measure."""
    rows = tested_rows(frame, head)
    out = {}
    for m in head.measures:
        if test_levels and m in frame.levels:
            codes = [LEVELS.index(lv) for lv in test_levels]
            out[m] = rows[np.isin(frame.levels[m][rows], codes)]
        else:
            out[m] = rows
    return out


def finetune(
    cache: str | os.PathLike | Cache,
    items,
    out: str | os.PathLike,
    model: str | ModelSpec | LoadedModel | None = None,
    *,
    experiment: str = "population",
    measures: Sequence[str] | None = None,
    n_train: Sequence[int] = (160,),
    label_noise: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    draws: int = 5,
    seed: int = 0,
    levels: Sequence[str] | None = None,
    test_levels: Sequence[str] | None = None,
    cutoffs: Mapping[str, Cutoff] | None = None,
    recipe: Recipe | None = None,
    zero_shot: bool = True,
    save_adapters: str | os.PathLike | None = None,
    verify: bool = True,
    max_updates: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters for every head of one experiment; write ``out/results.parquet``.

    ``cache``: the cache of ``probekit extract`` (item ids, levels, zero-shot scores, and the model
    and prompt to use); ``items``: the question set it was extracted from (checked by fingerprint).
    ``model``: a name or :class:`ModelSpec` as for :func:`probekit.extract.extract`, with its "auto"
    settled for fine-tuning (quantize: 8bit on a GPU, none on the CPU); None, or a spec whose model is
    None, loads the cache's model (``ModelSpec(device_map="auto")`` spreads one larger than a GPU over
    every GPU this process sees); a :class:`LoadedModel` is used as given.
    ``experiment``, ``measures``, ``n_train``, ``label_noise``, ``draws``, ``seed``, ``levels``,
    ``cutoffs``: as for :func:`probekit.probe.sweep` (the same heads). ``test_levels`` restricts
    scoring to items of those levels (e.g. ``["hard"]``). ``recipe``: the training settings
    (:class:`~probekit.finetune.recipe.Recipe`; defaults: the study's). ``save_adapters``: a folder
    that keeps each head's adapters (PEFT format). ``max_updates`` caps each fine-tune (tests).
    Returns the contents of ``sweep.json``; under torchrun, a rank that finishes while another is
    still training returns ``{"merged": False, "rank", "world_size", "counts"}`` (its own counts).

    Example:
        >>> finetune("cache/smollm2__arc", load_dataset("arc"), "results/ft", measures=["grade"],
        ...          levels=["easy", "hard"], n_train=[32], draws=1)
    """
    t0 = time.perf_counter()
    rank, world, local = dist_env()
    recipe = recipe or Recipe()
    emit = progress or (lambda event, fields: None)
    if experiment not in EXPERIMENTS:
        raise ProbekitError(f"unknown experiment {experiment!r}: choose from {', '.join(EXPERIMENTS)}")
    for lv in test_levels or ():
        if lv not in LEVELS:
            raise ProbekitError(f"test level {lv!r} is not one of {', '.join(LEVELS)}")
    if save_adapters is not None:
        check_dir_target(save_adapters, "save_adapters")
    model = settle_model(model, local, world, train=True)  # checked before anything is read or loaded
    with holding_results(out, "finetune", rank):  # locked before the cache is verified or the model loads
        cache = open_cache(cache, verify)
        dataset = str(cache.manifest.get("dataset", {}).get("name", ""))
        frame_items, measures = load_items(cache, measures)
        frame = item_frame(frame_items, dataset, measures, cutoffs)
        heads = plan(frame, experiment, measures, n_train=n_train, label_noise=label_noise, draws=draws, seed=seed,
                     levels=levels)  # the sweep's heads: n_train too large for a level fails here, before loading
        questions = cache_questions(items, cache)
        template = cache.manifest.get("prompt", {}).get("template", questions.prompt_template)
        lm = prepare_model(model_for_cache(cache, model) if isinstance(model, ModelSpec) and model.model is None
                           else model)
        q = lm.quantize
        if not _same_weights(cache.manifest.get("model", {}), lm.identity):
            raise ProbekitError(f"model {lm.identity.get('id')!r} is not the model cache {cache.path} was extracted with "
                                f"({cache.manifest.get('model', {}).get('id')!r})")
        check_targets(lm.model, recipe.target_modules)  # one line naming the model's modules, before any work
        check_table_context(lm, questions.table.iloc[frame.probe], template)  # every prompt fits the model
        run = {
            CACHE_HASH_KEY: cache.manifest_sha256, "dataset_fingerprint": questions.fingerprint,
            "model": {k: lm.identity.get(k) for k in ("id", "weights_sha256", "revision", "dtype", "quantization")},
            "experiment": experiment, "seed": seed, "recipe": recipe.describe(), "test_levels": list(test_levels or []),
            "cutoffs": {m: repr(r) for m, r in (cutoffs or {}).items()}, "template": template,
            "max_updates": max_updates, "zero_shot": zero_shot,
        }
        rows = FrameRows(frame, experiment)
        encoded: dict[int, Any] = {}

        def encode(idx: np.ndarray) -> list:
            need = [int(i) for i in idx if int(i) not in encoded]
            if need:
                for i, e in zip(need, encode_rows(lm, questions.table.iloc[need], template, lm.rules)):
                    encoded[i] = e
            return [encoded[int(i)] for i in idx]

        stats: dict[str, Any] = {"trained": 0, "skipped": 0, "updates": 0, "train_seconds": 0.0, "score_seconds": 0.0,
                                 "scored_items": 0, "final_loss": {}}
        mine = rank_share(heads, rank, world)  # each rank its own heads
        with ResultsWriter(out, run=run, rank=rank, world_size=world) as writer:
            todo = [h for h in mine if not writer.has_part(part_key(h))]
            emit("start", {"heads": len(mine), "todo": len(todo),
                           "updates": sum(min(schedule(h.n_train, recipe).updates, max_updates or 1 << 30) for h in todo)})
            if zero_shot and rank == 0 and not writer.has_part("zero_shot"):
                writer.write_part("zero_shot", zero_shot_tables(cache, frame, measures, experiment))
            for h in mine:
                key = part_key(h)
                if writer.has_part(key):
                    stats["skipped"] += 1
                    emit("skip", {"name": h.name})
                    continue
                hseed = head_seed(seed, h.name)
                emit("head", {"name": h.name, "updates": min(schedule(h.n_train, recipe).updates, max_updates or 1 << 30)})
                peft_model = attach_lora(lm, recipe, hseed)
                try:
                    log = train_adapters(lm, peft_model, encode(h.rows), h.labels, recipe, hseed, quantize=q,
                                         max_updates=max_updates,
                                         on_update=lambda d, t, loss: emit("update", {"done": d, "total": t, "loss": loss}))
                    t1 = time.perf_counter()
                    by_measure = _test_levels(frame, h, test_levels)
                    test = np.unique(np.concatenate(list(by_measure.values())))
                    scores = np.full((len(frame.ids), frame.n_choices.max()), -np.inf, np.float32)
                    if len(test):
                        scores[test] = score_items(lm, encode(test), recipe.eval_batch, int(frame.n_choices.max()))
                    tables = []
                    for m, mrows in by_measure.items():
                        p, c = zero_shot_p(scores[mrows], frame.n_choices[mrows], frame.gold[mrows])
                        tables.append(rows.table(method=METHOD, layer="", measure=m, train_level=h.train_level,
                                                 draw=h.draw, n_train=h.n_train, noise=h.label_noise, solver="",
                                                 rows=mrows, correct=c, p_gold=p))
                    stats["score_seconds"] += time.perf_counter() - t1
                    stats["scored_items"] += int(len(test))
                    if save_adapters is not None:
                        peft_model.save_pretrained(str(Path(save_adapters) / key))
                    writer.write_part(key, tables, info={"final_loss": log.losses[-1] if log.losses else None})
                finally:
                    detach_lora(lm, peft_model)
                stats["trained"] += 1
                stats["updates"] += log.updates
                stats["train_seconds"] += log.seconds
                stats["final_loss"][h.name] = log.losses[-1] if log.losses else None
                emit("scored", {"name": h.name, "items": int(len(test))})
            mine_counts = {"rank": rank, "trained_now": stats["trained"], "resumed": stats["skipped"],
                           "updates_now": stats["updates"], "scored_items_now": stats["scored_items"],
                           "train_seconds": stats["train_seconds"], "score_seconds": stats["score_seconds"],
                           "wall_seconds": time.perf_counter() - t0, "final_loss": stats["final_loss"]}
            if world > 1:  # the rank that merges sums every rank's counts
                writer.write_rank_counts(mine_counts)
            keys = (["zero_shot"] if zero_shot else []) + [part_key(h) for h in heads]

            def config(n_rows: int) -> RunRecord:
                ranks = [c for c in writer.rank_counts() if c is not None] if world > 1 else [mine_counts]
                total = {k: sum(c[k] for c in ranks) for k in ("trained_now", "resumed", "updates_now",
                                                                "scored_items_now", "train_seconds", "score_seconds")}
                wall = max([c["wall_seconds"] for c in ranks] + [time.perf_counter() - t0])
                final_loss = {h.name: writer.part_info(part_key(h)).get("final_loss") for h in heads}  # resumed too
                return RunRecord(
                    kind="finetune",
                    cache=str(cache.path.resolve()),
                    cache_manifest_sha256=cache.manifest_sha256,
                    dataset=dataset,
                    dataset_fingerprint=questions.fingerprint,
                    model=cache.manifest.get("model", {}),
                    prompt=cache.manifest.get("prompt", {}),
                    config={
                        "experiment": experiment, "measures": measures, "n_train": sorted({int(x) for x in n_train}),
                        "label_noise": [float(x) for x in label_noise] if experiment == "label_noise" else [0.0],
                        "draws": draws, "train_levels": sorted({h.train_level for h in heads}),
                        "test_levels": list(test_levels or []), "quantize": q or "none",
                        "optimizer": recipe.optimizer_for(q), "versions": library_versions(),
                        "recipe": recipe.describe(), "zero_shot": zero_shot, "max_updates": max_updates,
                        "save_adapters": str(save_adapters) if save_adapters is not None else None,
                        "cutoffs": {m: repr(r) for m, r in (cutoffs or {}).items()},
                        "schedules": {h.name: schedule(h.n_train, recipe).__dict__ for h in heads},
                    },
                    seed=seed,
                    counts={"heads": len(heads), "trained_now": total["trained_now"], "resumed": total["resumed"],
                            "updates_now": total["updates_now"], "rows": n_rows,
                            "probe_items": int(len(frame.probe)), "scored_items_now": total["scored_items_now"]},
                    details={
                        "finetune_model": lm.identity,
                        "world_size": world,
                        "final_loss": final_loss,
                        "wall_seconds": round(wall, 3),
                        "train_seconds": round(total["train_seconds"], 3),
                        "score_seconds": round(total["score_seconds"], 3),
                        "updates_per_second": (round(total["updates_now"] / total["train_seconds"], 4)
                                               if total["train_seconds"] else None),
                        "scored_items_per_second": (round(total["scored_items_now"] / total["score_seconds"], 3)
                                                    if total["score_seconds"] else None),
                    },
                )

            record = writer.merge(keys, config)
        if record is None:
            return {"merged": False, "rank": rank, "world_size": world, "counts": mine_counts}
        return record
