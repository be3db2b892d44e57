"""``build_comparison``: several results directories in, one comparison report out.

The runs may differ in method (probe sweeps, ``sweep --icl`` rows, fine-tuning, ...), model and
dataset. Each run's rows are split by their ``method`` column into heads: per (model, dataset,
experiment, method) one head, chosen as the single-run report chooses its headline
(:func:`probekit.report.tables.choose_headline`; ``site``/``layer``/``solver`` apply to the probe
head). Every number is computed by the single-run machinery (:func:`population_table`,
:func:`all_to_all_table`) on that head's rows beside the zero-shot baseline, so a run's numbers
in the comparison are the numbers of its own report with that head as the headline.

The zero-shot baseline (the rows of method ``baseline``) is shared by the methods of one (model,
dataset), as in the paper. By default each method gets the baseline the method registry gives it
(:attr:`probekit.methods.Method.baseline`): a chain-of-thought method (``icl_cot``, ``finetune_cot``)
is set against zero-shot chain of thought (``zero_shot_cot``) when some run of its model and dataset
holds those rows (GSM8k has no other zero-shot baseline; the paper scores its CoT methods against
zero-shot CoT), and against ``zero_shot`` otherwise, as every other method is; ``baseline`` names one
method for all. Each baseline is checked across runs: the runs of one model and dataset that hold
baseline rows must agree on them item by item (same items, levels and correctness per measure), else
the comparison is refused. Runs whose heads are training draws (the registry's ``paired`` methods:
probe, finetune) are paired item by item by the draw function; when two such runs of one model and
dataset were run with different seeds, their training items differ and the comparison is refused.
Two runs giving the same (model, dataset, experiment, method) are refused (which one would the table
show?). A run scored with another prompt template than its set's own (``extract
--template cloze``, recorded in sweep.json) counts as its own dataset, labelled "arc (cloze)", with
its own zero-shot baseline.

Written to ``REP/`` (see docs/protocol.md §11):

- ``sgr.png`` (the paper's headline figure): SGR per (dataset, measure), a bar per method, one
  panel per model; ``comparison.csv`` and the table in ``report.md``: hard-test accuracies of
  zero-shot and every training level, SGR and paired differences per (model, dataset, measure,
  method).
- ``model_size.png`` and ``model_size.csv`` (two or more models): the same SGRs and hard-test
  accuracies with models ordered by size (parameter count when the run records one, else the
  size in the model's name, e.g. "135M", else the name).
- ``all_to_all.csv``: accuracy on every test item of heads trained on a random split
  (``--experiment all_to_all`` runs), methods x (model, dataset).
- ``spearman.csv``: per dataset, the Spearman correlation between its difficulty measures over
  the probe items, from the item table of the cache a run read (the cache must still be at the
  recorded path with the recorded manifest hash; otherwise the matrix is skipped with a note).
- ``summary.json``: every number with the run (results directory and its sha256) it came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import probekit
from probekit.data.sets import SETS
from probekit.errors import OptionError, ProbekitError
from probekit.methods import METHODS, baselines, method_order
from probekit.report import compare_plots
from probekit.report.build import (
    ProgressFn,
    ReportFiles,
    Ticker,
    build_report,
    check_settings,
    holding_report,
    jsonable,
    write_report_dir,
)
from probekit.report.tables import (
    HARD,
    NOT_ESTIMABLE,
    POPULATION_NOTES,
    ZERO_SHOT,
    Headline,
    add_qvalues,
    all_to_all_table,
    choose_headline,
    control_verdict,
    count_zero_weight_heads,
    few_draws,
    flatten,
    fmt_acc,
    fmt_q,
    fmt_sgr,
    fmt_test,
    headline_records,
    level_order,
    load_results,
    population_table,
    sgr_flagged,
    to_markdown,
    treat_zero_weights,
)
from probekit.store.results import CONTROL_SITES, Results, RunRecord

FORMAT = "probekit-comparison/1"


def _other_baselines() -> dict[str, list[str]]:
    """Each registered baseline other than zero_shot, with the methods set against it (registry order)."""
    others: dict[str, list[str]] = {}
    for m in METHODS.values():
        if m.baseline not in (None, ZERO_SHOT):
            others.setdefault(m.baseline, []).append(m.name)
    return others


def _baseline_rule() -> str:
    """The per-method baseline rule in words, from the registry: "per method: zero_shot_cot for
    icl_cot, finetune_cot when present, else zero_shot"."""
    return ("per method: " + "".join(f"{b} for {', '.join(ms)} when present, else "
                                     for b, ms in _other_baselines().items()) + ZERO_SHOT)


