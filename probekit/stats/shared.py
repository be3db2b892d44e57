"""Shared resamples: every statistic over the same test items uses the same item resamples, and every
condition's resampled sums come from matrix products (docs/protocol.md §6.1).

:class:`SharedBootstrap` collects statistics (accuracies, paired differences, SGRs) over labelled
item x draw frames, then computes them all in :meth:`SharedBootstrap.run`. Statistics whose rows (the
items observed in any of their matrices) are the same item set form a **group**; a group draws its
row resamples once, as a (resamples x items) count matrix ``W`` (how often each item is drawn), in
blocks of resamples (a block holds about ``bootstrap.BLOCK_ELEMENTS`` counts and products, never
resamples x items x draws; the block size does not change the numbers: each generator's stream
continues across blocks). Each **condition** (one named item x draw matrix, e.g. the hard-trained heads of one
layer) draws its own column (training-draw) resamples, shared by every statistic of the group that
uses it. Per resample, a statistic is then the nanmean of its resampled (difference) matrix, exactly
as :mod:`probekit.stats.bootstrap` defines it: what changes is only that conditions and statistics
over the same items see the same item resamples.

A block's sums come from one GEMM per group, ``W @ F``: with ``X0`` a condition's matrix with NaN set
to 0 and ``K`` its mask of observed cells, ``F`` holds every condition's ``X0`` columns, its ``K``
columns (none when it has no NaN: every count is then the n items, as each row of ``W`` sums to n),
and for a pair (A, B) of a difference or an SGR the per-(draw, draw) products ``B0 * K_a``,
``A0 * K_b`` and ``K_a * K_b`` (only those a NaN makes different from existing columns: easy-trained
heads tested on hard items have no NaN, so a zero-shot vs easy pair costs nothing). The column (pair)
counts then weight these sums as in :func:`probekit.stats.bootstrap.difference_resample_stats`; rather
than counting them, each resample adds up the sums of its m resampled draws (slots) directly
(:func:`_slot_sums`: the same integer totals).
Cells that are 0/1 make every product an integer no larger than n in magnitude and every weighted
total and count one no larger than n x m (m draws), so products and sums run in float32 when
n x m < 2**24 (exact: every partial sum is such an integer, below 2**24, in any summation order;
measured 1.5x the float64 GEMM rate on 2 cores) and in float64 otherwise or for cells that are not
0/1. The final division is float64, as in the plain nanmean, so every statistic equals the plain
per-resample nanmean bit for bit (for 0/1 cells).

Groups are independent, so :meth:`SharedBootstrap.run` computes up to :data:`THREADS` of them at once
(numpy's draws, counts and products release the GIL); the numbers do not depend on it.

Randomness: a group's row resamples come from ``default_rng(SeedSequence([seed, hash(item ids)]))``,
a condition's column resamples from ``SeedSequence([seed, hash(item ids), hash(condition key)])``;
so the same seed gives the same numbers, and the same items and condition get the same resamples in
any report, whatever else it computes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.stats import bootstrap as _bs
from probekit.stats.bootstrap import (
    BootstrapTest,
    CrossedBootstrap,
    SgrTest,
    _check_baseline,
    _check_settings,
    _counts,
    crossed_result,
    difference_result,
    sgr_result,
)

#: A group's products and sums run in float32 when items x draws is below this (exact for 0/1 cells:
#: every sum is an integer no larger than that, see the module doc).
FLOAT32_EXACT = 2**24
#: Count matrices of at least this many items are counted one resample (row) at a time (:func:`_row_counts`).
ROW_COUNTS_FROM = 256
#: Groups computed at once (:meth:`SharedBootstrap.run`): one more than the CPUs, so that the last
#: groups share the cores rather than one of them finishing alone (on 2 cores, 3 threads took 0.84-0.94x
#: the wall time of 2 for a full-ARC report's groups). Each holds one block in memory.
THREADS = min(8, (os.cpu_count() or 1) + 1)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "little")


@dataclass
class Condition:
    """One item x draw matrix restricted to a group's items, with its all-NaN draws dropped."""

    key: tuple  # (name, kept draw labels as text)
    M: np.ndarray  # (n, m) float64 with NaN
    n_resamples: int = 0  # the most resamples any statistic over it needs

    @property
    def m(self) -> int:
        return self.M.shape[1]


