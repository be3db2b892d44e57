"""In-context-learning scores (docs/protocol.md §1.7, §2, §5): k-shot choice log-probs per draw.

For each draw b, ``k`` demonstrations are drawn from the probe items of one difficulty level
(``probekit.data.draws.train_draw`` with key ``"icl/{measure}/{level}"``), from every probe item
(``demos_from="all"``, key ``"icl/all"``), or from a level of another question set
(``demos_items``, key ``"icl/{set}/{measure}/{level}"``: ARC easy demonstrations for MMLU, say);
every probe item (or those at ``test_levels``) is then scored under the k-shot prompt
(demonstrations with their gold answer text, then the test item).
All items of a draw share the demonstrations, so the longest token prefix common to every k-shot
prompt of the draw runs once and its key/value cache is reused for every batch.

The output folder (``icl.json`` and one ``draw-NNN.h5`` per draw) is defined, written and read by
:mod:`probekit.store.icl_scores`; a rerun skips recorded draws. :func:`load_icl` returns
``choice_sum`` with a leading draw axis.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probekit.data.levels import ALL, level_pool
from probekit.data.prompts import TEMPLATE_TEXT, render_kshot
from probekit.errors import ProbekitError
from probekit.extract.capture import capture_batch
from probekit.extract.inputs import check_items, limit_items, with_template
from probekit.llm.batches import dist_env, length_batches
from probekit.llm.forward import Prefix, compute_prefix
from probekit.llm.models import LoadedModel, ModelSpec, prepare_model, settle_model
from probekit.llm.progress import progress_bar
from probekit.llm.tokens import Encoded, TokenRules, answer_text, common_prefix, encode_prompt
from probekit.store.icl_scores import FORMAT, IclScoresWriter, is_icl_entry
from probekit.store.icl_scores import load_icl as load_icl  # the reader, re-exported
from probekit.store.layout import lock_name
from probekit.store.outdir import OutputDir


@dataclass
class DrawPlan:
    """One draw: demonstration rows and every item's k-shot token ids."""

    draw: int
    demo_rows: np.ndarray
    k_used: int
    encoded: list[Encoded]  # full k-shot prompt ids per scored row
    prefix_ids: list[int]


def cutoff_text(rule) -> str:
    """A cut-off as the command line writes it: ``"3,8"`` or ``"q20,q80"``."""
    from probekit.data.levels import Quantile

    if isinstance(rule, Quantile):
        return f"q{100 * rule.lo:g},q{100 * rule.hi:g}"
    return f"{rule.easy_max:g},{rule.hard_min:g}"


def plan_draw(lm: LoadedModel, items, rows: np.ndarray, demo_rows: np.ndarray, draw: int,
              rules: TokenRules, max_seq_len: int, demos_items=None) -> DrawPlan:
    """Tokenise every row's k-shot prompt (jointly, as the reference does) and find the shared prefix.

    ``demo_rows`` index ``demos_items`` (another question set) when given, else ``items``; the
    prompt template is that of ``items``. If a prompt plus its longest choice exceeds
    ``max_seq_len`` tokens, demonstrations are dropped from the end for the whole draw (the
    reference drops them per prompt).
    """
    table = items.table.reset_index(drop=True)
    template = items.prompt_template
    source = table if demos_items is None else demos_items.table.reset_index(drop=True)
    demos = [(str(source.at[r, "question"]), [str(c) for c in source.at[r, "choices"]],
              str(source.at[r, "choices"][int(source.at[r, "label"])])) for r in demo_rows]
    k = len(demos)
    while True:
        encoded = []
        for r in rows:
            choices = [str(c) for c in table.at[r, "choices"]]
            text = render_kshot(demos[:k], str(table.at[r, "question"]), choices, template)
            p = encode_prompt(lm.tokenizer, text, rules)
            cs = [list(lm.tokenizer(answer_text(c, rules), add_special_tokens=False)["input_ids"]) for c in choices]
            if any(not c for c in cs):
                raise ProbekitError(f"item {table.at[r, 'id']!r}: a choice encodes to no tokens")
            encoded.append(Encoded(prompt=p, choices=cs, item_id=str(table.at[r, "id"])))
        lengths = [len(e.prompt) + max(len(c) for c in e.choices) for e in encoded]
        longest = max(lengths)
        if longest <= max_seq_len or k == 0:
            break
        k -= 1
    if longest > max_seq_len:
        item = encoded[int(np.argmax(lengths))].item_id
        raise ProbekitError(f"item {item!r}: its zero-shot prompt and longest choice are {longest} tokens, longer "
                            f"than max_seq_len={max_seq_len}; shorten the question or leave the item out")
    m = common_prefix([e.prompt for e in encoded])
    m = min(m, min(len(e.prompt) for e in encoded) - 1)  # every row keeps at least its last prompt token
    return DrawPlan(draw=draw, demo_rows=np.asarray(demo_rows), k_used=k, encoded=encoded,
                    prefix_ids=encoded[0].prompt[:m] if m > 0 else [])


