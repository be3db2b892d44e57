"""Tables from a sweep's per-item results (``RES/results.parquet``), with bootstrap statistics.

The results table has one row per (head, test item). For a condition (experiment, measure,
site, layer, solver, training level, ...) the rows become an item x draw matrix: one row per
test item, one column per training draw, 0/1 correctness in the cells and NaN where the item
was not a test item in that draw (it was in that draw's training set, so it has no row).

Tables (each a list of plain records; :func:`flatten` turns one into a CSV-ready frame):

- :func:`population_table`: per measure, site, layer and solver, hard-test accuracy of zero-shot
  and of heads trained on easy, medium, hard and all data (crossed bootstrap), the SGR
  (zero-shot -> easy vs hard) and two paired differences (hard - easy, easy - zero-shot).
  An SGR whose hard - zero-shot interval does not lie above 0 is not estimable
  (:func:`probekit.stats.sgr_estimable`): its numbers stay in the record and the CSV, with
  ``estimable`` False and the reason, and the display tables show it as ``n/e``.
- :func:`transfer_table`: accuracy by training level x test level (point estimates; heatmap).
- :func:`all_to_all_table`: heads trained on a random split, accuracy by test level.
- :func:`curve_table`: accuracy on the hard test against ``n_train`` (learning curves) or
  ``label_noise`` (noisy labels), per training level.

The statistics of a table are computed together by :class:`probekit.stats.shared.SharedBootstrap`:
statistics over the same test items share their item resamples (docs/protocol.md §6.1), and every
condition (a named item x draw matrix, :func:`condition_name`) its draw resamples. Resamples are
keyed by ``seed``, the item set and the condition's name, so each number is reproducible on its own
and the same condition gets the same resamples in every table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.methods import METHODS
from probekit.stats.bootstrap import Fieller, bh_qvalues
from probekit.stats.shared import SharedBootstrap
from probekit.store.results import (
    CONTROL_HEADS,
    CONTROL_SITES,
    RESULTS,
    TEXT_COLUMNS,
    Results,
    read_results,
)

#: Training levels in display order; other levels found in the results follow, sorted.
TRAIN_LEVELS = ("zero_shot", "easy", "medium", "hard", "all")
TEST_LEVELS = ("easy", "medium", "hard", "all")
HARD = "hard"
ZERO_SHOT = "zero_shot"
#: Population-table comparisons: name -> (baseline level, compared level); the statistic is
#: mean(compared - baseline).
DIFFERENCES = {"hard_minus_easy": ("easy", "hard"), "easy_minus_zero_shot": (ZERO_SHOT, "easy")}
#: What a report does with the rows of heads whose exact optimum has zero weights (:func:`treat_zero_weights`).
ZERO_WEIGHTS = ("chance", "exclude", "include")
#: Fewer training draws than this and a condition's draw variance is not estimable (a warning).
MIN_DRAWS = 3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Headline:
    """The site, layer (or layer set) and solver that the headline table and plots show."""

    site: str
    layer: str
    solver: str


# ----------------------------------------------------------------------------------------------
# Loading


def load_results(results_dir: str | Path, columns: Sequence[str] | None = None) -> Results:
    """Read a results directory (:func:`probekit.store.results.read_results`: the table must belong
    to its ``sweep.json`` and have every column; ``columns``: the optional columns to read, None for
    all) and normalise the column types."""
    res = read_results(results_dir, columns)
    path = res.path / RESULTS
    if res.table.empty:
        raise ProbekitError(f"{path} has no rows")
    return replace(res, table=method_heads(_normalise(res.table, path)))


def method_heads(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the rows of each method without a probe head keyed as that method's heads: their
    (empty) site and solver set to the method's :attr:`~probekit.methods.Method.report_head`, so the
    tables, which key heads by site, layer and solver, keep two such methods of one table apart (and
    their resamples, keyed by those names, are the same in every version)."""
    out = table
    for m in METHODS.values():
        if m.report_head is None:
            continue
        rows = (out["method"] == m.name).to_numpy(bool)
        if not rows.any():
            continue
        out = out.copy(deep=False) if out is table else out
        for column, value in zip(("site", "solver"), m.report_head):
            values = out[column]
            if value not in values.cat.categories:
                values = values.cat.add_categories([value])
            codes = values.cat.codes.to_numpy().copy()
            codes[rows] = values.cat.categories.get_loc(value)
            out[column] = pd.Categorical.from_codes(codes, values.cat.categories).remove_unused_categories()
    return out


