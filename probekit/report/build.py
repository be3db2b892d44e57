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
from probekit.report.tables import (
    HARD,
    ZERO_SHOT,
    Headline,
    all_to_all_table,
    choose_headline,
    curve_table,
    flatten,
    fmt_acc,
    head_label,
    head_method,
    headline_frame,
    load_results,
    population_display,
    population_table,
    row_runs,
    to_markdown,
    transfer_table,
    zero_weight_heads,
)
from probekit.store.outdir import LOCK, OutputDir, remove_temporaries, replace_dir, take_dir_lock, write_error
from probekit.store.results import cache_hash

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
    zero_weights: str = "exclude",
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
    ``zero_weights`` column, :func:`probekit.probe.solvers.zero_is_optimal`): ``"exclude"`` (the
    default) leaves their rows out of every accuracy, SGR, difference, table and plot, since their
    predictions are decided by what the last SGD steps left, not by the data; ``"include"`` keeps
    them. Either way their counts per layer are in ``summary.json`` and ``report.md``.
    """
    check_settings(n_boot, n_boot_sgr, seed, zero_weights)
    res = load_results(results_dir, columns=())  # the report does not use p_gold
    table = res.table
    zero = zero_weight_heads(table)
    if zero_weights == "exclude" and table["zero_weights"].astype(bool).any():
        table = table[~table["zero_weights"].astype(bool)]
    headline = choose_headline(table, site, layer, solver)
    experiments = sorted(table["experiment"].unique())

    tick = _Ticker(progress, _count_tasks(table))
    population = population_table(table, n_boot, n_boot_sgr, seed, tick, headline)
    _count_zero_weight_heads(population, res.table)
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
        "cache_manifest_sha256": cache_hash(res.sweep),
        "sweep": res.sweep,
        "settings": {
            "n_boot": int(n_boot),
            "n_boot_sgr": int(n_boot_sgr),
            "seed": int(seed),
            "level": 0.95,
            "test_level": HARD,
            "headline": vars(headline) if headline else None,
            "headline_method": head_method(table, headline) if headline else None,
            "accuracy": "crossed bootstrap over test items and training draws; point = nanmean of the "
                        "item x draw matrix, interval = percentiles of the resampled means",
            "sgr": "(easy - zero_shot) / (hard - zero_shot) on the hard test; one shared item resample, "
                   "independent draw resamples; p-value: centered two-sided bootstrap test of 0",
            "sgr_estimable": "an SGR is estimable only when the 95% interval of hard - zero-shot (from the "
                             "same resamples) lies above 0; otherwise its numbers are kept with "
                             "estimable = false and the reason, and tables show it as n/e",
            "differences": {"hard_minus_easy": "hard-trained minus easy-trained",
                            "easy_minus_zero_shot": "easy-trained minus zero-shot"},
        },
        "zero_weight_heads": {
            "rule": "zero weights are the exact optimum of the head's objective: the NLL gradient at zero "
                    "weights has norm <= the unsquared penalty l2 (standardised units)",
            "excluded": zero_weights == "exclude",
            "heads": sum(r["heads"] for r in zero),
            "zero_weight_heads": sum(r["zero_weight_heads"] for r in zero),
            "by_layer": zero,
        },
        "population": population,
        "transfer": transfer.to_dict(orient="records"),
        "all_to_all": all_to_all,
        "learning_curve": curves["learning_curve"],
        "label_noise": curves["label_noise"],
        "files": [],
    }
    summary = _jsonable(summary)
    _write(Path(out_dir), summary, headline, population, all_to_all, curves, transfer)
    return summary


def check_settings(n_boot, n_boot_sgr, seed, zero_weights) -> None:
    """Refuse bootstrap sizes, a seed or a zero-weights choice a report cannot use (one line)."""
    for name, value in (("n_boot", n_boot), ("n_boot_sgr", n_boot_sgr)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ProbekitError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    if zero_weights not in ("exclude", "include"):
        raise ProbekitError(f"zero_weights must be exclude or include, got {zero_weights!r}")


def _count_zero_weight_heads(population: list[dict], table: pd.DataFrame) -> None:
    """Add to each population record ``zero_weight_heads``: per training level, how many of its heads
    have zero weights as their exact optimum (left out of its numbers unless included)."""
    flagged = table[table["zero_weights"].astype(bool) & (table["experiment"] == "population")]
    heads = flagged.drop_duplicates(["measure", "site", "layer", "solver", "train_level", "draw", "n_train"])
    counts = heads.groupby(["measure", "site", "layer", "solver", "train_level"], observed=True).size()
    for r in population:
        r["zero_weight_heads"] = {lv: int(counts.get((r["measure"], r["site"], r["layer"], r["solver"], lv), 0))
                                  for lv in r["accuracy"] if lv != ZERO_SHOT}


class _Ticker:
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
        f"seed {s['seed']}, 95% percentile intervals.",
        "- Accuracy cells: bootstrap mean ± error bar in % (crossed bootstrap over test items and training "
        "draws). SGR = (easy − zero-shot) / (hard − zero-shot) on the hard test, with its 95% interval and "
        "bootstrap p-value against 0. Differences in percentage points.",
        "- SGR `n/e` (not estimable): the 95% interval of hard − zero-shot, from the same resamples, does not "
        "lie above 0, so hard training does not beat zero-shot and the ratio has no meaning; its numbers are in "
        "`summary.json` and `population.csv` with `estimable` false and the reason (`sgr_reason`; here the "
        "`SGR note` column).",
        "",
    ]
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
    lines += _zero_weight_lines(summary["zero_weight_heads"])
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
                  json.dumps(summary["sweep"], indent=2), "```", "", "</details>", ""]
    lines += ["## Files", "", *[f"- [{f}]({f})" for f in [*files, "summary.json"]], ""]
    return "\n".join(lines)


def _zero_weight_lines(zero: dict) -> list[str]:
    """The report's section on heads whose exact optimum has zero weights: counts per layer."""
    if not zero["zero_weight_heads"]:
        return []
    rows = [r for r in zero["by_layer"] if r["zero_weight_heads"]]
    frame = pd.DataFrame([{"experiment": r["experiment"], "site": r["site"], "layer": r["layer"],
                           "solver": r["solver"], "zero-weight heads": f"{r['zero_weight_heads']} of {r['heads']}",
                           "heads (measure/level/draw)": ", ".join(r["which"])} for r in rows])
    what = ("left out of every accuracy, SGR, difference, table and plot in this report" if zero["excluded"]
            else "included in the statistics of this report (`--zero-weights include`)")
    return ["## Heads with zero weights", "",
            f"{zero['zero_weight_heads']} of {zero['heads']} trained heads have zero weights as the exact optimum of "
            "their objective (the NLL's gradient at zero weights is within the unsquared L2 penalty): every "
            "choice scores the same, and what the last SGD steps left decides their predictions. They are "
            f"{what}.", "", to_markdown(frame), ""]


def _curve_display(records: list[dict], x: str) -> pd.DataFrame:
    """Curve records as a wide table: one row per head and training level, one column per x."""
    long = pd.DataFrame([{"measure": r["measure"], "site": r["site"] or "–", "layer": r["layer"] or "–",
                          "train": r["train_level"], x: r[x], "acc": fmt_acc(r["accuracy"])} for r in records])
    wide = long.pivot_table(index=["measure", "site", "layer", "train"], columns=x, values="acc", aggfunc="first")
    wide.columns = [f"{x}={v:g}" for v in wide.columns]
    return wide.reset_index().fillna("")


def _jsonable(obj):
    """Plain JSON types: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
