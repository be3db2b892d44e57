"""Bootstrap statistics over item x draw accuracy matrices (docs/protocol.md §6).

A matrix has one row per test item and one column per training draw; a cell is the 0/1
correctness of that draw's head on that item, or NaN when the item was not a test item in that
draw (it was in the training set). Three statistics share one resampling scheme:

- :func:`crossed_bootstrap`: accuracy with a percentile interval, resampling items (rows) and
  draws (columns) with replacement (``metrics.grid_bootstrap``).
- :func:`sgr_bootstrap`: the supervision gap recovered ``(B - A) / (C - A)`` with A zero-shot,
  B easy-trained and C hard-trained; one shared row index vector per resample keeps items
  paired, each matrix gets its own column indices (``bootstrapBminusAoverCminusA``).
- :func:`paired_difference`: ``mean(B - A)`` with the same scheme (``bootstrapDiff``).

p-values: by default (``"percentile"``) the p-value of a test of 0 is read off the same resampled
statistics as the percentile interval, by inverting it: ``p`` is the smallest ``alpha`` at which the
``1 - alpha`` percentile interval (numpy's "linear" quantiles, the interval's own rule) excludes 0
(:func:`percentile_p_value`), so "the 95% interval excludes 0" and "p < 0.05" always agree. The
reference code's centred bootstrap test (``metrics.p_value``) is :func:`centred_p_value`
(``"centred"``); it can disagree with the percentile interval. An SGR also carries a Fieller-type
interval (:func:`fieller_interval`) from the same resamples' numerator and denominator; multiplicity
is handled by Benjamini-Hochberg q-values over a family of tests (:func:`bh_qvalues`).

When SGR is estimable: the ratio means something only when hard training beats zero-shot. From
the same paired resamples as the SGR, :func:`sgr_bootstrap` takes the percentile interval of the
denominator ``C - A`` (hard - zero-shot); when its lower end is not above 0 (the interval includes
0 or lies below it) the result is flagged ``estimable = False`` with the reason. Its numbers are
kept, but they are not a finding: a denominator that can be 0 or negative makes the ratio's
point and percentile interval arbitrary (the demo's 1.24 [-7.38, 8.53]).

The fast path never builds the (resamples x rows x cols) array. A resample is summarised by how
often it drew each row (a count vector ``w``) and each column, or column pair, of a difference
(a count vector ``v``); the nanmean of a resampled matrix is then
``(w @ X0 @ v) / (w @ K @ v)`` with ``X0`` the matrix with NaN set to 0 and ``K`` its non-NaN
mask. Blocks of resamples go through one matrix product. With 0/1 data every partial sum is an
integer, so the result equals the plain nanmean of the resampled matrix bit for bit.

Randomness comes only from ``np.random.default_rng(seed)``, consumed by
:func:`resample_indices`; the ``*_resample_stats`` functions take drawn indices, so a plain loop
over the same indices can check them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from probekit.errors import ProbekitError

#: Upper bound on (resamples x rows) per block. A block's working memory is about 25 bytes per
#: element (int32 indices, int64 bincount, float64 counts): 100 MB at this setting.
BLOCK_ELEMENTS = 4_000_000
#: How a p-value of a test of 0 is computed from the resampled statistics (module doc).
P_VALUES = ("percentile", "centred")


@dataclass(frozen=True)
class CrossedBootstrap:
    """Accuracy of one condition with a crossed (items x draws) bootstrap interval.

    ``point`` is the nanmean of the matrix, ``mean`` the mean of the resampled statistics,
    ``[lo, hi]`` the percentile interval at ``level`` and ``error_bar`` the average distance of
    ``lo`` and ``hi`` from ``mean`` (the paper's "±"). ``n_kept`` counts resamples with a defined
    statistic (a resample can draw only NaN cells).
    """

    point: float
    mean: float
    lo: float
    hi: float
    error_bar: float
    level: float
    n_items: int
    n_draws: int
    n_resamples: int
    n_kept: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BootstrapTest:
    """A paired statistic (SGR or a difference) with a percentile interval and a p-value.

    ``point`` is the statistic on the original matrices, ``mean`` the mean of the finite
    resampled statistics, ``[lo, hi]`` their percentile interval at ``level``,
    ``error_bar = (hi - lo) / 2`` and ``p_value`` the two-sided p-value of H0: statistic = 0 by the
    rule ``p_method`` (:func:`p_value`; "percentile": agrees with ``[lo, hi]``). ``n_draws`` holds
    the column count of each matrix after all-NaN columns are dropped; ``n_kept`` counts resamples
    with a finite statistic.
    """

    point: float
    mean: float
    lo: float
    hi: float
    error_bar: float
    p_value: float
    level: float
    n_items: int
    n_draws: tuple[int, ...]
    n_resamples: int
    n_kept: int
    p_method: str = "percentile"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_draws"] = list(self.n_draws)
        return d


@dataclass(frozen=True)
class SgrTest(BootstrapTest):
    """An SGR :class:`BootstrapTest` with its denominator and whether the ratio is estimable.

    ``den_point`` is ``mean C - mean A`` (hard - zero-shot) on the original matrices and
    ``[den_lo, den_hi]`` its percentile interval at ``level`` over the same resamples as the
    ratio. ``estimable`` is False when ``den_lo <= 0`` (or the denominator is undefined);
    ``reason`` then says why, and is None otherwise. ``fieller`` is the Fieller-type interval of the
    ratio at ``level`` (:func:`fieller_interval`, as a dict).
    """

    den_point: float = math.nan
    den_lo: float = math.nan
    den_hi: float = math.nan
    estimable: bool = True
    reason: str | None = None
    fieller: dict | None = None


@dataclass(frozen=True)
class Fieller:
    """A Fieller-type confidence set for a ratio ``N / D`` at ``level``.

    ``kind``: "bounded" (the interval ``[lo, hi]``; the denominator is significantly away from 0),
    "exclusive" (the complement of an interval: ``(-inf, lo] U [hi, inf)``), "unbounded" (every real
    number), "below" (``(-inf, hi]``) or "above" (``[lo, inf)``), or "undefined" (no finite
    resamples). The set is ``{t : (n - t d)^2 <= z^2 (v_nn - 2 t v_nd + t^2 v_dd)}`` with ``n``, ``d``
    the point numerator and denominator and the v's their covariance over the resamples.
    """

    kind: str
    lo: float = math.nan
    hi: float = math.nan
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """The set as text: ``[0.52, 1.31]``, ``(-inf, -0.4] U [2.1, inf)``, ``(-inf, inf)``."""
        f = f"{{:.{digits}f}}"
        return {
            "bounded": lambda: f"[{f.format(self.lo)}, {f.format(self.hi)}]",
            "exclusive": lambda: f"(-inf, {f.format(self.lo)}] U [{f.format(self.hi)}, inf)",
            "unbounded": lambda: "(-inf, inf)",
            "below": lambda: f"(-inf, {f.format(self.hi)}]",
            "above": lambda: f"[{f.format(self.lo)}, inf)",
        }.get(self.kind, lambda: "undefined")()


def fieller_interval(n: float, d: float, v_nn: float, v_dd: float, v_nd: float, level: float = 0.95) -> Fieller:
    """The Fieller-type confidence set of ``n / d`` given the variances and covariance of the estimates
    ``n`` and ``d`` (normal quantile ``z`` of ``level``); see :class:`Fieller`."""
    if not all(math.isfinite(x) for x in (n, d, v_nn, v_dd, v_nd)):
        return Fieller("undefined", level=level)
    z2 = NormalDist().inv_cdf(0.5 + level / 2) ** 2
    a = d * d - z2 * v_dd
    b = -2.0 * (n * d - z2 * v_nd)
    c = n * n - z2 * v_nn
    disc = b * b - 4.0 * a * c
    if abs(a) <= 1e-12 * max(d * d, z2 * v_dd):  # the denominator sits exactly at the edge of significance
        a = 0.0
    if a == 0.0:
        if b == 0.0:
            return Fieller("unbounded" if c <= 0 else "undefined", level=level)
        root = -c / b
        return Fieller("below", hi=root, level=level) if b > 0 else Fieller("above", lo=root, level=level)
    if disc < 0:
        return Fieller("unbounded", level=level) if a < 0 else Fieller("undefined", level=level)
    r = math.sqrt(disc)
    lo, hi = sorted(((-b - r) / (2.0 * a), (-b + r) / (2.0 * a)))
    return Fieller("bounded" if a > 0 else "exclusive", lo, hi, level)


def bh_qvalues(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a family of tests, in the given order.

    ``q_(i) = min over j >= i of m p_(j) / j`` over the p-values sorted ascending, capped at 1; ``m``
    counts every test of the family. A NaN p-value (a test that could not be computed) counts as 1:
    it stays in the family and is never declared significant.
    """
    p = np.asarray(p_values, dtype=np.float64)
    p = np.where(np.isnan(p), 1.0, p)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def sgr_estimable(den_lo: float, den_hi: float) -> tuple[bool, str | None]:
    """Whether an SGR is estimable from its denominator's (hard - zero-shot) interval, and why not.

    Estimable when the interval lies above 0; otherwise the reason names the interval in
    percentage points and says whether it includes 0 or lies below it.
    """
    if not (math.isfinite(den_lo) and math.isfinite(den_hi)):
        return False, "hard - zero-shot interval undefined"
    if den_lo > 0:
        return True, None
    where = "lies below 0" if den_hi < 0 else "includes 0"
    return False, f"hard - zero-shot interval [{100 * den_lo:.1f}, {100 * den_hi:.1f}] pts {where}"


# ----------------------------------------------------------------------------------------------
# Input checks and cleaning


def as_matrix(x, name: str = "matrix") -> np.ndarray:
    """Return ``x`` as a float64 (items x draws) matrix; a 1-D vector becomes one column."""
    try:
        m = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProbekitError(f"{name} must be numeric (item x draw), got {type(x).__name__}: {exc}") from None
    if m.ndim == 1:
        m = m[:, None]
    if m.ndim != 2:
        raise ProbekitError(f"{name} must be 2-D (item x draw), got shape {m.shape}")
    if np.isinf(m).any():
        raise ProbekitError(f"{name} holds infinite values; use NaN for missing cells")
    return m


def _check_settings(n_resamples: int, level: float, p_method: str = "percentile") -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ProbekitError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ProbekitError(f"level must be in (0, 1), got {level!r}")
    if p_method not in P_VALUES:
        raise ProbekitError(f"p-value method must be one of {', '.join(P_VALUES)}, got {p_method!r}")


def drop_empty(*mats: np.ndarray) -> tuple[np.ndarray, ...]:
    """Drop rows NaN in every matrix, then each matrix's all-NaN columns (rows stay paired)."""
    observed = np.zeros(mats[0].shape[0], dtype=bool)
    for m in mats:
        observed |= ~np.isnan(m).all(axis=1)
    out = []
    for m in mats:
        m = m[observed]
        out.append(m[:, ~np.isnan(m).all(axis=0)])
    return tuple(out)


def _check_baseline(A: np.ndarray, X: np.ndarray, names: str) -> None:
    if A.shape[1] not in (1, X.shape[1]):
        raise ProbekitError(
            f"{names}: the baseline has {A.shape[1]} observed draws and the other matrix {X.shape[1]}; "
            "a baseline needs one draw (recycled) or as many draws"
        )


# ----------------------------------------------------------------------------------------------
# Index draws


def block_size(n_rows: int, n_resamples: int) -> int:
    """Resamples per block, so one block's row indices hold at most ``BLOCK_ELEMENTS`` values."""
    return int(max(1, min(n_resamples, BLOCK_ELEMENTS // max(n_rows, 1))))


def resample_indices(
    seed: int, n_resamples: int, n_rows: int, n_cols: Sequence[int]
) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """Yield blocks ``(rows, cols)`` of bootstrap indices drawn from ``default_rng(seed)``.

    ``rows`` has shape (b, n_rows) with values in [0, n_rows); ``cols[k]`` has shape
    (b, n_cols[k]) with values in [0, n_cols[k]); both int32. Blocks together hold
    ``n_resamples`` resamples; the sequence depends only on the arguments (and on
    ``BLOCK_ELEMENTS``, which sets the block size).
    """
    rng = np.random.default_rng(seed)
    size = block_size(n_rows, n_resamples)
    done = 0
    while done < n_resamples:
        b = min(size, n_resamples - done)
        rows = rng.integers(0, n_rows, size=(b, n_rows), dtype=np.int32)
        cols = tuple(rng.integers(0, m, size=(b, m), dtype=np.int32) for m in n_cols)
        yield rows, cols
        done += b


def _counts(idx: np.ndarray, n: int, dtype=np.float64) -> np.ndarray:
    """How often each value in [0, n) occurs in each row of ``idx``: (b, n) of ``dtype``."""
    b = idx.shape[0]
    itype = np.int32 if b * n < 2**31 else np.int64  # int32 keeps the bincount fast
    flat = (idx.astype(itype, copy=False) + (np.arange(b, dtype=itype) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Counts-based nanmean of a resampled (difference) matrix


def _features(X: np.ndarray, A: np.ndarray | None) -> np.ndarray:
    """Sum and count features of the cells of ``X - A``, one per (X column, A column) pair.

    Returns (n_rows, 2 q) with q = m_X * m_A: the first q columns hold the difference with NaN
    set to 0, the last q the 0/1 indicator that both cells are observed. With ``A`` None the
    features are those of ``X`` itself (q = m_X).
    """
    kx = ~np.isnan(X)
    x0 = np.where(kx, X, 0.0)
    if A is None:
        return np.concatenate([x0, kx.astype(np.float64)], axis=1)
    ka = ~np.isnan(A)
    a0 = np.where(ka, A, 0.0)
    both = kx[:, :, None] & ka[:, None, :]
    diff = np.where(both, x0[:, :, None] - a0[:, None, :], 0.0)
    n = X.shape[0]
    return np.concatenate([diff.reshape(n, -1), both.reshape(n, -1).astype(np.float64)], axis=1)


def _slot_counts(cx: np.ndarray, ca: np.ndarray | None, m_x: int, m_a: int, dtype=np.float64) -> np.ndarray:
    """Counts of the (X column, A column) pairs that the resampled columns line up.

    Resampled column j of ``X`` meets resampled column j of ``A``, or A's single column when A
    has one (it is recycled across X's columns).
    """
    if ca is None:
        return _counts(cx, m_x, dtype)
    aligned = ca if ca.shape[1] == cx.shape[1] else np.repeat(ca[:, :1], cx.shape[1], axis=1)
    return _counts(cx * m_a + aligned, m_x * m_a, dtype)


def _means(G: np.ndarray, P: np.ndarray) -> np.ndarray:
    """nanmeans from ``G = W @ features`` (b, 2 q) and slot counts ``P`` (b, q); NaN if empty."""
    q = P.shape[1]
    total = np.einsum("bq,bq->b", G[:, :q], P)
    count = np.einsum("bq,bq->b", G[:, q:], P)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


# ----------------------------------------------------------------------------------------------
# Statistics for given indices (one block); the fast path of the public functions


def crossed_resample_stats(M: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """nanmean of ``M[rows[i]][:, cols[i]]`` for every resample i, without building it."""
    F = _features(M, None)
    return _means(_counts(rows, M.shape[0]) @ F, _counts(cols, M.shape[1]))


def difference_resample_stats(
    A: np.ndarray, B: np.ndarray, rows: np.ndarray, cols_a: np.ndarray, cols_b: np.ndarray
) -> np.ndarray:
    """nanmean of ``B[r][:, cb] - A[r][:, ca]`` per resample (A recycled when it has one column)."""
    _check_baseline(A, B, "paired_difference")
    F = _features(B, A)
    G = _counts(rows, B.shape[0]) @ F
    return _means(G, _slot_counts(cols_b, cols_a, B.shape[1], A.shape[1]))


def sgr_resample_stats(
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    rows: np.ndarray,
    cols_a: np.ndarray,
    cols_b: np.ndarray,
    cols_c: np.ndarray,
) -> np.ndarray:
    """``nanmean(B* - A*) / nanmean(C* - A*)`` per resample; one shared row index vector."""
    num, den = sgr_resample_parts(A, B, C, rows, cols_a, cols_b, cols_c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def sgr_resample_parts(A: np.ndarray, B: np.ndarray, C: np.ndarray, rows: np.ndarray, cols_a: np.ndarray,
                       cols_b: np.ndarray, cols_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numerator ``nanmean(B* - A*)`` and denominator ``nanmean(C* - A*)`` of each resample's SGR."""
    _check_baseline(A, B, "sgr_bootstrap (A vs B)")
    _check_baseline(A, C, "sgr_bootstrap (A vs C)")
    fb, fc = _features(B, A), _features(C, A)
    G = _counts(rows, A.shape[0]) @ np.concatenate([fb, fc], axis=1)
    num = _means(G[:, : fb.shape[1]], _slot_counts(cols_b, cols_a, B.shape[1], A.shape[1]))
    den = _means(G[:, fb.shape[1] :], _slot_counts(cols_c, cols_a, C.shape[1], A.shape[1]))
    return num, den


# ----------------------------------------------------------------------------------------------
# Summaries


def p_value(stats: np.ndarray, method: str = "percentile", level: float = 0.95) -> float:
    """Two-sided p-value of H0: statistic = 0 from resampled statistics, by ``method`` (:data:`P_VALUES`):
    :func:`percentile_p_value` (agrees with the percentile interval at ``level``) or :func:`centred_p_value`."""
    if method == "percentile":
        return percentile_p_value(stats, level)
    if method == "centred":
        return centred_p_value(stats)
    raise ProbekitError(f"p-value method must be one of {', '.join(P_VALUES)}, got {method!r}")


def percentile_p_value(stats: np.ndarray, level: float = 0.95) -> float:
    """The smallest ``alpha`` at which the ``1 - alpha`` percentile interval of ``stats`` excludes 0.

    With ``q(t)`` numpy's "linear" quantile of the sorted statistics (the rule of the intervals),
    ``t0 = sup{t : q(t) <= 0}`` and ``t1 = inf{t : q(t) >= 0}``: the interval ``[q(alpha/2),
    q(1 - alpha/2)]`` excludes 0 exactly when ``alpha > 2 t0`` or ``alpha > 2 (1 - t1)``, so
    ``p = min(1, 2 t0, 2 (1 - t1))`` and ``p < 1 - level`` exactly when the interval at ``level``
    excludes 0. 0 when every statistic lies on one side of 0 (report it as below ``1 / len(stats)``);
    NaN when ``stats`` is empty. At ``level`` (the interval a report prints) the agreement is exact even
    where rounding meets the boundary: the p-value is then set to the side numpy's own quantiles give.
    """
    s = np.sort(np.asarray(stats, dtype=np.float64))
    n = s.size
    if n == 0:
        return math.nan
    if n == 1:
        return 1.0 if s[0] == 0 else 0.0
    if s[0] > 0:
        t0 = 0.0
    elif s[-1] <= 0:
        t0 = 1.0
    else:
        i = int(np.searchsorted(s, 0.0, side="right")) - 1  # last s[i] <= 0; s[i + 1] > 0
        t0 = (i - s[i] / (s[i + 1] - s[i])) / (n - 1)
    if s[-1] < 0:
        t1 = 1.0
    elif s[0] >= 0:
        t1 = 0.0
    else:
        j = int(np.searchsorted(s, 0.0, side="left"))  # first s[j] >= 0; s[j - 1] < 0
        t1 = (j - 1 - s[j - 1] / (s[j] - s[j - 1])) / (n - 1)
    p = float(min(1.0, 2.0 * t0, 2.0 * (1.0 - t1)))
    alpha = 1.0 - level
    lo, hi = np.quantile(s, [alpha / 2, 1.0 - alpha / 2])
    if (lo > 0 or hi < 0) != (p < alpha):  # rounding at the boundary: numpy's quantiles decide
        p = float(np.nextafter(alpha, 0.0)) if (lo > 0 or hi < 0) else alpha
    return p


def centred_p_value(stats: np.ndarray) -> float:
    """Centered two-sided bootstrap p-value of H0: statistic = 0 (the reference code's test).

    ``p = mean(s - s̄ < -|s̄|) + mean(s - s̄ > |s̄|)`` with ``s̄`` the mean of the statistics
    (``metrics.p_value``). NaN when ``stats`` is empty. When every resample gives exactly 0 (a
    difference of two identical matrices, say) the formula would give 0, the strongest evidence
    against a null that holds exactly; such a statistic gets p = 1.
    """
    s = np.asarray(stats, dtype=np.float64)
    if s.size == 0:
        return math.nan
    centre = s.mean()
    centred = s - centre
    if centre == 0 and not centred.any():
        return 1.0
    return float(np.mean(centred < -abs(centre)) + np.mean(centred > abs(centre)))


def _summary(stats: np.ndarray, level: float) -> tuple[float, float, float, int]:
    """Mean, lower and upper percentile (numpy "linear", R type 7) of the finite stats."""
    kept = stats[np.isfinite(stats)]
    if kept.size == 0:
        return math.nan, math.nan, math.nan, 0
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(kept, [alpha, 1.0 - alpha])
    return float(kept.mean()), float(lo), float(hi), int(kept.size)


def _nanmean(x: np.ndarray) -> float:
    k = ~np.isnan(x)
    return float(x[k].sum() / k.sum()) if k.any() else math.nan


def _collect(stat_fn, seed: int, n_resamples: int, n_rows: int, n_cols: Sequence[int]) -> np.ndarray:
    return np.concatenate(
        [stat_fn(rows, *cols) for rows, cols in resample_indices(seed, n_resamples, n_rows, n_cols)]
    )


# ----------------------------------------------------------------------------------------------
# Public statistics


def crossed_bootstrap(M, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> CrossedBootstrap:
    """Accuracy of an item x draw matrix with a crossed bootstrap percentile interval.

    All-NaN rows are dropped; each resample draws the rows and the columns with replacement and
    takes the nanmean (docs/protocol.md §6, ``grid_bootstrap``). Resamples that draw only NaN cells are
    left out of the summary.
    """
    _check_settings(n_resamples, level)
    (M,) = drop_empty(as_matrix(M, "M"))
    if M.size == 0:
        raise ProbekitError("crossed_bootstrap: the matrix has no observed cell")
    n, m = M.shape

    def block(rows, cols):
        return crossed_resample_stats(M, rows, cols)

    stats = _collect(block, seed, n_resamples, n, [m])
    return crossed_result(M, stats, level, n_resamples)


def crossed_result(M: np.ndarray, stats: np.ndarray, level: float, n_resamples: int) -> CrossedBootstrap:
    """The :class:`CrossedBootstrap` of a cleaned matrix ``M`` from its resampled statistics."""
    mean, lo, hi, kept = _summary(stats, level)
    err = float((abs(lo - mean) + abs(hi - mean)) / 2.0)
    return CrossedBootstrap(_nanmean(M), mean, lo, hi, err, level, M.shape[0], M.shape[1], n_resamples, kept)


def _test(point, stats, level, n_items, n_draws, n_resamples, p_method) -> BootstrapTest:
    kept = stats[np.isfinite(stats)]
    mean, lo, hi, n_kept = _summary(kept, level)
    return BootstrapTest(
        float(point), mean, lo, hi, float((hi - lo) / 2.0), p_value(kept, p_method, level), level,
        n_items, tuple(n_draws), n_resamples, n_kept, p_method,
    )


def _prepare(names: str, *mats) -> tuple[np.ndarray, ...]:
    arrays = [as_matrix(m, n) for m, n in zip(mats, names)]
    if len({a.shape[0] for a in arrays}) != 1:
        shapes = ", ".join(f"{n}{a.shape}" for n, a in zip(names, arrays))
        raise ProbekitError(f"matrices must have the same item rows, got {shapes}")
    arrays = drop_empty(*arrays)
    for n, a in zip(names, arrays):
        if a.size == 0:
            raise ProbekitError(f"matrix {n} has no observed cell on the shared items")
    return arrays


def paired_difference(A, B, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                      p_method: str = "percentile") -> BootstrapTest:
    """Difference ``mean(B - A)`` of two conditions on the same items, with interval and p-value.

    Rows NaN in both matrices are dropped, then each matrix's all-NaN columns. Each resample
    draws one row index vector for both and independent column indices per matrix, and takes
    the nanmean of the elementwise difference (``bootstrapDiff``); A with one column is
    recycled across B's columns, otherwise A and B need the same number of draws. ``point`` is
    the same statistic on the original matrices; ``p_method``: see :func:`p_value`.
    """
    _check_settings(n_resamples, level, p_method)
    A, B = _prepare("AB", A, B)
    _check_baseline(A, B, "paired_difference")
    n, ma, mb = A.shape[0], A.shape[1], B.shape[1]

    def block(rows, ca, cb):
        return difference_resample_stats(A, B, rows, ca, cb)

    stats = _collect(block, seed, n_resamples, n, [ma, mb])
    return difference_result(A, B, stats, level, n_resamples, p_method)


def difference_result(A: np.ndarray, B: np.ndarray, stats: np.ndarray, level: float,
                      n_resamples: int, p_method: str = "percentile") -> BootstrapTest:
    """The :class:`BootstrapTest` of ``mean(B - A)`` (cleaned matrices) from its resampled statistics."""
    point = _nanmean(B - A)  # A broadcasts when it has one column
    return _test(point, stats, level, A.shape[0], (A.shape[1], B.shape[1]), n_resamples, p_method)


def sgr_bootstrap(A, B, C, n_resamples: int = 100_000, seed: int = 0, level: float = 0.95,
                  p_method: str = "percentile") -> BootstrapTest:
    """Supervision gap recovered ``(B - A) / (C - A)`` with interval and p-value.

    A is the zero-shot matrix (items x 1), B easy-trained and C hard-trained (items x draws), on
    the same item rows. Rows NaN in all three are dropped, then each matrix's all-NaN columns.
    Each resample draws one shared row index vector and independent column indices per matrix,
    and computes ``nanmean(B* - A*) / nanmean(C* - A*)`` (A recycled across columns);
    non-finite statistics are dropped (``bootstrapBminusAoverCminusA``). ``point`` is
    ``(mean B - mean A) / (mean C - mean A)`` with nanmeans of the original matrices.

    The result (:class:`SgrTest`) also holds the denominator ``C - A`` with its percentile
    interval from the same resamples, and ``estimable = False`` with a reason when that interval
    does not lie above 0 (:func:`sgr_estimable`), and the Fieller-type interval of the ratio
    (:func:`fieller_interval`) from the numerator's and denominator's covariance over the resamples.
    """
    _check_settings(n_resamples, level, p_method)
    A, B, C = _prepare("ABC", A, B, C)
    _check_baseline(A, B, "sgr_bootstrap (A vs B)")
    _check_baseline(A, C, "sgr_bootstrap (A vs C)")
    n, ma, mb, mc = A.shape[0], A.shape[1], B.shape[1], C.shape[1]

    def block(rows, ca, cb, cc):
        return np.stack(sgr_resample_parts(A, B, C, rows, ca, cb, cc), axis=1)

    parts = _collect(block, seed, n_resamples, n, [ma, mb, mc])
    return sgr_result(A, B, C, parts[:, 0], parts[:, 1], level, n_resamples, p_method)


def sgr_result(A: np.ndarray, B: np.ndarray, C: np.ndarray, num: np.ndarray, den: np.ndarray, level: float,
               n_resamples: int, p_method: str = "percentile") -> SgrTest:
    """The :class:`SgrTest` of cleaned matrices from each resample's numerator and denominator."""
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = num / den
    a = _nanmean(A)
    num_point = np.float64(_nanmean(B) - a)
    den_point = np.float64(_nanmean(C) - a)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num_point / den_point
    base = _test(point, stats, level, A.shape[0], (A.shape[1], B.shape[1], C.shape[1]), n_resamples, p_method)
    _, den_lo, den_hi, _ = _summary(den, level)
    estimable, reason = sgr_estimable(den_lo, den_hi)
    both = np.isfinite(num) & np.isfinite(den)
    if both.sum() > 1:
        cov = np.cov(num[both], den[both])
        fieller = fieller_interval(float(num_point), float(den_point), cov[0, 0], cov[1, 1], cov[0, 1], level)
    else:
        fieller = Fieller("undefined", level=level)
    return SgrTest(**vars(base), den_point=float(den_point), den_lo=den_lo, den_hi=den_hi,
                   estimable=estimable, reason=reason, fieller=fieller.to_dict())