@dataclass
class Statistic:
    """A registered statistic: kind "accuracy" (one condition), "difference" (A, B) or "sgr" (A, B, C)."""

    kind: str
    group: tuple
    conditions: tuple  # condition keys, in the order A, B(, C)
    n_resamples: int


class _Group:
    def __init__(self, items: tuple, seed: int):
        self.items = items
        self.n = len(items)
        self.h = _digest("\0".join(map(str, items)))
        self.seed = seed
        self.conditions: dict[tuple, Condition] = {}
        self.n_resamples = 0
        self.handles: list[int] = []  # the statistics over these items, in registration order
        self._features: dict = {}
        self._index: dict = {}

    def index(self, dtype) -> pd.Index:
        """The group's items as an index of ``dtype`` (comparing indexes of one dtype is fast), or of
        objects when ``dtype`` does not hold them as they are."""
        if dtype not in self._index:
            try:
                index = pd.Index(self.items, dtype=dtype)
            except (TypeError, ValueError):
                index = None
            if index is None or tuple(index.tolist()) != self.items:
                index = pd.Index(self.items, dtype=object)
            self._index[dtype] = index
        return self._index[dtype]

    def condition(self, frame: pd.DataFrame, values: np.ndarray, name: str, n_resamples: int) -> Condition:
        """The condition of ``frame`` (its cells ``values``) on the group's items."""
        if len(frame.index) == self.n and frame.index.equals(self.index(frame.index.dtype)):
            M = values  # the usual case: the frame is on the group's items already
        else:
            M = frame.reindex(self.index(object)).to_numpy(dtype=np.float64)
        keep = ~np.isnan(M).all(axis=0)
        key = (name, tuple(str(c) for c, k in zip(frame.columns, keep) if k))  # str: 0 and np.int64(0) alike
        M = M[:, keep]
        if M.size == 0:
            raise ProbekitError(f"condition {name}: no observed cell on the shared items")
        c = self.conditions.get(key)
        if c is None:
            c = self.conditions[key] = Condition(key, M)
        elif not np.array_equal(c.M, M, equal_nan=True):
            raise ProbekitError(f"condition {name} was given twice with different cells")
        c.n_resamples = max(c.n_resamples, n_resamples)
        self.n_resamples = max(self.n_resamples, n_resamples)
        return c

    def features(self, active: tuple | None, stats: list) -> tuple[dict, np.ndarray]:
        """The (items x features) matrix whose product with ``W`` gives every sum that ``stats`` need,
        and where each sum is: ``("x", key)`` the columns of ``X0`` (NaN as 0) and ``("k", key)`` of the
        mask ``K`` (None when a condition has no NaN: its count is the n items), and for a pair (A, B)
        the (B draw, A draw) products ``("pb", A, B)`` = ``B0 * K_a``, ``("pa", A, B)`` = ``A0 * K_b``
        and ``("pk", A, B)`` = ``K_a * K_b`` (an existing column where one side has no NaN). Cached per
        set of ``active`` statistics."""
        if active is not None and active in self._features:
            return self._features[active]
        blocks: list[np.ndarray] = []
        layout: dict = {}
        width = 0

        def add(block: np.ndarray) -> slice:
            nonlocal width
            blocks.append(block)
            width += block.shape[1]
            return np.arange(width - block.shape[1], width)

        x0, k = {}, {}
        for key in dict.fromkeys(key for st in stats for key in st.conditions):
            M = self.conditions[key].M
            nan = np.isnan(M)
            x0[key], k[key] = np.where(nan, 0.0, M), (None if not nan.any() else (~nan).astype(np.float64))
            layout[("x", key)] = add(x0[key])
            layout[("k", key)] = None if k[key] is None else add(k[key])
        for st in stats:
            for a, b in [(st.conditions[0], other) for other in st.conditions[1:]]:
                if ("pb", a, b) in layout:
                    continue
                ma, mb = x0[a].shape[1], x0[b].shape[1]
                xa, xb = layout[("x", a)], layout[("x", b)]
                ka, kb = k[a], k[b]
                # (B draw j, A draw i) -> column j * m_a + i, the order of the slot counts
                layout[("pb", a, b)] = (np.repeat(xb, ma) if ka is None else
                                        add((x0[b][:, :, None] * ka[:, None, :]).reshape(self.n, -1)))
                layout[("pa", a, b)] = (np.tile(xa, mb) if kb is None else
                                        add((kb[:, :, None] * x0[a][:, None, :]).reshape(self.n, -1)))
                if ka is None and kb is None:
                    layout[("pk", a, b)] = None
                elif ka is None:
                    layout[("pk", a, b)] = np.repeat(layout[("k", b)], ma)
                elif kb is None:
                    layout[("pk", a, b)] = np.tile(layout[("k", a)], mb)
                else:
                    layout[("pk", a, b)] = add((kb[:, :, None] * ka[:, None, :]).reshape(self.n, -1))
        unit = all(_unit(x) for x in x0.values())
        m = max(x.shape[1] for x in x0.values())
        dtype = np.float32 if unit and self.n * m < FLOAT32_EXACT else np.float64
        F = np.concatenate(blocks, axis=1).astype(dtype)
        if active is not None:
            self._features = {active: (layout, F)}  # the active set changes only at a statistic's last block
        return layout, F

    def rng_rows(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.h]))

    def rng_cols(self, key: tuple) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.h, _digest(repr(key))]))


