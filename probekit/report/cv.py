"""The report's section on strengths chosen by cross-validation (``probekit sweep --select cvK``).

The sweep records every fit's curve in ``sweep.json``'s ``cv`` (:func:`probekit.store.results.cv_table`
reads it); the report writes that table as ``cv_path.csv`` and counts, per head, which strength
was chosen.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from probekit.report.tables import to_markdown

#: The heads a count of choices is taken over (summed over layers and draws).
KEYS = ["experiment", "site", "solver", "option", "measure", "train_level"]


def cv_choices(cv: pd.DataFrame, config: dict | None) -> dict[str, Any] | None:
    """``summary.json``'s ``cv``: the selection rule and, per solver, measure and training level,
    how many fits chose each strength of the grid (None when the run chose none)."""
    if cv.empty:
        return None
    rec = (config or {}).get("cv", {})
    counts = []
    for key, rows in cv.groupby(KEYS, sort=False):
        picks = rows[rows["chosen"]]
        counts.append({**dict(zip(KEYS, key)), "fits": int(len(picks)),
                       "chosen": {f"{v:g}": int((picks["strength"] == v).sum()) for v in rows["strength"].unique()}})
    return {"folds": rec.get("folds"), "scoring": rec.get("scoring"), "rule": rec.get("rule"),
            "normalisation": rec.get("normalisation"), "counts": counts,
            "file": "cv_path.csv: one row per fit, measure and strength (chosen marks the refitted one)"}


def sweep_shown(config: dict | None) -> dict | None:
    """``sweep.json`` as the report shows it: the per-fit curves left to ``cv_path.csv``."""
    if not config or not config.get("cv"):
        return config
    cv = config["cv"]
    return {**config, "cv": {**cv, "fits": f"{len(cv['fits'])} fits: see cv_path.csv"}}


def cv_lines(choices: dict[str, Any] | None) -> list[str]:
    """The report's markdown section: per solver, how many fits chose each strength."""
    if not choices:
        return []
    lines = ["## Strength chosen by cross-validation", "",
             f"Each head chose its strength by {choices['folds']}-fold cross-validation inside its training draw and "
             "was refitted on the whole draw at it; its rows in the tables above are the refit's. Rule: "
             f"{choices['rule']}. Cells: fits (layers x draws) that chose each value. The curves are in "
             "`cv_path.csv`; the cross-validated loss of a chosen value is biased low by the choice itself, the "
             "test items are not.", ""]
    for solver in dict.fromkeys(r["solver"] for r in choices["counts"]):
        rows = [r for r in choices["counts"] if r["solver"] == solver]
        frame = pd.DataFrame([{"experiment": r["experiment"], "measure": r["measure"], "train": r["train_level"],
                               **{f"{r['option']}={v}": n for v, n in r["chosen"].items()}} for r in rows])
        lines += [f"Solver `{solver}`:", "", to_markdown(frame), ""]
    return lines
