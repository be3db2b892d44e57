"""Bootstrap statistics against plain per-resample loops over the same drawn indices."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from probekit.errors import ProbekitError
from probekit.stats import (
    bh_qvalues,
    bootstrap,
    centred_p_value,
    crossed_bootstrap,
    crossed_resample_stats,
    difference_resample_stats,
    fieller_interval,
    p_value,
    paired_difference,
    percentile_p_value,
    resample_indices,
    sgr_bootstrap,
    sgr_estimable,
    sgr_resample_parts,
    sgr_resample_stats,
)

# ----------------------------------------------------------------------------------------------
# Plain reference implementations (one resample at a time, docs/protocol.md §6 read literally)


def ref_nanmean(x: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(x))


def ref_clean(*mats):
    """Drop rows NaN in all matrices, then each matrix's all-NaN columns, with loops."""
    n = mats[0].shape[0]
    keep = [i for i in range(n) if any(not np.isnan(m[i]).all() for m in mats)]
    out = []
    for m in mats:
        m = m[keep]
        cols = [j for j in range(m.shape[1]) if not np.isnan(m[:, j]).all()]
        out.append(m[:, cols])
    return out


def ref_crossed_loop(M, rows, cols):
    return np.array([ref_nanmean(M[rows[i]][:, cols[i]]) for i in range(len(rows))])


def ref_diff_loop(A, B, rows, ca, cb):
    # A[r][:, ca] has one column when A has one column: numpy broadcasting recycles it (as R does)
    return np.array([ref_nanmean(B[rows[i]][:, cb[i]] - A[rows[i]][:, ca[i]]) for i in range(len(rows))])


def ref_sgr_loop(A, B, C, rows, ca, cb, cc):
    out = []
    for i in range(len(rows)):
        a = A[rows[i]][:, ca[i]]
        num = ref_nanmean(B[rows[i]][:, cb[i]] - a)
        den = ref_nanmean(C[rows[i]][:, cc[i]] - a)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.float64(num) / np.float64(den))
    return np.array(out)


def ref_p_value(betas):
    """The reference code's centred two-sided bootstrap p-value (``metrics.p_value``)."""
    abs_mean = abs(np.mean(betas))
    centred = [b - np.mean(betas) for b in betas]
    return sum(c < -abs_mean for c in centred) / len(betas) + sum(c > abs_mean for c in centred) / len(betas)


def excludes_zero(stats, level) -> bool:
    """Whether the percentile interval at ``level`` (numpy's linear quantiles) excludes 0."""
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return bool(lo > 0 or hi < 0)


def ref_percentile_p_value(stats, tol: float = 1e-13) -> float:
    """The smallest alpha whose 1 - alpha percentile interval excludes 0, by bisection over alpha."""
    if excludes_zero(stats, 1 - 1e-15):  # excluded at every level
        return 0.0
    if not excludes_zero(stats, 1e-15):  # never excluded
        return 1.0
    lo, hi = 1e-15, 1.0 - 1e-15  # alpha = 1 - level: excluded at hi, not at lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if excludes_zero(stats, 1 - mid):
            hi = mid
        else:
            lo = mid
    return hi


def ref_bh(p):
    """Benjamini-Hochberg adjusted p-values by their definition, one test at a time."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    return [min(1.0, min(m * p[j] / rank[j] for j in range(m) if rank[j] >= rank[i])) for i in range(m)]


def ref_summary(stats, level=0.95):
    kept = np.array([s for s in stats if np.isfinite(s)])
    lo, hi = np.quantile(kept, [(1 - level) / 2, 1 - (1 - level) / 2])
    return kept.mean(), lo, hi, len(kept)


def ref_all_stats(loop, seed, n_resamples, mats):
    """Run a reference loop over the library's own index sequence for ``seed``."""
    n = mats[0].shape[0]
    out = []
    for rows, cols in resample_indices(seed, n_resamples, n, [m.shape[1] for m in mats]):
        out.append(loop(*mats, rows, *cols))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Test data


def accuracy_matrix(rng, n, m, p_nan=0.2, base=None):
    """0/1 item x draw matrix with NaN cells (training items) and a few all-NaN rows."""
    p = rng.uniform(0.2, 0.9, n) if base is None else base
    M = (rng.random((n, m)) < p[:, None]).astype(float)
    M[rng.random((n, m)) < p_nan] = np.nan
    return M


def draw(rng, b, n, *ms):
    rows = rng.integers(0, n, size=(b, n))
    return rows, [rng.integers(0, m, size=(b, m)) for m in ms]


