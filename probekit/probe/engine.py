"""Fit many linear heads on one feature set in one jitted, head-sharded computation, and score them.

:func:`fit_and_score` takes the layer matrices of one feature set (one layer, or several to
concatenate) and a batch of heads, each given by its training item rows and (possibly noisy)
labels, and returns every head's probability of the gold answer and correctness on every item.
Heads are processed in fixed-size chunks (so the gathered training rows stay a fraction of a
layer); each chunk is sharded over ``jax.devices()`` along the head axis, the layer matrices are
replicated. Per head the work is one Gram GEMM, a solver in coefficient space and one GEMM
that scores all items, see :mod:`probekit.probe.kernel`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from probekit.errors import ProbekitError
from probekit.probe import solvers
from probekit.probe.kernel import (
    PAD_MODES,
    Kernel,
    init_weights,
    item_rows,
    log_softmax,
    Slots,
    mc_rows,
    mc_rows_needed,
    mc_slots,
)

HEADS = ("mc", "multinomial")


@dataclass(frozen=True)
class ProbeConfig:
    """How every head of a batch is fitted.

    ``head``: ``"mc"`` (one weight vector scores each answer slot, softmax over the item's choices;
    answer_end features) or ``"multinomial"`` (a (d, C) matrix plus bias maps the item's feature
    to class scores; question_end features). ``solver``: ``"paper"`` (PROTOCOL §4) or
    ``"converged"``. ``pad``: ``"mask"`` excludes padded choices everywhere, ``"zero"`` keeps
    them as zero vectors in the normalisation statistics and the softmax, as the protocol does
    (multinomial heads always mask padded classes). ``l2``: the paper's unsquared penalty
    weight. ``C``: the converged solver's inverse regularisation strength, as in scikit-learn
    (loss = mean NLL + |w|^2 / (2 C n_train)). ``tol``: converged solver's relative optimality
    (stop once the gradient bounds the loss's excess over its minimum by ``tol`` times the loss).

    Example:
        >>> cfg = ProbeConfig(head="mc", solver="paper", pad="zero")
    """

    head: str = "mc"
    solver: str = "paper"
    pad: str = "mask"
    l2: float = 1.0
    lr: float = 0.05
    steps: int = 100
    max_grad_norm: float = 1.0
    C: float = 1.0
    tol: float = 1e-4
    max_newton: int = 50

    def __post_init__(self) -> None:
        for name, value, allowed in (("head", self.head, HEADS), ("solver", self.solver, solvers.SOLVERS),
                                     ("pad", self.pad, PAD_MODES)):
            if value not in allowed:
                raise ProbekitError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.C <= 0 or self.l2 < 0:
            raise ProbekitError(f"C must be > 0 and l2 >= 0, got C={self.C}, l2={self.l2}")


def head_seed(seed: int, name: str) -> int:
    """A 31-bit integer naming one head's initialisation, derived from the sweep seed and head name."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def head_key(seed: int) -> jax.Array:
    """The jax PRNG key of a head with :func:`head_seed` ``seed``."""
    return jax.random.key(seed)


# ----- one head, pure ------------------------------------------------------------------------------
def _fit_one(Xs, rows, labels, hseed, flat, ref, valid, grid, mask, *, cfg: ProbeConfig):
    """Fit one head on the feature set ``Xs``; returns per-layer folded weights, offset, fit stats.

    The folded weights ``v_l = w_l / sigma_l`` and ``offset = -sum_l mu_l . v_l (+ bias)`` score raw
    features directly: ``score = x . v + offset``.
    """
    n = rows.shape[0]
    C = mask.shape[-1]
    if cfg.head == "mc":
        parts = [mc_rows(X, rows, flat, ref, valid, cfg.pad) for X in Xs]
    else:
        parts = [item_rows(X, rows) for X in Xs]
    dims = [p.Z.shape[1] for p in parts]
    w0, b0 = init_weights(head_key(hseed), sum(dims), None if cfg.head == "mc" else C)
    w0s = jnp.split(w0, np.cumsum(dims)[:-1], axis=0)
    K = sum(p.Z @ p.Z.T for p in parts)
    u = sum(p.Z @ w for p, w in zip(parts, w0s))
    kern = Kernel(K, u, jnp.vdot(w0, w0), grid if cfg.head == "mc" else None, mask, labels, b0)
    if cfg.solver == "paper":
        fit = solvers.paper(kern, l2=cfg.l2, lr=cfg.lr, steps=cfg.steps, max_grad_norm=cfg.max_grad_norm)
    else:
        kern = kern._replace(b0=None if b0 is None else jnp.zeros_like(b0))
        fit = solvers.converged(kern, l2=1.0 / (cfg.C * n), tol=cfg.tol, max_newton=cfg.max_newton)
    folded = []
    offset = jnp.zeros(() if cfg.head == "mc" else (C,), jnp.float32)
    for p, w0l in zip(parts, w0s):
        v = (fit.beta * w0l + p.Z.T @ fit.a)
        v = v / (p.sigma if cfg.head == "mc" else p.sigma[:, None])
        folded.append(v)
        offset = offset - p.mu @ v
    if fit.b is not None:
        offset = offset + fit.b
    return folded, offset, fit


def _score(Xs, folded, offset, n_choices, gold, *, cfg: ProbeConfig):
    """Every head's p(gold) and correctness on every item: (H, N) each."""
    N, H = Xs[0].shape[0], offset.shape[0]
    if cfg.head == "mc":  # one (N*C, d) x (d, H) GEMM per layer
        C = Xs[0].shape[1]
        S = sum(X.reshape(N * C, -1) @ v.T for X, v in zip(Xs, folded))
        S = S.T.reshape(H, N, C) + offset[:, None, None]
    else:  # (N, d) x (d, H*C)
        C = folded[0].shape[-1]
        S = sum(X @ jnp.moveaxis(v, 0, 1).reshape(X.shape[1], H * C) for X, v in zip(Xs, folded))
        S = jnp.moveaxis(S.reshape(N, H, C), 1, 0) + offset[:, None, :]
    real = jnp.arange(C)[None, :] < n_choices[:, None]
    mask = jnp.ones_like(real) if (cfg.head == "mc" and cfg.pad == "zero") else real
    logp = log_softmax(S, mask[None])
    p_gold = jnp.exp(jnp.take_along_axis(logp, gold[None, :, None], axis=-1)[..., 0])
    pred = jnp.argmax(jnp.where(mask[None], S, -jnp.inf), axis=-1)
    return p_gold, (pred == gold[None, :]).astype(jnp.int8)


@partial(jax.jit, static_argnames=("cfg",))
def _fit_chunk(Xs, *per_head, cfg: ProbeConfig):
    return jax.vmap(partial(_fit_one, cfg=cfg), in_axes=(None,) + (0,) * len(per_head))(Xs, *per_head)


_score_jit = jax.jit(_score, static_argnames=("cfg",))


# ----- batches of heads ----------------------------------------------------------------------------
@dataclass
class HeadResults:
    """Per-head outputs of :func:`fit_and_score` (numpy): ``p_gold``/``correct`` are (H, N)."""

    p_gold: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    converged: np.ndarray
    grad_norm: np.ndarray
    steps: np.ndarray


def _mesh(devices: Sequence[jax.Device] | None) -> Mesh:
    return Mesh(np.asarray(list(devices or jax.devices())), ("heads",))


def put_layer(X: np.ndarray | jax.Array, devices: Sequence[jax.Device] | None = None) -> jax.Array:
    """A layer matrix replicated on every device (a no-op for one already placed so).

    Hand the result to :func:`fit_and_score` and drop the numpy original, so that one copy of the
    layer is held while heads are fitted."""
    return jax.device_put(X, NamedSharding(_mesh(devices), PartitionSpec()))


def default_chunk(n_rows: int, dim: int, n_devices: int, budget_bytes: int = 128 << 20) -> int:
    """Heads per chunk: as many as keep ``budget_bytes`` of gathered rows (a few copies of each head's
    (n_rows, dim) rows live at once), a multiple of the device count, at most 64."""
    per_head = 3 * 4 * n_rows * dim
    h = max(1, budget_bytes // per_head) // n_devices * n_devices
    return int(min(max(h, n_devices), 64))


def fit_and_score(
    Xs: Sequence[np.ndarray],
    n_choices: np.ndarray,
    gold: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    seeds: np.ndarray,
    cfg: ProbeConfig,
    *,
    devices: Sequence[jax.Device] | None = None,
    chunk: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> HeadResults:
    """Fit heads on the feature set ``Xs`` and score every item with each.

    ``Xs``: the layers to concatenate (middle first), each (N, C, d) for ``cfg.head == "mc"`` or
    (N, d) for ``"multinomial"``; ``n_choices`` (N,) real choices per item; ``gold`` (N,) the
    labels used for scoring; ``rows`` (H, n) training item rows per head; ``labels`` (H, n)
    training labels (noisy ones for label-noise heads); ``seeds`` (H,) per-head initialisation
    seeds (:func:`head_seed`). ``on_chunk(h)`` is called after each chunk with its head count.

    Example:
        >>> res = fit_and_score([X], n_choices, gold, rows, labels, seeds, ProbeConfig(pad="zero"))
        >>> res.p_gold.shape  # (heads, items)
    """
    rows = np.asarray(rows, np.int32)
    labels = np.asarray(labels, np.int32)
    seeds = np.asarray(seeds, np.int64)
    H, n = rows.shape
    N = Xs[0].shape[0]
    C = Xs[0].shape[1] if cfg.head == "mc" else int(np.max(n_choices))
    if labels.shape != rows.shape or seeds.shape != (H,):
        raise ProbekitError(f"rows {rows.shape}, labels {labels.shape} and seeds {seeds.shape} disagree")
    if n < 2:
        raise ProbekitError(f"heads need at least 2 training items, got {n}")
    n_choices = np.asarray(n_choices, np.int32)
    # host-side per-head layout
    if cfg.head == "mc":
        m = max(mc_rows_needed(n_choices[r], cfg.pad) for r in rows)
        m = -(-m // 8) * 8
        slots = [mc_slots(r, n_choices, C, m, cfg.pad) for r in rows]
        layout = [np.stack([getattr(s, f) for s in slots]) for f in Slots._fields]
    else:  # no slots: classes are the item's choice positions, padded classes masked
        real = np.arange(C)[None, None, :] < n_choices[rows][:, :, None]
        none = np.zeros((H, 1), np.int32)
        layout = [none, none, none.astype(np.float32), none[:, :, None], real]
    mesh = _mesh(devices)
    n_dev = mesh.devices.size
    dim = sum(X.shape[-1] for X in Xs)
    h_chunk = chunk or default_chunk(layout[0].shape[1] if cfg.head == "mc" else n, dim, n_dev)
    h_chunk = max(n_dev, -(-h_chunk // n_dev) * n_dev)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_head = NamedSharding(mesh, PartitionSpec("heads"))
    Xd = [put_layer(X, devices) for X in Xs]
    nc_d = jax.device_put(n_choices, replicated)
    gold_d = jax.device_put(np.asarray(gold, np.int32), replicated)
    per_head = [rows, labels, (seeds & 0x7FFFFFFF).astype(np.int32), *layout]
    score_chunk = max(n_dev, min(-(-H // n_dev) * n_dev, 128 // n_dev * n_dev))
    folded, offsets, stats = [], [], []
    for lo in range(0, H, h_chunk):
        idx = np.minimum(np.arange(lo, lo + h_chunk), H - 1)  # pad the last chunk with its last head
        args = [jax.device_put(a[idx], by_head) for a in per_head]
        f, off, fit = _fit_chunk(Xd, *args, cfg=cfg)
        keep = min(h_chunk, H - lo)
        folded.append([v[:keep] for v in f])
        offsets.append(off[:keep])
        stats.append([np.asarray(x)[:keep] for x in (fit.loss, fit.converged, fit.grad_norm, fit.steps)])
        if on_chunk is not None:
            on_chunk(keep)
    folded = [jnp.concatenate([f[i] for f in folded]) for i in range(len(Xs))]
    offsets = jnp.concatenate(offsets)
    p_gold, correct = [], []
    for lo in range(0, H, score_chunk):  # one GEMM over the items per block of heads
        idx = np.minimum(np.arange(lo, lo + score_chunk), H - 1)
        sl = [jax.device_put(v[idx], by_head) for v in folded]
        p, c = _score_jit(Xd, sl, jax.device_put(offsets[idx], by_head), nc_d, gold_d, cfg=cfg)
        keep = min(score_chunk, H - lo)
        p_gold.append(np.asarray(p)[:keep])
        correct.append(np.asarray(c)[:keep])
    loss, conv, gnorm, steps = (np.concatenate([s[i] for s in stats]) for i in range(4))
    return HeadResults(np.concatenate(p_gold), np.concatenate(correct), loss, conv, gnorm, steps)
