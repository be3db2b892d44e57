"""Result rows every method on a cache writes: rows over an item frame, and the zero-shot rows.

:class:`FrameRows` builds the results table's rows (:class:`probekit.store.results.ResultRows`,
whose file format it is) of one experiment, test levels read off the item frame; the zero-shot
rows come from the choice log-probs the cache holds (:func:`zero_shot_tables`), and a method that
scores every choice of an item (fine-tuning, ICL) turns its scores into rows with the same rule
(:func:`zero_shot_p`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from probekit.data.levels import LEVELS
from probekit.design.plan import ALL, ItemFrame
from probekit.methods import ZERO_SHOT
from probekit.store import Cache
from probekit.store.results import ResultRows


def zero_shot_p(choice_sum: np.ndarray, n_choices: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p(gold) and correctness from summed choice log-probs, softmaxed over the real choices (§5)."""
    real = np.arange(choice_sum.shape[1])[None, :] < n_choices[:, None]
    s = np.where(real, choice_sum.astype(np.float64), -np.inf)
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(1, keepdims=True)
    return p[np.arange(len(gold)), gold].astype(np.float32), (s.argmax(1) == gold).astype(np.int8)


class FrameRows(ResultRows):
    """Result rows of one experiment at one site ("" for a method without a probe head); test levels
    are the item frame's levels."""

    def __init__(self, frame: ItemFrame, experiment: str, site: str = "") -> None:
        super().__init__(experiment, site, frame.ids, LEVELS, frame.n_choices)
        self.frame = frame

    def table(self, *, measure: str, rows: np.ndarray, **fields: Any) -> pa.Table:
        codes = self.frame.levels[measure][rows] if measure in self.frame.levels else np.full(len(rows), -1)
        return super().table(measure=measure, rows=rows, test_levels=codes, **fields)


def zero_shot_tables(cache: Cache, frame: ItemFrame, measures: Sequence[str], experiment: str) -> list[pa.Table]:
    """The zero-shot rows (from the cached choice log-probs) of every probe item, one table per
    measure (one for the unstratified all_to_all experiment)."""
    choice_sum, _ = cache.logprobs()
    p0, c0 = zero_shot_p(choice_sum, frame.n_choices, frame.gold)
    rows = FrameRows(frame, experiment)
    return [rows.table(method=ZERO_SHOT, layer="", measure=m, train_level=ZERO_SHOT, draw=0, n_train=0, noise=0.0,
                       solver="", rows=frame.probe, correct=c0[frame.probe], p_gold=p0[frame.probe])
            for m in (measures if experiment != "all_to_all" else [ALL])]