# ----------------------------------------------------------------------------------------------
# Fast path == loop, for the same indices


def test_crossed_stats_equal_loop_exactly():
    rng = np.random.default_rng(0)
    for n, m, p_nan in [(40, 5, 0.2), (3, 4, 0.6), (25, 1, 0.3)]:
        M = ref_clean(accuracy_matrix(rng, n, m, p_nan))[0]
        rows, (cols,) = draw(rng, 300, M.shape[0], M.shape[1])
        fast = crossed_resample_stats(M, rows, cols)
        ref = ref_crossed_loop(M, rows, cols)
        np.testing.assert_array_equal(fast, ref)  # bit for bit, NaN where a resample drew only NaN


def test_crossed_stats_hit_empty_resamples():
    # a 2 x 2 matrix with one observed cell per row: some resamples draw only NaN cells
    M = np.array([[1.0, np.nan], [np.nan, 0.0]])
    rows, (cols,) = draw(np.random.default_rng(1), 200, 2, 2)
    fast = crossed_resample_stats(M, rows, cols)
    np.testing.assert_array_equal(fast, ref_crossed_loop(M, rows, cols))
    assert np.isnan(fast).any() and np.isfinite(fast).any()


@pytest.mark.parametrize("m_a", [1, 5])
def test_difference_stats_equal_loop_exactly(m_a):
    rng = np.random.default_rng(2)
    A, B = ref_clean(accuracy_matrix(rng, 50, m_a, 0.1), accuracy_matrix(rng, 50, 5, 0.3))
    rows, (ca, cb) = draw(rng, 400, 50, A.shape[1], B.shape[1])
    np.testing.assert_array_equal(
        difference_resample_stats(A, B, rows, ca, cb), ref_diff_loop(A, B, rows, ca, cb)
    )


def test_sgr_stats_equal_loop_exactly():
    rng = np.random.default_rng(3)
    A, B, C = ref_clean(
        accuracy_matrix(rng, 60, 1, 0.05), accuracy_matrix(rng, 60, 5, 0.3), accuracy_matrix(rng, 60, 4, 0.3)
    )
    rows, (ca, cb, cc) = draw(rng, 500, A.shape[0], 1, B.shape[1], C.shape[1])
    np.testing.assert_array_equal(
        sgr_resample_stats(A, B, C, rows, ca, cb, cc), ref_sgr_loop(A, B, C, rows, ca, cb, cc)
    )


def test_float_cells_match_loop_to_rounding():
    # p_gold-like values: sums are no longer integers, so agreement is to rounding only
    rng = np.random.default_rng(4)
    A = rng.random((30, 1))
    B, C = rng.random((30, 5)), rng.random((30, 5))
    B[rng.random(B.shape) < 0.2] = np.nan
    rows, (ca, cb, cc) = draw(rng, 200, 30, 1, 5, 5)
    np.testing.assert_allclose(
        sgr_resample_stats(A, B, C, rows, ca, cb, cc), ref_sgr_loop(A, B, C, rows, ca, cb, cc), rtol=1e-10
    )
    np.testing.assert_allclose(crossed_resample_stats(B, rows, cb), ref_crossed_loop(B, rows, cb), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    p_nan=st.sampled_from([0.0, 0.3, 0.7]),
)
def test_difference_property_matches_loop(n, m, seed, p_nan):
    rng = np.random.default_rng(seed)
    A = accuracy_matrix(rng, n, 1, p_nan)
    B = accuracy_matrix(rng, n, m, p_nan)
    rows, (ca, cb) = draw(rng, 20, n, 1, m)
    np.testing.assert_array_equal(difference_resample_stats(A, B, rows, ca, cb), ref_diff_loop(A, B, rows, ca, cb))


# ----------------------------------------------------------------------------------------------
# Public functions == reference loop over the same seed's indices (several blocks)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several resample blocks so block boundaries are exercised."""
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 7 * 40)


def test_crossed_bootstrap_equals_reference(small_blocks):
    rng = np.random.default_rng(5)
    M = accuracy_matrix(rng, 40, 5, 0.25)
    M[[3, 17]] = np.nan  # training items in every draw
    res = crossed_bootstrap(M, n_resamples=333, seed=11)
    (Mc,) = ref_clean(M)
    stats = ref_all_stats(ref_crossed_loop, 11, 333, [Mc])
    mean, lo, hi, kept = ref_summary(stats)
    assert (res.mean, res.lo, res.hi, res.n_kept) == (mean, lo, hi, kept)
    assert res.error_bar == (abs(lo - mean) + abs(hi - mean)) / 2
    assert res.point == ref_nanmean(M)
    assert (res.n_items, res.n_draws, res.n_resamples) == (38, 5, 333)


