"""Which heads an experiment fits: training rows, labels and test exclusions (docs/protocol.md §1.7, §1.8).

Pure numpy over the cache's item table; no features are read here. Each :class:`Head` is one
fit; it emits result rows for one or more measures (a head trained on all items serves every
measure, labelled by each measure's test levels). Every method trained on the study's draws (the
probe sweep, fine-tuning) fits the heads of :func:`plan`, so their rows pair item by item; each head
is initialised from :func:`head_seed` of its name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probekit.data.draws import noisy_labels, random_split, train_draw
from probekit.data.levels import LEVELS, Cutoff, cutoff_for, probe_levels
from probekit.errors import ProbekitError
from probekit.store.results import EXPERIMENTS  # the values of the results table's experiment column

ALL = "all"


@dataclass(frozen=True, eq=False)
class Head:
    """One fit. ``rows``/``labels``: training item rows (cache order) and their (maybe noisy) labels;
    ``exclude``: rows kept out of its test set (its training pool); ``measures``: the measures it
    reports under (``("all",)`` for the all-to-all table)."""

    experiment: str
    train_level: str
    draw: int
    n_train: int
    label_noise: float
    rows: np.ndarray
    labels: np.ndarray
    exclude: np.ndarray
    measures: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.experiment}/{'+'.join(self.measures)}/{self.train_level}/{self.draw}/{self.n_train}/{self.label_noise:g}"


@dataclass(frozen=True)
class ItemFrame:
    """The cache's items as the planner sees them: probe rows, gold labels, choices, level codes."""

    ids: np.ndarray  # (N,) str
    gold: np.ndarray  # (N,) int
    n_choices: np.ndarray  # (N,) int
    probe: np.ndarray  # row indices of pool == "probe"
    holdout: np.ndarray  # row indices of pool == "holdout"
    levels: dict[str, np.ndarray]  # measure -> (N,) int8 codes (0/1/2, -1 unknown; -1 outside probe)
    dataset: str


def item_frame(
    items: pd.DataFrame,
    dataset: str,
    measures: Sequence[str],
    cutoffs: Mapping[str, Cutoff] | None = None,
) -> ItemFrame:
    """Cut each measure into levels over the probe items (docs/protocol.md §1.6: quantiles over the whole
    probing set). ``items`` needs id, label, n_choices, pool and one column per measure."""
    missing = [m for m in measures if m not in items.columns]
    if missing:
        known = [c for c in items.columns if c not in ("id", "label", "n_choices", "pool", "source")]
        raise ProbekitError(f"unknown measure {missing[0]!r}: the cache has {', '.join(known) or 'none'}")
    pool = items["pool"].astype(str).to_numpy()
    probe = np.flatnonzero(pool == "probe")
    if len(probe) == 0:
        raise ProbekitError("the cache has no items with pool == 'probe'")
    levels = {m: probe_levels(items[m].to_numpy(), probe, cutoff_for(dataset, m, cutoffs)) for m in measures}
    return ItemFrame(
        ids=items["id"].astype(str).to_numpy(),
        gold=items["label"].to_numpy(np.int64),
        n_choices=items["n_choices"].to_numpy(np.int64),
        probe=probe,
        holdout=np.flatnonzero(pool == "holdout"),
        levels=levels,
        dataset=dataset,
    )


def train_levels(dataset: str, experiment: str) -> tuple[str, ...]:
    """Training levels of an experiment: MMLU has no medium level; label noise uses easy and hard."""
    if experiment == "label_noise":
        return ("easy", "hard")
    levels = tuple(lv for lv in LEVELS if not (dataset == "mmlu" and lv == "medium"))
    return levels + (ALL,)