def _normalise(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Numeric columns to their types; text columns stay categoricals (the results file's dictionaries:
    one small code per row, so selections and groupings compare integers, not millions of strings),
    with text categories and "" for a missing value."""
    out = table.copy(deep=False)  # columns are replaced, never written into (copy-on-write)
    for col in TEXT_COLUMNS:
        out[col] = _text_categorical(out[col])
    try:
        out["draw"] = out["draw"].astype(np.int64)
        out["n_train"] = out["n_train"].astype(np.int64)
        out["label_noise"] = out["label_noise"].astype(np.float64)
        out["correct"] = out["correct"].astype(np.float64)
        out["n_choices"] = out["n_choices"].astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise ProbekitError(f"{path}: non-numeric draw, n_train, label_noise, correct or n_choices ({exc})") from None
    return out  # values were checked by read_results (probekit.store.results.check_values)


def treat_zero_weights(table: pd.DataFrame, treatment: str) -> pd.DataFrame:
    """The rows a report computes on, given what it does with heads whose exact optimum has zero weights
    (the ``zero_weights`` column; :func:`probekit.probe.solvers.zero_is_optimal`):

    - ``"chance"``: kept, scored as what they are at their optimum: every choice scores the same, so
      the head's expected accuracy on an item is ``1 / n_choices`` (its ``correct`` cells become that);
    - ``"exclude"``: their rows are left out (a selection on the training draw: a draw with a weak
      linear signal is dropped);
    - ``"include"``: kept as the last SGD steps left them (their argmax decides ``correct``).

    ``"chance"`` needs each row's ``n_choices`` (results written before the column existed lack it:
    rerun the sweep, or choose another treatment).
    """
    if treatment not in ZERO_WEIGHTS:
        raise ProbekitError(f"zero_weights must be one of {', '.join(ZERO_WEIGHTS)}, got {treatment!r}")
    zero = table["zero_weights"].to_numpy(bool)
    if treatment == "include" or not zero.any():
        return table
    if treatment == "exclude":
        return table[~zero]
    k = table["n_choices"].to_numpy(np.int64)
    unknown = zero & (k < 1)
    if unknown.any():
        row = table[unknown].iloc[0]
        raise ProbekitError(f"results rows of zero-weight heads lack n_choices (item {row['item_id']!r}; written by "
                            "an older probekit): rerun the sweep, or report with --zero-weights exclude or include")
    correct = table["correct"].to_numpy(np.float64).copy()
    correct[zero] = 1.0 / k[zero]
    return table.assign(correct=correct)


def _text_categorical(values: pd.Series) -> pd.Series:
    """``values`` as a categorical of text ("" for missing), the categories each value's ``str``."""
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return values.fillna("").astype(str).astype("category")
    cats = values.cat.categories
    text = pd.Index([str(c) for c in cats])
    if text.has_duplicates:  # e.g. 1 and "1": merge through the text values
        return values.astype(object).fillna("").astype(str).astype("category")
    if not cats.equals(text):
        values = values.cat.rename_categories(text)
    if values.isna().any():
        if "" not in values.cat.categories:
            values = values.cat.add_categories([""])
        values = values.fillna("")
    return values


# ----------------------------------------------------------------------------------------------
# Ordering and selection


def layer_key(layer: str) -> tuple:
    """Sort key for layers: single layers by index, then layer sets ("15+30") by their indices."""
    try:
        parts = tuple(int(p) for p in layer.split("+")) if layer else ()
    except ValueError:
        return (2, (), layer)
    return (0 if len(parts) <= 1 else 1, parts, layer)


def level_order(levels: Iterable[str], canonical: Sequence[str] = TRAIN_LEVELS) -> list[str]:
    """The given levels in ``canonical`` order, then any others sorted."""
    levels = set(levels)
    return [lv for lv in canonical if lv in levels] + sorted(levels - set(canonical))


def choose_headline(table: pd.DataFrame, site: str | None = None, layer: str | None = None,
                    solver: str | None = None) -> Headline | None:
    """Pick the headline site, layer and solver among the trained heads.

    Defaults: site ``answer_end`` when present (else the first); the protocol's middle+last
    concatenation (a two-layer set such as "16+30") when present, else the last single layer;
    solver ``paper`` when present (else the first). A requested value that the results lack is
    an error. The shortcut controls (sites "surface" and "majority") are never the headline.
    """
    trained = table.loc[(table["train_level"] != ZERO_SHOT) & ~table["site"].isin(CONTROL_SITES),
                        ["site", "layer", "solver"]]
    if trained.empty:
        return None
    site = _pick(trained["site"], site, "answer_end", "site")
    trained = trained[trained["site"] == site]
    layers = sorted(trained["layer"].unique(), key=layer_key)
    if layer is None:
        pairs = [lv for lv in layers if lv.count("+") == 1]
        singles = [lv for lv in layers if layer_key(lv)[0] == 0]
        layer = (pairs or singles or layers)[-1]
    layer = _pick(trained["layer"], layer, None, "layer")
    solver = _pick(trained[trained["layer"] == layer]["solver"], solver, "paper", "solver")
    return Headline(site, layer, solver)


def head_method(table: pd.DataFrame, headline: Headline) -> str:
    """The ``method`` of a head's rows ("probe", "icl", "finetune", ...; several joined by "+")."""
    rows = table[(table["site"] == headline.site) & (table["layer"] == headline.layer)
                 & (table["solver"] == headline.solver) & (table["train_level"] != ZERO_SHOT)]
    return "+".join(sorted(rows["method"].astype(str).unique()))


