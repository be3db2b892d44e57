"""``probekit generate``: chain-of-thought generation and scoring (docs/protocol.md §12).

For a question set and a model, every test item gets a greedy chain of thought under each
requested condition:

- ``zero_shot``: the zero-shot CoT prompt (GSM8k: the paper's instruction "5305"; otherwise "0305",
  no instruction), one draw (greedy decoding has nothing to redraw);
- ``easy`` / ``medium`` / ``hard``: k demonstrations ``Q: ...\\nA: {reasoning} So the answer is
  {answer}`` drawn per draw from that level of ``measure``, with the draws and pools ICL uses
  (:func:`probekit.data.levels.level_pool`, :func:`probekit.data.draws.train_draw`, key
  ``icl/{measure}/{level}``); a draw's demonstrations are not among its test items;
- ``tuned_easy`` / ``tuned_medium`` / ``tuned_hard`` / ``tuned_all`` (``finetune``): LoRA adapters
  trained on ``n_train`` items of that draw and level with the seq2seq objective, then zero-shot
  generation with the adapted model (:mod:`probekit.cot.tune`); the training items are not among
  the unit's test items.

Test items are the probe items, or with ``n_test`` a stratified sample: about ``n_test / 3`` per
level of ``measure`` (a whole level when it is smaller), the same for every condition and draw,
so conditions can be compared item by item. Generation is batched with the shared prefix run once
(:mod:`probekit.cot.decode`); answers are scored by :mod:`probekit.cot.answers`. Every generation
is kept (:mod:`probekit.store.generations`), and the scores form a results table that
``probekit report`` reads (methods ``zero_shot_cot``, ``icl_cot`` and ``finetune_cot``).

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment; no process group is needed) the
work is split as ``probekit finetune`` splits its heads (:mod:`probekit.store.parts`), in pieces
dealt out ``i % world_size == rank`` (:func:`unit_pieces`): whole units, as many as give every rank
the same number, then the rest (fewer units than ranks) in s = ceil(ranks / rest) slices each
(slice j: the unit's batches j, j+s, ..., the batches one process runs, on the same shared prefix;
:func:`probekit.cot.decode.batch_rows`). Each rank writes its whole units as one process does and
its slices as parts, under its own lock; the rank that finishes last turns the slices into unit
files and writes ``results.parquet`` and ``sweep.json`` (with each rank's counts), so the folder
holds the files one process writes: the same rows, byte for byte where the decoding is the same.
A rank sharing a fine-tuned unit trains its adapters itself (the same seed, the same items), so
prompting units are the ones sliced when there are any. A killed rank's rerun (or the whole
command's) skips the units and slices already written.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from probekit.cot import tune
from probekit.cot.answers import SCORINGS, score
from probekit.cot.decode import batch_rows, check_lengths, generate
from probekit.data.draws import MIN_TEST, rng_for, train_draw
from probekit.data.levels import LEVELS, cutoff_for, level_pool, probe_levels
from probekit.data.prompts import COT_TEMPLATE_TEXT, render_cot
from probekit.design.plan import head_seed
from probekit.errors import OptionError, ProbekitError
from probekit.finetune.recipe import SEQ2SEQ_MIN_UPDATES, Recipe, schedule
from probekit.llm.batches import dist_env, rank_share
from probekit.llm.models import LoadedModel, ModelSpec, prepare_model, settle_model
from probekit.llm.progress import progress_bar
from probekit.llm.tokens import encode_prompt
from probekit.store.generations import GenerationsWriter, is_generation_entry, read_generations, read_logs
from probekit.store.layout import lock_name
from probekit.store.outdir import LOCK, OutputDir
from probekit.store.results import ResultRows, ResultsWriter, RunRecord, refuse_other_run

ZERO_SHOT = "zero_shot"
CONDITIONS = (ZERO_SHOT,) + LEVELS
#: The method of each kind of condition's rows (:data:`probekit.methods.METHODS`).
ZERO_SHOT_METHOD, PROMPTED_METHOD = "zero_shot_cot", "icl_cot"


def default_prompt_id(items) -> str:
    """The zero-shot CoT prompt of the paper's runs: "5305" (worksheet instruction) for GSM8k, else "0305"."""
    return "5305" if items.name == "gsm8k" else "0305"


