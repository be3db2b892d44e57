"""Per-head geometry: gather a head's training rows, z-normalise them, and reduce them to a kernel.

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

Everything here is a pure function of arrays for ONE head; the engine vmaps it (accelerators)
or, on the host, computes the rows with the numpy twins ``host_mc_rows``/``host_item_rows`` and
the Gram with BLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAD_MODES = ("mask", "zero")


class Slots(NamedTuple):
    """Host-side row layout of one multiple-choice head (numpy, built by :func:`mc_slots`).

    ``flat``/``ref``: (m,) slot of each row and of its reference slot in the layer's
    (items*choices, d) matrix (``ref == flat`` in zero-pad mode: the reference is the padding);
    ``valid``: (m,) 1.0 for used rows; ``grid``: (n, C) row of each (item, choice), ``m - 1`` (a
    zero row) for reference and padded slots; ``mask``: (n, C) slots in the softmax (real
    choices; every slot in zero-pad mode); ``slot``: (m,) the inverse of ``grid``, each used row's
    position in the flattened (n, C) grid, ``n * C`` for the unused rows.
    """

    flat: np.ndarray
    ref: np.ndarray
    valid: np.ndarray
    grid: np.ndarray
    mask: np.ndarray
    slot: np.ndarray


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
    ref = np.zeros(m, np.int32)
    valid = np.zeros(m, np.float32)
    flat[:k] = slot[used]
    ref[:k] = (slot - choice)[used] if pad == "mask" else slot[used]
    valid[:k] = 1.0
    grid = np.full((n, max_choices), m - 1, np.int32)
    grid[used] = np.arange(k, dtype=np.int32)
    mask = np.ones((n, max_choices), bool) if pad == "zero" else real
    slot = np.full(m, n * max_choices, np.int32)
    slot[:k] = np.flatnonzero(used)
    return Slots(flat, ref, valid, grid, mask, slot)


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


def _safe_std(var: jax.Array) -> jax.Array:
    sigma = jnp.sqrt(var)
    return jnp.where(sigma > 0, sigma, 1.0)  # constant features: leave unscaled instead of dividing by 0


def mc_rows(X: jax.Array, rows: jax.Array, flat: jax.Array, ref: jax.Array, valid: jax.Array, pad: str) -> LayerRows:
    """Normalised difference rows of a multiple-choice head in one layer (see the module docstring).

    ``X`` is the layer (items, C, d). Statistics are over the training items' answer slots: the
    real ones in mask mode (the rows' slots plus each item's first choice); all ``n * C`` in
    zero-pad mode, padded slots counting as zero vectors (PROTOCOL §4). Only the head's own
    slots are gathered.
    """
    n, C, d = rows.shape[0], X.shape[1], X.shape[2]
    Xf = X.reshape(-1, d)
    Xs = Xf[flat]  # (m, d): the rows' own slots
    vw = valid[:, None]
    k = valid.sum()
    if pad == "mask":
        X0 = Xf[rows * C]  # (n, d): each item's first choice, the reference
        count = k + n
        mu = ((Xs * vw).sum(0) + X0.sum(0)) / count
        ss = jnp.square((Xs - mu) * vw).sum(0) + jnp.square(X0 - mu).sum(0)
    else:
        count = n * C
        mu = (Xs * vw).sum(0) / count
        ss = jnp.square((Xs - mu) * vw).sum(0) + (count - k) * mu * mu  # padded slots are zero vectors
    sigma = _safe_std(ss / (count - 1))
    diff = Xs - Xf[ref] if pad == "mask" else Xs
    return LayerRows(diff * (vw / sigma), mu, sigma)


def item_rows(X: jax.Array, rows: jax.Array) -> LayerRows:
    """Normalised rows of a multinomial head in one layer: ``X`` (items, d), statistics over ``rows``."""
    Xg = X[rows]
    n = rows.shape[0]
    mu = Xg.mean(0)
    dev = Xg - mu
    sigma = _safe_std((dev * dev).sum(0) / (n - 1))
    return LayerRows(dev / sigma, mu, sigma)


class Scratch:
    """Reusable float32 buffers for the host functions below (one per thread), so that fitting head
    after head does not churn the allocator. A returned array is valid until the next request of
    the same name."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, d: int) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != d:
            buf = self._bufs[name] = np.empty((rows, d), np.float32)
        return buf[:rows]


_BLOCK = 64  # rows per step: a block of gathered rows stays in cache between operations