BASELINE_RULE = _baseline_rule()
_SIZE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*([kKmMbBtT])(?![a-zA-Z])")
_UNIT = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclass
class Run:
    """One results directory as the comparison sees it."""

    index: int
    res: Results
    table: pd.DataFrame
    model: str
    dataset: str  # the set's name, with the prompt template when it is not the set's own (dataset_label)
    seed: int | None
    size: float | None
    size_source: str

    @property
    def dir(self) -> str:
        return str(self.res.path.resolve())

    @property
    def dataset_name(self) -> str:
        """The question set's name as sweep.json records it, whatever the prompt."""
        return self.res.record.dataset

    @property
    def prompt(self) -> str | None:
        return prompt_template(self.res.record.prompt)


@dataclass
class Head:
    """One method's head in one run: its rows (trained rows only) and where they came from."""

    run: Run
    experiment: str
    method: str
    headline: Headline
    rows: pd.DataFrame = field(repr=False)
    #: The shortcut controls' rows of a probe head (empty for other methods).
    controls: pd.DataFrame = field(repr=False, default=None)


def model_size(model: dict) -> tuple[float | None, str]:
    """(parameter count, where it came from): a recorded count (``n_params``, ``num_parameters``
    or ``parameters``), else the size written in the model's name ("SmolLM2-135M" -> 1.35e8,
    "Llama-2-7b-hf" -> 7e9), else (None, "unknown")."""
    for key in ("n_params", "num_parameters", "parameters"):
        value = model.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value), f"recorded ({key})"
    name = str(model.get("id") or "")
    found = _SIZE.findall(name)
    if found:
        number, unit = found[-1]
        return float(number) * _UNIT[unit.lower()], f"from the name ({number}{unit})"
    return None, "unknown (ordered by name)"


def _model_label(model: dict) -> str:
    label = str(model.get("id") or "?")
    quant = model.get("quantization")
    return f"{label} ({quant})" if quant else label


def prompt_template(prompt: dict) -> str | None:
    """The prompt template a run's rows were scored with, as its run record's ``prompt`` holds it (the
    cache's ``prompt.template``); None for runs that do not record one (generation runs name their
    prompts by id)."""
    template = prompt.get("template")
    return template if isinstance(template, str) else None


def dataset_label(dataset: str, template: str | None) -> str:
    """``dataset``, with the prompt template in brackets when the run used another than the set's own
    ("arc (cloze)"): the comparison keeps a cloze run apart from the paper's prompt on the same set,
    each against its own zero-shot baseline."""
    spec = SETS.get(dataset)
    if template is None or (spec is not None and template == spec.prompt_template):
        return dataset
    return f"{dataset} ({template})"


def _load_runs(dirs: Sequence[str | Path], zero_weights: str) -> list[Run]:
    seen: dict[Path, str] = {}
    runs = []
    for i, d in enumerate(dirs):
        res = load_results(d)
        where = res.path.resolve()
        if where in seen:
            raise ProbekitError(f"results directory {d} is given twice (also as {seen[where]})")
        seen[where] = str(d)
        record = res.record
        if not record.model or not record.dataset:
            raise ProbekitError(f"{res.path}: its sweep.json does not record the model and dataset, "
                                "so it cannot be compared with other runs")
        try:
            table = treat_zero_weights(res.table, zero_weights)
        except ProbekitError as exc:
            raise ProbekitError(f"{res.path}: {exc}") from None
        size, source = model_size(record.model)
        dataset = dataset_label(record.dataset, prompt_template(record.prompt))
        runs.append(Run(i, res, table, _model_label(record.model), dataset, record.seed, size, source))
    return runs