def head_label(head: dict, method: str | None = None, code: bool = False) -> str:
    """How a head (a summary's ``headline``: site, layer, solver) of ``method`` is named in titles:
    "site answer_end, layer 16+30, solver paper", or by its method when it has no layer
    ("method finetune, site finetune, solver lora"); ``code``: values in Markdown backticks."""
    q = "`" if code else ""
    parts = [("site", head["site"]), ("layer", head.get("layer")), ("solver", head["solver"])]
    if not head.get("layer"):
        parts = [("method", method or head["site"]), parts[0], parts[2]]
    return ", ".join(f"{name} {q}{value}{q}" for name, value in parts)


def _pick(values: pd.Series, wanted: str | None, preferred: str | None, what: str) -> str:
    present = sorted(values.unique(), key=layer_key if what == "layer" else str)
    if wanted is not None:
        if wanted not in present:
            raise ProbekitError(f"{what} {wanted!r} is not in the results (have {', '.join(map(repr, present))})")
        return wanted
    return preferred if preferred in present else present[0]


# ----------------------------------------------------------------------------------------------
# Matrices


def item_draw_frame(rows: pd.DataFrame, what: str = "condition") -> pd.DataFrame:
    """Pivot rows to an item x draw frame of 0/1 correctness (NaN: not a test item in that draw).

    Rows are sorted by item id and columns by draw, so the bootstrap resamples of a condition
    do not depend on the order of the results file. The pivot runs on integer codes (the item
    column's categorical codes, else its factorisation).
    """
    items = rows["item_id"]
    if isinstance(items.dtype, pd.CategoricalDtype):
        codes, labels = items.cat.codes.to_numpy(), items.cat.categories
    else:
        codes, labels = pd.factorize(items)
    if len(codes) and codes.min() >= 0:  # codes index the labels: count them rather than sort them
        present = np.zeros(len(labels), bool)
        present[codes] = True
        used = np.flatnonzero(present)
        item_pos = (np.cumsum(present) - 1)[codes]
    else:
        used, item_pos = np.unique(codes, return_inverse=True)
    draws, draw_pos = np.unique(rows["draw"].to_numpy(), return_inverse=True)
    cell = item_pos.reshape(-1) * len(draws) + draw_pos.reshape(-1)
    if len(cell) and np.bincount(cell).max() > 1:
        r = rows[rows.duplicated(["item_id", "draw"])].iloc[0]
        raise ProbekitError(f"results.parquet: item {r['item_id']!r} appears twice in draw {r['draw']} of {what}")
    values = np.full(len(used) * len(draws), np.nan)
    values[cell] = rows["correct"].to_numpy(np.float64)
    index = pd.Index(labels.take(used) if len(used) else labels[:0], name="item_id")
    order = index.argsort()
    frame = pd.DataFrame(values.reshape(len(used), len(draws))[order], index=index[order],
                         columns=pd.Index(draws, name="draw"))
    return frame


def aligned(*frames: pd.DataFrame) -> list[np.ndarray]:
    """Matrices of several conditions over the union of their items (same row order)."""
    index = frames[0].index
    for f in frames[1:]:
        index = index.union(f.index)
    index = index.sort_values()
    return [f.reindex(index).to_numpy(dtype=np.float64) for f in frames]


