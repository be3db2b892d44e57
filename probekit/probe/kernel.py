"""The probe recipe for one head: gather its training rows, z-normalise them, reduce them to a
kernel for the solver, fold the fitted weights back onto raw features and score every item.

Both solvers work in the span of the training rows. For a head with normalised training rows
``Z`` (one row per answer slot for a multiple-choice head, one per item for a multinomial head),
every weight vector the solvers visit has the form ``w = beta * w0 + Z.T @ a``: the paper's SGD
starts at ``w0`` and each step adds a combination of training rows (the regulariser's gradient is
parallel to ``w``), and the converged optimum lies in ``span(Z)``. So a fit needs only the Gram
matrix ``K = Z @ Z.T``, the initial scores ``u = Z @ w0`` and ``|w0|^2``; one GEMM per head
replaces a hundred passes over ``D``-wide rows. Features of several layers are concatenated by
summing their Gram matrices.

Multiple-choice heads exploit that a softmax over an item's choices ignores a shift common to
them: only differences ``z_ij - z_ref`` matter, and the gradient ``sum_j r_ij z_ij`` (with
``sum_j r_ij = 0``) lies in their span. The reference is the zero-padded slot in zero-pad mode
(all padded slots are the same vector ``-mu / sigma``, so the rows are simply ``x_ij / sigma``
for the real slots and the padded slots score 0) and the item's first choice in mask mode (rows
``(x_ij - x_i0) / sigma`` for ``j >= 1``: one row fewer per item). Reference slots map to a
zero row. ``grid`` maps each (item, choice) to its row; ``expand``/``reduce`` move between
coefficient space and the (items, choices) score grid. The iterates are exactly those of the
D-dimensional recipe; only per-item constants of the scores, which the softmax ignores, differ.

The recipe for one head (rows and their statistics, kernel, folding, scoring) is written once,
over the array namespace of its inputs: the engine runs it traced and vmapped over heads with
jax (accelerators) and eagerly in numpy on the host, where the same steps work in place in
reusable buffers (:class:`Scratch`) a block of rows at a time, and gather only a head's own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAD_MODES = ("mask", "zero")


class Slots(NamedTuple):
    """Row layout of one head (numpy, built by :func:`mc_slots`; the engine stacks it over heads).

    ``flat``: (m,) slot of each row in the layer's (items*choices, d) matrix (the reference of a
    row is its item's first choice in mask mode, the padding in zero-pad mode); ``valid``: (m,) 1.0
    for used rows; ``grid``: (n, C) row of each (item, choice), ``m - 1`` (a
    zero row) for reference and padded slots; ``mask``: (n, C) slots in the softmax (real
    choices; every slot in zero-pad mode); ``slot``: (m,) the inverse of ``grid``, each used row's
    position in the flattened (n, C) grid, ``n * C`` for the unused rows.

    A multinomial head has no slots: only ``mask`` (n, C), its real classes, is set.
    """

    flat: np.ndarray | None
    valid: np.ndarray | None
    grid: np.ndarray | None
    mask: np.ndarray
    slot: np.ndarray | None

    def take(self, idx: np.ndarray) -> Slots:
        """The layouts of heads ``idx`` (on a layout stacked over heads)."""
        return Slots(*(None if a is None else a[idx] for a in self))


def mc_rows_needed(n_choices_of_rows: np.ndarray, pad: str) -> int:
    """Rows a head needs: one per real slot (zero-pad) or per non-first real slot (mask), plus the zero row."""
    nc = np.asarray(n_choices_of_rows)
    return int(nc.sum() - (len(nc) if pad == "mask" else 0)) + 1


def mc_slots(rows: np.ndarray, n_choices: np.ndarray, max_choices: int, m: int, pad: str) -> Slots:
    """Row layout for a multiple-choice head trained on item ``rows``.

    ``m`` is the number of rows, shared by the heads of one batch so they stack: at least
    :func:`mc_rows_needed`; row ``m - 1`` is always zero.
    """
    rows = np.asarray(rows)
    nc = np.asarray(n_choices)[rows]
    n = len(rows)
    choice = np.arange(max_choices)[None, :]
    real = choice < nc[:, None]
    used = real & (choice >= 1) if pad == "mask" else real
    k = int(used.sum())
    if k + 1 > m:
        raise ValueError(f"head needs {k + 1} rows, more than the {m} given")
    slot = rows[:, None] * max_choices + choice
    flat = np.zeros(m, np.int32)
    valid = np.zeros(m, np.float32)
    flat[:k] = slot[used]
    valid[:k] = 1.0
    grid = np.full((n, max_choices), m - 1, np.int32)
    grid[used] = np.arange(k, dtype=np.int32)
    mask = np.ones((n, max_choices), bool) if pad == "zero" else real
    slot = np.full(m, n * max_choices, np.int32)
    slot[:k] = np.flatnonzero(used)
    return Slots(flat, valid, grid, mask, slot)


def init_weights(key: jax.Array, dim: int, n_out: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """PyTorch's ``nn.Linear`` default initialisation U(-1/sqrt(dim), 1/sqrt(dim)).

    Returns ``(w0, b0)``: ``w0`` of shape (dim,) for a multiple-choice head (``n_out=None``, no
    bias) or (dim, n_out) plus a bias (n_out,) for a multinomial head.

    Example:
        >>> w0, _ = init_weights(jax.random.key(0), 4096)
    """
    bound = 1.0 / np.sqrt(dim)
    kw, kb = jax.random.split(key)
    if n_out is None:
        return jax.random.uniform(kw, (dim,), jnp.float32, -bound, bound), None
    w0 = jax.random.uniform(kw, (dim, n_out), jnp.float32, -bound, bound)
    return w0, jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)


class LayerRows(NamedTuple):
    """One head's normalised training rows in one layer: ``Z`` (m', d), with ``mu`` and ``sigma`` (d,)."""

    Z: jax.Array
    mu: jax.Array
    sigma: jax.Array


class Scratch:
    """Reusable float32 buffers for the recipe on the host (one per thread), so that fitting head
    after head does not churn the allocator. A returned array is valid until the next request of
    the same name."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, d: int) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != d:
            buf = self._bufs[name] = np.empty((rows, d), np.float32)
        return buf[:rows]