def _heads(runs: list[Run], baselines: Sequence[str], site: str | None, layer: str | None,
           solver: str | None) -> list[Head]:
    """One head per (run, experiment, trained method); two runs giving the same (model, dataset,
    experiment, method) are refused."""
    heads: list[Head] = []
    owner: dict[tuple, Run] = {}
    for run in runs:
        t = run.table
        trained = t[~t["method"].isin(list(baselines)) & (t["train_level"] != ZERO_SHOT)]
        for (experiment, method), rows in trained.groupby(["experiment", "method"], sort=True, observed=True):
            key = (run.model, run.dataset, experiment, method)
            if key in owner:
                raise ProbekitError(
                    f"{owner[key].res.path} and {run.res.path} both hold {method} rows of the {experiment} "
                    f"experiment for {run.model} on {run.dataset}: give one of them")
            owner[key] = run
            pick = (site, layer, solver) if METHODS[method].probe_head else (None, None, None)
            try:
                head = choose_headline(rows, *pick)
            except ProbekitError as exc:
                raise ProbekitError(f"{run.res.path} ({method}): {exc}") from None
            at = rows[(rows["site"] == head.site) & (rows["layer"] == head.layer) & (rows["solver"] == head.solver)]
            heads.append(Head(run, str(experiment), str(method), head, at, rows[rows["site"].isin(CONTROL_SITES)]))
    if not heads:
        raise ProbekitError("none of the results directories holds trained heads to compare")
    return heads


def _baselines(runs: list[Run], baseline: str) -> dict[tuple, tuple[Run, pd.DataFrame]]:
    """Per (model, dataset, experiment): the baseline rows (train level set to zero_shot) and the
    run they come from, after checking that every run of that model and dataset agrees on them."""
    by_group: dict[tuple, list[tuple[Run, pd.DataFrame]]] = {}
    for run in runs:
        rows = run.table[run.table["method"] == baseline]
        if len(rows):
            rows = rows.drop_duplicates(["experiment", "measure", "item_id", "draw"]).assign(train_level=ZERO_SHOT)
            by_group.setdefault((run.model, run.dataset), []).append((run, rows))
    out: dict[tuple, tuple[Run, pd.DataFrame]] = {}
    for (model, dataset), entries in by_group.items():
        first, ref = entries[0]
        for other, rows in entries[1:]:
            _check_same_baseline(first, ref, other, rows, baseline)
        for run, rows in entries:
            for experiment, part in rows.groupby("experiment", observed=True):
                out.setdefault((model, dataset, str(experiment)), (run, part))
    return out


def baseline_of(method: str, key: tuple, baseline: str | None, bases: dict[str, dict]) -> str:
    """The baseline method of ``method``'s head for ``key`` = (model, dataset, experiment): ``baseline``
    when given, else the method's registered baseline when present for ``key``, else zero_shot."""
    if baseline:
        return baseline
    registered = METHODS[method].baseline
    if registered and key in bases.get(registered, {}):
        return registered
    return ZERO_SHOT


def _check_same_baseline(a: Run, ra: pd.DataFrame, b: Run, rb: pd.DataFrame, baseline: str) -> None:
    where = f"{a.res.path} and {b.res.path} ({a.model} on {a.dataset})"
    ca = ra.drop_duplicates("item_id").set_index("item_id")["correct"]
    cb = rb.drop_duplicates("item_id").set_index("item_id")["correct"]
    common = ca.index.intersection(cb.index)
    diff = common[ca[common].to_numpy() != cb[common].to_numpy()]
    if len(diff):
        raise ProbekitError(f"{where} disagree on {baseline} for {len(diff)} item(s), first {diff[0]!r} "
                            f"(correct {int(ca[diff[0]])} vs {int(cb[diff[0]])}): not the same model, cache or "
                            "scoring; compare runs of one cache")
    for measure in sorted(set(ra["measure"]) & set(rb["measure"])):
        la = ra[ra["measure"] == measure].set_index("item_id")["test_level"]
        lb = rb[rb["measure"] == measure].set_index("item_id")["test_level"]
        if set(la.index) != set(lb.index):
            only = sorted(set(la.index) ^ set(lb.index))
            raise ProbekitError(f"{where} test different items for measure {measure!r} ({len(only)} differ, "
                                f"first {only[0]!r}): compare runs over the same items")
        lb = lb[la.index]
        bad = la.index[la.to_numpy() != lb.to_numpy()]
        if len(bad):
            raise ProbekitError(f"{where} cut measure {measure!r} into different levels (item {bad[0]!r}: "
                                f"{la[bad[0]]!r} vs {lb[bad[0]]!r}): use the same --cutoff for both")


