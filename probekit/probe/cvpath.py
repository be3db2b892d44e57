"""Probes that choose their own regularisation strength: k-fold cross-validation inside a head's
training draw over a grid of strengths, then a refit on the whole draw at the chosen one
(docs/protocol.md §4).

A head's draw is cut into ``k`` folds (:func:`probekit.data.draws.cv_folds`: stratified by the
training label, seeded from the head's name, so every feature set and solver of the head uses the
same folds; the head's test items are never in the draw). For every fold ``f`` and every strength
``c`` of the grid the solver fits the draw with fold ``f``'s items weighted 0, and the fit is scored
on fold ``f``; one more fit per strength uses every item (the refit). All of them share the head's
kernel (:class:`~probekit.probe.kernel.Kernel`): the fold fits differ from the refit only in the
items' weights in the mean NLL, so the ``D``-wide work (gathering and normalising the rows, the
Gram matrix, folding the weights back, scoring every item) is done once per head, as for one fit,
and the ``(k + 1) x len(grid)`` solver runs are one computation in coefficient space, vmapped over
the folds and the refit. A solver that takes a warm start (the converged one) runs each fold's
strengths in turn from the strongest penalty, each fit starting at the last one's optimum, as
scikit-learn's paths do; the paper recipe, whose initial weights are part of the recipe, runs each
strength from them, one strength after another.

What that means for the recipe:

* The folds share the draw's normalisation statistics (the mean and standard deviation of every
  training item, the held-out fold's included), as ``StandardScaler`` fitted on the draw and then
  ``LogisticRegressionCV`` would; the held-out fold's labels take no part in its fit. A weighted
  item is out of the fit exactly: the solvers' iterates never give it a coefficient.
* The converged solver's ``n`` in ``|w|^2 / (2 C n)`` is the number of items a fit uses (the
  fold's training items), as scikit-learn's objective on that fold; the paper recipe's mean NLL is
  over those items and its penalty ``l2 * |w|`` is as in §4, with the paper's initial weights.
* Selection: the strength with the lowest mean over the folds of each fold's mean held-out
  log-loss (scikit-learn's ``scoring="neg_log_loss"``, folds weighted equally); a fit with
  non-finite loss never wins; ties go to the strongest penalty, the first of the grid as
  :class:`Selection` orders it (scikit-learn's ``LogisticRegressionCV`` takes the first best of
  its ``Cs``, so an ascending ``Cs`` gives the same rule).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from probekit.data.draws import cv_folds
from probekit.errors import ProbekitError
from probekit.probe.kernel import Kernel, expand, log_softmax
from probekit.probe.solvers import SOLVERS, Fit, Solver

#: What the folds' held-out items are scored by (scikit-learn's name: ``neg_log_loss``).
SCORING = "log_loss"
#: The selection rule, in words (recorded in ``sweep.json``).
RULE = ("lowest mean over the folds of each fold's mean held-out log-loss (non-finite fits never win); "
        "ties: the strongest penalty")


@dataclass(frozen=True)
class Selection:
    """How a head chooses its strength: ``folds``-fold cross-validation over ``grid``, values of
    the solver's strength option ``option`` (``C`` or ``l2``, see
    :attr:`probekit.probe.solvers.Solver.strength`), ordered from the strongest penalty to the
    weakest (:meth:`for_solver` orders them)."""

    folds: int
    option: str
    grid: tuple[float, ...]
    scoring: str = SCORING

    def __post_init__(self) -> None:
        if not isinstance(self.folds, numbers.Integral) or isinstance(self.folds, bool) or self.folds < 2:
            raise ProbekitError(f"cross-validation needs at least 2 folds, got {self.folds!r}")
        if len(self.grid) < 2:
            raise ProbekitError(f"choosing {self.option} needs a grid of at least 2 values, got {list(self.grid)}")
        for v in self.grid:
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise ProbekitError(f"{self.option} grid values must be finite numbers, got {v!r}")
        twice = sorted({v for v in self.grid if self.grid.count(v) > 1})
        if twice:
            raise ProbekitError(f"{self.option} grid lists {twice[0]:g} more than once")
        if self.scoring != SCORING:
            raise ProbekitError(f"scoring must be {SCORING!r}, got {self.scoring!r}")

    @classmethod
    def for_solver(cls, solver: str, folds: int, grid: Sequence[float]) -> Selection:
        """The selection of ``solver``'s strength from ``grid`` (in any order) with ``folds`` folds."""
        spec = SOLVERS[solver]
        if spec.strength is None:
            raise ProbekitError(f"solver {solver!r} has no strength to choose")
        return cls(int(folds), spec.strength, spec.strongest_first(grid))


def parse_select(text: str) -> int:
    """The number of folds of a ``--select`` value: ``"cv5"`` -> 5 (k-fold cross-validation, k >= 2)."""
    match = re.fullmatch(r"cv(\d+)", str(text).strip())
    if match is None or int(match.group(1)) < 2:
        raise ProbekitError(f"select must be cvK, K-fold cross-validation with K >= 2 (e.g. cv5), got {text!r}")
    return int(match.group(1))


def item_losses(kern: Kernel, fit: Fit) -> tuple[jax.Array, jax.Array]:
    """Every training item's NLL of its label and whether the fit's argmax is its label, (n,) each,
    from the fit's coefficients (scores ``s = beta u + K a``, no pass over the features)."""
    s = fit.beta * kern.u + kern.K @ fit.a
    logits = expand(kern, s) if fit.b is None else expand(kern, s) + fit.b
    logp = log_softmax(logits, kern.mask)
    nll = -jnp.take_along_axis(logp, kern.y[:, None], axis=-1)[:, 0]
    hit = (jnp.argmax(jnp.where(kern.mask, logits, -jnp.inf), -1) == kern.y) & jnp.isfinite(nll)
    return nll, hit