def host_mc_rows(Xf: np.ndarray, rows: np.ndarray, slots: Slots, pad: str, scratch: Scratch,
                 name: str = "Z") -> LayerRows:
    """:func:`mc_rows` on the host in numpy: ``Xf`` is the layer as (items*C, d) float32.

    Returns the head's own rows ``Z`` (k, d) float32 (rows ``k..m-1`` of the kernel are zero;
    ``Z`` lives in ``scratch`` under ``name``), and ``mu``, ``sigma``. The slots are gathered
    once, their statistics taken in the same pass, then scaled (and differenced) in place.
    """
    C = slots.mask.shape[1]
    k = int(slots.valid.sum())
    flat = slots.flat[:k]
    if pad == "mask":  # statistics over every real slot: the rows' own, then each item's first choice
        idx, count = np.concatenate([flat, np.asarray(rows) * C]), k + len(rows)
    else:  # over all n*C slots, padded ones being zero vectors
        idx, count = flat, len(rows) * C
    G, mu, ss = _gather_moments(Xf, idx, count, scratch, name)
    sigma = _safe_std_np(ss / (count - 1))
    inv = (1.0 / sigma).astype(np.float32)
    Z = G[:k]
    if pad == "mask":  # row j of item i: (slot - first choice) / sigma
        ref = k + slots.slot[:k] // C
        for lo in range(0, k, _BLOCK):
            hi = min(k, lo + _BLOCK)
            Z[lo:hi] -= np.take(G, ref[lo:hi], axis=0, out=scratch.get("b", hi - lo, G.shape[1]), mode="clip")
            Z[lo:hi] *= inv
    else:
        Z *= inv
    return LayerRows(Z, mu, sigma)


def host_item_rows(X: np.ndarray, rows: np.ndarray, scratch: Scratch, name: str = "Z") -> LayerRows:
    """:func:`item_rows` on the host in numpy: ``X`` (items, d) float32; ``Z`` lives in ``scratch``."""
    rows = np.asarray(rows)
    G, mu, ss = _gather_moments(X, rows, len(rows), scratch, name)
    sigma = _safe_std_np(ss / (len(rows) - 1))
    G -= mu
    G *= (1.0 / sigma).astype(np.float32)
    return LayerRows(G, mu, sigma)


def _gather_moments(X: np.ndarray, idx: np.ndarray, count: int, scratch: Scratch,
                    name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X[idx]`` gathered into ``scratch`` (under ``name``), with the mean and the sum of squared
    deviations per column of those rows plus ``count - len(idx)`` zero rows, in one pass.

    Sums are taken about the first row (so no cancellation for features far from zero, such as a
    model's massive activations), in float32 within a block and float64 across blocks; the rows
    themselves are kept as they are, so that differences of nearby values stay exact.
    """
    d = X.shape[1]
    c = X[idx[0]].astype(np.float64)
    c32 = c.astype(np.float32)
    s1 = np.zeros(d, np.float64)
    s2 = np.zeros(d, np.float64)
    G = scratch.get(name, len(idx), d)
    for lo in range(0, len(idx), _BLOCK):
        B = np.take(X, idx[lo:lo + _BLOCK], axis=0, out=G[lo:lo + _BLOCK], mode="clip")
        B = np.subtract(B, c32, out=scratch.get("b", len(B), d))
        s1 += B.sum(0)
        s2 += np.einsum("kd,kd->d", B, B)
    zeros = count - len(idx)  # zero rows sit at -c
    s1 -= zeros * c
    s2 += zeros * c * c
    mean_dev = s1 / count  # mean minus c
    return G, (c + mean_dev).astype(np.float32), np.maximum(s2 - count * mean_dev * mean_dev, 0.0)


def _safe_std_np(var: np.ndarray) -> np.ndarray:
    sigma = np.sqrt(var).astype(np.float32)
    sigma[sigma == 0] = 1.0  # constant features: leave unscaled instead of dividing by 0
    return sigma


class Kernel(NamedTuple):
    """What a solver needs of one head: its training geometry in coefficient space.

    ``K`` (m, m) Gram matrix of the normalised rows; ``u`` scores of the initial weights
    (``Z @ w0``, (m,) or (n, C)); ``w0w0`` = |w0|^2; ``grid`` (n, C) row of each choice and
    ``slot`` (m,) its inverse (:class:`Slots`), or both ``None`` for a multinomial head
    (coefficients are then (n, C), one per item and class); ``mask`` (n, C) softmax mask; ``y``
    (n,) labels; ``b0`` initial bias (multinomial) or ``None``.
    """

    K: jax.Array
    u: jax.Array
    w0w0: jax.Array
    grid: jax.Array | None
    slot: jax.Array | None
    mask: jax.Array
    y: jax.Array
    b0: jax.Array | None


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