def _check_pairing(heads: list[Head]) -> list[str]:
    """Refuse paired methods run with different seeds; return notes on other differences."""
    notes = []
    groups: dict[tuple, list[Head]] = {}
    for h in heads:
        if METHODS[h.method].paired:
            groups.setdefault((h.run.model, h.run.dataset, h.experiment), []).append(h)
    for (model, dataset, experiment), hs in groups.items():
        for h in hs[1:]:
            a = hs[0]
            if a.run.seed != h.run.seed:
                raise ProbekitError(
                    f"{a.run.res.path} ({a.method}, seed {a.run.seed}) and {h.run.res.path} ({h.method}, seed "
                    f"{h.run.seed}) of {model} on {dataset} drew their training items with different seeds, so "
                    "they do not pair item by item: rerun one with the other's --seed")
            na = sorted(set(a.rows["n_train"])), sorted(set(h.rows["n_train"]))
            if na[0] != na[1]:
                notes.append(f"{model} on {dataset} ({experiment}): {a.method} trains on n_train {na[0]}, "
                             f"{h.method} on {na[1]}; each uses its largest")
    return notes


def build_comparison(
    results_dirs: Sequence[str | Path],
    out_dir: str | Path,
    n_boot: int = 10_000,
    n_boot_sgr: int = 100_000,
    seed: int = 0,
    *,
    site: str | None = None,
    layer: str | None = None,
    solver: str | None = None,
    baseline: str | None = None,
    zero_weights: str = "chance",
    p_value: str = "percentile",
    progress: ProgressFn | None = None,
) -> dict:
    """Compare several results directories (see the module docstring) and return the summary.

    ``n_boot`` resamples per accuracy, difference and all-to-all cell; ``n_boot_sgr`` per SGR of
    every method's head; every bootstrap uses ``seed``. ``site``, ``layer`` and ``solver`` pick the
    probe head (defaults as in a single-run report); other methods' heads take their defaults.
    ``baseline``: the method whose rows are the zero-shot baseline of every method (e.g.
    "zero_shot_cot"); None: per method (:func:`baseline_of`, see the module docstring).
    ``zero_weights``, ``p_value``: as in :func:`probekit.report.build.build_report`. Every SGR of the
    comparison gets a Benjamini-Hochberg q-value over all of them (one family), a probe head its
    shortcut controls. Bad, incomplete or mismatched runs raise :class:`ProbekitError` before anything
    is written.
    """
    if len(results_dirs) < 2:
        raise ProbekitError("a comparison needs at least two results directories")
    check_settings(n_boot, n_boot_sgr, seed, zero_weights, p_value)
    if baseline is not None and baseline not in METHODS:
        raise OptionError("baseline", baseline, f"one of the methods {', '.join(METHODS)}")
    runs = _load_runs(results_dirs, zero_weights)
    names = [baseline] if baseline else baselines()
    heads = _heads(runs, names, site, layer, solver)
    bases = {b: _baselines(runs, b) for b in names}
    notes = _check_pairing(heads)
    pop_heads = [h for h in heads if h.experiment == "population"]
    a2a_heads = [h for h in heads if h.experiment == "all_to_all"]
    a2a_base = [(b, k, v) for b in names for k, v in bases[b].items() if k[2] == "all_to_all"]
    tick = Ticker(progress, len(pop_heads) + len(a2a_heads) + len(a2a_base))

    population = _population(pop_heads, bases, baseline, n_boot, n_boot_sgr, seed, p_value, notes, tick)
    family = add_qvalues(population)
    warnings = few_draws(population, lambda r: f"{r['model']} {r['dataset']} {r['measure']} {r['method']}")

    all_to_all = _all_to_all(a2a_base, a2a_heads, n_boot, seed, tick)
    settings = {"n_boot": n_boot, "n_boot_sgr": n_boot_sgr, "seed": seed, "baseline": baseline,
                "zero_weights": zero_weights, "p_value": p_value, "site": site, "layer": layer, "solver": solver}
    summary = _summary(runs, heads, population, all_to_all, family, notes, warnings, settings)
    summary = jsonable(summary)
    write_report_dir(Path(out_dir), summary, lambda tmp: _write_files(tmp, summary))
    return summary