# ----- array steps that run in place on numpy, functionally on jax ------------------------------------
_BLOCK = 64  # rows per step on the host: a block of gathered rows stays in cache between operations


def _xp(a):
    """The array namespace of ``a``: numpy for host arrays, jax.numpy for jax arrays and tracers."""
    return np if isinstance(a, (np.ndarray, np.generic)) else jnp


def _buf(scratch: Scratch | None, name: str, rows: int, d: int) -> np.ndarray | None:
    return None if scratch is None else scratch.get(name, rows, d)


def _take(X, idx, out=None):
    """Rows ``X[idx]``, indices clipped into range; into ``out`` when given (numpy)."""
    if out is None:
        return _xp(X).take(X, idx, axis=0, mode="clip")
    return np.take(X, idx, axis=0, out=out, mode="clip")


def _sub(a, b, out=None):
    """``a - b``; written into ``out`` when given (numpy), or into ``a`` when ``out`` is ``a``."""
    return a - b if out is None else np.subtract(a, b, out=out)


def _inplace(a) -> np.ndarray | None:
    """``a`` itself as the output of an elementwise step when it is a numpy buffer, else None."""
    return a if isinstance(a, np.ndarray) else None


def _scale(a, s):
    """``a * s``, in ``a``'s own buffer on the host."""
    out = _inplace(a)
    return a * s if out is None else np.multiply(a, s, out=out)


def _by_block(Z, step: Callable, host: bool):
    """``step(Z[lo:hi], lo, hi)`` over blocks of rows, in place on the host (each block stays in
    cache), over all rows at once when traced. Returns the rows."""
    if not host:
        return step(Z, 0, Z.shape[0])
    for lo in range(0, len(Z), _BLOCK):
        step(Z[lo:lo + _BLOCK], lo, min(len(Z), lo + _BLOCK))
    return Z


