"""Shortcut controls: heads that can know nothing of an item but its surface (docs/protocol.md §4.1).

A difficulty measure computed from the gold answer (answer length) or a label share that moves with the
level (StrategyQA's "yes") can make a probe look as if it generalised when it only read the surface. Beside
every hidden-state head, a sweep fits two controls on the same training draws (same rows, same labels)
and scores them on the same test items:

- ``surface``: a probe on the choices' surface features only: each choice's length in whitespace words
  and in characters (the counts the ``answer_num_words`` / ``answer_num_chars`` measures take of the gold
  choice) and its position (one-hot), zeros on padded choices as the hidden states have, with the sweep's
  padding and normalisation (z-scores of the training draw). It is fitted by the ``converged`` solver
  (squared L2 at the sweep's ``C``, solved to tolerance: scikit-learn's logistic regression over choices),
  whatever the sweep's solvers: under the paper's unsquared penalty (lambda = 1 on standardised features)
  a head of 7 features has zero weights almost always (every surface head of the bundled ARC sample's
  demo), so it would sit at chance by construction and control nothing. Needs a cache that holds the
  features (:meth:`probekit.store.Cache.choice_surface`).
- ``majority``: the training draw's most frequent gold position, predicted for every test item (ties go
  to the first position); its ``p_gold`` is the share of the item's gold position in the draw.

Their rows join the results table as rows of method "probe" (heads reading other features) with
``site`` "surface" / "majority" and an empty layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import pyarrow as pa

from probekit.design.plan import Head, ItemFrame, head_seed, tested_rows
from probekit.probe.engine import ProbeConfig, fit_and_score_many, prepare
from probekit.store import Cache
from probekit.store.results import MAJORITY_SITE, MAJORITY_SOLVER, SURFACE_SITE, SURFACE_SOLVER, ResultRows

#: What the surface control sees, per choice, in this order (then one column per position).
SURFACE_FEATURES = ("choice_words", "choice_chars")


def surface_features(cache: Cache) -> np.ndarray:
    """(N, C, 2 + C) float32: words, characters and the one-hot position of each choice; 0 on padding."""
    counts = cache.choice_surface()
    n, C = counts["choice_words"].shape
    real = np.arange(C)[None, :] < cache.items["n_choices"].to_numpy()[:, None]
    position = np.broadcast_to(np.eye(C, dtype=np.float32), (n, C, C)) * real[:, :, None]
    X = np.concatenate([np.stack([counts[k].astype(np.float32) for k in SURFACE_FEATURES], axis=-1), position],
                       axis=-1)
    return np.where(real[:, :, None], X, 0.0).astype(np.float32)


def majority(frame: ItemFrame, head: Head) -> tuple[np.ndarray, np.ndarray]:
    """(correct, p_gold) over every item of the frame for the majority-position head of ``head``'s draw."""
    share = np.bincount(head.labels, minlength=int(frame.n_choices.max())) / len(head.labels)
    guess = int(np.argmax(share))
    correct = ((frame.gold == guess) & (guess < frame.n_choices)).astype(np.int8)
    return correct, share[frame.gold].astype(np.float32)


def control_tables(
    cache: Cache,
    frame: ItemFrame,
    builders: Mapping[str, ResultRows],
    groups: Sequence[Sequence[Head]],
    config: ProbeConfig,
    seed: int,
    devices: Sequence[jax.Device] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[list[pa.Table], int]:
    """The control rows of every head (``groups``: heads of one n_train each); ``builders``: a row builder
    per control site present (:data:`SURFACE_SITE` only when the cache holds surface features);
    ``config``: the sweep's probe configuration (its padding, ``C`` and tolerance; the solver is
    :data:`SURFACE_SOLVER`). Returns the tables and the number of surface heads whose exact optimum has
    zero weights."""
    tables, zero = [], 0
    if MAJORITY_SITE in builders:
        for group in groups:
            for h in group:
                correct, p_gold = majority(frame, h)
                tables += _rows(builders[MAJORITY_SITE], frame, h, MAJORITY_SOLVER, correct, p_gold, False)
    if SURFACE_SITE in builders:
        layer = prepare([surface_features(cache)], devices)
        cfg = ProbeConfig(head="mc", solver=SURFACE_SOLVER, pad=config.pad, C=config.C, tol=config.tol)
        for group in groups:
            (res,) = fit_and_score_many(
                layer, frame.n_choices, frame.gold, np.stack([h.rows for h in group]),
                np.stack([h.labels for h in group]),
                np.array([head_seed(seed, f"{h.name}/{SURFACE_SITE}") for h in group]), [cfg],
                devices=devices, on_chunk=on_chunk)
            zero += int(res.zero_weights.sum())
            for i, h in enumerate(group):
                tables += _rows(builders[SURFACE_SITE], frame, h, SURFACE_SOLVER, res.correct[i], res.p_gold[i],
                                bool(res.zero_weights[i]))
    return tables, zero


def _rows(builder: ResultRows, frame: ItemFrame, h: Head, solver: str, correct: np.ndarray, p_gold: np.ndarray,
          zero_weights: bool) -> list[pa.Table]:
    test = tested_rows(frame, h)
    return [builder.table(method="probe", layer="", measure=m, train_level=h.train_level, draw=h.draw, n_train=h.n_train,
                          noise=h.label_noise, solver=solver, rows=test, correct=correct[test], p_gold=p_gold[test],
                          zero_weights=zero_weights) for m in h.measures]