def plan(
    frame: ItemFrame,
    experiment: str,
    measures: Sequence[str],
    *,
    n_train: Sequence[int] = (160,),
    label_noise: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    draws: int = 5,
    seed: int = 0,
    levels: Sequence[str] | None = None,
) -> list[Head]:
    """Every head of one experiment.

    * ``population``: for each measure, train level (easy, medium, hard, all) and draw, ``n`` items
      drawn from the level's probe items for each ``n`` in ``n_train``; test on every other probe item.
    * ``learning_curve``: as population, but sizes are nested prefixes of one draw of ``max(n_train)``
      and the test set excludes that whole pool, so every size is tested on the same items.
    * ``all_to_all``: unstratified random training rows among the probe items (measure "all").
    * ``label_noise``: easy-trained labels replaced at rate p, hard-trained at 2p.

    ``levels`` restricts the training levels (default: all the experiment has).

    Example:
        >>> heads = plan(frame, "population", ["grade"], n_train=[160], draws=5)
    """
    if experiment not in EXPERIMENTS:
        raise ProbekitError(f"unknown experiment {experiment!r}: choose from {', '.join(EXPERIMENTS)}")
    sizes = sorted({int(n) for n in n_train})
    if not sizes or sizes[0] < 2:
        raise ProbekitError(f"n_train must be at least 2, got {list(n_train)}")
    if draws < 1:
        raise ProbekitError(f"draws must be >= 1, got {draws}")
    heads: list[Head] = []
    probe = frame.probe
    if experiment == "all_to_all":
        for b in range(draws):
            for n in sizes:
                rows = probe[random_split(len(probe), n, seed=seed, draw=b)]
                heads.append(Head(experiment, ALL, b, n, 0.0, rows, frame.gold[rows], rows, (ALL,)))
        return heads
    noise = [float(p) for p in label_noise] if experiment == "label_noise" else [0.0]
    for p in noise:
        if not 0.0 <= p <= 0.5:
            raise ProbekitError(f"label noise rate must be in [0, 0.5] (hard items get twice it), got {p}")
    allowed = train_levels(frame.dataset, experiment)
    for level in levels or ():
        if level not in allowed:
            raise ProbekitError(f"train level {level!r} is not one of {', '.join(allowed)} for {experiment}")
    for level in [lv for lv in allowed if levels is None or lv in levels]:
        groups = [tuple(measures)] if level == ALL else [(m,) for m in measures]
        for group in groups:
            if level == ALL:
                pool, key = probe, ALL
            else:
                code = LEVELS.index(level)
                pool, key = probe[frame.levels[group[0]][probe] == code], f"{group[0]}/{level}"
            for b in range(draws):
                if experiment == "learning_curve":
                    full = train_draw(pool, sizes[-1], seed=seed, draw=b, key=key)
                    draws_by_n = {n: (full[:n], full) for n in sizes}
                else:
                    draws_by_n = {}
                    for n in sizes:
                        rows = train_draw(pool, n, seed=seed, draw=b, key=key)
                        draws_by_n[n] = (rows, rows)
                for n, (rows, exclude) in draws_by_n.items():
                    for rate in noise:
                        labels = frame.gold[rows]
                        if rate > 0:
                            r = rate * (2 if level == "hard" else 1)
                            labels = noisy_labels(labels, frame.n_choices[rows], r, seed=seed, draw=b,
                                                  key=f"{key}/{n}/{rate:g}")
                        heads.append(Head(experiment, level, b, n, rate, rows, labels, exclude, group))
    return heads


def head_seed(seed: int, name: str) -> int:
    """A 31-bit integer naming one head's initialisation, derived from the run's seed and the head's name
    (a probe head's key, a fine-tune's adapters and data order)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def layer_label(layers: Sequence[int]) -> str:
    """The results table's name of a feature set: ``"17"`` or ``"15+30"``."""
    return "+".join(str(x) for x in layers)


def tested_rows(frame: ItemFrame, head: Head) -> np.ndarray:
    """The probe items a head is tested on: every probe item it was not trained on."""
    return frame.probe[~np.isin(frame.probe, head.exclude)]
