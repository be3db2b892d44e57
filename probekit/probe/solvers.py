"""The two solvers, for ONE head in coefficient space (see :mod:`probekit.probe.kernel`).

A weight vector is held as ``w = beta * w0 + Z.T @ a`` (plus a bias ``b`` for multinomial
heads). With ``s = Z @ w`` (the per-slot scores without bias) every quantity the recipes need is
available without touching the ``D``-wide rows again:

* ``|w|^2 = beta^2 |w0|^2 + beta a.u + a.s``  (since ``K a = s - beta u``)
* ``Z.T r . w = r.s`` and ``|Z.T r|^2 = r.K r``.

``paper`` replays docs/protocol.md §4 step by step (the iterates are those of plain SGD on the
D-dimensional weights, up to float rounding); ``converged`` minimises the squared-L2 regularised
likelihood with Newton-CG in the same space. Both are pure functions; the engine vmaps and jits
them over heads.

:data:`SOLVERS` is the registry the engine, the sweep and the command line read: each
:class:`Solver` names its function, the options it takes and its objective in one line. A new
solver is a pure function of a :class:`~probekit.probe.kernel.Kernel` returning a :class:`Fit`,
registered there; options it shares with :class:`~probekit.probe.engine.ProbeConfig` are passed
from the configuration, the others keep the function's defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from probekit.probe.kernel import Kernel, expand, log_softmax, reduce

#: The converged solver's default relative optimality: it stops once the gradient bounds the
#: objective's excess over its minimum by ``DEFAULT_TOL`` times the objective. At 1e-7 p_gold is
#: the exact optimum's to about 1e-4 and a head gives the same numbers fitted alone or in a
#: batch, on either path (1e-4 left p_gold up to 2e-2 from the optimum on the demo's hidden
#: states). Float32 limits the bound to about 1e-8 to 2e-7 on some heads (53 of the demo's 1600
#: cannot reach 1e-8): a tighter ``tol`` leaves those flagged as not converged.
DEFAULT_TOL = 1e-7


class Fit(NamedTuple):
    """A fitted head in coefficient space: ``w = beta * w0 + Z.T @ a``, bias ``b`` (or None).

    ``loss`` is the solver's own objective at the end, ``grad_norm`` its gradient norm
    (paper: before clipping), ``converged`` whether the converged solver met its tolerance (for
    the fixed-step paper recipe: whether its weights are finite), ``steps`` iterations taken,
    ``zero_weights`` whether the exact minimiser of the objective has zero weights (see
    :func:`zero_is_optimal`; never for the squared penalty).

    A fit chosen by cross-validation (:func:`probekit.probe.cvpath.select`) also carries
    ``cv_loss``, ``cv_accuracy`` and ``cv_converged`` (folds, strengths): each fold's mean held-out
    log-loss and accuracy at each strength of the grid and whether that fold's fit converged, and
    ``chosen``, the grid index it was refitted at; ``None`` for any other fit.
    """

    beta: jax.Array
    a: jax.Array
    b: jax.Array | None
    loss: jax.Array
    grad_norm: jax.Array
    converged: jax.Array
    steps: jax.Array
    zero_weights: jax.Array
    cv_loss: jax.Array | None = None
    cv_accuracy: jax.Array | None = None
    cv_converged: jax.Array | None = None
    chosen: jax.Array | None = None


def _item_share(kern: Kernel) -> jax.Array:
    """Each training item's share of a weighted mean (``kern.weight`` normalised to sum 1), (n, 1)."""
    return (kern.weight / jnp.sum(kern.weight))[:, None]