def select(kern: Kernel, solver: Solver, settings: Any, sel: Selection) -> Fit:
    """Cross-validate ``solver`` over ``sel.grid`` on one head (``kern.fold`` gives each training
    item's fold) and return the refit on the whole draw at the chosen strength, with
    ``cv_loss``/``cv_accuracy``/``cv_converged`` (folds, strengths) and ``chosen`` (the grid
    index) set.

    ``settings`` gives the solver's other options (:meth:`~probekit.probe.solvers.Solver.__call__`).
    """
    if kern.fold is None:
        raise ValueError("a cross-validated fit needs each training item's fold (Kernel.fold)")
    k = sel.folds
    dtype = kern.u.dtype
    held = kern.fold[None, :] == jnp.arange(k, dtype=kern.fold.dtype)[:, None]  # (k, n)
    weights = jnp.concatenate([~held, jnp.ones_like(held[:1])]).astype(dtype)  # k fold fits, then the refit
    values = jnp.asarray(sel.grid, dtype)
    base = kern._replace(fold=None)

    if solver.warm:  # each fold's path from the strongest penalty to the weakest, each fit warm from the last
        def path(w):
            kern_w = base._replace(weight=w)

            def step(start, v):
                fit = solver(kern_w, settings, start=start, **{sel.option: v})
                return (fit.a, fit.b), fit

            zero_b = None if kern.b0 is None else jnp.zeros_like(kern.b0)
            return jax.lax.scan(step, (jnp.zeros_like(kern.u), zero_b), values)[1]

        fits = jax.vmap(path)(weights)  # leaves (k+1, S, ...)
    else:  # strength by strength, every fold at once, from the solver's own start
        def strength(v):
            return jax.vmap(lambda w: solver(base._replace(weight=w), settings, **{sel.option: v}))(weights)

        # one strength at a time: a strength whose fits are redone (the paper recipe's non-finite
        # retries) does not make the others' lanes run again with it
        fits = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), jax.lax.map(strength, values))
    nll, hit = jax.vmap(jax.vmap(lambda f: item_losses(kern, f)))(fits)  # (k+1, S, n)
    size = held.sum(1).astype(dtype)[:, None]  # (k, 1)
    cv_loss = jnp.where(held[:, None, :], nll[:k], 0.0).sum(-1) / size  # (k, S)
    cv_accuracy = jnp.where(held[:, None, :], hit[:k], False).sum(-1) / size
    curve = cv_loss.mean(0)
    chosen = jnp.argmin(jnp.where(jnp.isnan(curve), jnp.inf, curve))  # the first lowest: the strongest of ties
    refit = jax.tree.map(lambda x: x[k, chosen], fits)
    return refit._replace(cv_loss=cv_loss, cv_accuracy=cv_accuracy, cv_converged=fits.converged[:k], chosen=chosen)


# ----- the sweep's folds and its record of each head's path (sweep.json "cv") ----------------------
def head_folds(heads: Sequence[Any], folds: int, seed: int) -> dict[str, np.ndarray]:
    """Each head's folds (:func:`probekit.data.draws.cv_folds` of its training labels, from the
    sweep's seed, its draw and its name), by head name: positions in the head's training rows, so
    they never reach its test items. Raises, naming the head, if a label has fewer items than
    ``folds``."""
    return {h.name: cv_folds(h.labels, folds, seed=seed, draw=h.draw, key=h.name) for h in heads}


# ----- the sweep's record of each head's path (sweep.json "cv") ------------------------------------
def _rounded(a) -> list:
    """A (folds, strengths) array as nested lists of floats to 6 significant digits (NaN kept)."""
    return [[float(f"{x:.6g}") for x in row] for row in np.asarray(a, float)]


def fit_record(head: Any, layer: str, solver: str, sel: Selection, cv_loss, cv_accuracy, cv_converged,
               chosen: int) -> dict[str, Any]:
    """One fit's entry in ``sweep.json``'s ``cv.fits``: the head (by the results table's keys), the
    strength chosen, per fold (rows) and strength (columns, in ``grid`` order) the held-out mean
    log-loss and accuracy, and per strength how many of the fold fits converged."""
    return {
        "experiment": head.experiment, "measures": list(head.measures), "train_level": head.train_level,
        "draw": int(head.draw), "n_train": int(head.n_train), "label_noise": float(head.label_noise),
        "layer": layer, "solver": solver, sel.option: sel.grid[int(chosen)],
        "log_loss": _rounded(cv_loss), "accuracy": _rounded(cv_accuracy),
        "folds_converged": [int(x) for x in np.asarray(cv_converged).sum(0)],
    }


def record(selections: dict[str, Selection], fits: list[dict[str, Any]]) -> dict[str, Any]:
    """``sweep.json``'s ``cv``: how strengths were chosen, and every fit's choice and curve."""
    first = next(iter(selections.values()))
    return {
        "folds": first.folds,
        "folds_by": "stratified by training label; each head's from (seed, draw, 'cv/' + its name), the same "
                    "for every feature set and solver of the head",
        "normalisation": "the draw's statistics for every fold and the refit",
        "scoring": first.scoring, "rule": RULE,
        "grids": {s: {"option": sel.option, "values": list(sel.grid)} for s, sel in selections.items()},
        "fits": fits,
    }