def zero_shot_rows(table: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Zero-shot rows of a measure, one per item (they repeat identically across sites)."""
    zs = table[(table["train_level"] == ZERO_SHOT) & (table["measure"] == measure)]
    return zs.drop_duplicates(["item_id", "draw"])


def test_levels(rows: pd.DataFrame) -> list[str]:
    """The test levels present (unknown "" left out), then "all" (every test item)."""
    return [lv for lv in level_order(rows["test_level"].unique(), TEST_LEVELS[:-1]) if lv] + ["all"]


def _largest_n_train(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    n = int(rows["n_train"].max())
    return rows[rows["n_train"] == n], n


# ----------------------------------------------------------------------------------------------
# Tables


def population_table(
    table: pd.DataFrame,
    n_boot: int = 10_000,
    n_boot_sgr: int = 100_000,
    seed: int = 0,
    progress: Progress | None = None,
    headline: Headline | None = None,
    p_method: str = "percentile",
) -> list[dict]:
    """Hard-test accuracies, SGR and paired differences per measure, site, layer and solver.

    Uses the ``population`` experiment's trained heads and the zero-shot rows of each measure.
    The SGR of the ``headline`` head gets ``n_boot_sgr`` resamples; when a headline is given,
    every other head's SGR gets ``n_boot`` (the per-layer curves need intervals, not 1e-5
    p-value resolution), which keeps a 30-layer report to about a minute.
    When a training level holds several ``n_train`` values, the largest is used. A measure
    without hard-test rows is an error. Entries that cannot be computed (a level that was not
    run, no zero-shot rows) are None. ``p_method``: the p-values' rule
    (:func:`probekit.stats.bootstrap.p_value`).

    The headline head's records also get ``controls``: for each shortcut control in the table
    (:mod:`probekit.probe.controls`; the surface-feature probe, the majority position), its
    accuracies and the paired difference ``hard_minus_control`` (the hidden-state probe trained on
    hard items minus the control trained on the same draws, on the hard test), and ``beats_controls``:
    whether every such difference's interval lies above 0 (None without controls).
    """
    head_keys = ["site", "layer", "solver"]
    trained = (table["experiment"] == "population") & (table["train_level"] != ZERO_SHOT)
    # the heads from the runs of rows (few), the rows themselves only where they are tested on hard items
    runs = row_runs(table, ["experiment", "train_level", "measure", *head_keys])
    runs = runs[(runs["experiment"] == "population") & (runs["train_level"] != ZERO_SHOT)]
    pop = table.loc[trained & (table["test_level"] == HARD),
                    ["measure", *head_keys, "train_level", "test_level", "n_train", "item_id", "draw", "correct"]]
    boot = SharedBootstrap(n_boot, seed, p_method=p_method)
    records, done, frames_of = [], [], {}
    for measure in sorted(runs["measure"].unique()):
        hard = pop[pop["measure"] == measure]
        if hard.empty:
            raise ProbekitError(f"results.parquet: no hard-test rows for measure {measure!r} in the population experiment")
        zero = zero_shot_rows(table, measure)
        zero = zero[zero["test_level"] == HARD]
        zero_frame = item_draw_frame(zero, f"{measure}/zero_shot") if len(zero) else None
        heads = dict(_groups(hard, head_keys))  # each head's hard-test rows, grouped once
        heads_run = runs.loc[runs["measure"] == measure, head_keys].drop_duplicates()
        for key in _ordered(heads_run.itertuples(index=False, name=None), head_keys):
            group = heads.get(key, hard.iloc[:0])
            n_sgr = n_boot_sgr if headline is None or key == (headline.site, headline.layer, headline.solver) else n_boot
            record, frames_of[(measure, *key)] = _population_record(boot, measure, key, group, zero_frame, n_sgr)
            records.append(record)
            done.append(f"population {measure} {key[0]} layer {key[1] or '-'}")
    if headline is not None:
        _add_controls(boot, records, frames_of, headline)
    out = _run(boot, records, done, progress)
    for r in out:
        if "controls" in r:
            r["beats_controls"] = beats_controls(r["controls"])
    return out


def _add_controls(boot: SharedBootstrap, records: list[dict], frames_of: dict, headline: Headline) -> None:
    """Attach the shortcut controls to the headline head's records (see :func:`population_table`)."""
    by_key = {(r["measure"], r["site"], r["layer"], r["solver"]): r for r in records}
    for r in records:
        if (r["site"], r["layer"], r["solver"]) != (headline.site, headline.layer, headline.solver):
            continue
        frames, names = frames_of[(r["measure"], r["site"], r["layer"], r["solver"])]
        controls = {}
        for site, solver in CONTROL_HEADS:
            key = (r["measure"], site, "", solver)
            if key not in by_key:
                continue
            other, other_names = frames_of[key]
            entry = {"site": site, "solver": solver, "accuracy": {lv: a for lv, a in by_key[key]["accuracy"].items()
                                                                   if lv != ZERO_SHOT},
                     "hard_minus_control": None}
            if HARD in frames and HARD in other:
                A, B = _paired_draws(other[HARD], frames[HARD])
                if A is not None:
                    entry["hard_minus_control"] = _Pending(boot.difference(A, B, (other_names[HARD], names[HARD])))
            controls[site] = entry
        r["controls"] = controls


def beats_controls(controls: dict) -> bool | None:
    """Whether the hidden-state probe beats every shortcut control: each ``hard_minus_control`` interval
    lies above 0 (None when there is no control to compare with)."""
    tests = _control_tests(controls)
    if not tests:
        return None
    return all(t["lo"] > 0 for t in tests.values())


def _groups(rows: pd.DataFrame, keys: list[str]):
    groups = dict(tuple(rows.groupby(keys, sort=False)))
    return [(k, groups[k]) for k in _ordered(groups, keys)]


def _ordered(key_values: Iterable[tuple], keys: list[str]) -> list[tuple]:
    """Key tuples in display order (layers by :func:`layer_key`, other values as they sort)."""
    return sorted(key_values, key=lambda k: tuple(layer_key(v) if c == "layer" else (v,) for c, v in zip(keys, k)))


def condition_name(experiment: str, measure: str, site: str = "", layer: str = "", solver: str = "",
                   train_level: str = ZERO_SHOT, **extra) -> str:
    """The name of a condition's item x draw matrix in :class:`SharedBootstrap` (its column resamples
    are keyed by it): ``zero_shot/<measure>`` for the zero-shot rows of a measure (whatever the
    experiment), else ``<experiment>/<measure>/<site>/<layer>/<solver>/<train_level>`` followed by
    ``/<key>=<value>`` for each ``extra`` (the curves' ``n_train`` or ``label_noise``)."""
    if train_level == ZERO_SHOT:
        return f"{ZERO_SHOT}/{measure}"
    return "/".join([experiment, measure, site, layer, solver, train_level, *(f"{k}={v}" for k, v in extra.items())])