def _population(pop_heads: list[Head], bases: dict, baseline: str | None, n_boot: int, n_boot_sgr: int, seed: int,
                p_value: str, notes: list[str], tick) -> list[dict]:
    """Every population head's records, each beside the baseline of its model and dataset (a head
    without one gets a note and no SGR)."""
    population: list[dict] = []
    for h in pop_heads:
        key = (h.run.model, h.run.dataset, "population")
        used = baseline_of(h.method, key, baseline, bases)
        zero_run, zero = bases[used].get(key, (None, h.rows.iloc[:0]))
        if zero_run is None:
            notes.append(f"{h.run.res.path} ({h.method}): no {used} rows for {h.run.model} on {h.run.dataset}; "
                         "its SGR is not computed")
        parts = [zero[zero["measure"].isin(set(h.rows["measure"]))], h.rows]
        if h.controls is not None and len(h.controls):
            parts.append(h.controls)
        sub = pd.concat(parts, ignore_index=True)
        records = headline_records(population_table(sub, n_boot, n_boot_sgr, seed, None, h.headline, p_value),
                                   h.headline)
        count_zero_weight_heads(records, h.run.res.table)
        for rec in records:
            population.append({"model": h.run.model, "dataset": h.run.dataset, "method": h.method,
                               "method_label": method_label(h.method, h.run.res.record),
                               "run": h.run.dir, "run_sha256": h.run.res.sha256, "baseline": used,
                               "baseline_run": zero_run.dir if zero_run else None, **rec})
        tick(f"{h.method} {h.run.model} {h.run.dataset}")
    return population


def _all_to_all(a2a_base: list, a2a_heads: list[Head], n_boot: int, seed: int, tick) -> list[dict]:
    """The all-to-all records of every baseline and every all-to-all head."""
    all_to_all: list[dict] = []
    for name, (model, dataset, _), (run, zero) in a2a_base:
        for rec in all_to_all_table(zero, n_boot, seed):
            all_to_all.append({"model": model, "dataset": dataset, "method": name, "run": run.dir,
                               "run_sha256": run.res.sha256, **rec})
        tick(f"{name} all-to-all {model} {dataset}")
    for h in a2a_heads:
        for rec in all_to_all_table(h.rows, n_boot, seed):
            all_to_all.append({"model": h.run.model, "dataset": h.run.dataset, "method": h.method,
                               "run": h.run.dir, "run_sha256": h.run.res.sha256, **rec})
        tick(f"{h.method} all-to-all {h.run.model} {h.run.dataset}")
    return all_to_all


def _summary(runs: list[Run], heads: list[Head], population: list[dict], all_to_all: list[dict], family: int,
             notes: list[str], warnings: list, given: dict) -> dict:
    """The comparison's ``summary.json`` (before :func:`jsonable`); ``given``: the settings it was asked for."""
    models = _model_order(runs)
    spearman, spearman_notes = _spearman(runs)
    notes += spearman_notes
    summary = {
        "format": FORMAT,
        "probekit_version": probekit.__version__,
        "runs": [{"dir": r.dir, "sha256": r.res.sha256, "model": r.model, "dataset": r.dataset, "prompt": r.prompt,
                  "experiments": sorted(r.table["experiment"].unique()),
                  "methods": method_order(r.table["method"].unique()), "seed": r.seed,
                  "cache_manifest_sha256": r.res.record.cache_manifest_sha256, "n_rows": int(len(r.table)),
                  "model_size": r.size, "model_size_source": r.size_source} for r in runs],
        "heads": [{"run": h.run.dir, "model": h.run.model, "dataset": h.run.dataset, "experiment": h.experiment,
                   "method": h.method, **vars(h.headline)} for h in heads],
        "models": [{"model": m, "size": s, "size_source": src} for m, s, src in models],
        "settings": {
            "n_boot": int(given["n_boot"]), "n_boot_sgr": int(given["n_boot_sgr"]), "seed": int(given["seed"]), "level": 0.95,
            "test_level": HARD, "baseline": given["baseline"] or BASELINE_RULE, "zero_weights": given["zero_weights"],
            "p_value": given["p_value"],
            "multiplicity": {"method": "benjamini-hochberg", "family": "every SGR of the comparison (not estimable "
                             "ones counted as p = 1)", "size": family},
            "probe_head": {"site": given["site"], "layer": given["layer"], "solver": given["solver"]},
            "rule": "each method's head is computed by the single-run report's functions on its own rows beside "
                    "the shared baseline of its model and dataset; every head's SGR gets n_boot_sgr resamples",
            "sgr_estimable": "an SGR is estimable only when the 95% interval of hard - zero-shot (from the same "
                             "resamples) lies above 0; otherwise its numbers are kept with estimable = false",
        },
        "population": population,
        "all_to_all": all_to_all,
        "spearman": spearman,
        "notes": notes,
        "warnings": warnings,
        "files": [],
    }
    return summary