def test_sgr_bootstrap_equals_reference(small_blocks):
    rng = np.random.default_rng(6)
    base = rng.uniform(0.2, 0.9, 45)
    A = accuracy_matrix(rng, 45, 1, 0.0, base - 0.15)
    B = accuracy_matrix(rng, 45, 5, 0.2, base)
    C = accuracy_matrix(rng, 45, 5, 0.2, base + 0.1)
    C[:, 2] = np.nan  # an all-NaN draw is dropped
    res = sgr_bootstrap(A, B, C, n_resamples=1000, seed=7)
    Ac, Bc, Cc = ref_clean(A, B, C)
    stats = ref_all_stats(ref_sgr_loop, 7, 1000, [Ac, Bc, Cc])
    mean, lo, hi, kept = ref_summary(stats)
    assert (res.mean, res.lo, res.hi, res.n_kept) == (mean, lo, hi, kept)
    assert res.error_bar == (hi - lo) / 2
    kept = np.array([s for s in stats if np.isfinite(s)])
    assert res.p_value == pytest.approx(ref_percentile_p_value(kept), abs=1e-9)
    assert sgr_bootstrap(A, B, C, n_resamples=1000, seed=7, p_method="centred").p_value == ref_p_value(kept)
    a = ref_nanmean(A)
    assert res.point == (ref_nanmean(B) - a) / (ref_nanmean(C) - a)
    assert res.n_draws == (1, 5, 4)


@pytest.mark.parametrize("m_a", [1, 5])
def test_paired_difference_equals_reference(small_blocks, m_a):
    rng = np.random.default_rng(8)
    A, B = accuracy_matrix(rng, 35, m_a, 0.2), accuracy_matrix(rng, 35, 5, 0.2)
    res = paired_difference(A, B, n_resamples=500, seed=9)
    Ac, Bc = ref_clean(A, B)
    stats = ref_all_stats(ref_diff_loop, 9, 500, [Ac, Bc])
    mean, lo, hi, kept = ref_summary(stats)
    assert (res.mean, res.lo, res.hi, res.n_kept) == (mean, lo, hi, kept)
    assert res.p_value == pytest.approx(ref_percentile_p_value(stats[np.isfinite(stats)]), abs=1e-9)
    assert paired_difference(A, B, 500, seed=9, p_method="centred").p_value == ref_p_value(stats[np.isfinite(stats)])
    assert res.point == ref_nanmean(B - A)


def test_centred_p_value_matches_reference_formula():
    rng = np.random.default_rng(10)
    for shift in (0.0, 0.1, 1.0, -0.5):
        betas = rng.normal(shift, 0.3, 257)
        assert centred_p_value(betas) == ref_p_value(betas) == p_value(betas, "centred")
    assert centred_p_value(np.full(10, 2.0)) == 0.0
    assert centred_p_value(np.zeros(10)) == 1.0  # a null that holds exactly is not rejected
    with pytest.raises(ProbekitError, match="p-value method must be one of percentile, centred"):
        p_value(np.zeros(3), "exact")


def test_percentile_p_value_inverts_the_interval():
    """The default p-value is the smallest alpha at which the percentile interval excludes 0 (a plain
    bisection over alpha with numpy's quantiles), so p < 1 - level exactly when the interval excludes 0."""
    rng = np.random.default_rng(11)
    cases = [rng.normal(shift, 0.3, n) for shift in (0.0, 0.05, 0.3, 0.6, 1.0, -0.4) for n in (2, 7, 200, 1001)]
    cases += [np.array([0.0, 0.0, 1.0, 2.0]), np.array([-1.0, 0.0, 0.0, 0.0, 3.0]), np.full(10, 2.0),
              np.full(10, -1.0), np.zeros(10), np.array([-3.0, 5.0]), rng.integers(-2, 5, 40).astype(float)]
    for stats in cases:
        p = percentile_p_value(stats)
        assert p == pytest.approx(ref_percentile_p_value(stats), abs=1e-9), stats[:5]
        assert p == p_value(stats)
        for level in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
            assert excludes_zero(stats, level) == (percentile_p_value(stats, level) < 1 - level), (stats[:5], level)
    assert percentile_p_value(np.full(10, 2.0)) == 0.0 and percentile_p_value(np.zeros(10)) == 1.0
    assert np.isnan(percentile_p_value(np.array([])))


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=60), st.floats(0.5, 0.999))
@settings(max_examples=300, deadline=None)
def test_interval_and_p_value_never_disagree(values, level):
    stats = np.asarray(values)
    assert excludes_zero(stats, level) == (percentile_p_value(stats, level) < 1 - level)