class _Pending:
    """A statistic registered with a :class:`SharedBootstrap`, replaced by its result after ``run``."""

    def __init__(self, handle: int):
        self.handle = handle


def _resolve(obj, results: list):
    """``obj`` with every :class:`_Pending` replaced by its result's dict (records are nested dicts)."""
    if isinstance(obj, _Pending):
        return results[obj.handle].to_dict()
    if isinstance(obj, dict):
        return {k: _resolve(v, results) for k, v in obj.items()}
    return obj


def _run(boot: SharedBootstrap, records: list[dict], done: list[str], progress: Progress | None) -> list[dict]:
    results = boot.run()
    out = [_resolve(r, results) for r in records]
    for what in done:
        if progress:
            progress(what)
    return out


def _population_record(boot, measure, key, group, zero_frame, n_boot_sgr) -> tuple[dict, tuple[dict, dict]]:
    """A head's population record (statistics pending) and its (frames, condition names) by level."""
    site, layer, solver = key
    hard = group[group["test_level"] == HARD]
    frames: dict[str, pd.DataFrame] = {}
    n_train: dict[str, int] = {}
    if zero_frame is not None:
        frames[ZERO_SHOT] = zero_frame
        n_train[ZERO_SHOT] = 0
    for level in level_order(hard["train_level"].unique()):
        rows, n_train[level] = _largest_n_train(hard[hard["train_level"] == level])
        frames[level] = item_draw_frame(rows, f"{measure}/{site}/{layer}/{level}")
    names = {lv: condition_name("population", measure, site, layer, solver, lv) for lv in frames}
    accuracy = {lv: _Pending(boot.accuracy(f, names[lv])) for lv, f in frames.items()}
    record = {
        "measure": measure, "site": site, "layer": layer, "solver": solver,
        "n_train": n_train, "accuracy": accuracy, "sgr": None,
    }
    if all(lv in frames for lv in (ZERO_SHOT, "easy", HARD)):
        levels = (ZERO_SHOT, "easy", HARD)
        record["sgr"] = _Pending(boot.sgr(*(frames[lv] for lv in levels), tuple(names[lv] for lv in levels), n_boot_sgr))
    for name, (base, other) in DIFFERENCES.items():
        record[name] = None
        if base in frames and other in frames:
            A, B = _paired_draws(frames[base], frames[other])
            if A is not None:
                record[name] = _Pending(boot.difference(A, B, (names[base], names[other])))
    return record, (frames, names)


