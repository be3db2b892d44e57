"""Cutting a difficulty measure into easy / medium / hard (docs/protocol.md §1.6).

Two kinds of rule:

* ``Fixed(easy_max, hard_min)`` for human annotations and step counts: easy if value <= easy_max,
  hard if value >= hard_min, medium otherwise.
* ``Quantile(0.3, 0.7)`` for any measure whose name contains ``model``, ``prob``, ``words``,
  ``chars`` or ``mdl``: easy if value <= the 30th percentile, hard if value >= the 70th, computed over
  the values given (the whole probing set, training items included, as the protocol does).

Items with an unknown value (NaN) get level -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from probekit.errors import ProbekitError

LEVELS: tuple[str, str, str] = ("easy", "medium", "hard")
UNKNOWN = -1


@dataclass(frozen=True)
class Fixed:
    """Fixed thresholds: easy <= easy_max, hard >= hard_min."""

    easy_max: float
    hard_min: float

    def describe(self) -> str:
        return f"easy <= {self.easy_max:g}, hard >= {self.hard_min:g}"


@dataclass(frozen=True)
class Quantile:
    """Percentile thresholds over the values given: easy <= q(lo), hard >= q(hi)."""

    lo: float = 0.3
    hi: float = 0.7

    def describe(self) -> str:
        return f"easy <= q{100 * self.lo:g}, hard >= q{100 * self.hi:g} (percentiles)"


Cutoff = Fixed | Quantile

# docs/protocol.md §1.6: fixed cut-offs per (dataset, measure).
FIXED_CUTOFFS: dict[tuple[str, str], Fixed] = {
    ("arc", "grade"): Fixed(5, 8),
    ("arc", "difficulty"): Fixed(1, 3),
    ("arc", "bloom"): Fixed(2, 4),
    ("arc", "depth_of_knowledge"): Fixed(1, 3),
    ("mmlu", "human_hardness"): Fixed(0, 1),
    ("strategyqa", "num_steps"): Fixed(2, 4),
    ("gsm8k", "num_steps"): Fixed(4, 7),
}

# Datasets whose annotations share another set's cut-offs.
_FAMILY = {"arc-sample": "arc"}

QUANTILE_MARKERS = ("model", "prob", "words", "chars", "mdl")


def cutoff_for(
    dataset: str,
    measure: str,
    overrides: Mapping[str, Cutoff] | None = None,
) -> Cutoff:
    """The rule that cuts ``measure`` of ``dataset`` into levels.

    ``overrides`` maps a measure name to a rule and wins over the defaults. Measures with no fixed
    cut-off and a name marking them as continuous use 30/70 percentiles, as do all measures of a
    user's own set; an unknown annotation of a built-in set is an error, since guessing its
    thresholds would silently change the science.
    """
    if overrides and measure in overrides:
        return overrides[measure]
    family = _FAMILY.get(dataset, dataset)
    if (family, measure) in FIXED_CUTOFFS:
        return FIXED_CUTOFFS[(family, measure)]
    builtin = {d for d, _ in FIXED_CUTOFFS}
    if family not in builtin or any(marker in measure.lower() for marker in QUANTILE_MARKERS):
        return Quantile()  # continuous measures, and every measure of a user's own set
    known = sorted(m for d, m in FIXED_CUTOFFS if d == family)
    raise ProbekitError(
        f"no cut-off known for measure {measure!r} of dataset {dataset!r} "
        f"(fixed cut-offs exist for {', '.join(known)}; continuous measures need 'words', 'chars', "
        f"'prob', 'model' or 'mdl' in their name, or pass an explicit cut-off)"
    )


def cut_levels(values: np.ndarray, rule: Cutoff) -> np.ndarray:
    """Level codes (0 easy, 1 medium, 2 hard, -1 unknown) for each value under ``rule``."""
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values)
    if isinstance(rule, Quantile):
        if not known.any():
            return np.full(values.shape, UNKNOWN, dtype=np.int8)
        easy_max, hard_min = np.quantile(values[known], [rule.lo, rule.hi])
    else:
        easy_max, hard_min = rule.easy_max, rule.hard_min
    codes = np.ones(values.shape, dtype=np.int8)
    codes[values <= easy_max] = 0
    codes[values >= hard_min] = 2
    codes[~known] = UNKNOWN
    return codes


def probe_levels(values: np.ndarray, probe: np.ndarray, rule: Cutoff) -> np.ndarray:
    """Level codes cut over the probe rows only (quantiles over the probing set, docs/protocol.md §1.6);
    every other row (the hardness hold-out) gets -1."""
    values = np.asarray(values, dtype=np.float64)
    codes = np.full(values.shape, UNKNOWN, dtype=np.int8)
    codes[probe] = cut_levels(values[probe], rule)
    return codes


def level_names(codes: np.ndarray) -> np.ndarray:
    """Level codes as strings ("easy", "medium", "hard", "" for unknown)."""
    names = np.array(LEVELS + ("",), dtype=object)
    return names[np.where(np.asarray(codes) < 0, 3, codes)]


def parse_cutoff(text: str) -> Cutoff:
    """Parse a cut-off given on the command line: ``"5,8"`` (fixed) or ``"q30,q70"`` (percentiles)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 2 and all(p.lower().startswith("q") for p in parts):
            lo, hi = (float(p[1:]) / 100 for p in parts)
            if not 0 <= lo <= hi <= 1:
                raise ValueError
            return Quantile(lo, hi)
        if len(parts) == 2:
            easy_max, hard_min = (float(p) for p in parts)
            if easy_max >= hard_min:
                raise ValueError
            return Fixed(easy_max, hard_min)
    except ValueError:
        pass
    raise ProbekitError(
        f"cut-off {text!r} is not 'EASY_MAX,HARD_MIN' (e.g. '5,8', easy_max < hard_min) "
        f"or 'qLO,qHI' (e.g. 'q30,q70')"
    )


