"""Training draws, random splits and label noise (docs/protocol.md §1.7, §1.8), reproducible from a seed.

Every draw has its own generator, seeded from ``(seed, draw, key)``; nothing reads global random
state, so draw ``b`` is the same whatever else is drawn and in whatever order. A training draw is a
prefix of one fixed permutation of its pool, so smaller training sizes are nested in larger ones
(learning curves) for free.
"""

from __future__ import annotations

import zlib

import numpy as np

from probekit.errors import ProbekitError

MIN_TEST = 50  # the protocol asserts |level| >= n_train + 50


def rng_for(seed: int, draw: int, key: str) -> np.random.Generator:
    """The generator for one (seed, draw, key); ``key`` names what is drawn, e.g. "grade/easy"."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(draw), zlib.crc32(key.encode())]))


def train_draw(
    pool: np.ndarray,
    n_train: int,
    *,
    seed: int = 0,
    draw: int = 0,
    key: str = "",
    min_test: int = MIN_TEST,
    size_name: str = "n_train",
) -> np.ndarray:
    """``n_train`` items drawn without replacement from ``pool`` (row indices).

    The first ``n`` items of a larger draw with the same seed, draw and key are the draw of size
    ``n``. Raises if the pool has fewer than ``n_train + min_test`` items (``size_name`` says
    what ``n_train`` is in that message, e.g. the number of in-context demonstrations).
    """
    pool = np.asarray(pool)
    if n_train < 0:
        raise ProbekitError(f"n_train must be >= 0, got {n_train}")
    if len(pool) < n_train + min_test:
        where = f" {key!r}" if key else ""
        named = f" (here n_train is {size_name} = {n_train})" if size_name != "n_train" else ""
        raise ProbekitError(
            f"level{where} has {len(pool)} items, fewer than n_train + {min_test} = {n_train + min_test}{named}"
        )
    order = rng_for(seed, draw, key).permutation(len(pool))
    return pool[order[:n_train]]


def random_split(n_items: int, n_train: int, *, seed: int = 0, draw: int = 0) -> np.ndarray:
    """Unstratified training rows for the all-to-all table: the first ``n_train`` of a permutation."""
    return train_draw(np.arange(n_items), n_train, seed=seed, draw=draw, key="all_to_all")


def cv_folds(labels: np.ndarray, folds: int, *, seed: int = 0, draw: int = 0, key: str = "") -> np.ndarray:
    """Stratified ``folds``-fold cross-validation of one training draw: each item's fold, (n,) int32.

    The items are shuffled by the generator of ``(seed, draw, "cv/" + key)``, grouped by label (in
    label order, shuffled within each label) and dealt to folds 0, 1, ..., ``folds - 1`` in turn,
    so every label's items spread over the folds as evenly as they can (±1) and the folds' sizes
    differ by at most one. Raises if a label has fewer items than ``folds`` (a fold would then
    train without it, or hold none of it out), naming ``key``.
    """
    labels = np.asarray(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ProbekitError(f"cross-validation needs at least 2 folds, got {folds!r}")
    values, counts = np.unique(labels, return_counts=True)
    if len(labels) < folds or counts.min() < folds:
        where = f" {key!r}" if key else ""
        few = int(np.argmin(counts))
        raise ProbekitError(
            f"{folds}-fold cross-validation needs at least {folds} training items of every label; draw{where} has "
            f"{counts[few]} of label {values[few]}: use fewer folds or a larger n_train"
        )
    perm = rng_for(seed, draw, f"cv/{key}").permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    fold = np.empty(len(labels), np.int32)
    fold[order] = np.arange(len(labels)) % folds
    return fold


def noisy_labels(
    labels: np.ndarray,
    n_choices: np.ndarray,
    rate: float,
    *,
    seed: int = 0,
    draw: int = 0,
    key: str = "",
) -> np.ndarray:
    """Labels where each is replaced with probability ``rate`` by a uniform draw over its choices.

    As in the protocol, the uniform draw may return the gold answer, so the realised error rate
    is ``rate * (1 - 1/n_choices)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ProbekitError(f"label noise rate must be in [0, 1], got {rate}")
    labels = np.asarray(labels)
    n_choices = np.asarray(n_choices)
    rng = rng_for(seed, draw, f"noise/{key}")
    flip = rng.random(len(labels)) < rate
    random_labels = np.floor(rng.random(len(labels)) * n_choices).astype(labels.dtype)
    return np.where(flip, random_labels, labels)


def holdout_rows(n_items: int, n_holdout: int = 1000, seed: int = 0) -> np.ndarray:
    """Rows held out for model-based (MDL) hardness: ``n_holdout`` random rows, ``default_rng(seed)``."""
    if n_items <= n_holdout:
        raise ProbekitError(f"cannot hold out {n_holdout} of {n_items} items for hardness")
    return np.sort(np.random.default_rng(seed).choice(n_items, size=n_holdout, replace=False))