def test_bh_qvalues_equal_the_definition():
    rng = np.random.default_rng(13)
    for m in (1, 2, 5, 29):
        p = list(rng.uniform(0, 0.2, m))
        if m > 2:
            p[1] = p[0]  # ties
        np.testing.assert_allclose(bh_qvalues(p), ref_bh(p), rtol=0, atol=1e-15)
    # a NaN p-value stays in the family as 1
    np.testing.assert_allclose(bh_qvalues([0.01, np.nan, 0.04]), ref_bh([0.01, 1.0, 0.04]))
    assert bh_qvalues([]).size == 0
    # 3 of 14 survive at 5%: the family size is every test given
    p = [0.001, 0.004, 0.006, 0.02, 0.03, 0.045, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9]
    assert int((bh_qvalues(p) < 0.05).sum()) == 3


def ref_fieller_set(n, d, vnn, vdd, vnd, z, grid):
    """Which values of the grid satisfy Fieller's inequality, point by point."""
    return (n - grid * d) ** 2 <= z * z * (vnn - 2 * grid * vnd + grid * grid * vdd)


@pytest.mark.parametrize("case, kind", [
    ((2.0, 4.0, 0.25, 0.25, 0.05), "bounded"),      # denominator far from 0
    ((1.0, 0.5, 0.04, 0.25, 0.0), "exclusive"),     # denominator within noise, numerator not
    ((0.1, 0.2, 0.25, 0.25, 0.0), "unbounded"),     # neither is away from 0
    ((-1.5, 3.0, 0.3, 0.2, -0.1), "bounded"),
])
def test_fieller_interval_equals_the_closed_form(case, kind):
    z = sps.norm.ppf(0.975)
    n, d, vnn, vdd, vnd = case
    f = fieller_interval(n, d, vnn, vdd, vnd, 0.95)
    assert f.kind == kind
    a, b, c = d * d - z * z * vdd, -2 * (n * d - z * z * vnd), n * n - z * z * vnn
    if kind != "unbounded":
        roots = sorted(np.roots([a, b, c]).real)
        assert (f.lo, f.hi) == pytest.approx(tuple(roots), rel=1e-12)
    grid = np.linspace(-60, 60, 240_001)
    inside = ref_fieller_set(n, d, vnn, vdd, vnd, z, grid)
    if kind == "bounded":
        claimed = (grid >= f.lo) & (grid <= f.hi)
    elif kind == "exclusive":
        claimed = (grid <= f.lo) | (grid >= f.hi)
    else:
        claimed = np.ones_like(grid, bool)
    near = np.isclose(grid, f.lo, atol=1e-3) | np.isclose(grid, f.hi, atol=1e-3)
    assert np.array_equal(inside[~near], claimed[~near])
    assert fieller_interval(np.nan, d, vnn, vdd, vnd).kind == "undefined"
    assert fieller_interval(1.0, np.sqrt(z * z * 0.25), 0.04, 0.25, 0.0).kind in ("below", "above")


# ----------------------------------------------------------------------------------------------
# Known cases


def test_sgr_of_identical_easy_and_hard_is_one():
    rng = np.random.default_rng(12)
    A = accuracy_matrix(rng, 80, 1, 0.0, np.full(80, 0.3))
    one_draw = accuracy_matrix(rng, 80, 1, 0.1, np.full(80, 0.7))
    B = np.repeat(one_draw, 5, axis=1)  # five identical draws: every column resample is the same
    rows, (ca, cb, cc) = draw(rng, 2000, 80, 1, 5, 5)
    s = sgr_resample_stats(A, B, B.copy(), rows, ca, cb, cc)
    finite = np.isfinite(s)
    assert finite.mean() > 0.99
    assert np.all(s[finite] == 1.0)
    res = sgr_bootstrap(A, B, B.copy(), n_resamples=2000, seed=1)
    assert (res.point, res.mean, res.lo, res.hi, res.error_bar) == (1.0, 1.0, 1.0, 1.0, 0.0)