def report(
    results: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    n_boot: int = 10_000,
    n_boot_sgr: int = 100_000,
    seed: int = 0,
    *,
    baseline: str | None = None,
    **options,
) -> dict:
    """``probekit report``: one results directory gives a single-run report
    (:func:`probekit.report.build.build_report`), several a comparison (:func:`build_comparison`);
    ``out_dir`` is held from the start, so a refused report leaves nothing behind. ``options``: ``site``,
    ``layer``, ``solver``, ``zero_weights``, ``p_value``, ``progress``. Returns the summary
    (``summary.json``)."""
    dirs = [results] if isinstance(results, (str, Path)) else list(results)
    if not dirs:
        raise ProbekitError("no results directory to report on")
    with holding_report(out_dir):
        if len(dirs) > 1:
            return build_comparison(dirs, out_dir, n_boot, n_boot_sgr, seed, baseline=baseline, **options)
        if baseline is not None:
            raise ProbekitError(f"--baseline {baseline}: a baseline is shared by the methods of a comparison; give "
                                "several results directories, or leave --baseline out")
        return build_report(dirs[0], out_dir, n_boot, n_boot_sgr, seed, **options)


def method_label(method: str, record: RunRecord) -> str:
    """How a method is named in tables (:attr:`probekit.methods.Method.label`), with what ran for a
    fine-tuning run: its base ("LoRA (float32 base)" on a model that was not quantized, "QLoRA (8-bit
    base)"), as its run record holds it (a fine-tuning run's settings, or a generation run's
    fine-tuning settings)."""
    label = METHODS[method].label
    if not METHODS[method].finetunes:
        return label
    if record.kind == "finetune":
        quantize, model = record.config["quantize"], record.details["finetune_model"]
    elif record.kind == "generate":
        quantize, model = record.config["finetune"]["quantize"], record.model
    else:
        return label
    if quantize in ("8bit", "4bit"):
        return f"{label}: QLoRA ({quantize[0]}-bit base)"
    if quantize == "none":
        return f"{label}: LoRA ({model.get('dtype') or 'unquantized'} base)"
    return label


def _model_order(runs: list[Run]) -> list[tuple[str, float | None, str]]:
    """Models ordered by size (known sizes first, smallest first), then by name."""
    models = {}
    for r in runs:
        models.setdefault(r.model, (r.size, r.size_source))
    order = sorted(models, key=lambda m: (models[m][0] is None, models[m][0] or 0.0, m))
    return [(m, *models[m]) for m in order]


# ----------------------------------------------------------------------------------------------
# Spearman correlations between a dataset's difficulty measures


def _spearman(runs: list[Run]) -> tuple[list[dict], list[str]]:
    from scipy.stats import spearmanr

    from probekit.store.reader import Cache

    out, notes = [], []
    by_dataset: dict[str, list[Run]] = {}
    for r in runs:
        by_dataset.setdefault(r.dataset_name, []).append(r)
    for dataset, rs in sorted(by_dataset.items()):
        found = None
        for r in rs:
            path, recorded = r.res.record.cache, r.res.record.cache_manifest_sha256
            if not path or not Path(path).is_dir():
                continue
            try:
                cache = Cache(path)
            except ProbekitError:
                continue
            if recorded and cache.manifest_sha256 != recorded:
                continue
            found = (r, cache)
            break
        if found is None:
            notes.append(f"Spearman correlations of {dataset} not computed: no run's cache is at its recorded "
                         "path with its recorded manifest")
            continue
        run, cache = found
        items = cache.items
        probe = set(run.table["item_id"].astype(str))
        items = items[items["id"].astype(str).isin(probe)]
        measures = [m for m in cache.measures if m in items.columns]
        values = items[measures].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        k = len(measures)
        rho = np.full((k, k), np.nan)
        n = np.zeros((k, k), np.int64)
        for i in range(k):
            for j in range(k):
                ok = np.isfinite(values[:, i]) & np.isfinite(values[:, j])
                n[i, j] = int(ok.sum())
                a, b = values[ok, i], values[ok, j]
                if n[i, j] > 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
                    rho[i, j] = float(spearmanr(a, b).statistic)
        out.append({"dataset": dataset, "run": run.dir, "cache": str(cache.path.resolve()),
                    "cache_manifest_sha256": cache.manifest_sha256, "n_items": int(len(items)),
                    "measures": measures, "rho": rho.tolist(), "n": n.tolist()})
    return out, notes


# ----------------------------------------------------------------------------------------------
# Tables and files