def default_max_new_tokens(items) -> int:
    """300 tokens for a generative set (GSM8k), 100 otherwise (StrategyQA), as in the paper's runs."""
    return 300 if items.generative else 100


def comma_choices(text: str | list[str] | None, known: tuple[str, ...], what: str,
                  aliases: dict[str, str] | None = None) -> list[str]:
    """``"a,b,a"`` -> ``["a", "b"]``: each checked against ``known`` (one error naming ``what``), repeats dropped."""
    parts = [p.strip() for p in ((text or "").split(",") if isinstance(text, str) or text is None else text)
             if p.strip()]
    out = []
    for p in parts:
        p = (aliases or {}).get(p, p)
        if p not in known:
            raise ProbekitError(f"unknown {what} {p!r}: choose from {', '.join(known)} (comma-separated)")
        if p not in out:
            out.append(p)
    return out


def parse_conditions(text: str | list[str], allow_none: bool = False) -> list[str]:
    """``"zero_shot,easy,hard"`` -> the conditions, checked and without repeats (``none`` = ``zero_shot``);
    with ``allow_none`` an empty list is accepted."""
    out = comma_choices(text, CONDITIONS, "condition", {"none": ZERO_SHOT, "zero-shot": ZERO_SHOT, "0": ZERO_SHOT})
    if not out and not allow_none:
        raise ProbekitError("no condition given (e.g. zero_shot,easy,hard)")
    return out


def parse_levels(text: str | list[str] | None) -> list[str]:
    """``"easy,hard"`` -> the levels to fine-tune on (:data:`probekit.cot.tune.TUNE_LEVELS`), checked,
    without repeats (None or "" -> none)."""
    return comma_choices(text, tune.TUNE_LEVELS, "fine-tuning level")


def test_levels(items, measure: str) -> np.ndarray:
    """Level codes of every row for ``measure`` (cut over the probe items; -1 elsewhere)."""
    level_pool(items, measure, LEVELS[0])  # the measure check and its message
    table = items.table.reset_index(drop=True)
    probe = np.flatnonzero((table["pool"] == "probe").to_numpy())
    return probe_levels(table[measure].to_numpy(), probe, cutoff_for(items.name, measure))


def test_sample(items, measure: str, n_test: int | None, seed: int = 0) -> np.ndarray:
    """Test rows: every probe item, or about ``n_test / 3`` per level of ``measure`` (sorted)."""
    codes = test_levels(items, measure)
    if n_test is None:
        return np.flatnonzero(codes >= 0)
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 1:
        raise ProbekitError(f"n_test must be a positive integer, got {n_test!r}")
    per = math.ceil(n_test / len(LEVELS))
    rows = []
    for k, level in enumerate(LEVELS):
        pool = np.flatnonzero(codes == k)
        order = rng_for(seed, 0, f"cot-test/{measure}/{level}").permutation(len(pool))
        rows.append(pool[order[:per]])
    return np.sort(np.concatenate(rows))


def demo_rows(items, measure: str, level: str, k: int, seed: int, draw: int, min_test: int = MIN_TEST,
              what: str = "demonstrations") -> np.ndarray:
    """The k demonstrations (or, ``what="training items"``, the k fine-tuning items) of one draw: the
    ICL draw (same pool, same key, same seed)."""
    pool = level_pool(items, measure, level)
    name = "k" if what == "demonstrations" else "n_train"
    if k > len(pool):
        raise ProbekitError(f"{name} = {k} {what} but level {level!r} of {measure!r} has only {len(pool)} items")
    return train_draw(pool, k, seed=seed, draw=draw, key=f"icl/{measure}/{level}", min_test=min_test,
                      size_name=f"the number of {what} {name}")


def _check_reasoning(items, rows: np.ndarray, what: str = "demonstration") -> None:
    table = items.table  # a set without a reasoning column is refused by generate_cot
    for r in rows:
        text = table["reasoning"].iat[int(r)]
        if not isinstance(text, str) or not text.strip():
            raise ProbekitError(f"dataset {items.name}: {what} item {table['id'].iat[int(r)]!r} has no "
                                "reasoning text")