def score_plan(lm: LoadedModel, plan: DrawPlan, max_choices: int, batch_size: int, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Choice log-prob sums (n, C) of every row of a plan, the shared prefix run once."""
    m = len(plan.prefix_ids)
    prefix: Prefix | None = compute_prefix(lm, plan.prefix_ids) if m else None
    rest = [Encoded(prompt=e.prompt[m:], choices=e.choices, item_id=e.item_id) for e in plan.encoded]
    n = len(rest)
    csum = np.full((n, max_choices), -np.inf, dtype=np.float32)
    ctok = np.zeros((n, max_choices), dtype=np.int32)
    for idx in length_batches(rest, batch_size):
        cap = capture_batch(lm, [rest[i] for i in idx], [], [], max_choices, prefix=prefix)
        csum[idx] = cap.choice_sum
        ctok[idx] = cap.choice_tokens
        if bar is not None:
            bar.advance(len(idx), cap.n_tokens)
    return csum, ctok


@dataclass
class IclSummary:
    out_dir: Path
    draws_written: list[int]
    n_items: int
    items_run: int
    tokens: int
    seconds: float
    complete: bool

    def line(self) -> str:
        return (f"ICL: {len(self.draws_written)} draws written, {self.items_run} item scorings, {self.tokens:,} tokens "
                f"in {self.seconds:.1f} s; {self.out_dir} ({self.n_items} items, "
                f"{'complete' if self.complete else 'incomplete'})")


def demo_key(measure: str, demos_from: str, demos_set: str | None = None) -> str:
    """The draw key of a demonstration pool: ``icl/grade/easy``, ``icl/all``, ``icl/arc/grade/easy``."""
    where = f"{demos_set}/" if demos_set else ""
    return f"icl/{where}all" if demos_from == ALL else f"icl/{where}{measure}/{demos_from}"


def scored_rows(items, measure: str, test_levels: Sequence[str] | None) -> np.ndarray:
    """Row indices of the probe items to score: all of them, or those at ``test_levels`` of ``measure``."""
    if not test_levels:
        table = items.table.reset_index(drop=True)
        return np.flatnonzero((table["pool"] == "probe").to_numpy())
    if ALL in test_levels:
        raise ProbekitError(f"test level {ALL!r}: name levels (easy, medium, hard), or leave test levels out")
    return np.sort(np.concatenate([level_pool(items, measure, lv) for lv in dict.fromkeys(test_levels)]))


def extract_icl(
    items,
    out_dir: str | os.PathLike,
    model: str | ModelSpec | LoadedModel | None = None,
    *,
    k: int = 10,
    demos_from: str = "easy",
    measure: str = "grade",
    demos_items=None,
    demos_measure: str | None = None,
    demos_cutoff=None,
    test_levels: Sequence[str] | None = None,
    draws: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    max_seq_len: int = 2048,
    min_test: int = 50,
    limit: int | None = None,
    template: str | None = None,
    progress: bool = True,
) -> IclSummary:
    """Score every probe item under ``k``-shot prompts, for ``draws`` draws of demonstrations.

    Draw ``b`` takes its demonstrations from the ``demos_from`` level of ``measure`` (``"all"``:
    from every probe item); the pool must hold at least ``k + min_test`` probe items (the
    protocol's check, 50), and the demonstrations of a draw are not scored in it.
    ``demos_items``: another question set to take the demonstrations from (its ``demos_from`` level
    of ``demos_measure``, default ``measure``; its probe items, ``min_test`` does not apply);
    the k-shot prompt is rendered with the template of ``items``. ``demos_cutoff``: the rule that cuts
    the demonstrations' measure into levels instead of the default (a
    :class:`~probekit.data.levels.Fixed` or :class:`~probekit.data.levels.Quantile`; e.g. ``Fixed(3, 8)``
    for third-grade ARC demonstrations, as the paper's Figure 1); it is recorded, and the rows' training
    level names it (``easy@grade=3,8``, ``arc:grade@3,8:easy``). ``template``: a prompt template
    instead of the set's (``"cloze"``), for the demonstrations and the test item alike.
    ``test_levels``: score only the probe items at these levels of ``measure`` (e.g. ``["hard"]``
    for the SGR's hard test). ``limit`` keeps the first items of ``items`` only. ``model``: as for
    :func:`probekit.extract.extract`. Under ``RANK``/``WORLD_SIZE`` draws are split across ranks
    (``b % world_size == rank``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ProbekitError(f"icl k must be a positive integer, got {k!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ProbekitError(f"draws must be a positive integer, got {draws!r}")
    if demos_items is None and demos_measure not in (None, measure):
        raise ProbekitError(f"demos measure {demos_measure!r} needs demonstrations from another question set; "
                            f"for demonstrations from {items.name} use measure={demos_measure!r}")
    items = with_template(limit_items(items, limit), template)
    if len(items) == 0:
        raise ProbekitError(f"dataset {items.name!r} has no items: nothing to score")
    check_items(items)
    if demos_items is not None:
        check_items(demos_items, items.prompt_template)
    d_measure = demos_measure or measure
    if demos_cutoff is not None and demos_from == ALL:
        raise ProbekitError("a demonstrations' cut-off applies to a level (--demos-from easy|medium|hard), not to all")
    if demos_items is None:
        pool, key = level_pool(items, measure, demos_from, demos_cutoff), demo_key(measure, demos_from)
    else:
        pool = level_pool(demos_items, d_measure, demos_from, demos_cutoff)
        key = demo_key(d_measure, demos_from, demos_items.name)
        min_test = 0  # the test items come from the other set
    if demos_cutoff is not None:
        key += f"@{cutoff_text(demos_cutoff)}"
    rows = scored_rows(items, measure, test_levels)
    if len(rows) == 0:
        raise ProbekitError(f"dataset {items.name!r} has no probe items at test level(s) "
                            f"{', '.join(test_levels or [])} of {measure!r}: nothing to score")
    table = items.table.reset_index(drop=True)
    from probekit.data.draws import train_draw

    demo_sets = [train_draw(pool, k, seed=seed, draw=b, key=key, min_test=min_test,
                            size_name="the number of demonstrations k") for b in range(draws)]
    icl = {"k": k, "demos_from": demos_from, "measure": measure, "seed": seed, "draws": draws, "key": key,
           "max_seq_len": max_seq_len}
    if demos_items is not None:  # recorded only when used, so folders written before these options still resume
        icl["demos_dataset"] = {"name": demos_items.name, "fingerprint": demos_items.fingerprint}
        icl["demos_measure"] = d_measure
    if test_levels:
        icl["test_levels"] = list(dict.fromkeys(test_levels))
    if demos_cutoff is not None:
        icl["demos_cutoff"] = cutoff_text(demos_cutoff)
    rank, world, local = dist_env()
    model = settle_model(model, local, world)  # what this machine cannot run, before anything is written
    out = Path(out_dir)
    # The folder's lock is taken before the model loads; the writer below shares it.
    with OutputDir(out, (), "ICL score folder", lock_file=lock_name(rank), own=is_icl_entry, share=True,
                   exclusive=True):
        return _extract_icl_locked(items, out, model, table, rows, demo_sets, icl, demos_items, batch_size, rank,
                                   world, progress)


def _extract_icl_locked(items, out: Path, model: ModelSpec | LoadedModel, table, rows: np.ndarray, demo_sets: list,
                        icl: dict, demos_items, batch_size: int, rank: int, world: int, progress: bool) -> IclSummary:
    """Load the model (settled for this process) and score this rank's pending draws (the folder's lock is held)."""
    lm = prepare_model(model)
    rules = lm.rules
    max_choices = int(items.max_choices)
    k, max_seq_len = icl["k"], icl["max_seq_len"]
    header = {
        "format": FORMAT,
        "model": lm.identity,
        "dataset": {"name": items.name, "fingerprint": items.fingerprint, "n_items": len(table)},
        "prompt": {"template": items.prompt_template, "text": TEMPLATE_TEXT.get(items.prompt_template, ""),
                   "tokenization": rules.describe()},
        "icl": icl,
        "n_items": int(len(rows)),
        "max_choices": max_choices,
    }
    source = table if demos_items is None else demos_items.table.reset_index(drop=True)
    label = f"icl k={k} {icl['key'][len('icl/'):]}"

    ids = table["id"].astype(str).to_numpy()[rows]
    t0 = time.perf_counter()
    tokens = items_run = 0
    written = []
    with IclScoresWriter(out, header, rank=rank, world_size=world) as scores:  # refuses another configuration
        todo = scores.pending()
        with progress_bar(len(todo) * len(rows), label, enabled=progress and bool(todo)) as bar:
            for b in todo:
                plan = plan_draw(lm, items, rows, demo_sets[b], b, rules, max_seq_len, demos_items)
                csum, ctok = score_plan(lm, plan, max_choices, batch_size, bar)
                if demos_items is None:  # a draw's demonstrations are not scored in it
                    csum[np.isin(rows, plan.demo_rows[: plan.k_used])] = np.nan
                info = {"demo_rows": [int(r) for r in plan.demo_rows[: plan.k_used]],
                        "demo_ids": [str(source.at[int(r), "id"]) for r in plan.demo_rows[: plan.k_used]],
                        "k_used": plan.k_used, "shared_prefix_tokens": len(plan.prefix_ids)}
                scores.write_draw(b, ids, csum, ctok, info)
                written.append(b)
                items_run += len(rows)
                tokens += len(plan.prefix_ids) + sum(e.n_tokens_shared - len(plan.prefix_ids) for e in plan.encoded)
        complete = scores.complete
    return IclSummary(out_dir=out, draws_written=written, n_items=len(rows), items_run=items_run, tokens=tokens,
                      seconds=time.perf_counter() - t0, complete=complete)