def _paired_draws(A: pd.DataFrame, B: pd.DataFrame) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Two conditions' item x draw frames restricted to the draws both have (a one-draw baseline is
    recycled as it is): the draws of a paired difference once heads with zero weights are left out.
    (None, None) when they share no draw."""
    if A.shape[1] == 1 or list(A.columns) == list(B.columns):
        return A, B
    common = A.columns.intersection(B.columns)
    return (A[common], B[common]) if len(common) else (None, None)


def transfer_table(table: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """Accuracy (nanmean of the item x draw matrix) by training level x test level.

    One block per measure for the headline site, layer and solver, from the ``population``
    experiment (zero-shot included) and the ``all_to_all`` experiment (measure "all"). Columns:
    measure, train_level, test_level, accuracy, n_items.
    """
    rows = table[
        table["experiment"].isin(["population", "all_to_all"])
        & (table["site"] == headline.site) & (table["layer"] == headline.layer)
        & (table["solver"] == headline.solver) & (table["train_level"] != ZERO_SHOT)
    ]
    out = []
    for measure in sorted(rows["measure"].unique()):
        rm = rows[rows["measure"] == measure]
        zero = zero_shot_rows(table, measure)
        levels = [(ZERO_SHOT, zero)] if len(zero) else []
        for lv in level_order(rm["train_level"].unique()):
            levels.append((lv, _largest_n_train(rm[rm["train_level"] == lv])[0]))
        for lv, lrows in levels:
            for test in test_levels(lrows):
                sel = lrows if test == "all" else lrows[lrows["test_level"] == test]
                if len(sel):
                    M = item_draw_frame(sel, f"{measure}/{lv}").to_numpy(np.float64)
                    out.append({"measure": measure, "train_level": lv, "test_level": test,
                                "accuracy": float(np.nanmean(M)), "n_items": int(M.shape[0])})
    return pd.DataFrame(out, columns=["measure", "train_level", "test_level", "accuracy", "n_items"])


def all_to_all_table(table: pd.DataFrame, n_boot: int = 10_000, seed: int = 0,
                     progress: Progress | None = None) -> list[dict]:
    """Heads trained on a random split (``all_to_all``): accuracy by test level, with CIs."""
    rows = table[table["experiment"] == "all_to_all"]
    boot = SharedBootstrap(n_boot, seed)
    records, done = [], []
    for (site, layer, solver, level), group in _groups(rows, ["site", "layer", "solver", "train_level"]):
        group, n = _largest_n_train(group)
        measure = str(group["measure"].iloc[0])
        for test in test_levels(group):
            sel = group if test == "all" else group[group["test_level"] == test]
            M = item_draw_frame(sel, f"all_to_all/{site}/{layer}")
            name = condition_name("all_to_all", measure, site, layer, solver, level)
            records.append({"site": site, "layer": layer, "solver": solver, "train_level": level,
                            "n_train": n, "test_level": test, "accuracy": _Pending(boot.accuracy(M, name))})
        done.append(f"all-to-all {site} layer {layer}")
    return _run(boot, records, done, progress)


def curve_table(table: pd.DataFrame, experiment: str, x: str, n_boot: int = 10_000, seed: int = 0,
                progress: Progress | None = None) -> list[dict]:
    """Hard-test accuracy against ``x`` ("n_train" or "label_noise") per training level.

    One record per (measure, site, layer, solver, train level, x) of ``experiment``; zero-shot
    records (x = 0) are added per measure as the reference line.
    """
    rows = table[(table["experiment"] == experiment) & (table["test_level"] == HARD)
                 & (table["train_level"] != ZERO_SHOT)]
    boot = SharedBootstrap(n_boot, seed)
    records, done = [], []
    keys = ["measure", "site", "layer", "solver", "train_level", x]
    for key, group in _groups(rows, keys):
        M = item_draw_frame(group, f"{experiment}/{'/'.join(map(str, key))}")
        rec = dict(zip(keys, key))
        rec[x] = float(rec[x]) if x == "label_noise" else int(rec[x])
        rec["accuracy"] = _Pending(boot.accuracy(M, condition_name(experiment, *key[:5], **{x: rec[x]})))
        records.append(rec)
        done.append(f"{experiment} {key[0]} {key[4]} {x}={key[5]}")
    for measure in sorted(rows["measure"].unique()):
        zero = zero_shot_rows(table, measure)
        zero = zero[zero["test_level"] == HARD]
        if len(zero):
            M = item_draw_frame(zero, f"{measure}/zero_shot")
            records.append({"measure": measure, "site": "", "layer": "", "solver": ZERO_SHOT,
                            "train_level": ZERO_SHOT, x: 0 if x == "n_train" else 0.0,
                            "accuracy": _Pending(boot.accuracy(M, condition_name(experiment, measure)))})
    return _run(boot, records, done, progress)


def zero_weight_heads(table: pd.DataFrame) -> list[dict]:
    """Per experiment, site, layer and solver: how many trained heads there are and how many have zero
    weights as their exact optimum (the ``zero_weights`` column). A head is one (measure, training
    level, draw, n_train, label noise) of a layer; a head trained on all items counts once per measure."""
    keys = ["experiment", "site", "layer", "solver"]
    head = ["measure", "train_level", "draw", "n_train", "label_noise"]
    runs = row_runs(table, keys + head, "zero_weights")
    runs = runs[runs["train_level"] != ZERO_SHOT]
    heads = runs.groupby(keys + head, sort=False, observed=True)["zero_weights"].any().reset_index()
    records = []
    for key, group in _groups(heads, keys):
        zero = group[group["zero_weights"]]
        records.append({**dict(zip(keys, key)), "heads": int(len(group)), "zero_weight_heads": int(len(zero)),
                        "which": [f"{r.measure}/{r.train_level}/draw {r.draw}" for r in zero.itertuples()]})
    return records


def count_zero_weight_heads(population: list[dict], table: pd.DataFrame) -> None:
    """Add to each population record ``zero_weight_heads``: per training level, how many of its heads
    have zero weights as their exact optimum (the report's zero-weight treatment says what its numbers did
    with them)."""
    flagged = table[table["zero_weights"].astype(bool) & (table["experiment"] == "population")]
    heads = flagged.drop_duplicates(["measure", "site", "layer", "solver", "train_level", "draw", "n_train"])
    counts = heads.groupby(["measure", "site", "layer", "solver", "train_level"], observed=True).size()
    for r in population:
        r["zero_weight_heads"] = {lv: int(counts.get((r["measure"], r["site"], r["layer"], r["solver"], lv), 0))
                                  for lv in r["accuracy"] if lv != ZERO_SHOT}


def row_runs(rows: pd.DataFrame, keys: list[str], flag: str | None = None) -> pd.DataFrame:
    """``rows`` cut into runs of consecutive rows with the same ``keys`` (a head's rows are written
    together, so a results table holds few runs): one row per run, its keys and, with ``flag``,
    whether that column is set in any of its rows. Selecting and grouping the runs by ``keys``
    selects and groups the rows (the same key combinations), at the cost of the runs."""
    if rows.empty:
        return rows[keys + ([flag] if flag else [])]
    change = np.zeros(len(rows), bool)
    change[0] = True
    for col in keys:
        v = rows[col]
        v = v.cat.codes.to_numpy() if isinstance(v.dtype, pd.CategoricalDtype) else v.to_numpy()
        change[1:] |= v[1:] != v[:-1]
    starts = np.flatnonzero(change)
    out = rows[keys].iloc[starts].reset_index(drop=True)
    if flag:
        out[flag] = np.logical_or.reduceat(rows[flag].to_numpy(bool), starts)
    return out


# ----------------------------------------------------------------------------------------------
# Flat frames and writers


STAT_FIELDS = {"": "point", "_lo": "lo", "_hi": "hi", "_err": "error_bar"}


def flatten(records: list[dict]) -> pd.DataFrame:
    """One flat row per record: nested statistics become ``<name>``, ``<name>_lo``, ``_hi``, ...

    Accuracy entries become ``acc_<level>`` columns; paired statistics add ``<name>_p``.
    """
    rows = []
    for rec in records:
        flat = {}
        for key, value in rec.items():
            if key == "accuracy" and isinstance(value, dict) and "point" not in value:
                for level, stat in value.items():
                    flat.update(_stat_columns(f"acc_{level}", stat))
            elif key == "accuracy":
                flat.update(_stat_columns("acc", value))
            elif key == "controls":
                for site, c in (value or {}).items():
                    for level, stat in c["accuracy"].items():
                        flat.update(_stat_columns(f"{site}_acc_{level}", stat))
                    flat.update(_stat_columns(f"hard_minus_{site}", c["hard_minus_control"]))
            elif key in ("n_train", "zero_weight_heads") and isinstance(value, dict):
                flat.update({f"{key}_{lv}": n for lv, n in value.items()})
            elif isinstance(value, dict) or (value is None and key in ("sgr", *DIFFERENCES)):
                flat.update(_stat_columns(key, value))
            else:
                flat[key] = value
        rows.append(flat)
    return pd.DataFrame(rows)


def _stat_columns(name: str, stat: dict | None) -> dict:
    if stat is None:
        return {f"{name}{suffix}": math.nan for suffix in (*STAT_FIELDS, "_p")}
    out = {f"{name}{suffix}": stat[field] for suffix, field in STAT_FIELDS.items()}
    if "p_value" in stat:
        out[f"{name}_p"] = stat["p_value"]
    out[f"{name}_n_items"] = stat["n_items"]
    if "estimable" in stat:  # an SGR: its numbers stay, with the flag and the reason beside them
        out[f"{name}_estimable"] = stat["estimable"]
        out[f"{name}_reason"] = stat["reason"] or ""
        fieller = stat.get("fieller") or {}
        out.update({f"{name}_fieller": fieller.get("kind"), f"{name}_fieller_lo": fieller.get("lo"),
                    f"{name}_fieller_hi": fieller.get("hi")})
    if "q_value" in stat:
        out[f"{name}_q"] = stat["q_value"]
    return out


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def fmt_acc(stat: dict | None, interval: bool = True) -> str:
    """``78.3 [76.1, 80.4]`` (percent: the point estimate, the accuracy of the observed item x draw
    matrix, and its 95% bootstrap percentile interval; ``78.3`` without), or ``–`` when missing."""
    if not stat or not _finite(stat["point"]):
        return "–"
    point = f"{100 * stat['point']:.1f}"
    if not interval or not _finite(stat["lo"]):
        return point
    return f"{point} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"


def fmt_test(stat: dict | None, percent: bool = False) -> str:
    """``0.92 [0.81, 1.04] p=0.012`` (point, interval, p-value; ``p<0.001``), or ``–`` when undefined."""
    if not stat or not _finite(stat["point"]) or not _finite(stat["lo"]):
        return "–"
    k, d = (100, 1) if percent else (1, 2)
    return f"{k * stat['point']:.{d}f} [{k * stat['lo']:.{d}f}, {k * stat['hi']:.{d}f}] {p_label(stat['p_value'])}"


#: How a display table shows an SGR that is not estimable (its reason goes in a note column).
NOT_ESTIMABLE = "n/e"


def sgr_flagged(stat: dict | None) -> bool:
    """Whether an SGR record is flagged as not estimable (hard - zero-shot interval not above 0)."""
    return bool(stat) and stat.get("estimable") is False


def fmt_sgr(stat: dict | None) -> str:
    """An SGR as :func:`fmt_test` shows it, or ``n/e`` when it is not estimable."""
    return NOT_ESTIMABLE if sgr_flagged(stat) else fmt_test(stat)


def fmt_q(stat: dict | None) -> str:
    """An SGR's Benjamini-Hochberg q-value (``q=0.012``, ``q<0.001``), or ``–`` when it has none."""
    q = (stat or {}).get("q_value")
    return "–" if q is None or not math.isfinite(q) else p_label(q).replace("p", "q", 1)