def _residual(kern: Kernel, s: jax.Array, b: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Mean NLL of the gold choices and its gradient with respect to the score grid, (n, C).

    With ``kern.weight`` the mean is weighted (an item of weight 0 takes no part in either)."""
    logits = expand(kern, s) if b is None else expand(kern, s) + b
    logp = log_softmax(logits, kern.mask)
    n = kern.y.shape[0]
    onehot = jax.nn.one_hot(kern.y, logits.shape[-1], dtype=logits.dtype)
    gold = jnp.where(onehot > 0, logp, 0.0)
    p = jnp.where(kern.mask, jnp.exp(logp), 0.0)
    # p - onehot, with the gold entry as minus the others' mass: accurate when p_gold is near 1
    others = jnp.sum(jnp.where(onehot > 0, 0.0, p), -1, keepdims=True)
    R = jnp.where(onehot > 0, -others, p)
    if kern.weight is None:
        return -jnp.sum(gold) / n, R / n
    share = _item_share(kern)
    return -jnp.sum(gold * share), R * share


# ----- paper recipe (docs/protocol.md §4) -----------------------------------------------------------------
def paper(
    kern: Kernel,
    *,
    l2: float = 1.0,
    lr: float = 0.05,
    steps: int = 100,
    max_grad_norm: float = 1.0,
    refits: int = 3,
) -> Fit:
    """Plain full-batch SGD on mean NLL + ``l2 * |w|`` (unsquared), clipped, linearly decayed lr.

    Step ``t`` (0-based) uses ``lr * (1 - 0.9 t / steps)``; the total gradient (regulariser
    included, bias included) is scaled by ``min(1, max_grad_norm / (|g| + 1e-6))`` as
    ``torch.nn.utils.clip_grad_norm_`` does. The bias, if any, is not regularised.

    As the protocol's ``safe_fit``: when the weights come out non-finite the head is fitted again
    from the same start with the clipping norm divided by 4 and ``l2`` multiplied by 4, up to
    ``refits`` times; ``steps`` of the returned :class:`Fit` counts every step run, and
    ``converged`` is False if no attempt gave finite weights.
    """
    has_bias = kern.b0 is not None

    def fit(l2, max_grad_norm):
        def step(state, t):
            beta, a, s, b = state
            wnorm = jnp.sqrt(beta * beta * kern.w0w0 + beta * jnp.vdot(a, kern.u) + jnp.vdot(a, s))
            _, R = _residual(kern, s, b)
            r = reduce(kern, R)
            Kr = kern.K @ r
            gb = R.sum(0) if has_bias else None
            g2 = jnp.vdot(r, Kr) + 2.0 * l2 * jnp.vdot(r, s) / wnorm + l2 * l2
            if has_bias:
                g2 = g2 + jnp.vdot(gb, gb)
            gnorm = jnp.sqrt(jnp.maximum(g2, 0.0))
            clip = jnp.minimum(1.0, max_grad_norm / (gnorm + 1e-6))
            eta = lr * (1.0 - 0.9 * t / steps) * clip
            shrink = 1.0 - eta * l2 / wnorm
            b = b - eta * gb if has_bias else b
            return (shrink * beta, shrink * a - eta * r, shrink * s - eta * Kr, b), gnorm

        state = (jnp.ones((), kern.u.dtype), jnp.zeros_like(kern.u), kern.u, kern.b0)
        (beta, a, s, b), gnorms = jax.lax.scan(step, state, jnp.arange(steps, dtype=kern.u.dtype))
        nll, _ = _residual(kern, s, b)
        wnorm = jnp.sqrt(beta * beta * kern.w0w0 + beta * jnp.vdot(a, kern.u) + jnp.vdot(a, s))
        loss = nll + l2 * wnorm
        finite = jnp.isfinite(loss) & jnp.isfinite(beta) & jnp.all(jnp.isfinite(a))
        if has_bias:
            finite = finite & jnp.all(jnp.isfinite(b))
        return Fit(beta, a, b, loss, gnorms[-1], finite, jnp.array(steps), jnp.array(False))

    def again(c):
        attempt, _ = c
        scale = jnp.asarray(4.0, kern.u.dtype) ** attempt
        return attempt + 1, fit(l2 * scale, max_grad_norm / scale)

    def needed(c):
        attempt, last = c
        return (attempt == 0) | ((attempt <= refits) & ~last.converged)

    zero = jnp.zeros((), kern.u.dtype)
    blank = Fit(zero, jnp.zeros_like(kern.u), kern.b0, zero, zero, jnp.array(False), jnp.array(0), jnp.array(False))
    attempts, out = jax.lax.while_loop(needed, again, (jnp.array(0), blank))
    used_l2 = l2 * jnp.asarray(4.0, kern.u.dtype) ** jnp.maximum(attempts - 1, 0)  # the returned attempt's penalty
    return out._replace(steps=attempts * steps, zero_weights=zero_is_optimal(kern, used_l2))


def _bias_at_zero(kern: Kernel, iters: int = 30) -> jax.Array:
    """The bias minimising the mean NLL of a multinomial head with zero weights (damped Newton over
    the classes; a class no training item has goes towards -inf; weighted by ``kern.weight``)."""
    n, C = kern.mask.shape
    onehot = jax.nn.one_hot(kern.y, C, dtype=kern.u.dtype)

    def step(_, b):
        p = jnp.where(kern.mask, jnp.exp(log_softmax(jnp.broadcast_to(b, (n, C)), kern.mask)), 0.0)
        if kern.weight is None:
            g = (p - onehot).mean(0)
            H = (jnp.einsum("nc,cd->cd", p, jnp.eye(C, dtype=p.dtype)) - jnp.einsum("nc,nd->cd", p, p)) / n
        else:
            share = _item_share(kern)
            g = ((p - onehot) * share).sum(0)
            H = jnp.einsum("nc,cd->cd", p * share, jnp.eye(C, dtype=p.dtype)) - jnp.einsum("nc,nd->cd", p * share, p)
        d = jnp.linalg.solve(H + 1e-6 * jnp.eye(C, dtype=p.dtype), g)
        return b - jnp.clip(d, -5.0, 5.0)

    return jax.lax.fori_loop(0, iters, step, jnp.zeros(C, kern.u.dtype))


def zero_is_optimal(kern: Kernel, l2) -> jax.Array:
    """Whether zero weights minimise mean NLL + ``l2 * |w|`` (unsquared; the bias, if any, free).

    The objective is convex and the penalty's subgradient at ``w = 0`` is the ball of radius ``l2``,
    so ``w = 0`` is the exact minimiser if and only if the NLL's gradient at zero weights (with the
    best bias for a multinomial head) has norm at most ``l2`` in standardised units (KKT). Such a
    head carries no information: every choice scores the same at the optimum, and what a fixed
    number of SGD steps leaves (weights of about the last step size, their sign set by the
    step count) decides its predictions.
    """
    b = None if kern.b0 is None else _bias_at_zero(kern)
    _, R = _residual(kern, jnp.zeros_like(kern.u), b)
    r = reduce(kern, R)
    return jnp.vdot(r, kern.K @ r) <= l2 * l2


# ----- converged: Newton-CG on the squared-L2 objective --------------------------------------------
def converged(
    kern: Kernel,
    *,
    l2: float,
    tol: float = DEFAULT_TOL,
    max_newton: int = 50,
    max_cg: int = 200,
    start: tuple[jax.Array, jax.Array | None] | None = None,
) -> Fit:
    """Minimise mean NLL + ``l2/2 * |w|^2`` (bias unregularised) with line-searched Newton-CG,
    from zero weights and a zero bias, or from the coefficients and bias ``start`` (a warm start:
    the same optimum to the tolerance, in fewer steps from a nearby one).

    Works in coefficient space with the metric ``<x, y> = x_a.K y_a + x_b.y_b``, in which the
    Hessian is self-adjoint, so conjugate gradients and norms are those of the D-dimensional
    problem. It stops, with ``converged`` True, once ``|g|^2 / (2 l2)`` (which bounds how far the
    objective is above its minimum; exactly so for the weights, the unregularised bias aside) is at
    most ``tol`` times the objective: a relative optimality guarantee independent of scale
    (:data:`DEFAULT_TOL`). The scores are recomputed from the coefficients after every step, so
    that float32 rounding does not accumulate in them; three steps in a row that do not lower the
    gradient below its best (float32's limit) end the fit, with ``converged`` telling whether
    ``tol`` was met.
    """
    has_bias = kern.b0 is not None
    K = kern.K
    zb = jnp.zeros_like(kern.b0) if has_bias else None

    def objective(a, s, b):
        nll, R = _residual(kern, s, b)
        return nll + 0.5 * l2 * jnp.vdot(a, s), R

    def gradient(a, s, R):
        """Gradient coordinates (g_a, g_b), K g_a, and the squared metric norm."""
        ga = reduce(kern, R) + l2 * a
        Kga = K @ ga
        gb = R.sum(0) if has_bias else None
        g2 = jnp.vdot(ga, Kga) + (jnp.vdot(gb, gb) if has_bias else 0.0)
        return ga, gb, Kga, g2

    def hess_times(s, b, da, Kda, db):
        """Hessian applied to a direction: coordinates (h_a, h_b) and the quadratic form."""
        logits = expand(kern, s) if b is None else expand(kern, s) + b
        p = jnp.exp(log_softmax(logits, kern.mask))
        dL = expand(kern, Kda) if db is None else expand(kern, Kda) + db
        Q = jnp.where(kern.mask, p * (dL - jnp.sum(p * dL, -1, keepdims=True)), 0.0)
        Q = Q / kern.y.shape[0] if kern.weight is None else Q * _item_share(kern)
        ha = reduce(kern, Q) + l2 * da
        hb = Q.sum(0) if has_bias else None
        quad = jnp.sum(dL * Q) + l2 * jnp.vdot(da, Kda)
        return ha, hb, quad

    def newton_direction(s, b, ga, gb, Kga, g2):
        """Approximately solve H d = -g by conjugate gradients in the K-metric."""
        forcing = jnp.minimum(0.5, jnp.sqrt(jnp.sqrt(g2)))
        stop2 = (forcing * forcing) * g2

        def cond(c):
            i, _, _, _, _, _, _, _, rr, _ = c
            return (i < max_cg) & (rr > stop2)

        def body(c):
            i, xa, Kxa, xb, ra, Kra, rb, pa_pb, rr, Kpa = c
            pa, pb = pa_pb
            ha, hb, quad = hess_times(s, b, pa, Kpa, pb)
            alpha = rr / jnp.maximum(quad, 1e-30)
            Kha = K @ ha
            xa, Kxa = xa + alpha * pa, Kxa + alpha * Kpa
            ra, Kra = ra - alpha * ha, Kra - alpha * Kha
            if has_bias:
                xb, rb = xb + alpha * pb, rb - alpha * hb
            rr_new = jnp.vdot(ra, Kra) + (jnp.vdot(rb, rb) if has_bias else 0.0)
            beta = rr_new / rr
            pa, Kpa = ra + beta * pa, Kra + beta * Kpa
            pb = rb + beta * pb if has_bias else None
            return (i + 1, xa, Kxa, xb, ra, Kra, rb, (pa, pb), rr_new, Kpa)

        init = (0, jnp.zeros_like(ga), jnp.zeros_like(ga), zb, -ga, -Kga,
                -gb if has_bias else None, (-ga, -gb if has_bias else None), g2, -Kga)
        out = jax.lax.while_loop(cond, body, init)
        return out[1], out[2], out[3]

    def newton_step(c):
        it, a, s, b, f, R, best, stalled = c
        ga, gb, Kga, g2 = gradient(a, s, R)
        da, Kda, db = newton_direction(s, b, ga, gb, Kga, g2)
        slope = jnp.vdot(ga, Kda) + (jnp.vdot(gb, db) if has_bias else 0.0)

        def trial(t):
            bt = b + t * db if has_bias else None
            return objective(a + t * da, s + t * Kda, bt)

        def ls_cond(ls):
            t, ft, _ = ls
            return (ft > f + 1e-4 * t * slope) & (t > 1e-8)

        def ls_body(ls):
            t = 0.5 * ls[0]
            ft, Rt = trial(t)
            return (t, ft, Rt)

        f1, R1 = trial(1.0)
        t, ft, Rt = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones_like(f), f1, R1))
        accept = ft <= f
        a = jnp.where(accept, a + t * da, a)
        if has_bias:
            b = jnp.where(accept, b + t * db, b)
        # scores afresh from the coefficients: updated in steps (s + t K da) they would drift from K a
        # by float32 rounding and put a floor under the attainable optimality
        s = K @ a
        f, R = objective(a, s, b)
        # no lower gradient than the best so far: one more step at float32's limit
        stalled = jnp.where(accept & (g2 < best), 0, stalled + 1)
        return (it + 1, a, s, b, f, R, jnp.minimum(g2, best), stalled)

    def done(f, g2):
        """|g|^2 / (2 l2) bounds the suboptimality (strong convexity): stop when it is below tol * f."""
        return g2 <= 2.0 * l2 * tol * f

    def newton_cond(c):
        it, a, s, b, f, R, _, stalled = c
        # float32 bounds how far the gradient can be lowered (about 1e-7 of the objective in the
        # bound above on some heads): steps that no longer lower it are not worth taking
        return (it < max_newton) & (stalled < _STALLED) & ~done(f, gradient(a, s, R)[3])

    if start is None:
        a0, s0, b0 = jnp.zeros_like(kern.u), jnp.zeros_like(kern.u), zb
    else:
        a0, s0, b0 = start[0], K @ start[0], start[1] if has_bias else None
    f0, R0 = objective(a0, s0, b0)
    init = (0, a0, s0, b0, f0, R0, jnp.full_like(f0, jnp.inf), 0)
    it, a, s, b, f, R, _, _ = jax.lax.while_loop(newton_cond, newton_step, init)
    g2 = gradient(a, s, R)[3]
    return Fit(jnp.zeros((), a.dtype), a, b, f, jnp.sqrt(jnp.maximum(g2, 0.0)), done(f, g2), it, jnp.array(False))


def converged_at_C(kern: Kernel, *, C: float = 1.0, tol: float = DEFAULT_TOL, max_newton: int = 50,
                   start: tuple[jax.Array, jax.Array | None] | None = None) -> Fit:
    """:func:`converged` with scikit-learn's parametrisation: mean NLL + ``|w|^2 / (2 C n)``, i.e.
    ``l2 = 1 / (C n)`` for ``n`` training items (the sum of ``kern.weight`` when given: the items
    the fit uses), from zero weights and a zero bias (or warm, from ``start``)."""
    kern = kern._replace(b0=None if kern.b0 is None else jnp.zeros_like(kern.b0))
    n = kern.y.shape[0] if kern.weight is None else jnp.sum(kern.weight)
    return converged(kern, l2=1.0 / (C * n), tol=tol, max_newton=max_newton, start=start)


_STALLED = 3  # Newton steps without a lower gradient after which the converged solver stops


# ----- the registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Solver:
    """A registered solver: ``fit(kern, **options) -> Fit``, a pure function of one head's kernel;
    ``options``, the keyword options it takes (their defaults are the function's); ``objective``,
    what it minimises, in one line (recorded in ``sweep.json`` and shown by ``probekit sweep --help``).

    ``strength``: the option that sets how strongly the weights are penalised, the one a
    cross-validated path chooses from a grid (:mod:`probekit.probe.cvpath`); ``inverse``: whether
    larger values of it penalise less (scikit-learn's ``C``) rather than more (a penalty weight).
    The fit may take it as a traced value, so that one compiled fit serves a whole grid. ``warm``:
    whether the fit takes ``start=(a, b)``, coefficients and bias to start from (a path then runs
    from the strongest penalty to the weakest, each fit starting at the one before, as
    scikit-learn's regularisation paths do; a fit that defines its own start, as the paper
    recipe's initial weights, has none)."""

    name: str
    fit: Callable[..., Fit]
    options: tuple[str, ...]
    objective: str
    strength: str | None = None
    inverse: bool = False
    warm: bool = False

    def __call__(self, kern: Kernel, settings: Any = None, **override: Any) -> Fit:
        """Fit one head, taking each option found on ``settings`` (an object with those attributes,
        such as a ``ProbeConfig``, or a mapping) and the function's default for the others;
        ``override`` replaces options (e.g. the strength, as an array under a trace)."""
        get = settings.get if isinstance(settings, Mapping) else (lambda k, d: getattr(settings, k, d))
        missing = object()
        options = {k: v for k in self.options if (v := get(k, missing)) is not missing}
        return self.fit(kern, **{**options, **override})

    def strongest_first(self, values: Sequence[float]) -> tuple[float, ...]:
        """``values`` ordered from the strongest penalty to the weakest."""
        return tuple(sorted((float(v) for v in values), reverse=not self.inverse))


SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("paper", paper, ("l2", "lr", "steps", "max_grad_norm"),
           "mean NLL + l2 * |w| (unsquared), SGD as docs/protocol.md §4", strength="l2"),
    Solver("converged", converged_at_C, ("C", "tol", "max_newton"),
           "mean NLL + |w|^2 / (2 C n_train), bias unregularised", strength="C", inverse=True, warm=True),
)}


def solver_names(spec: str | Sequence[str]) -> list[str]:
    """The solvers a sweep fits: one name, a sequence of names, or ``"both"`` for every registered
    solver (names are checked by :class:`~probekit.probe.engine.ProbeConfig`)."""
    if isinstance(spec, str):
        return list(SOLVERS) if spec == "both" else [spec]
    return list(spec)