# ----- the recipe for one head: rows, their statistics, kernel, folding, scoring ----------------------
def safe_std(var):
    """Standard deviations from variances as float32, 1 where a feature is constant (left unscaled
    instead of dividing by 0)."""
    xp = _xp(var)
    sigma = xp.sqrt(var).astype(np.float32)
    return xp.where(sigma > 0, sigma, np.float32(1.0))


def gather_moments(X, idx, count, weights=None, scratch: Scratch | None = None, name: str = "Z"):
    """``X[idx]`` gathered, with the mean and the sum of squared deviations per column, in one pass,
    over those rows (each weighted by ``weights``, 0 or 1, when given) and as many zero rows as
    make ``count`` rows in all.

    Sums are taken about the first row (so no cancellation for features far from zero, such as a
    model's massive activations); the rows themselves are kept as they are, so that differences of
    nearby values stay exact. On the host (``scratch`` given) the rows land in ``scratch`` under
    ``name``, a block at a time, with float32 sums within a block and float64 across blocks;
    traced, the rows are one block and the sums float32.
    """
    host = scratch is not None
    xp, acc = (np, np.float64) if host else (jnp, jnp.float32)
    n_idx, d = idx.shape[0], X.shape[1]
    c = X[idx[0]].astype(acc)
    c32 = c.astype(np.float32)
    s1 = xp.zeros(d, acc)
    s2 = xp.zeros(d, acc)
    G = _buf(scratch, name, n_idx, d)
    step = _BLOCK if host else n_idx
    for lo in range(0, n_idx, step):
        hi = min(n_idx, lo + step)
        B = _take(X, idx[lo:hi], None if G is None else G[lo:hi])
        G = B if G is None else G  # traced: the one block is the gather
        B = _sub(B, c32, _buf(scratch, "b", hi - lo, d))
        if weights is not None:
            B = B * weights[lo:hi, None]
        s1 = s1 + B.sum(0).astype(acc)
        s2 = s2 + xp.einsum("kd,kd->d", B, B).astype(acc)
    zeros = count - (n_idx if weights is None else weights.sum())  # zero rows sit at -c
    s1 = s1 - zeros * c
    s2 = s2 + zeros * c * c
    mean_dev = s1 / count  # mean minus c
    return G, (c + mean_dev).astype(np.float32), xp.maximum(s2 - count * mean_dev * mean_dev, 0.0)


