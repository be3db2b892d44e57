"""``build_report``: results directory in, report directory out.

``REP/summary.json`` holds every number (fractions, not percent) with its interval and, for
SGR and differences, its p-value, plus the settings, ``sweep.json`` and the cache hash.
``REP/report.md`` shows the tables and links the PNGs; one CSV per table sits beside them.

Everything is computed before anything is written. The report holds ``REP``'s lock
(:class:`probekit.store.outdir.OutputDir`) from its start, before the results are read: a second
report into the same directory is refused at once, and so is a directory that holds anything but
a report (a results directory, say). The files are written into a temporary directory beside
``REP``, which then takes ``REP``'s place as a whole (:func:`write_report_dir`): a kill leaves the
old report or the new one, never a mix, and a killed run's temporary directory is removed by the
next report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

import probekit
from probekit.errors import ProbekitError
from probekit.report import plots
from probekit.report.cv import cv_choices, cv_lines, sweep_shown
from probekit.report.tables import (
    HARD,
    POPULATION_NOTES,
    ZERO_SHOT,
    ZERO_WEIGHTS,
    Headline,
    add_qvalues,
    all_to_all_table,
    choose_headline,
    count_zero_weight_heads,
    curve_table,
    few_draws,
    flatten,
    fmt_acc,
    head_label,
    head_method,
    headline_frame,
    headline_records,
    load_results,
    population_display,
    population_table,
    row_runs,
    to_markdown,
    transfer_table,
    treat_zero_weights,
    zero_weight_heads,
)
from probekit.stats.bootstrap import P_VALUES
from probekit.store.outdir import LOCK, OutputDir, remove_temporaries, replace_dir, take_dir_lock, write_error
from probekit.store.results import cv_table

FORMAT = "probekit-report/1"
SUMMARY = "summary.json"
#: experiment -> (x column, CSV/PNG stem, plot title, x label)
CURVES = {
    "learning_curve": ("n_train", "learning_curves", "Hard-test accuracy vs training set size", "n_train (log scale)"),
    "label_noise": ("label_noise", "label_noise", "Hard-test accuracy vs label noise", "label noise rate (as run)"),
}

ProgressFn = Callable[[int, int, str], None]


def build_report(
    results_dir: str | Path,
    out_dir: str | Path,
    n_boot: int = 10_000,
    n_boot_sgr: int = 100_000,
    seed: int = 0,
    *,
    site: str | None = None,
    layer: str | None = None,
    solver: str | None = None,
    zero_weights: str = "chance",
    p_value: str = "percentile",
    progress: ProgressFn | None = None,
) -> dict:
    """Build the report of a sweep's results directory and return the summary.

    ``n_boot`` resamples go into each accuracy interval and paired difference, ``n_boot_sgr``
    into the headline head's SGR (other heads' SGR get ``n_boot``); every bootstrap uses ``seed``.
    ``site``, ``layer`` (e.g. "30" or "15+30") and ``solver`` pick the headline head; by default
    the middle+last concatenation (else the last single layer) at ``answer_end`` with the
    ``paper`` solver (see :func:`probekit.report.tables.choose_headline`). Every layer is
    reported in ``population.csv``. ``progress(done, total, what)`` is called after each unit of
    work. Bad or incomplete results raise :class:`ProbekitError` before anything is written.

    ``zero_weights``: what to do with heads whose exact optimum has zero weights (the results'
    ``zero_weights`` column, :func:`probekit.probe.solvers.zero_is_optimal`;
    :func:`probekit.report.tables.treat_zero_weights`): ``"chance"`` (the default) keeps them, scored
    as what they are at their optimum (expected accuracy 1 / n_choices per item); ``"exclude"`` leaves
    their rows out (a selection on the training draw); ``"include"`` keeps their SGD predictions. Their
    counts per layer and per (measure, training level) are in ``summary.json`` and ``report.md``, and
    ``summary.json`` holds the headline numbers under all three treatments (``zero_weight_treatments``).
    ``p_value``: "percentile" (the default: read off the interval's own resamples, so a p below 0.05
    and an interval excluding 0 always agree) or "centred" (the reference code's centred test).
    Every headline SGR gets a Benjamini-Hochberg q-value over the headline's SGRs, and conditions
    with fewer than 3 training draws are listed in ``warnings``.
    """
    check_settings(n_boot, n_boot_sgr, seed, zero_weights, p_value)
    res = load_results(results_dir, columns=())  # the report does not use p_gold
    zero = zero_weight_heads(res.table)
    table = treat_zero_weights(res.table, zero_weights)
    headline = choose_headline(table, site, layer, solver)
    experiments = sorted(table["experiment"].unique())

    tick = Ticker(progress, _count_tasks(table))
    population = population_table(table, n_boot, n_boot_sgr, seed, tick, headline, p_value)
    count_zero_weight_heads(population, res.table)
    chosen = headline_records(population, headline)
    family = add_qvalues(chosen)
    warnings = few_draws(chosen, lambda r: r["measure"])
    treatments = _treatments(res.table, headline, zero_weights, population, n_boot, n_boot_sgr, seed, p_value)
    all_to_all = all_to_all_table(table, n_boot, seed, tick)
    curves = {exp: curve_table(table, exp, spec[0], n_boot, seed, tick) for exp, spec in CURVES.items()}
    transfer = transfer_table(table, headline) if headline else pd.DataFrame()

    summary = {
        "format": FORMAT,
        "probekit_version": probekit.__version__,
        "results": {
            "dir": str(res.path.resolve()),
            "sha256": res.sha256,
            "n_rows": int(len(table)),
            "experiments": experiments,
        },
        "cache_manifest_sha256": res.record.cache_manifest_sha256,
        "sweep": res.sweep,
        "settings": _settings(n_boot, n_boot_sgr, seed, table, headline, p_value, zero_weights, family),
        "warnings": warnings,
        "zero_weight_heads": _zero_weight_record(zero, zero_weights),
        "population": population,
        "zero_weight_treatments": treatments,
        "transfer": transfer.to_dict(orient="records"),
        "all_to_all": all_to_all,
        "learning_curve": curves["learning_curve"],
        "label_noise": curves["label_noise"],
        "cv": cv_choices(cv_table(res.sweep), res.sweep),
        "files": [],
    }
    summary = jsonable(summary)
    _write(Path(out_dir), summary, headline, population, all_to_all, curves, transfer)
    return summary


def _settings(n_boot: int, n_boot_sgr: int, seed: int, table: pd.DataFrame, headline: Headline | None, p_value: str,
              zero_weights: str, family: int) -> dict:
    """The report's ``settings``: its resamples, headline head and the estimators its numbers come from."""
    return {
        "n_boot": int(n_boot),
        "n_boot_sgr": int(n_boot_sgr),
        "seed": int(seed),
        "level": 0.95,
        "test_level": HARD,
        "headline": vars(headline) if headline else None,
        "headline_method": head_method(table, headline) if headline else None,
        "accuracy": "crossed bootstrap over test items and training draws; point = nanmean of the "
                    "item x draw matrix, interval = percentiles of the resampled means",
        "p_value": p_value,
        "zero_weights": zero_weights,
        "sgr": "(easy - zero_shot) / (hard - zero_shot) on the hard test; one shared item resample, "
               "independent draw resamples; point = the ratio of the observed matrices' means, interval = "
               "percentiles of the resampled ratios, p-value: " + _P_WORDS[p_value] + "; fieller = the "
               "Fieller-type set of the ratio from the resamples' numerator and denominator covariance; "
               "q_value = Benjamini-Hochberg over the headline's SGRs (not estimable ones counted as p = 1)",
        "multiplicity": {"method": "benjamini-hochberg", "family": "the headline head's SGRs, one per measure",
                         "size": family},
        "sgr_estimable": "an SGR is estimable only when the 95% interval of hard - zero-shot (from the "
                         "same resamples) lies above 0; otherwise its numbers are kept with "
                         "estimable = false and the reason, and tables show it as n/e",
        "differences": {"hard_minus_easy": "hard-trained minus easy-trained, paired: per training draw, over "
                                           "the test items both were tested on",
                        "easy_minus_zero_shot": "easy-trained minus zero-shot"},
        "controls": "shortcut controls trained on the same draws: the probe recipe on the choices' surface "
                    "features (site surface) and the training draw's majority position (site majority); "
                    "hard_minus_control = the hard-trained probe minus the hard-trained control on the hard "
                    "test, paired by draw; beats_controls when every such interval lies above 0",
    }


def _zero_weight_record(zero: list[dict], zero_weights: str) -> dict:
    """The report's ``zero_weight_heads``: the rule, the treatment and the counts by layer."""
    return {
        "rule": "zero weights are the exact optimum of the head's objective: the NLL gradient at zero "
                "weights has norm <= the unsquared penalty l2 (standardised units)",
        "treatment": zero_weights,
        "excluded": zero_weights == "exclude",
        "heads": sum(r["heads"] for r in zero),
        "zero_weight_heads": sum(r["zero_weight_heads"] for r in zero),
        "by_layer": zero,
    }


#: How each p-value rule is described in a summary.
_P_WORDS = {
    "percentile": "the smallest alpha whose 1 - alpha percentile interval (from the same resamples) excludes 0, "
                  "so p < 0.05 exactly when the 95% interval excludes 0",
    "centred": "the centred two-sided bootstrap test of 0 (the reference code's metrics.p_value)",
}


def _treatments(raw: pd.DataFrame, headline: Headline | None, chosen: str, population: list[dict], n_boot: int,
                n_boot_sgr: int, seed: int, p_value: str) -> dict:
    """The headline head's accuracies and SGR under each zero-weight treatment (the chosen one from
    ``population``, the others computed on the headline's rows alone), so a reader sees how much they move."""
    if headline is None:
        return {}
    keep = ((raw["site"] == headline.site) & (raw["layer"] == headline.layer) & (raw["solver"] == headline.solver)
            | (raw["train_level"] == ZERO_SHOT))
    rows = raw[keep & (raw["experiment"] == "population")]
    out = {}
    for treatment in ZERO_WEIGHTS:
        if treatment == chosen:
            recs = headline_records(population, headline)
        else:
            try:
                table = treat_zero_weights(rows, treatment)
            except ProbekitError as exc:
                out[treatment] = {"error": str(exc)}
                continue
            recs = headline_records(population_table(table, n_boot, n_boot_sgr, seed, None, headline, p_value),
                                    headline)
            add_qvalues(recs)
        out[treatment] = {r["measure"]: {"accuracy": r["accuracy"], "sgr": r["sgr"]} for r in recs}
    return out


def check_settings(n_boot, n_boot_sgr, seed, zero_weights, p_value="percentile") -> None:
    """Refuse bootstrap sizes, a seed, a zero-weights treatment or a p-value rule a report cannot use (one line)."""
    for name, value in (("n_boot", n_boot), ("n_boot_sgr", n_boot_sgr)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ProbekitError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    if zero_weights not in ZERO_WEIGHTS:
        raise ProbekitError(f"zero_weights must be one of {', '.join(ZERO_WEIGHTS)}, got {zero_weights!r}")
    if p_value not in P_VALUES:
        raise ProbekitError(f"p_value must be one of {', '.join(P_VALUES)}, got {p_value!r}")


class Ticker:
    """Counts finished units of work and forwards them to a progress callback."""

    def __init__(self, progress: ProgressFn | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, what)


def _count_tasks(table: pd.DataFrame) -> int:
    keys = ["experiment", "measure", "site", "layer", "solver", "train_level", *(x for x, *_ in CURVES.values())]
    runs = row_runs(table, keys)  # the same key combinations as the rows (test levels alternate item by item,
    trained = runs[runs["train_level"] != "zero_shot"]  # so they are left out of the runs but for the curves)
    curves = table[table["experiment"].isin(list(CURVES)) & (table["test_level"] == HARD)
                   & (table["train_level"] != "zero_shot")]
    curves = row_runs(curves, keys)

    def groups(rows: pd.DataFrame, keys: list[str]) -> int:
        return int(rows.groupby(keys).ngroups) if len(rows) else 0

    n = groups(trained[trained["experiment"] == "population"], ["measure", "site", "layer", "solver"])
    n += groups(trained[trained["experiment"] == "all_to_all"], ["site", "layer", "solver", "train_level"])
    for exp, (x, *_) in CURVES.items():
        n += groups(curves[curves["experiment"] == exp], ["measure", "site", "layer", "solver", "train_level", x])
    return n


# ----------------------------------------------------------------------------------------------
# Writing


def _write(out: Path, summary: dict, headline: Headline | None, population, all_to_all, curves, transfer) -> None:
    write_report_dir(out, summary,
                     lambda tmp: _write_files(tmp, summary, headline, population, all_to_all, curves, transfer))


def is_report_entry(name: str) -> bool:
    """Whether a directory entry can belong to a report directory: its summary, markdown, CSV and
    PNG files, its lock and temporaries."""
    return (name in (SUMMARY, "report.md", LOCK) or (not name.startswith(".") and name.endswith((".csv", ".png")))
            or (name.startswith(".") and ".tmp" in name))


@contextmanager
def holding_report(out: str | Path, exclusive: bool = True) -> Iterator[OutputDir]:
    """Hold report directory ``out`` from the start of a report (before the results are read):
    refuses a directory holding anything but a report (a results directory, say) and one another
    process is writing, in one line; :func:`write_report_dir` inside shares the lock
    (``exclusive=False``: a writer inside a holder of this process)."""
    with OutputDir(out, (), "report output", own=is_report_entry, share=True, exclusive=exclusive) as held:
        yield held


def write_report_dir(out: Path, summary: dict, write_files: Callable[[Path], list[str]]) -> None:
    """Write a report directory as a whole: ``write_files(tmp)`` writes the files into a temporary
    directory beside ``out`` and returns their names; ``summary`` (with ``files`` set) goes in as
    ``summary.json``; then the temporary directory takes the place of ``out`` in one step
    (:func:`probekit.store.outdir.replace_dir`), under ``out``'s lock, and the old report is
    deleted. A kill at any moment leaves the old report or the new one, never a mix; the next
    report removes what a killed one left beside ``out``."""
    with holding_report(out, exclusive=False):  # refuses a report directory another writer holds
        remove_temporaries(out.parent, [out.name])  # a killed run's temporary directory
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        except OSError as exc:
            raise write_error(exc, out.parent) from None
        fd = None
        try:
            try:
                files = write_files(tmp)
                summary["files"] = files + [SUMMARY]
                (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
                fd = take_dir_lock(tmp, LOCK, "report output")  # the new directory arrives locked
                replace_dir(tmp, out)
            except OSError as exc:  # a full disk or an unwritable folder: one line, nothing half-written
                raise write_error(exc, getattr(exc, "filename", None) or tmp) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the old report (or the unfinished new one)
            if fd is not None:
                os.close(fd)


class ReportFiles:
    """The files written into a report's temporary directory, by name in order: ``csv`` writes a
    non-empty table, ``png`` records a plot a plotting function wrote (None: nothing drawn)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.names = tmp, []

    def csv(self, name: str, frame: pd.DataFrame) -> None:
        if len(frame):
            frame.to_csv(self.tmp / name, index=False)
            self.names.append(name)

    def png(self, path: Path | None) -> str | None:
        if path is not None:
            self.names.append(path.name)
            return path.name
        return None


def _write_files(tmp: Path, summary, headline, population, all_to_all, curves, transfer) -> list[str]:
    written = ReportFiles(tmp)
    files, csv, png = written.names, written.csv, written.png

    csv("population.csv", flatten(population))
    csv("cv_path.csv", cv_table(summary["sweep"]))
    csv("transfer.csv", transfer)
    csv("all_to_all.csv", flatten(all_to_all))
    for exp, (_, stem, *_) in CURVES.items():
        csv(f"{stem}.csv", flatten(curves[exp]))
    figs = {}
    if headline:
        figs["sgr"] = png(plots.plot_sgr(population, headline, tmp / "sgr.png"))
        figs["layers"] = png(plots.plot_layer_curves(population, headline, tmp / "layer_curves.png",
                                                     summary["zero_weight_heads"]["excluded"]))
        figs["transfer"] = png(plots.plot_transfer(transfer, headline, tmp / "transfer.png"))
    for exp, (x, stem, title, xlabel) in CURVES.items():
        figs[exp] = png(plots.plot_curves(curves[exp], x, tmp / f"{stem}.png", title, xlabel, headline))
    md = _markdown(summary, headline, population, all_to_all, curves, figs, files)
    (tmp / "report.md").write_text(md)
    files.append("report.md")
    return files


def _markdown(summary, headline, population, all_to_all, curves, figs, files) -> str:
    s = summary["settings"]
    lines = [
        "# probekit report",
        "",
        f"- Results: `{summary['results']['dir']}` ({summary['results']['n_rows']} rows; "
        f"experiments: {', '.join(summary['results']['experiments'])}; sha256 `{summary['results']['sha256'][:16]}…`)",
        f"- Cache manifest sha256: `{summary['cache_manifest_sha256'] or 'not recorded'}`",
        f"- Bootstrap: {s['n_boot']} resamples per accuracy and difference, {s['n_boot_sgr']} per SGR, "
        f"seed {s['seed']}, 95% percentile intervals (crossed: test items and training draws).",
        *[f"- {note}" for note in POPULATION_NOTES],
        f"- p-values: {_P_WORDS[s['p_value']]}.",
        "- SGR = (easy − zero-shot) / (hard − zero-shot) on the hard test. `n/e` (not estimable): the 95% "
        "interval of hard − zero-shot, from the same resamples, does not lie above 0, so hard training does not "
        "beat zero-shot and the ratio has no meaning; its numbers are in `summary.json` and `population.csv` "
        "with `estimable` false and the reason (here the `SGR note` column). Each SGR's Fieller-type interval "
        "is in `population.csv` (`sgr_fieller*`).",
        f"- Heads with zero weights as their exact optimum: {_ZERO_WORDS[s['zero_weights']]} "
        "(`--zero-weights`; `summary.json` holds the headline under all three treatments).",
        "- Shortcut controls (trained on the same draws, scored on the same items): a probe on the choices' "
        "surface features (length in words and characters, position) and the training draw's majority "
        "position. `vs controls`: `beats` when the hard-trained probe's paired lead over each control has a "
        "95% interval above 0, else the controls it does not beat: such a row's gain may be read off the "
        "surface, not the hidden states.",
        "",
    ]
    if summary["warnings"]:
        lines += ["**Warnings**", "", *[f"- {w}" for w in summary["warnings"]], ""]
    if headline:
        lines += [
            f"## Headline: hard-test accuracy ({head_label(s['headline'], s['headline_method'], code=True)})",
            "",
            to_markdown(headline_frame(population, headline)),
        ]
        for key, alt in (("sgr", "SGR per measure"), ("layers", "Hard-test accuracy by layer"),
                         ("transfer", "Accuracy by training and test level")):
            if figs.get(key):
                lines += [f"![{alt}]({figs[key]})", ""]
    lines += _zero_weight_lines(summary["zero_weight_heads"], population, headline)
    lines += cv_lines(summary["cv"])
    if population:
        lines += ["## Population table, every site, layer and solver", "",
                  to_markdown(population_display(population)), "Numbers: `population.csv`.", ""]
    if all_to_all:
        frame = pd.DataFrame([{"site": r["site"], "layer": r["layer"], "solver": r["solver"],
                               "train": r["train_level"], "n_train": r["n_train"], "test": r["test_level"],
                               "accuracy (%)": fmt_acc(r["accuracy"])} for r in all_to_all])
        lines += ["## All-to-all (random training split)", "", to_markdown(frame), "Numbers: `all_to_all.csv`.", ""]
    for exp, (x, stem, title, _) in CURVES.items():
        recs = curves[exp]
        if not recs:
            continue
        frame = _curve_display(recs, x)
        lines += [f"## {title}", ""]
        if figs.get(exp):
            lines += [f"![{title}]({figs[exp]})", ""]
        lines += [to_markdown(frame), f"Numbers: `{stem}.csv`.", ""]
    if summary["sweep"] is not None:
        lines += ["## Sweep configuration", "", "<details><summary>sweep.json</summary>", "", "```json",
                  json.dumps(sweep_shown(summary["sweep"]), indent=2), "```", "", "</details>", ""]
    lines += ["## Files", "", *[f"- [{f}]({f})" for f in [*files, "summary.json"]], ""]
    return "\n".join(lines)


#: What each zero-weight treatment does, in the report's words.
_ZERO_WORDS = {
    "chance": "kept in every statistic and scored as what they are at their optimum: every choice scores the "
              "same, so each counts 1 / (number of choices) on an item",
    "exclude": "left out of every accuracy, SGR, difference, table and plot (a selection on the training draw)",
    "include": "kept in every statistic with the predictions the last SGD steps left",
}


def _zero_weight_lines(zero: dict, population: list[dict], headline: Headline | None) -> list[str]:
    """The report's section on heads whose exact optimum has zero weights: counts per (measure, training
    level) of the headline head, then per layer."""
    if not zero["zero_weight_heads"]:
        return []
    rows = [r for r in zero["by_layer"] if r["zero_weight_heads"]]
    frame = pd.DataFrame([{"experiment": r["experiment"], "site": r["site"], "layer": r["layer"],
                           "solver": r["solver"], "zero-weight heads": f"{r['zero_weight_heads']} of {r['heads']}",
                           "heads (measure/level/draw)": ", ".join(r["which"])} for r in rows])
    lines = ["## Heads with zero weights", "",
             f"{zero['zero_weight_heads']} of {zero['heads']} trained heads have zero weights as the exact optimum "
             "of their objective (the NLL's gradient at zero weights is within the unsquared L2 penalty). In this "
             f"report they are {_ZERO_WORDS[zero['treatment']]}.", ""]
    chosen = headline_records(population, headline)
    if chosen:
        levels = [lv for lv in chosen[0]["accuracy"] if lv != ZERO_SHOT]
        per = pd.DataFrame([{"measure": r["measure"],
                             **{lv: _of_draws(r, lv, zero["excluded"]) for lv in levels}} for r in chosen])
        lines += ["Headline head, zero-weight heads per training level (of its draws):", "", to_markdown(per)]
    return lines + ["Every layer:", "", to_markdown(frame), ""]


def _of_draws(record: dict, level: str, excluded: bool) -> str:
    """``"2 of 5"``: a level's zero-weight heads of all its draws (excluded ones are not in ``n_draws``)."""
    zero, acc = record["zero_weight_heads"].get(level, 0), record["accuracy"].get(level)
    if not acc:
        return f"{zero} of {zero}" if zero else "–"
    return f"{zero} of {acc['n_draws'] + (zero if excluded else 0)}"


def _curve_display(records: list[dict], x: str) -> pd.DataFrame:
    """Curve records as a wide table: one row per head and training level, one column per x."""
    long = pd.DataFrame([{"measure": r["measure"], "site": r["site"] or "–", "layer": r["layer"] or "–",
                          "train": r["train_level"], x: r[x], "acc": fmt_acc(r["accuracy"])} for r in records])
    wide = long.pivot_table(index=["measure", "site", "layer", "train"], columns=x, values="acc", aggfunc="first")
    wide.columns = [f"{x}={v:g}" for v in wide.columns]
    return wide.reset_index().fillna("")


def jsonable(obj):
    """Plain JSON types: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