def fmt_fieller(stat: dict | None) -> str:
    """An SGR's Fieller-type interval as text (``[0.52, 1.31]``, ``(-inf, -0.4] U [2.1, inf)``), or ``–``."""
    f = (stat or {}).get("fieller")
    return Fieller(**f).text() if f else "–"


def control_verdict(record: dict) -> str:
    """How a headline record's hidden-state probe fares against its shortcut controls: ``beats`` when
    every ``hard − control`` interval lies above 0, else ``not above surface`` / ``not above majority``
    naming each control it does not beat (its interval includes or lies below 0); ``–`` without controls."""
    tests = _control_tests(record.get("controls") or {})
    if not tests:
        return "–"
    below = [site for site, t in tests.items() if not t["lo"] > 0]
    return "not above " + ", ".join(below) if below else "beats"


def _control_tests(controls: dict) -> dict:
    """Each shortcut control's ``hard_minus_control`` test, where it could be computed."""
    return {site: c["hard_minus_control"] for site, c in controls.items() if c.get("hard_minus_control")}


def fmt_p(p: float) -> str:
    """A p-value to three decimals, ``<0.001`` below that."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_label(p: float) -> str:
    """A p-value as a label: ``p=0.012``, or ``p<0.001``."""
    text = fmt_p(p)
    return f"p{text}" if text[0] == "<" else f"p={text}"


def headline_records(records: list[dict], headline: Headline | None) -> list[dict]:
    """The population records of the headline head, one per measure."""
    return [r for r in records if headline and (r["site"], r["layer"], r["solver"])
            == (headline.site, headline.layer, headline.solver)]


def headline_frame(records: list[dict], headline: Headline | None) -> pd.DataFrame:
    """The headline population table as display strings, one row per measure."""
    return population_display(headline_records(records, headline), with_head=False)


def add_qvalues(records: list[dict]) -> int:
    """Benjamini-Hochberg q-values over the SGRs of ``records`` (one family), stored as each SGR's
    ``q_value``. An SGR that is not estimable enters the family with p = 1 (it is never a finding, and
    leaving it out would choose the family by its outcome). Returns the family's size."""
    family = [r["sgr"] for r in records if r.get("sgr")]
    p = [1.0 if sgr_flagged(s) else s["p_value"] for s in family]
    for s, q in zip(family, bh_qvalues(p)):
        s["q_value"] = float(q)
    return len(family)