def test_sgr_not_estimable_when_hard_does_not_beat_zero_shot():
    # hard training no better than zero-shot: the denominator's interval spans 0
    rng = np.random.default_rng(40)
    base = rng.uniform(0.3, 0.7, 120)
    A = accuracy_matrix(rng, 120, 1, 0.0, base)
    B = accuracy_matrix(rng, 120, 5, 0.2, base)
    C = accuracy_matrix(rng, 120, 5, 0.2, base)
    res = sgr_bootstrap(A, B, C, n_resamples=2000, seed=3)
    assert res.den_lo < 0 < res.den_hi
    assert res.estimable is False
    assert res.reason == f"hard - zero-shot interval [{100 * res.den_lo:.1f}, {100 * res.den_hi:.1f}] pts includes 0"
    d = res.to_dict()  # the numbers stay, with the flag
    assert d["estimable"] is False and d["reason"] == res.reason
    assert np.isfinite(d["point"]) and np.isfinite(d["lo"]) and np.isfinite(d["hi"])
    # hard training clearly worse than zero-shot: the interval lies below 0
    worse = accuracy_matrix(rng, 120, 5, 0.2, base - 0.25)
    res = sgr_bootstrap(A, B, worse, n_resamples=2000, seed=3)
    assert res.den_hi < 0 and res.estimable is False and res.reason.endswith("pts lies below 0")


def test_sgr_estimable_when_hard_clearly_beats_zero_shot():
    rng = np.random.default_rng(41)
    base = rng.uniform(0.2, 0.5, 120)
    A = accuracy_matrix(rng, 120, 1, 0.0, base)
    B = accuracy_matrix(rng, 120, 5, 0.2, base + 0.2)
    C = accuracy_matrix(rng, 120, 5, 0.2, base + 0.4)
    res = sgr_bootstrap(A, B, C, n_resamples=2000, seed=3)
    assert res.den_lo > 0.2 and res.estimable is True and res.reason is None
    assert res.den_point == pytest.approx(np.nanmean(C) - np.nanmean(A))
    assert res.den_lo <= res.den_point <= res.den_hi


def test_sgr_denominator_interval_comes_from_the_same_resamples():
    rng = np.random.default_rng(42)
    A = accuracy_matrix(rng, 30, 1, 0.0)
    B, C = accuracy_matrix(rng, 30, 5, 0.2), accuracy_matrix(rng, 30, 5, 0.2)
    res = sgr_bootstrap(A, B, C, n_resamples=500, seed=5)
    Ac, Bc, Cc = ref_clean(A, B, C)
    blocks = [sgr_resample_parts(Ac, Bc, Cc, rows, *cols)
              for rows, cols in resample_indices(5, 500, Ac.shape[0], [1, Bc.shape[1], Cc.shape[1]])]
    num = np.concatenate([b[0] for b in blocks])
    den = np.concatenate([b[1] for b in blocks])
    ratio = num / den
    lo, hi = np.quantile(ratio[np.isfinite(ratio)], [0.025, 0.975])
    assert (res.lo, res.hi) == pytest.approx((lo, hi), rel=1e-12)
    dlo, dhi = np.quantile(den[np.isfinite(den)], [0.025, 0.975])
    assert (res.den_lo, res.den_hi) == pytest.approx((dlo, dhi), rel=1e-12)
    assert res.estimable == (dlo > 0)


def test_sgr_estimable_rule_on_intervals():
    assert sgr_estimable(0.01, 0.2) == (True, None)
    assert sgr_estimable(0.0, 0.2) == (False, "hard - zero-shot interval [0.0, 20.0] pts includes 0")
    assert sgr_estimable(-0.3, -0.1) == (False, "hard - zero-shot interval [-30.0, -10.0] pts lies below 0")
    assert sgr_estimable(float("nan"), float("nan"))[0] is False


def test_identical_conditions_have_zero_difference():
    rng = np.random.default_rng(13)
    M = np.repeat(accuracy_matrix(rng, 50, 1, 0.2), 5, axis=1)  # draws agree, so B* == A* always
    res = paired_difference(M, M.copy(), n_resamples=500, seed=0)
    assert (res.point, res.mean, res.lo, res.hi) == (0.0, 0.0, 0.0, 0.0)


def test_intervals_contain_point_estimates():
    rng = np.random.default_rng(14)
    for k in range(5):
        base = rng.uniform(0.2, 0.8, 300)
        A = accuracy_matrix(rng, 300, 1, 0.0, base - 0.2)
        B = accuracy_matrix(rng, 300, 5, 0.2, base)
        C = accuracy_matrix(rng, 300, 5, 0.2, base + 0.1)
        for res in (
            crossed_bootstrap(B, 500, seed=k),
            paired_difference(B, C, 500, seed=k),
            sgr_bootstrap(A, B, C, 2000, seed=k),
        ):
            assert res.lo <= res.point <= res.hi
            assert res.lo <= res.mean <= res.hi