def mc_rows(Xf, rows, slots: Slots, pad: str, scratch: Scratch | None = None, name: str = "Z") -> LayerRows:
    """Normalised difference rows of a multiple-choice head in one layer (see the module docstring).

    ``Xf`` is the layer as (items*C, d). Statistics are over the training items' answer slots: the
    real ones in mask mode (the rows' slots plus each item's first choice); all ``n * C`` in
    zero-pad mode, padded slots counting as zero vectors (docs/protocol.md §4). Only the head's own
    slots are gathered, once; their statistics are taken in the same pass, then they are scaled
    (and differenced).

    On the host (numpy, ``scratch`` given) ``Z`` holds the head's own ``k`` rows only (the
    kernel's rows ``k..m-1`` are zero) and lives in ``scratch`` under ``name``; traced, ``Z`` has
    all ``m`` rows of ``slots``, the unused ones zero.
    """
    n, C = rows.shape[0], slots.mask.shape[1]
    if scratch is not None:  # the host knows the head's row count: gather only its own rows
        k = int(slots.valid.sum())
        flat, slot, valid = slots.flat[:k], slots.slot[:k], None
    else:
        flat, slot, valid = slots.flat, slots.slot, slots.valid
        k = valid.sum()
    xp = _xp(flat)
    if pad == "mask":  # statistics over every real slot: the rows' own, then each item's first choice
        idx, count = xp.concatenate([flat, rows * C]), k + n
        weights = None if valid is None else xp.concatenate([valid, xp.ones(n, valid.dtype)])
    else:  # over all n*C slots, padded ones being zero vectors
        idx, count, weights = flat, n * C, valid
    G, mu, ss = gather_moments(Xf, idx, count, weights, scratch, name)
    sigma = safe_std(ss / (count - 1))
    inv = (1.0 / sigma).astype(np.float32)
    Z = G[:flat.shape[0]]
    if pad == "mask":  # row j of item i: (slot - first choice) / sigma; item i's first choice is G[len(flat) + i]
        ref = flat.shape[0] + xp.minimum(slot // C, n - 1)

        def step(Zb, lo, hi):
            first = _take(G, ref[lo:hi], _buf(scratch, "b", hi - lo, G.shape[1]))
            return _scale(_sub(Zb, first, _inplace(Zb)), inv)

        Z = _by_block(Z, step, scratch is not None)
    else:
        Z = _scale(Z, inv)
    if valid is not None:
        Z = Z * valid[:, None]
    return LayerRows(Z, mu, sigma)


def item_rows(X, rows, scratch: Scratch | None = None, name: str = "Z") -> LayerRows:
    """Normalised rows of a multinomial head in one layer: ``X`` (items, d), statistics over ``rows``
    (on the host ``Z`` lives in ``scratch`` under ``name``)."""
    n = rows.shape[0]
    G, mu, ss = gather_moments(X, rows, n, None, scratch, name)
    sigma = safe_std(ss / (n - 1))
    G = _sub(G, mu, _inplace(G))
    return LayerRows(_scale(G, (1.0 / sigma).astype(np.float32)), mu, sigma)


def head_rows(Xs: Sequence, rows, slots: Slots, mc: bool, pad: str,
              scratch: Scratch | None = None) -> list[LayerRows]:
    """A head's normalised rows in every layer of the feature set ``Xs`` ((N, C, d) or (N, d) each)."""
    if mc:
        return [mc_rows(X.reshape(-1, X.shape[-1]), rows, slots, pad, scratch, f"Z{j}") for j, X in enumerate(Xs)]
    return [item_rows(X, rows, scratch, f"Z{j}") for j, X in enumerate(Xs)]


def head_kernel(parts: Sequence[LayerRows], w0, b0, slots: Slots, y) -> tuple[Kernel, list]:
    """The head's :class:`Kernel` over the concatenated layers (Gram matrices summed), and ``w0``
    split by layer. ``w0`` (sum of widths,) or (sum of widths, C); ``y`` (n,) training labels.
    Rows past the head's own (on the host, see :func:`mc_rows`) are zero."""
    xp = _xp(parts[0].Z)
    dims = [p.Z.shape[1] for p in parts]
    w0s = xp.split(w0, np.cumsum(dims)[:-1], axis=0)
    m = y.shape[0] if slots.slot is None else slots.slot.shape[0]
    K = xp.zeros((m, m), np.float32)
    u = xp.zeros((m,) + w0.shape[1:], np.float32)
    for p, w in zip(parts, w0s):
        K = _add_corner(K, p.Z @ p.Z.T)
        u = _add_corner(u, xp.dot(p.Z, w))  # np.dot releases the GIL for a matrix-vector product; @ does not
    return Kernel(K, u, xp.vdot(w0, w0), slots.grid, slots.slot, slots.mask, y, b0), w0s


def _add_corner(a, b):
    """``b`` added to the leading corner of ``a`` (``a[:k] += b`` for ``b`` of k rows), in place on the host."""
    corner = tuple(slice(0, s) for s in b.shape)
    if isinstance(a, np.ndarray):
        a[corner] += b
        return a
    return a.at[corner].add(b)


def fold(parts: Sequence[LayerRows], w0s: Sequence, fit) -> tuple[list, jax.Array]:
    """Weights that score raw features, ``score = x . v + offset``: ``v_l = w_l / sigma_l`` with
    ``w = beta * w0 + Z.T a`` (a :class:`~probekit.probe.solvers.Fit`), ``offset = -sum_l mu_l . v_l
    (+ bias)``; the coefficients of the kernel's zero rows are dropped."""
    mc = w0s[0].ndim == 1
    xp = _xp(parts[0].Z)
    a = fit.a[:parts[0].Z.shape[0]]
    folded = []
    offset = xp.zeros(() if mc else w0s[0].shape[1:], np.float32)
    for p, w0 in zip(parts, w0s):
        v = fit.beta * w0 + p.Z.T @ a
        v = v / (p.sigma if mc else p.sigma[:, None])
        folded.append(v.astype(np.float32))
        offset = offset - p.mu @ v
    if fit.b is not None:
        offset = offset + fit.b
    return folded, offset.astype(np.float32)


def score(Xs: Sequence, folded: Sequence, offsets, n_choices, gold, mc: bool, every_slot: bool):
    """Every head's p(gold) and correctness on the items of ``Xs``: (H, N) each.

    ``folded`` per layer (H, d) or (H, d, C) and ``offsets`` (H,) or (H, C) from :func:`fold`,
    stacked over heads; ``n_choices``/``gold`` (N,). Padded choices are masked unless
    ``every_slot`` (a multiple-choice head with zero-padding)."""
    xp = _xp(offsets)
    N, H = Xs[0].shape[0], offsets.shape[0]
    if mc:  # one (N*C, d) x (d, H) GEMM per layer
        S = sum(X.reshape(-1, X.shape[-1]) @ v.T for X, v in zip(Xs, folded))
        S = S.T.reshape(H, N, -1) + offsets[:, None, None]
    else:  # (N, d) x (d, H*C)
        S = sum(X @ xp.moveaxis(v, 0, 1).reshape(X.shape[1], -1) for X, v in zip(Xs, folded))
        S = xp.moveaxis(S.reshape(N, H, -1), 1, 0) + offsets[:, None, :]
    real = xp.arange(S.shape[-1])[None, :] < n_choices[:, None]
    mask = xp.ones_like(real) if every_slot else real
    S = xp.where(mask[None], S, -np.inf)
    top = S.max(-1, keepdims=True)
    lse = top[..., 0] + xp.log(xp.exp(S - top).sum(-1))
    s_gold = xp.take_along_axis(S, xp.broadcast_to(gold[None, :, None], (H, N, 1)), axis=-1)[..., 0]
    p = xp.exp(s_gold - lse).astype(np.float32)
    return p, ((S.argmax(-1) == gold[None, :]) & xp.isfinite(p)).astype(np.int8)  # no credit for NaN weights


class Kernel(NamedTuple):
    """What a solver needs of one head: its training geometry in coefficient space.

    ``K`` (m, m) Gram matrix of the normalised rows; ``u`` scores of the initial weights
    (``Z @ w0``, (m,) or (n, C)); ``w0w0`` = |w0|^2; ``grid`` (n, C) row of each choice and
    ``slot`` (m,) its inverse (:class:`Slots`), or both ``None`` for a multinomial head
    (coefficients are then (n, C), one per item and class); ``mask`` (n, C) softmax mask; ``y``
    (n,) labels; ``b0`` initial bias (multinomial) or ``None``.

    ``weight`` (n,): each training item's weight in the solver's mean NLL (0 leaves an item out of
    the fit; ``None``: every item counts once), so that several fits share one kernel
    (:mod:`probekit.probe.cvpath` fits a fold by weighting its held-out items 0). ``fold`` (n,):
    each training item's cross-validation fold for :func:`probekit.probe.cvpath.select`, or ``None``.
    """

    K: jax.Array
    u: jax.Array
    w0w0: jax.Array
    grid: jax.Array | None
    slot: jax.Array | None
    mask: jax.Array
    y: jax.Array
    b0: jax.Array | None
    weight: jax.Array | None = None
    fold: jax.Array | None = None


def expand(kern: Kernel, v: jax.Array) -> jax.Array:
    """Coefficient-space scores -> (n, C) score grid."""
    return v if kern.grid is None else v[kern.grid]


def reduce(kern: Kernel, R: jax.Array) -> jax.Array:
    """(n, C) per-choice residuals -> coefficient space: the adjoint of :func:`expand` on every
    row with a kernel row of its own (a gather through ``slot``; cheaper than scattering through
    ``grid``). The zero row gets 0 instead of the reference slots' sum: its coefficient multiplies
    a zero row, so it never reaches a score, a norm or the weights."""
    if kern.grid is None:
        return R
    return jnp.concatenate([R.reshape(-1), jnp.zeros(1, R.dtype)])[kern.slot]


def log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-softmax over the last axis with masked entries at -inf."""
    return jax.nn.log_softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