def few_draws(records: list[dict], label: Callable[[dict], str]) -> list[str]:
    """One warning per condition of ``records`` trained on fewer than :data:`MIN_DRAWS` draws: its draw
    variance is not estimable, so its interval reflects the test items and those draws only."""
    out = []
    for r in records:
        for lv, a in r["accuracy"].items():
            if lv != ZERO_SHOT and a and a["n_draws"] < MIN_DRAWS:
                out.append(f"{label(r)} {lv}: {a['n_draws']} training draw(s); the draw variance is not estimable, "
                           "so its intervals reflect item resampling over these draws only")
    return out


#: Footnotes of a table printed by :func:`population_display` (the estimator of each column).
POPULATION_NOTES = (
    "Accuracies: point estimate (accuracy of the observed item x draw matrix) [95% bootstrap percentile "
    "interval], in %.",
    "SGR: point [95% percentile interval] and the p-value read off the same resamples (it is below 0.05 "
    "exactly when the interval excludes 0); the headline interval is the percentile one, its Fieller-type "
    "set beside it; q: Benjamini-Hochberg over the table's SGRs (n/e counted as p = 1).",
    "hard−easy is paired: per training draw, over the test items both heads were tested on, so it can differ "
    "from the difference of the two accuracy columns.",
)


def population_display(records: list[dict], with_head: bool = True) -> pd.DataFrame:
    """Population records as display strings (accuracies in %, SGR, differences in points); the
    columns' estimators are :data:`POPULATION_NOTES`. Records with shortcut controls get their
    hard-trained accuracy and the verdict (:func:`control_verdict`)."""
    rows = []
    controls = sorted({site for r in records for site in (r.get("controls") or {})}, key=CONTROL_SITES.index)
    for r in records:
        row = {"measure": r["measure"]}
        if with_head:
            row.update(site=r["site"], layer=r["layer"], solver=r["solver"])
        row["zero-shot"] = fmt_acc(r["accuracy"].get(ZERO_SHOT))
        for lv in level_order(set(r["accuracy"]) - {ZERO_SHOT}):
            row[f"{lv}→hard"] = fmt_acc(r["accuracy"][lv])
        row["SGR [95% CI]"] = fmt_sgr(r["sgr"])
        row["SGR Fieller 95%"] = "" if sgr_flagged(r["sgr"]) else fmt_fieller(r["sgr"])
        if any((x["sgr"] or {}).get("q_value") is not None for x in records):
            row["q"] = fmt_q(r["sgr"])
        row["hard−easy (pts, paired)"] = fmt_test(r["hard_minus_easy"], percent=True)
        row["easy−zero-shot (pts)"] = fmt_test(r["easy_minus_zero_shot"], percent=True)
        for site in controls:
            c = (r.get("controls") or {}).get(site)
            row[f"{site} control hard→hard"] = fmt_acc((c or {}).get("accuracy", {}).get(HARD))
        if controls:
            row["vs controls"] = control_verdict(r)
        if any(sgr_flagged(x["sgr"]) for x in records):
            row["SGR note"] = f"{NOT_ESTIMABLE}: {r['sgr']['reason']}" if sgr_flagged(r["sgr"]) else ""
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.fillna("–") if len(frame) else frame


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (floats with 4 decimals)."""
    if frame.empty:
        return "_(no rows)_\n"

    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"