def gold_answer(items, row: int) -> str:
    table = items.table
    return str(table["choices"].iat[row][int(table["label"].iat[row])])


def unit_pieces(units: list[tuple[str, int]], world_size: int) -> list[tuple[tuple[str, int], int, int]]:
    """The pieces of work ranks share, ``(unit, j, s)``; rank r takes those at ``i % world_size == r``.

    Fine-tuned units first, then prompting ones (a unit's order within each kind kept): the first
    units whole (``j, s = 0, 1``), as many as give every rank the same number; the rest, fewer than
    the ranks, each in ``s = ceil(world_size / rest)`` slices j = 0..s-1 (the unit's batches j, j+s, ...)."""
    ordered = sorted(units, key=lambda u: tune.tuned_level(u[0]) is None)
    whole = len(ordered) - len(ordered) % world_size
    rest = ordered[whole:]
    s = -(-world_size // len(rest)) if rest else 1
    return [(u, 0, 1) for u in ordered[:whole]] + [(u, j, s) for u in rest for j in range(s)]


@dataclass
class GenerateSummary:
    out_dir: Path
    units_written: list[str]  # "easy/0", or "easy/0 part 1/2" for a slice of a unit (several ranks)
    n_test: int
    new_tokens: int
    seconds: float
    accuracy: dict
    rank: int = 0
    world_size: int = 1
    merged: bool = True  # False: another rank is still at work (it merges when it finishes)
    resumed: int = 0  # this rank's units (or slices) already written by an earlier run

    def line(self) -> str:
        acc = ", ".join(f"{c} {a:.1%}" for c, a in self.accuracy.items())
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        who = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        resumed = f" ({self.resumed} written before)" if self.world_size > 1 and self.resumed else ""
        done = (f"accuracy {acc or '-'}" if self.merged else "the last rank to finish merges")
        return (f"generate: {who}{len(self.units_written)} {'pieces' if self.world_size > 1 else 'units'} written{resumed}, "
                f"{self.new_tokens:,} tokens generated in {self.seconds:.1f} s ({rate:,.1f} tok/s); {self.n_test} test "
                f"items; {done}; {self.out_dir}")


def generate_cot(
    items,
    out_dir: str | os.PathLike,
    model: str | ModelSpec | LoadedModel | None = None,
    *,
    conditions: str | list[str] | None = "zero_shot,easy,hard",
    k: int = 8,
    measure: str | None = None,
    draws: int = 1,
    seed: int = 0,
    n_test: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    scoring: str = "default",
    prompt_id: str | None = None,
    min_test: int = MIN_TEST,
    finetune: str | list[str] | None = None,
    n_train: int = 160,
    recipe: Recipe | None = None,
    max_updates: int | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Generate and score chains of thought into ``out_dir`` (see the module docstring); resumable.

    ``model``: as for :func:`probekit.extract.extract` (``ModelSpec(device_map="auto")`` spreads a
    model larger than one GPU over every GPU this process sees); with ``finetune`` its "auto" is
    settled for fine-tuning (quantize: 8bit on a GPU, none on the CPU).

    ``finetune``: levels (``easy,hard``; ``all`` = every probe item) whose ``n_train`` items per draw
    train fresh LoRA adapters on chains of thought (:mod:`probekit.cot.tune`; ``recipe``: the
    settings, default the study's with at least 150 updates; ``max_updates`` caps a fine-tune, for
    tests) before the adapted model generates. With ``finetune``, ``conditions`` may be empty.
    """
    g = _settle(items, conditions, k, measure, draws, seed, n_test, max_new_tokens, batch_size, scoring, prompt_id,
                min_test, finetune, n_train, recipe, max_updates)
    rank, world, local = dist_env()
    pieces = unit_pieces(g.units, world)
    out = Path(out_dir)
    model = settle_model(model, local, world, train=bool(g.tune_levels))  # checked before anything is written
    refuse_other_run(out, "generate", "generation folder")  # before a lock file is made in it
    lock = LOCK if world == 1 else lock_name(rank)
    with OutputDir(out, (), "generation folder", lock_file=lock, own=is_generation_entry, share=True,
                   exclusive=True):  # locked before the model loads
        refuse_other_run(out, "generate", "generation folder")
        lm = prepare_model(model)
        header = _header(lm, items, g)
        t0 = time.perf_counter()
        merged = True
        with GenerationsWriter(out, header, rank, world) as writer:
            mine = rank_share(pieces, rank, world)
            todo = [(u, j, s) for u, j, s in mine if not writer.has_unit(*u) and not writer.has_slice(*u, j, s)]
            done = _generate_pieces(lm, items, g, header, writer, todo, out, rank, world, progress)
            if world == 1 and not todo:
                write_results(out, items, g.codes, g.measure, g.k, header)
            if world > 1:  # the rank that finishes last merges (the others find a piece missing)
                writer.parts.write_counts({"rank": rank, "pieces": len(mine), "written_now": len(done.units),
                                           "resumed": len(mine) - len(todo), "new_tokens_now": done.new_tokens,
                                           "wall_seconds": round(time.perf_counter() - t0, 3)})
                with writer.merging():
                    merged = all([writer.merge_unit(c, b, s, _merge_logs) for (c, b), j, s in pieces if j == 0])
                    if merged:
                        writer.remove_leftovers(g.units)
                        write_results(out, items, g.codes, g.measure, g.k, header, world,
                                      [x for x in writer.parts.counts() if x is not None])
        accuracy = {}
        if merged:
            frame = read_generations(out)
            accuracy = {c: float(x["correct"].mean()) for c, x in frame.groupby("condition", sort=False)}
    return GenerateSummary(out, done.units, len(g.rows), done.new_tokens, time.perf_counter() - t0, accuracy, rank,
                           world, merged, len(mine) - len(todo))


class Generation(NamedTuple):
    """A generation run's settings, checked and settled, and its draws: the test rows and their level
    codes, each k-shot unit's demonstrations and each fine-tuned unit's training rows, the units."""

    conds: list[str]
    tune_levels: list[str]
    k: int
    measure: str
    draws: int
    seed: int
    n_test: int | None
    max_new_tokens: int
    batch_size: int
    scoring: str
    prompt_id: str
    min_test: int
    n_train: int
    recipe: Recipe
    max_updates: int | None
    rows: np.ndarray
    codes: np.ndarray
    demos: dict[tuple[str, int], np.ndarray]
    trains: dict[tuple[str, int], np.ndarray]
    units: list[tuple[str, int]]


class UnitPlan(NamedTuple):
    """A unit's test rows, prompt texts, item ids and prompt token ids (prompt order)."""

    rows: np.ndarray
    texts: list[str]
    ids: list[str]
    prompts: list


class Written(NamedTuple):
    """What one rank generated now: the units (or slices) written and the tokens generated."""

    units: list[str]
    new_tokens: int


class Piece(NamedTuple):
    """A unit (or slice) generated: its rows, and the fine-tune's log for a fine-tuned unit (else None)."""

    rows: dict
    log: dict | None


def _check_options(items, k, draws, seed, max_new_tokens, batch_size, scoring, n_train) -> None:
    if scoring not in SCORINGS:
        raise ProbekitError(f"unknown scoring rule {scoring!r}: choose {' or '.join(SCORINGS)}")
    for name, value in (("k", k), ("draws", draws), ("batch_size", batch_size), ("n_train", n_train)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbekitError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise OptionError("max_new_tokens", max_new_tokens, "a positive integer")
    if "reasoning" not in items.table.columns:
        raise ProbekitError(f"dataset {items.name} has no reasoning text: chain-of-thought generation is for sets "
                            "with worked reasoning (gsm8k, strategyqa, or a file with a 'reasoning' column); score "
                            "multiple-choice items with `probekit extract`")


def _settle(items, conditions, k, measure, draws, seed, n_test, max_new_tokens, batch_size, scoring, prompt_id,
            min_test, finetune, n_train, recipe, max_updates) -> Generation:
    """The options checked and their defaults settled; the test sample, demonstrations and training
    draws drawn and checked (every refusal before a model loads)."""
    tune_levels = parse_levels(finetune)
    conds = parse_conditions(conditions or [], allow_none=bool(tune_levels))
    _check_options(items, k, draws, seed, max_new_tokens, batch_size, scoring, n_train)
    recipe = recipe or Recipe(min_updates=SEQ2SEQ_MIN_UPDATES)
    measure = measure or items.measures[0]
    max_new_tokens = max_new_tokens if max_new_tokens is not None else default_max_new_tokens(items)
    prompt_id = prompt_id or default_prompt_id(items)
    rows = test_sample(items, measure, n_test, seed)
    codes = test_levels(items, measure)
    demos = {(c, b): demo_rows(items, measure, c, k, seed, b, min_test)
             for c in conds if c != ZERO_SHOT for b in range(draws)}
    for d in demos.values():
        _check_reasoning(items, d)
    trains = {(tune.condition(lv), b): demo_rows(items, measure, lv, n_train, seed, b, min_test, what="training items")
              for lv in tune_levels for b in range(draws)}
    for d in trains.values():
        _check_reasoning(items, d, "training")
    units = [(c, b) for b in range(draws) for c in conds if c != ZERO_SHOT or b == 0]
    units += [(tune.condition(lv), b) for b in range(draws) for lv in tune_levels]
    return Generation(conds, tune_levels, k, measure, draws, seed, n_test, max_new_tokens, batch_size, scoring,
                      prompt_id, min_test, n_train, recipe, max_updates, rows, codes, demos, trains, units)


def _header(lm, items, g: Generation) -> dict:
    """The generation folder's header: model, dataset, prompts and settings (and the fine-tuning recipe
    with ``finetune``: only then, so a folder of prompting conditions keeps the header it had)."""
    header = {
        "model": lm.identity,
        "dataset": {"name": items.name, "fingerprint": items.fingerprint, "n_items": len(items.table)},
        "prompt": {"zero_shot": g.prompt_id, "k_shot": "0305", "text": COT_TEMPLATE_TEXT},
        "generate": {"conditions": g.conds, "k": g.k, "measure": g.measure, "draws": g.draws, "seed": g.seed,
                     "n_test": g.n_test, "max_new_tokens": g.max_new_tokens, "scoring": g.scoring,
                     "stop": "answer line", "min_test": g.min_test},
        "test_ids": [str(i) for i in items.table["id"].to_numpy()[g.rows]],
    }
    if g.tune_levels:
        from probekit.finetune.train import check_targets, library_versions

        quantize, recipe = lm.quantize, g.recipe
        check_targets(lm.model, recipe.target_modules)
        header["prompt"]["finetune"] = tune.PROMPT_ID
        header["generate"]["finetune"] = {
            "levels": g.tune_levels, "n_train": g.n_train, "objective": "seq2seq", "draws": "icl/{measure}/{level}",
            "quantize": quantize or "none", "optimizer": recipe.optimizer_for(quantize),
            "recipe": recipe.describe("seq2seq"), "max_updates": g.max_updates,
            "schedule": schedule(g.n_train, recipe).__dict__, "versions": library_versions(),
        }
    return header


def _generate_pieces(lm, items, g: Generation, header: dict, writer: GenerationsWriter, todo: list, out: Path,
                     rank: int, world: int, progress: bool) -> Written:
    """Generate this rank's pieces not yet written, each written as it finishes (a single process
    rebuilds the results after each)."""
    excluded = {**g.demos, **g.trains}
    plans = {u: _plan_unit(lm, items, g.rows, excluded.get(u), g.prompt_id, g.max_new_tokens, u[0])
             for u in dict.fromkeys(u for u, _, _ in todo)}
    piece_rows = {(u, j, s): [i for batch in batch_rows(plans[u].prompts, g.batch_size, (j, s)) for i in batch]
                  for u, j, s in todo}
    total = sum(len(v) for v in piece_rows.values())
    label = f"generate {items.name} k={g.k}" + (f" rank {rank}/{world}" if world > 1 else "")
    written, new_tokens = [], 0
    with progress_bar(total, label, enabled=progress and bool(todo)) as bar:
        for (c, b), j, s in todo:
            if g.tune_levels:
                bar.describe(f"generate {items.name} {c}")
            empty = s > 1 and not piece_rows[((c, b), j, s)]  # an empty slice: nothing to train for
            piece = _run_piece(lm, items, g, (c, b), (j, s), plans[(c, b)], empty, bar)
            if s == 1:
                writer.write_unit(c, b, piece.rows, piece.log)
                written.append(f"{c}/{b}")
            else:
                writer.write_slice(c, b, j, s, piece.rows, piece.log)
                written.append(f"{c}/{b} part {j + 1}/{s}")
            new_tokens += int(sum(piece.rows["new_tokens"]))
            if world == 1:
                write_results(out, items, g.codes, g.measure, g.k, header)
    return Written(written, new_tokens)


def _run_piece(lm, items, g: Generation, unit: tuple[str, int], part: tuple[int, int], plan: UnitPlan,
               empty: bool, bar) -> Piece:
    """One unit (or slice ``part`` of it); a fine-tuned unit trains its adapters first (seeded by the
    unit) and generates with them."""
    c, b = unit
    if tune.tuned_level(c) is None or empty:
        return Piece(_run_unit(lm, items, c, b, plan, g.max_new_tokens, g.batch_size, g.scoring, bar, part), None)
    train = tune.encode_targets(lm, items, g.trains[unit], lambda r: gold_answer(items, r))

    def shown(done: int, total: int, loss: float) -> None:
        bar.describe(f"train {c} update {done}/{total} loss {loss:.3f}")

    with tune.tuned(lm, train, g.recipe, head_seed(g.seed, f"cot/{g.measure}/{c}/{b}/n{g.n_train}"),
                    quantize=lm.quantize, max_updates=g.max_updates, on_update=shown) as trained:
        bar.describe(f"generate {items.name} {c}")
        t1 = time.perf_counter()
        rows = _run_unit(lm, items, c, b, plan, g.max_new_tokens, g.batch_size, g.scoring, bar, part)
    log = {"train_items": [str(i) for i in items.table["id"].to_numpy()[g.trains[unit]]],
           "updates": trained.updates, "epochs": trained.epochs,
           "effective_batch": trained.effective_batch, "optimizer": trained.optimizer,
           "losses": [x if math.isfinite(x) else None for x in trained.losses],
           "train_seconds": round(trained.seconds, 3),
           "generate_seconds": round(time.perf_counter() - t1, 3)}
    return Piece(rows, log)


def _merge_logs(logs: list[dict]) -> dict:
    """The training log of a fine-tuned unit generated in slices by several ranks: the first slice's
    (each rank trained the same adapters from the same seed and items), its ``generate_seconds`` summed
    over the slices, and every slice's last loss and seconds under ``slices``."""
    out = dict(logs[0])
    out["generate_seconds"] = round(sum(x["generate_seconds"] for x in logs), 3)
    out["slices"] = [{"last_loss": (x["losses"] or [None])[-1], "train_seconds": x["train_seconds"],
                      "generate_seconds": x["generate_seconds"]} for x in logs]
    return out


def _plan_unit(lm, items, rows, excluded, prompt_id, max_new_tokens, condition: str = "") -> UnitPlan:
    """A unit's test rows (without the draw's ``excluded`` rows), prompt texts and token ids; every
    prompt checked against the context. A k-shot unit shows its excluded rows as demonstrations."""
    table = items.table
    if excluded is not None:
        rows = rows[~np.isin(rows, excluded)]
    if tune.tuned_level(condition) is not None:
        examples, pid = [], tune.PROMPT_ID
    elif excluded is not None:
        examples = [(str(table["question"].iat[r]), str(table["reasoning"].iat[r]), gold_answer(items, int(r)))
                    for r in excluded]
        pid = "0305"
    else:
        examples, pid = [], prompt_id
    texts = [render_cot(examples, str(table["question"].iat[r]), pid) for r in rows]
    ids = [str(table["id"].iat[r]) for r in rows]
    prompts = [encode_prompt(lm.tokenizer, t, lm.rules) for t in texts]
    check_lengths(lm, prompts, ids, max_new_tokens)
    return UnitPlan(rows, texts, ids, prompts)


def _run_unit(lm, items, condition, draw, plan: UnitPlan, max_new_tokens, batch_size, scoring, bar, part=(0, 1)) -> dict:
    """One unit's rows (its slice ``part``, see :func:`probekit.cot.decode.generate`), in prompt order."""
    rows, texts, ids, prompts = plan
    gens, _ = generate(lm, prompts, max_new_tokens, batch_size=batch_size, stop="answer", bar=bar, part=part)
    keep = [i for i, g in enumerate(gens) if g is not None]
    rows, gens = rows[keep], [gens[i] for i in keep]
    texts, ids, prompts = [texts[i] for i in keep], [ids[i] for i in keep], [prompts[i] for i in keep]
    golds = [gold_answer(items, int(r)) for r in rows]
    scored = [score(g.text, gold, numeric=bool(items.generative), scoring=scoring) for g, gold in zip(gens, golds)]
    return {
        "item_id": ids, "condition": [condition] * len(rows), "draw": [draw] * len(rows),
        "prompt_sha256": [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts],
        "prompt_tokens": [len(p) for p in prompts], "text": [g.text for g in gens],
        "new_tokens": [len(g.ids) for g in gens], "stopped": [g.stopped for g in gens],
        "answer": [a for a, _ in scored], "gold": golds, "correct": [int(ok) for _, ok in scored],
    }


def condition_row(condition: str, k: int, header: dict) -> tuple[str, str, int]:
    """A condition's ``train_level``, ``method`` and ``n_train`` in the results table."""
    level = tune.tuned_level(condition)
    if level is not None:
        return level, tune.METHOD, int(header["generate"]["finetune"]["n_train"])
    if condition == ZERO_SHOT:
        return ZERO_SHOT, ZERO_SHOT_METHOD, 0
    return condition, PROMPTED_METHOD, k


def write_results(out: Path, items, codes: np.ndarray, measure: str, k: int, header: dict,
                  world_size: int = 1, ranks: list[dict] | None = None) -> None:
    """Rebuild ``results.parquet`` + ``sweep.json`` from every finished unit of the folder (written by
    ``world_size`` ranks: their number and ``ranks``, their counts, are recorded)."""
    frame = read_generations(out)
    table = items.table
    index = {str(i): n for n, i in enumerate(table["id"].to_numpy())}
    builder = ResultRows("population", "", [str(i) for i in table["id"].to_numpy()], LEVELS)
    with ResultsWriter(out) as writer:
        for (c, b), g in frame.groupby(["condition", "draw"], sort=True):
            r = np.array([index[i] for i in g["item_id"]], dtype=np.int64)
            level, method, n = condition_row(c, k, header)
            writer.append(builder.table(
                method=method, layer="", measure=measure, train_level=level, draw=int(b), n_train=n, noise=0.0,
                solver="", rows=r, test_levels=codes[r], correct=g["correct"].to_numpy(),
                p_gold=np.full(len(r), np.nan)))
        details = {}
        logs = read_logs(out)
        if logs:  # fine-tuned units: updates, first and last loss, seconds (every loss: DIR/log-*.json)
            details["training"] = {u: {"updates": g["updates"], "first_loss": (g["losses"] or [None])[0],
                                       "last_loss": (g["losses"] or [None])[-1], "train_seconds": g["train_seconds"],
                                       "generate_seconds": g["generate_seconds"]} for u, g in logs.items()}
        if world_size > 1:
            details["world_size"] = world_size
            details["ranks"] = ranks or []
        writer.commit(RunRecord(
            kind="generate", dataset=header["dataset"]["name"], dataset_fingerprint=header["dataset"]["fingerprint"],
            model=header["model"], prompt=header["prompt"], config=header["generate"],
            seed=header["generate"]["seed"], counts={"rows": builder.n_rows}, details=details))