def level_counts(items, measures=None, overrides: Mapping[str, Cutoff] | None = None) -> list[dict]:
    """Items per level for each measure of an item set (all items, hold-out included)."""
    rows = []
    for m in measures or items.measures:
        if m not in items.measures:
            raise ProbekitError(items.unknown_measure(m) if hasattr(items, "unknown_measure") else
                                f"unknown measure {m!r} for dataset {items.name}: choose from {', '.join(items.measures)}")
        rule = cutoff_for(items.name, m, overrides)
        codes = cut_levels(items.table[m].to_numpy(), rule)
        counts = {name: int((codes == k).sum()) for k, name in enumerate(LEVELS)}
        rows.append({"measure": m, "cutoff": rule.describe(), **counts, "unknown": int((codes == UNKNOWN).sum())})
    return rows


#: ``demos_from`` value for demonstrations drawn from every probe item, whatever its level.
ALL = "all"


def level_pool(items, measure: str, level: str, cutoff=None) -> np.ndarray:
    """Row indices of the probe items at ``level`` of ``measure`` (cut-offs of docs/protocol.md §1.6, or
    ``cutoff``); every probe item for ``level="all"``."""
    table = items.table.reset_index(drop=True)
    probe = np.flatnonzero((table["pool"] == "probe").to_numpy())
    if level == ALL:
        return probe

    if measure not in items.measures:
        why = getattr(items, "not_measures", {}).get(measure)
        raise ProbekitError(f"measure {measure!r} is not a difficulty measure of {items.name} "
                            + (f"({why})" if why else f"({', '.join(items.measures)})"))
    if level not in LEVELS:
        raise ProbekitError(f"level {level!r} is not one of {', '.join(LEVELS)} or {ALL}")
    codes = probe_levels(table[measure].to_numpy(), probe,
                         cutoff_for(items.name, measure, {measure: cutoff} if cutoff is not None else None))
    return np.flatnonzero(codes == LEVELS.index(level))