def comparison_frame(population: list[dict]) -> pd.DataFrame:
    """The headline comparison as display strings: one row per (model, dataset, measure, method)."""
    rows = []
    levels = level_order({lv for r in population for lv in r["accuracy"]} - {ZERO_SHOT})
    for r in comparison_order(population):
        row = {"model": r["model"], "dataset": r["dataset"], "measure": r["measure"],
               "method": r.get("method_label") or r["method"], "zero-shot": fmt_acc(r["accuracy"].get(ZERO_SHOT))}
        for lv in levels:
            row[f"{lv}→hard"] = fmt_acc(r["accuracy"].get(lv))
        row["SGR [95% CI]"] = fmt_sgr(r["sgr"])
        row["q"] = fmt_q(r["sgr"])
        row["hard−easy (pts, paired)"] = fmt_test(r.get("hard_minus_easy"), percent=True)
        row["vs controls"] = control_verdict(r)
        row["SGR note"] = f"{NOT_ESTIMABLE}: {r['sgr']['reason']}" if sgr_flagged(r["sgr"]) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_order(population: list[dict]) -> list[dict]:
    """Records sorted by model, dataset, measure and method."""
    order = {m: i for i, m in enumerate(method_order({r["method"] for r in population}))}
    return sorted(population, key=lambda r: (r["model"], r["dataset"], r["measure"], order[r["method"]]))


def model_size_frame(population: list[dict], models: list[dict]) -> pd.DataFrame:
    """Per (dataset, measure, method): SGR and easy/hard-trained hard-test accuracy of each model,
    models in size order."""
    rows = []
    keys = sorted({(r["dataset"], r["measure"], r["method"]) for r in population})
    for dataset, measure, method in keys:
        row = {"dataset": dataset, "measure": measure, "method": method}
        for m in models:
            rec = next((r for r in population if (r["model"], r["dataset"], r["measure"], r["method"])
                        == (m["model"], dataset, measure, method)), None)
            acc = rec["accuracy"] if rec else {}
            row[f"{m['model']}: zero-shot"] = fmt_acc(acc.get(ZERO_SHOT), interval=False)
            row[f"{m['model']}: easy→hard"] = fmt_acc(acc.get("easy"), interval=False)
            row[f"{m['model']}: hard→hard"] = fmt_acc(acc.get(HARD), interval=False)
            row[f"{m['model']}: SGR"] = fmt_sgr(rec["sgr"]) if rec else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def all_to_all_frame(records: list[dict]) -> pd.DataFrame:
    """Accuracy (%) on every test item (test level "all") of heads trained on a random split:
    one row per method, one column per (model, dataset)."""
    cells: dict[str, dict[str, str]] = {}
    columns = []
    for r in records:
        if r["test_level"] != "all":
            continue
        col = f"{r['model']} / {r['dataset']}"
        if col not in columns:
            columns.append(col)
        cells.setdefault(r["method"], {})[col] = fmt_acc(r["accuracy"])
    rows = [{"method": m, **{c: cells[m].get(c, "–") for c in columns}} for m in method_order(cells)]
    return pd.DataFrame(rows)


def spearman_frame(entry: dict) -> pd.DataFrame:
    measures = entry["measures"]
    rows = []
    for i, m in enumerate(measures):
        row = {"measure": m}
        for j, other in enumerate(measures):
            v = entry["rho"][i][j]
            row[other] = "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _write_files(tmp: Path, summary: dict) -> list[str]:
    written = ReportFiles(tmp)
    files, csv, png = written.names, written.csv, written.png
    population, a2a = summary["population"], summary["all_to_all"]

    csv("comparison.csv", flatten(comparison_order(population)))
    csv("all_to_all.csv", flatten(a2a))
    long = [{"dataset": e["dataset"], "run": e["run"], "measure": m, "other": o, "rho": e["rho"][i][j], "n": e["n"][i][j]}
            for e in summary["spearman"] for i, m in enumerate(e["measures"]) for j, o in enumerate(e["measures"])]
    csv("spearman.csv", pd.DataFrame(long))
    models = summary["models"]
    figs = {"sgr": png(compare_plots.plot_method_sgr(population, [m["model"] for m in models], tmp / "sgr.png"))}
    size = model_size_frame(population, models) if len(models) > 1 else pd.DataFrame()
    csv("model_size.csv", size)
    if len(models) > 1:
        figs["size"] = png(compare_plots.plot_model_size(population, models, tmp / "model_size.png"))
    (tmp / "report.md").write_text(_markdown(summary, figs, files, size))
    files.append("report.md")
    return files