class SharedBootstrap:
    """Accuracies, paired differences and SGRs that share their item resamples (module doc).

    Register statistics with :meth:`accuracy`, :meth:`difference` and :meth:`sgr` (each returns a
    handle), then :meth:`run` computes them all and returns the results by handle: the same result
    types as :func:`~probekit.stats.crossed_bootstrap`, :func:`~probekit.stats.paired_difference`
    and :func:`~probekit.stats.sgr_bootstrap`, with the same point estimates, interval rules and
    cleaning (rows NaN in all of a statistic's matrices and then all-NaN draws are dropped).

    A matrix is a frame with one row per test item (the index: item ids) and one column per training
    draw. ``name`` names the condition it holds: frames given under the same name (and draws) within
    one item set must hold the same cells, and share their column resamples. ``p_method``: how the
    p-values of differences and SGRs are computed (:func:`probekit.stats.bootstrap.p_value`).
    """

    def __init__(self, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95, p_method: str = "percentile"):
        _check_settings(n_resamples, level, p_method)
        self.p_method = p_method
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
        self.n_resamples, self.seed, self.level = int(n_resamples), int(seed), level
        self.groups: dict[tuple, _Group] = {}
        self.statistics: list[Statistic] = []

    # -- registration ---------------------------------------------------------------------------

    def _register(self, kind: str, frames: Sequence[pd.DataFrame], names: Sequence[str],
                  n_resamples: int | None) -> int:
        n_resamples = self.n_resamples if n_resamples is None else n_resamples
        _check_settings(n_resamples, self.level)
        index, cells = None, []
        for frame, name in zip(frames, names):
            if not isinstance(frame, pd.DataFrame):
                raise ProbekitError(f"condition {name}: expected an item x draw frame, got {type(frame).__name__}")
            values = frame.to_numpy(dtype=np.float64)
            if np.isinf(values).any():
                raise ProbekitError(f"condition {name} holds infinite values; use NaN for missing cells")
            cells.append(values)
            seen = ~np.isnan(values).all(axis=1)
            observed = frame.index if seen.all() else frame.index[seen]
            if index is None:
                index = observed
            elif not (observed is index or (len(observed) == len(index) and observed.equals(index))):
                index = index.union(observed)
        listed = index.tolist()  # one conversion, not an iteration over the index
        items = tuple(listed) if index.is_unique and index.is_monotonic_increasing else tuple(sorted(listed))
        if not items:
            raise ProbekitError(f"{' / '.join(names)}: no observed cell")
        group = self.groups.get(items)
        if group is None:
            group = self.groups[items] = _Group(items, self.seed)
        conds = [group.condition(f, v, n, n_resamples) for f, v, n in zip(frames, cells, names)]
        for other in conds[1:]:
            _check_baseline(conds[0].M, other.M, f"{names[0]} vs {other.key[0]}")
        self.statistics.append(Statistic(kind, group.items, tuple(c.key for c in conds), int(n_resamples)))
        group.handles.append(len(self.statistics) - 1)
        return len(self.statistics) - 1

    def accuracy(self, M: pd.DataFrame, name: str, n_resamples: int | None = None) -> int:
        """Accuracy of one condition with a crossed bootstrap interval (``crossed_bootstrap``)."""
        return self._register("accuracy", [M], [name], n_resamples)

    def difference(self, A: pd.DataFrame, B: pd.DataFrame, names: tuple[str, str],
                   n_resamples: int | None = None) -> int:
        """``mean(B - A)`` over the items of either, with interval and p-value (``paired_difference``)."""
        return self._register("difference", [A, B], names, n_resamples)

    def sgr(self, A: pd.DataFrame, B: pd.DataFrame, C: pd.DataFrame, names: tuple[str, str, str],
            n_resamples: int | None = None) -> int:
        """``(B - A) / (C - A)`` with interval, p-value and whether it is estimable (``sgr_bootstrap``)."""
        return self._register("sgr", [A, B, C], names, n_resamples)

    # -- drawing --------------------------------------------------------------------------------

    def draws(self) -> Iterator[tuple[tuple, int, np.ndarray, dict[tuple, np.ndarray]]]:
        """Yield ``(group items, start, rows, cols)`` blocks: ``rows`` (b, n) item indices of resamples
        ``start .. start + b`` and ``cols[key]`` (b_c, m) draw indices of each condition that needs
        resamples there (b_c <= b: a condition stops at the most resamples its statistics use)."""
        for items in self.groups:
            yield from self._group_draws(items)

    def _group_draws(self, items: tuple) -> Iterator[tuple[tuple, int, np.ndarray, dict[tuple, np.ndarray]]]:
        """The blocks of :meth:`draws` of one group (its own generators: groups are independent)."""
        g = self.groups[items]
        handles = tuple(g.handles)
        if not handles:  # only conditions of a statistic that was refused
            return
        rng = g.rng_rows()
        col_rngs = {key: g.rng_cols(key) for key in g.conditions}
        width = g.features(handles, [self.statistics[h] for h in handles])[1].shape[1]
        size = max(1, _bs.BLOCK_ELEMENTS // max(g.n, width // 2))
        for start in range(0, g.n_resamples, size):
            b = min(size, g.n_resamples - start)
            rows = rng.integers(0, g.n, size=(b, g.n), dtype=np.int32)
            cols = {}
            for key, c in g.conditions.items():
                if c.n_resamples > start:
                    bc = min(b, c.n_resamples - start)
                    cols[key] = col_rngs[key].integers(0, c.m, size=(bc, c.m), dtype=np.int32)
            yield items, start, rows, cols

    # -- computing ------------------------------------------------------------------------------

    def resample_values(self, items: tuple, rows: np.ndarray, cols: dict[tuple, np.ndarray],
                        start: int = 0) -> dict[int, np.ndarray]:
        """Per-resample values of the group's statistics for the given indices (resamples ``start ..``):
        handle -> (b_s,) nanmeans for an accuracy or a difference, (b_s, 2) numerator and denominator
        for an SGR, where b_s is the number of those resamples below the statistic's count."""
        g = self.groups[items]
        active = [(h, self.statistics[h]) for h in g.handles if self.statistics[h].n_resamples > start]
        layout, F = g.features(tuple(h for h, _ in active), [s for _, s in active])
        W = _row_counts(rows, g.n, F.dtype)
        G = W @ F  # exact integers (module doc)
        out = {}
        for h, s in active:
            b = min(rows.shape[0], s.n_resamples - start)
            if s.kind == "accuracy":
                (key,) = s.conditions
                c, kcol = cols[key][:b], layout.get(("k", key))
                count = np.full(b, g.n * c.shape[1], G.dtype) if kcol is None else _slot_sums(G, kcol, c)
                out[h] = _ratio(_slot_sums(G, layout[("x", key)], c), count)
            elif s.kind == "difference":
                out[h] = _pair_means(g, layout, G, cols, *s.conditions, b)
            else:
                a, bb, c = s.conditions
                out[h] = np.stack([_pair_means(g, layout, G, cols, a, bb, b),
                                   _pair_means(g, layout, G, cols, a, c, b)], axis=1)
        return out

    def run(self, progress: Callable[[str], None] | None = None) -> list:
        """Compute every registered statistic; results in registration order (handles index them).

        Groups are independent (their own generators, their own statistics), so up to
        :data:`THREADS` of them run at once, the largest first: numpy's draws, counts and products
        release the GIL. The numbers do not depend on the order or the threads."""
        values: list[list[np.ndarray]] = [[] for _ in self.statistics]
        order = sorted(self.groups, key=lambda items: -self.groups[items].n * self.groups[items].n_resamples)
        workers = max(1, min(THREADS, len(order)))
        with ThreadPoolExecutor(workers) as pool:
            for items, got in zip(order, pool.map(self._run_group, order)):
                for h, v in got.items():
                    values[h] = v
                if progress:
                    progress(f"{self.groups[items].n_resamples:,} resamples over {len(items)} items")
        return [self._result(s, np.concatenate(v)) for s, v in zip(self.statistics, values)]

    def _run_group(self, items: tuple) -> dict[int, list[np.ndarray]]:
        """Per-resample values of one group's statistics, by handle, in blocks."""
        values: dict[int, list[np.ndarray]] = {}
        for _, start, rows, cols in self._group_draws(items):
            for h, v in self.resample_values(items, rows, cols, start).items():
                values.setdefault(h, []).append(v)
        return values

    def _result(self, s: Statistic, v: np.ndarray) -> CrossedBootstrap | BootstrapTest | SgrTest:
        g = self.groups[s.group]
        mats = [g.conditions[k].M for k in s.conditions]
        if s.kind == "accuracy":
            return crossed_result(mats[0], v, self.level, s.n_resamples)
        if s.kind == "difference":
            return difference_result(*mats, v, self.level, s.n_resamples, self.p_method)
        return sgr_result(*mats, v[:, 0], v[:, 1], self.level, s.n_resamples, self.p_method)


def _row_counts(idx: np.ndarray, n: int, dtype) -> np.ndarray:
    """The counts of :func:`probekit.stats.bootstrap._counts` (how often each value in [0, n) occurs in
    each row of ``idx``), one bincount per row when rows are long: a row's n counts stay in cache,
    measured 3.5x faster than one bincount over offset indices for 3521 items x 1136 resamples."""
    if n < ROW_COUNTS_FROM:
        return _counts(idx, n, dtype)
    out = np.empty((idx.shape[0], n), dtype)
    for i, row in enumerate(idx):
        out[i] = np.bincount(row, minlength=n)
    return out


def _unit(M: np.ndarray) -> bool:
    """Whether every observed cell is 0 or 1 (then a group's sums are small integers)."""
    x = M[~np.isnan(M)]
    return bool(((x == 0) | (x == 1)).all())


def _pair_means(g: _Group, layout: dict, G: np.ndarray, cols: dict, a: tuple, bk: tuple, b: int) -> np.ndarray:
    """nanmean of ``B* - A*`` per resample (A recycled when it has one draw) from the products."""
    ma = g.conditions[a].m
    pb, pa, pk = (layout[(kind, a, bk)] for kind in ("pb", "pa", "pk"))
    cb, ca = cols[bk][:b], cols[a][:b]
    slots = cb * ma + (ca if ca.shape[1] == cb.shape[1] else ca[:, :1])  # the slots of _slot_counts
    count = np.full(b, g.n * cb.shape[1], G.dtype) if pk is None else _slot_sums(G, pk, slots)
    return _ratio(_slot_sums(G, pb, slots) - _slot_sums(G, pa, slots), count)


def _slot_sums(G: np.ndarray, columns: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Per resample r, the sum over its resampled slots t of ``G[r, columns[slots[r, t]]]``: the product
    of ``G``'s columns with the slot counts (:func:`probekit.stats.bootstrap._slot_counts`) without
    counting them. Exact for integer sums, as the products are (module doc)."""
    b, width = slots.shape[0], G.shape[1]
    flat = columns[slots] + np.arange(0, b * width, width)[:, None]
    return G.reshape(-1).take(flat).sum(axis=1)


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total / count in float64 (NaN where a resample drew no observed cell): the division the plain
    nanmean does, on the same (exact integer) sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return total.astype(np.float64) / count.astype(np.float64)
