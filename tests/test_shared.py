"""Shared resamples (probekit.stats.shared) against plain per-resample loops over the same drawn indices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_stats import (
    accuracy_matrix,
    ref_crossed_loop,
    ref_diff_loop,
    ref_nanmean,
    ref_percentile_p_value,
    ref_sgr_loop,
    ref_summary,
)

from probekit.errors import ProbekitError
from probekit.stats import bootstrap, shared
from probekit.stats.shared import SharedBootstrap

N = 40
IDS = [f"i{i:03d}" for i in range(N)]


def frame(M: np.ndarray, ids=IDS, draws=None) -> pd.DataFrame:
    return pd.DataFrame(M, index=list(ids), columns=list(range(M.shape[1])) if draws is None else draws)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many resample blocks so block boundaries and statistics that stop mid-block are exercised."""
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 7 * N)


def conditions():
    """Zero-shot A (one draw, no NaN), easy B (no NaN), hard C (training items NaN, an item NaN in every draw),
    a condition D missing some items altogether, and a condition E with an all-NaN draw."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.9, N)
    A = accuracy_matrix(rng, N, 1, 0.0, base - 0.15)
    B = accuracy_matrix(rng, N, 5, 0.0, base)
    C = accuracy_matrix(rng, N, 5, 0.25, base + 0.1)
    C[7] = np.nan
    D = accuracy_matrix(rng, N - 6, 5, 0.2, base[6:])
    E = accuracy_matrix(rng, N, 6, 0.3, base)
    E[:, 2] = np.nan
    return A, B, C, D, E


def register(boot: SharedBootstrap) -> dict:
    A, B, C, D, E = conditions()
    fa, fb, fc, fe = frame(A), frame(B), frame(C), frame(E)
    fd = frame(D, IDS[6:])
    return {
        "acc_a": boot.accuracy(fa, "a"),
        "acc_c": boot.accuracy(fc, "c"),  # item 7 is NaN in every draw: its own item set
        "acc_e": boot.accuracy(fe, "e"),
        "acc_d": boot.accuracy(fd, "d"),
        "diff_ab": boot.difference(fa, fb, ("a", "b")),
        "diff_bc": boot.difference(fb, fc, ("b", "c")),
        "diff_ce": boot.difference(fc, fe, ("c", "e")),
        "diff_ad": boot.difference(fa, fd, ("a", "d")),
        "sgr": boot.sgr(fa, fb, fc, ("a", "b", "c"), n_resamples=333),
    }


def loop_values(boot: SharedBootstrap, h: int, rows, cols) -> np.ndarray:
    s = boot.statistics[h]
    g = boot.groups[s.group]
    mats = [g.conditions[k].M for k in s.conditions]
    cs = [cols[k] for k in s.conditions]
    if s.kind == "accuracy":
        return ref_crossed_loop(mats[0], rows, cs[0])
    if s.kind == "difference":
        return ref_diff_loop(*mats, rows, *cs)
    return ref_sgr_loop(*mats, rows, *cs)


def replay(boot: SharedBootstrap) -> dict[int, np.ndarray]:
    """Every statistic's per-resample values from a plain loop over the engine's own drawn indices."""
    out: dict[int, list] = {}
    for items, start, rows, cols in boot.draws():
        for h, s in enumerate(boot.statistics):
            if s.group != items or s.n_resamples <= start:
                continue
            b = min(len(rows), s.n_resamples - start)
            out.setdefault(h, []).append(loop_values(boot, h, rows[:b], {k: c[:b] for k, c in cols.items()}))
    return {h: np.concatenate(v) for h, v in out.items()}


@pytest.mark.parametrize("kind", ["acc_a", "acc_c", "acc_e", "acc_d", "diff_ab", "diff_bc", "diff_ce", "diff_ad", "sgr"])
def test_block_values_equal_loop_exactly(small_blocks, kind):
    boot = SharedBootstrap(n_resamples=120, seed=5)
    h = register(boot)[kind]
    seen = 0
    for items, start, rows, cols in boot.draws():
        values = boot.resample_values(items, rows, cols, start)
        if h not in values:
            continue
        v = values[h]
        ref = loop_values(boot, h, rows[:len(v)], {k: c[:len(v)] for k, c in cols.items()})
        if boot.statistics[h].kind == "sgr":
            with np.errstate(invalid="ignore", divide="ignore"):
                v = v[:, 0] / v[:, 1]
        np.testing.assert_array_equal(v, ref)  # bit for bit, NaN where a resample drew only NaN cells
        seen += len(v)
    assert seen == boot.statistics[h].n_resamples


def test_random_indices_equal_loop_exactly():
    # any indices, not only the engine's: arbitrary rows and draws for one block
    boot = SharedBootstrap(n_resamples=50, seed=1)
    handles = register(boot)
    rng = np.random.default_rng(9)
    for items, g in boot.groups.items():
        rows = rng.integers(0, g.n, size=(200, g.n))
        cols = {k: rng.integers(0, c.m, size=(200, c.m)) for k, c in g.conditions.items()}
        values = boot.resample_values(items, rows, cols, 0)
        for h, v in values.items():
            assert h in handles.values()
            b = len(v)  # each statistic stops at its own count (50; the SGR 333)
            ref = loop_values(boot, h, rows[:b], {k: c[:b] for k, c in cols.items()})
            if boot.statistics[h].kind == "sgr":
                with np.errstate(invalid="ignore", divide="ignore"):
                    v = v[:, 0] / v[:, 1]
            np.testing.assert_array_equal(v, ref)


def test_row_by_row_counts_equal_loop_exactly(small_blocks, monkeypatch):
    # the per-resample counting that long rows (thousands of items) use, on these short ones
    monkeypatch.setattr(shared, "ROW_COUNTS_FROM", 1)
    boot = SharedBootstrap(n_resamples=120, seed=5)
    register(boot)
    rows_seen = 0
    for items, start, rows, cols in boot.draws():
        np.testing.assert_array_equal(shared._row_counts(rows, len(items), np.float32),
                                      bootstrap._counts(rows, len(items), np.float32))
        rows_seen += len(rows)
        for h, v in boot.resample_values(items, rows, cols, start).items():
            ref = loop_values(boot, h, rows[:len(v)], {k: c[:len(v)] for k, c in cols.items()})
            if boot.statistics[h].kind == "sgr":
                with np.errstate(invalid="ignore", divide="ignore"):
                    v = v[:, 0] / v[:, 1]
            np.testing.assert_array_equal(v, ref)
    assert rows_seen > 0


def test_results_equal_reference_summaries(small_blocks):
    boot = SharedBootstrap(n_resamples=150, seed=2)
    handles = register(boot)
    results = boot.run()
    loops = replay(boot)
    A, B, C, D, E = conditions()
    for name, h in handles.items():
        res, stats = results[h], loops[h]
        mean, lo, hi, kept = ref_summary(stats)
        assert (res.mean, res.lo, res.hi, res.n_kept) == (mean, lo, hi, kept), name
        if name.startswith(("diff", "sgr")):
            kept = stats[np.isfinite(stats)]
            assert res.p_value == pytest.approx(ref_percentile_p_value(kept), abs=1e-9), name
    assert results[handles["acc_c"]].point == ref_nanmean(C)
    assert results[handles["acc_c"]].n_items == N - 1  # the item NaN in every draw is dropped
    assert results[handles["acc_e"]].n_draws == 5  # the all-NaN draw is dropped
    assert results[handles["diff_bc"]].n_items == N and results[handles["diff_bc"]].point == ref_nanmean(C - B)
    a = ref_nanmean(A)
    assert results[handles["sgr"]].point == (ref_nanmean(B) - a) / (ref_nanmean(C) - a)
    assert results[handles["sgr"]].n_resamples == 333


def test_statistics_over_the_same_items_share_item_resamples():
    boot = SharedBootstrap(n_resamples=200, seed=4)
    h = register(boot)
    A, B, C, _, _ = conditions()
    # the SGR's numerator is the easy - zero-shot difference of the same resamples
    values = {}
    for items, start, rows, cols in boot.draws():
        for k, v in boot.resample_values(items, rows, cols, start).items():
            values.setdefault(k, []).append(v)
    num = np.concatenate(values[h["sgr"]])[:200, 0]
    np.testing.assert_array_equal(num, np.concatenate(values[h["diff_ab"]]))
    s = boot.statistics
    assert s[h["diff_ab"]].group == s[h["diff_bc"]].group == s[h["sgr"]].group  # the N items
    assert s[h["acc_c"]].group != s[h["diff_bc"]].group  # item 7 is dropped from C's own accuracy
    assert len(s[h["acc_d"]].group) == N - 6 and s[h["diff_ad"]].group == s[h["diff_ab"]].group


def test_same_seed_same_numbers_whatever_else_is_computed(monkeypatch):
    A, B, C, _, _ = conditions()
    alone = SharedBootstrap(300, seed=8)
    h = alone.difference(frame(A), frame(C), ("a", "c"))
    first = alone.run()[h]
    crowded = SharedBootstrap(300, seed=8)
    crowded.accuracy(frame(B), "b")
    crowded.sgr(frame(A), frame(B), frame(C), ("a", "b", "c"), n_resamples=1000)
    h2 = crowded.difference(frame(A), frame(C), ("a", "c"))
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 3 * N)  # other block sizes: the same draws
    assert crowded.run()[h2] == first
    other = SharedBootstrap(300, seed=9)
    h3 = other.difference(frame(A), frame(C), ("a", "c"))
    assert other.run()[h3] != first


def test_groups_in_threads_give_the_numbers_of_one_thread(small_blocks, monkeypatch):
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(shared, "THREADS", threads)
        boot = SharedBootstrap(150, seed=6)
        handles = register(boot)
        assert len(boot.groups) >= 3  # several groups run at once
        results[threads] = [r.to_dict() for r in boot.run()]
        assert [results[threads][h]["n_resamples"] for h in handles.values()] == [150] * 8 + [333]
    assert results[1] == results[3]


def test_float_cells_use_float64_and_match_loop_to_rounding():
    rng = np.random.default_rng(3)
    A, B = rng.random((N, 1)), rng.random((N, 5))
    B[rng.random(B.shape) < 0.2] = np.nan
    boot = SharedBootstrap(100, seed=0)
    h = boot.difference(frame(A), frame(B), ("a", "b"))
    (items, g), = boot.groups.items()
    assert g.features((h,), boot.statistics)[1].dtype == np.float64
    for items, start, rows, cols in boot.draws():
        v = boot.resample_values(items, rows, cols, start)[h]
        np.testing.assert_allclose(v, loop_values(boot, h, rows, cols), rtol=1e-12)


def test_bad_input_raises_one_line():
    A, B, C, _, _ = conditions()
    boot = SharedBootstrap(10)
    boot.accuracy(frame(C), "c")
    with pytest.raises(ProbekitError, match="condition c was given twice with different cells"):
        boot.accuracy(frame(1 - C), "c")
    with pytest.raises(ProbekitError, match="a baseline needs one draw"):
        boot.difference(frame(C[:, :3]), frame(B), ("c3", "b"))
    assert len(boot.run()) == 1  # a refused statistic leaves nothing to compute
    with pytest.raises(ProbekitError, match="no observed cell"):
        boot.accuracy(frame(np.full((N, 2), np.nan)), "empty")
    with pytest.raises(ProbekitError, match="infinite"):
        boot.accuracy(frame(np.full((N, 2), np.inf)), "inf")
    with pytest.raises(ProbekitError, match="n_resamples"):
        SharedBootstrap(0)
