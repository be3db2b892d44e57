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
from typing import Any, NamedTuple

import numpy as np

from probekit.data.levels import LEVELS, Cutoff
from probekit.design import (
    FrameRows,
    Head,
    ItemFrame,
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


class Settings(NamedTuple):
    """The heads and training settings of one fine-tuning run (see :func:`finetune`)."""

    experiment: str
    n_train: Sequence[int]
    label_noise: Sequence[float]
    draws: int
    seed: int
    levels: Sequence[str] | None
    test_levels: Sequence[str] | None
    cutoffs: Mapping[str, Cutoff] | None
    recipe: Recipe
    zero_shot: bool
    save_adapters: str | os.PathLike | None
    max_updates: int | None

    def updates(self, head: Head) -> int:
        """The optimizer updates of ``head``'s fine-tune (its schedule, capped by ``max_updates``)."""
        return min(schedule(head.n_train, self.recipe).updates, self.max_updates or 1 << 30)


class Opened(NamedTuple):
    """A fine-tuning run's inputs, checked: the cache, the design on it, the questions and the model."""

    cache: Cache
    dataset: str
    measures: list[str]
    frame: ItemFrame
    heads: list[Head]
    questions: Any
    template: str
    lm: LoadedModel


class Scored(NamedTuple):
    """One head's fine-tune: its log (updates, losses, seconds), and the items scored and how long it took."""

    log: Any
    items: int
    seconds: float


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
    s = Settings(experiment, n_train, label_noise, draws, seed, levels, test_levels, cutoffs, recipe or Recipe(),
                 zero_shot, save_adapters, max_updates)
    emit = progress or (lambda event, fields: None)
    check_settings(s)
    model = settle_model(model, local, world, train=True)  # checked before anything is read or loaded
    with holding_results(out, "finetune", rank):  # locked before the cache is verified or the model loads
        run = open_run(cache, items, model, measures, s, verify)
        mine = rank_share(run.heads, rank, world)  # each rank its own heads
        with ResultsWriter(out, run=_resume_key(run, s), rank=rank, world_size=world) as writer:
            counts = _train_heads(run, s, mine, writer, rank, emit)
            counts["wall_seconds"] = time.perf_counter() - t0
            if world > 1:  # the rank that merges sums every rank's counts
                writer.write_rank_counts(counts)
            keys = (["zero_shot"] if zero_shot else []) + [part_key(h) for h in run.heads]
            ranks = (lambda: [c for c in writer.rank_counts() if c is not None]) if world > 1 else (lambda: [counts])
            record = writer.merge(keys, lambda n_rows: _run_record(run, s, writer, ranks(), world, t0, n_rows))
        if record is None:
            return {"merged": False, "rank": rank, "world_size": world, "counts": counts}
        return record


def check_settings(s: Settings) -> None:
    """Refuse an unknown experiment or test level, and an unusable ``save_adapters`` folder, in one line."""
    if s.experiment not in EXPERIMENTS:
        raise ProbekitError(f"unknown experiment {s.experiment!r}: choose from {', '.join(EXPERIMENTS)}")
    for lv in s.test_levels or ():
        if lv not in LEVELS:
            raise ProbekitError(f"test level {lv!r} is not one of {', '.join(LEVELS)}")
    if s.save_adapters is not None:
        check_dir_target(s.save_adapters, "save_adapters")


def open_run(cache, items, model, measures: Sequence[str] | None, s: Settings, verify: bool) -> Opened:
    """The cache verified, its heads planned (the sweep's), the questions checked against it and the
    model loaded and checked: every refusal before the first update."""
    cache = open_cache(cache, verify)
    dataset = str(cache.manifest.get("dataset", {}).get("name", ""))
    frame_items, measures = load_items(cache, measures)
    frame = item_frame(frame_items, dataset, measures, s.cutoffs)
    heads = plan(frame, s.experiment, measures, n_train=s.n_train, label_noise=s.label_noise, draws=s.draws,
                 seed=s.seed, levels=s.levels)  # the sweep's heads: n_train too large for a level fails here
    questions = cache_questions(items, cache)
    template = cache.manifest.get("prompt", {}).get("template", questions.prompt_template)
    lm = prepare_model(model_for_cache(cache, model) if isinstance(model, ModelSpec) and model.model is None
                       else model)
    if not _same_weights(cache.manifest.get("model", {}), lm.identity):
        raise ProbekitError(f"model {lm.identity.get('id')!r} is not the model cache {cache.path} was extracted with "
                            f"({cache.manifest.get('model', {}).get('id')!r})")
    check_targets(lm.model, s.recipe.target_modules)  # one line naming the model's modules, before any work
    check_table_context(lm, questions.table.iloc[frame.probe], template)  # every prompt fits the model
    return Opened(cache, dataset, measures, frame, heads, questions, template, lm)


def _resume_key(run: Opened, s: Settings) -> dict[str, Any]:
    """What a rerun must share with the parts it finds to resume them."""
    return {
        CACHE_HASH_KEY: run.cache.manifest_sha256, "dataset_fingerprint": run.questions.fingerprint,
        "model": {k: run.lm.identity.get(k) for k in ("id", "weights_sha256", "revision", "dtype", "quantization")},
        "experiment": s.experiment, "seed": s.seed, "recipe": s.recipe.describe(),
        "test_levels": list(s.test_levels or []), "cutoffs": {m: repr(r) for m, r in (s.cutoffs or {}).items()},
        "template": run.template, "max_updates": s.max_updates, "zero_shot": s.zero_shot,
    }


def _train_heads(run: Opened, s: Settings, mine: Sequence[Head], writer: ResultsWriter, rank: int,
                 emit: Progress) -> dict[str, Any]:
    """Fine-tune and score this rank's heads not yet written (rank 0 writes the zero-shot part first);
    this rank's counts."""
    rows = FrameRows(run.frame, s.experiment)
    encoded: dict[int, Any] = {}

    def encode(idx: np.ndarray) -> list:
        need = [int(i) for i in idx if int(i) not in encoded]
        if need:
            for i, e in zip(need, encode_rows(run.lm, run.questions.table.iloc[need], run.template, run.lm.rules)):
                encoded[i] = e
        return [encoded[int(i)] for i in idx]

    counts: dict[str, Any] = {"rank": rank, "trained_now": 0, "resumed": 0, "updates_now": 0, "scored_items_now": 0,
                              "train_seconds": 0.0, "score_seconds": 0.0, "wall_seconds": 0.0, "final_loss": {}}
    todo = [h for h in mine if not writer.has_part(part_key(h))]
    emit("start", {"heads": len(mine), "todo": len(todo), "updates": sum(s.updates(h) for h in todo)})
    if s.zero_shot and rank == 0 and not writer.has_part("zero_shot"):
        writer.write_part("zero_shot", zero_shot_tables(run.cache, run.frame, run.measures, s.experiment))
    for h in mine:
        if writer.has_part(part_key(h)):
            counts["resumed"] += 1
            emit("skip", {"name": h.name})
            continue
        emit("head", {"name": h.name, "updates": s.updates(h)})
        done = _fit_head(run, s, h, encode, rows, writer, emit)
        counts["trained_now"] += 1
        counts["updates_now"] += done.log.updates
        counts["train_seconds"] += done.log.seconds
        counts["score_seconds"] += done.seconds
        counts["scored_items_now"] += done.items
        counts["final_loss"][h.name] = done.log.losses[-1] if done.log.losses else None
        emit("scored", {"name": h.name, "items": done.items})
    return counts


def _fit_head(run: Opened, s: Settings, h: Head, encode: Callable[[np.ndarray], list], rows: FrameRows,
              writer: ResultsWriter, emit: Progress) -> Scored:
    """Train fresh adapters (seeded by the head) on one head's draw, score its test items, write its part."""
    lm, frame = run.lm, run.frame
    hseed = head_seed(s.seed, h.name)
    peft_model = attach_lora(lm, s.recipe, hseed)
    try:
        log = train_adapters(lm, peft_model, encode(h.rows), h.labels, s.recipe, hseed, quantize=lm.quantize,
                             max_updates=s.max_updates,
                             on_update=lambda d, t, loss: emit("update", {"done": d, "total": t, "loss": loss}))
        t1 = time.perf_counter()
        by_measure = _test_levels(frame, h, s.test_levels)
        test = np.unique(np.concatenate(list(by_measure.values())))
        scores = np.full((len(frame.ids), frame.n_choices.max()), -np.inf, np.float32)
        if len(test):
            scores[test] = score_items(lm, encode(test), s.recipe.eval_batch, int(frame.n_choices.max()))
        tables = []
        for m, mrows in by_measure.items():
            p, c = zero_shot_p(scores[mrows], frame.n_choices[mrows], frame.gold[mrows])
            tables.append(rows.table(method=METHOD, layer="", measure=m, train_level=h.train_level, draw=h.draw,
                                     n_train=h.n_train, noise=h.label_noise, solver="", rows=mrows, correct=c,
                                     p_gold=p))
        seconds = time.perf_counter() - t1
        if s.save_adapters is not None:
            peft_model.save_pretrained(str(Path(s.save_adapters) / part_key(h)))
        writer.write_part(part_key(h), tables, info={"final_loss": log.losses[-1] if log.losses else None})
    finally:
        detach_lora(lm, peft_model)
    return Scored(log, int(len(test)), seconds)


def _run_record(run: Opened, s: Settings, writer: ResultsWriter, ranks: Sequence[Mapping[str, Any]], world: int,
                t0: float, n_rows: int) -> RunRecord:
    """``sweep.json`` of the merged run: every rank's counts summed, every head's last loss (resumed too)."""
    total = {k: sum(c[k] for c in ranks) for k in ("trained_now", "resumed", "updates_now", "scored_items_now",
                                                    "train_seconds", "score_seconds")}
    wall = max([c["wall_seconds"] for c in ranks] + [time.perf_counter() - t0])
    final_loss = {h.name: writer.part_info(part_key(h)).get("final_loss") for h in run.heads}
    q, cache, heads = run.lm.quantize, run.cache, run.heads
    return RunRecord(
        kind="finetune", cache=str(cache.path.resolve()), cache_manifest_sha256=cache.manifest_sha256,
        dataset=run.dataset, dataset_fingerprint=run.questions.fingerprint,
        model=cache.manifest.get("model", {}), prompt=cache.manifest.get("prompt", {}),
        config={
            "experiment": s.experiment, "measures": run.measures, "n_train": sorted({int(x) for x in s.n_train}),
            "label_noise": [float(x) for x in s.label_noise] if s.experiment == "label_noise" else [0.0],
            "draws": s.draws, "train_levels": sorted({h.train_level for h in heads}),
            "test_levels": list(s.test_levels or []), "quantize": q or "none",
            "optimizer": s.recipe.optimizer_for(q), "versions": library_versions(),
            "recipe": s.recipe.describe(), "zero_shot": s.zero_shot, "max_updates": s.max_updates,
            "save_adapters": str(s.save_adapters) if s.save_adapters is not None else None,
            "cutoffs": {m: repr(r) for m, r in (s.cutoffs or {}).items()},
            "schedules": {h.name: schedule(h.n_train, s.recipe).__dict__ for h in heads},
        },
        seed=s.seed,
        counts={"heads": len(heads), "trained_now": total["trained_now"], "resumed": total["resumed"],
                "updates_now": total["updates_now"], "rows": n_rows, "probe_items": int(len(run.frame.probe)),
                "scored_items_now": total["scored_items_now"]},
        details={
            "finetune_model": run.lm.identity, "world_size": world, "final_loss": final_loss,
            "wall_seconds": round(wall, 3), "train_seconds": round(total["train_seconds"], 3),
            "score_seconds": round(total["score_seconds"], 3),
            "updates_per_second": (round(total["updates_now"] / total["train_seconds"], 4)
                                   if total["train_seconds"] else None),
            "scored_items_per_second": (round(total["scored_items_now"] / total["score_seconds"], 3)
                                        if total["score_seconds"] else None),
        },
    )