def _baseline_words(baseline: str) -> str:
    if baseline == BASELINE_RULE:
        others = ", ".join(f"`{b}` for " + " and ".join(f"`{m}`" for m in ms) for b, ms in _other_baselines().items())
        return f"the zero-shot baseline is method `{ZERO_SHOT}`, or {others} when a run holds it"
    return f"the zero-shot baseline is method `{baseline}` for every method"


def _markdown(summary: dict, figs: dict, files: list[str], size: pd.DataFrame) -> str:
    s = summary["settings"]
    lines = ["# probekit comparison report", "", "## Runs", ""]
    runs = pd.DataFrame([{"#": i + 1, "results": r["dir"], "model": r["model"], "dataset": r["dataset"],
                          "prompt": r.get("prompt") or "–", "experiments": ", ".join(r["experiments"]),
                          "methods": ", ".join(r["methods"]),
                          "seed": "–" if r["seed"] is None else str(r["seed"]),
                          "sha256": (r["sha256"] or "")[:12]} for i, r in enumerate(summary["runs"])])
    heads = pd.DataFrame([{"model": h["model"], "dataset": h["dataset"], "experiment": h["experiment"],
                           "method": h["method"], "site": h["site"], "layer": h["layer"] or "–", "solver": h["solver"],
                           "results": h["run"]} for h in summary["heads"]])
    lines += [to_markdown(runs), "Heads compared (one per model, dataset, experiment and method):", "",
              to_markdown(heads),
              f"- Bootstrap: {s['n_boot']} resamples per accuracy and difference, {s['n_boot_sgr']} per SGR, seed "
              f"{s['seed']}, 95% percentile intervals; {_baseline_words(s['baseline'])}, shared by the methods of a "
              "model and dataset and checked equal item by item across its runs.",
              "- Each number equals the one the run's own `probekit report` gives for that head as its headline "
              "(but q, which is over every SGR of this comparison).",
              *[f"- {note}" for note in POPULATION_NOTES],
              "- SGR `n/e`: the 95% interval of hard − zero-shot does not lie above 0, so the ratio has no meaning; "
              "its numbers stay in `summary.json` and `comparison.csv` with `estimable` false.",
              "- `vs controls` (probe heads): `beats` when the hard-trained probe's paired lead over each shortcut "
              "control (a probe on the choices' surface features; the training draw's majority position) has a 95% "
              "interval above 0, else the controls it does not beat.", ""]
    if summary["notes"]:
        lines += ["Notes:", "", *[f"- {n}" for n in summary["notes"]], ""]
    if summary["warnings"]:
        lines += ["**Warnings**", "", *[f"- {w}" for w in summary["warnings"]], ""]
    if summary["population"]:
        lines += ["## SGR and hard-test accuracy by method", ""]
        if figs.get("sgr"):
            lines += ["![SGR per dataset and measure, a bar per method](sgr.png)", ""]
        lines += [to_markdown(comparison_frame(summary["population"])), "Numbers: `comparison.csv`.", ""]
    if len(summary["models"]) > 1:
        lines += ["## Across model sizes", "",
                  "Models in size order: " + ", ".join(f"{m['model']} ({m['size_source']})" for m in summary["models"]),
                  ""]
        if figs.get("size"):
            lines += ["![SGR and hard-test accuracy by model size](model_size.png)", ""]
        lines += [to_markdown(size), "Numbers: `model_size.csv`.", ""]
    lines += ["## All-to-all accuracy (random training split, every test item)", ""]
    if summary["all_to_all"]:
        lines += [to_markdown(all_to_all_frame(summary["all_to_all"])), "Numbers: `all_to_all.csv`.", ""]
    else:
        lines += ["_No `--experiment all_to_all` runs among the inputs._", ""]
    lines += ["## Spearman correlation between difficulty measures", ""]
    for e in summary["spearman"]:
        lines += [f"**{e['dataset']}** ({e['n_items']} probe items; from the cache `{e['cache']}`):", "",
                  to_markdown(spearman_frame(e))]
    if not summary["spearman"]:
        lines += ["_No cache could be read._", ""]
    lines += ["## Files", "", *[f"- [{f}]({f})" for f in [*files, "report.md", "summary.json"]], ""]
    return "\n".join(lines)