def test_clear_effects_have_small_p_values():
    rng = np.random.default_rng(15)
    base = rng.uniform(0.2, 0.6, 400)
    A = accuracy_matrix(rng, 400, 1, 0.0, base)
    B = accuracy_matrix(rng, 400, 5, 0.1, base + 0.3)
    assert paired_difference(A, B, 2000, seed=0).p_value < 0.01


def null_p_values(n_cols: int, n_sets: int = 200) -> np.ndarray:
    """p-values of the paired difference over simulated datasets where A and B are identical in law."""
    rng = np.random.default_rng(16)
    out = []
    for k in range(n_sets):
        p = rng.beta(2, 2, 120)
        A = accuracy_matrix(rng, 120, n_cols, 0.0, p)
        B = accuracy_matrix(rng, 120, n_cols, 0.0, p)
        out.append(paired_difference(A, B, n_resamples=400, seed=k).p_value)
    return np.array(out)


def test_null_p_values_are_roughly_uniform():
    ps = null_p_values(n_cols=1)
    se = np.sqrt(0.05 * 0.95 / len(ps))
    assert abs(np.mean(ps < 0.05) - 0.05) < 4 * se
    assert sps.kstest(ps, "uniform").pvalue > 1e-3


def test_crossed_null_p_values_are_not_anticonservative():
    # resampling draws on top of items counts cell noise twice, so the test is conservative
    ps = null_p_values(n_cols=5)
    se = np.sqrt(0.05 * 0.95 / len(ps))
    assert np.mean(ps < 0.05) <= 0.05 + 2 * se


# ----------------------------------------------------------------------------------------------
# NaN handling, reproducibility, bad input


def test_training_items_are_excluded():
    rng = np.random.default_rng(17)
    M = accuracy_matrix(rng, 30, 5, 0.2)
    padded = np.vstack([M, np.full((4, 5), np.nan)])  # items that were training items in every draw
    a = crossed_bootstrap(M, 300, seed=2)
    b = crossed_bootstrap(padded, 300, seed=2)
    assert a == b and b.n_items == 30
    # a cell that is NaN (a training item in that draw) does not count as wrong
    M2 = np.array([[1.0, np.nan], [1.0, 1.0], [0.0, np.nan]])
    assert crossed_bootstrap(M2, 50).point == 0.75


def test_sgr_drops_rows_nan_everywhere_and_empty_draws():
    rng = np.random.default_rng(18)
    A = accuracy_matrix(rng, 40, 1, 0.0)
    B, C = accuracy_matrix(rng, 40, 5, 0.2), accuracy_matrix(rng, 40, 5, 0.2)
    A[:3], B[:3], C[:3] = np.nan, np.nan, np.nan
    B[:, 4] = np.nan
    res = sgr_bootstrap(A, B, C, 500, seed=0)
    assert res.n_items == 37 and res.n_draws == (1, 4, 5)
    ref = sgr_bootstrap(A[3:], B[3:, :4], C[3:], 500, seed=0)
    assert res == ref


def test_reproducible_from_seed():
    rng = np.random.default_rng(19)
    M = accuracy_matrix(rng, 50, 5, 0.2)
    assert crossed_bootstrap(M, 200, seed=4) == crossed_bootstrap(M, 200, seed=4)
    assert crossed_bootstrap(M, 200, seed=4) != crossed_bootstrap(M, 200, seed=5)


def test_bad_input_raises_one_line():
    good = np.ones((5, 2))
    cases = [
        lambda: crossed_bootstrap(np.ones((2, 2, 2))),
        lambda: crossed_bootstrap(np.full((3, 2), np.nan)),
        lambda: crossed_bootstrap(good, n_resamples=0),
        lambda: crossed_bootstrap(good, level=1.5),
        lambda: crossed_bootstrap([["a", "b"]]),
        lambda: paired_difference(np.ones((4, 1)), good),
        lambda: paired_difference(np.ones((5, 3)), good),
        lambda: sgr_bootstrap(np.ones((5, 1)), good, np.full((5, 2), np.nan)),
    ]
    for case in cases:
        with pytest.raises(ProbekitError) as exc:
            case()
        assert "\n" not in str(exc.value)
