"""Fit many linear heads on one feature set and score them.

:func:`fit_and_score` takes the layer matrices of one feature set (one layer, or several to
concatenate) and a batch of heads, each given by its training item rows and (possibly noisy)
labels, and returns every head's probability of the gold answer and correctness on every item
(:func:`fit_and_score_many`: several configurations of the same heads, e.g. both solvers, sharing
each head's Gram matrix). Per head the work is one Gram GEMM over its normalised training rows, a
solver in coefficient space and one GEMM that scores all items, see :mod:`probekit.probe.kernel`.

Two execution paths give the same numbers. On CPU devices (the host path) the D-wide work (rows,
Gram, weight recovery, scoring) runs in numpy BLAS, single-threaded, in one thread per core, a
head at a time per thread, and only the m x m solver is jitted; the layer is held once, as
float32 numpy. On accelerators heads are processed in fixed-size chunks, each one jitted, vmapped
computation sharded over ``jax.devices()`` along the head axis, the layer matrices replicated.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial, wraps
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg  # noqa: F401 - loads the LAPACK that jax's CPU kernels call, so BLAS thread limits reach it
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from threadpoolctl import threadpool_limits

from probekit.errors import ProbekitError
from probekit.probe import solvers
from probekit.probe.kernel import (
    PAD_MODES,
    Kernel,
    LayerRows,
    Scratch,
    host_item_rows,
    host_mc_rows,
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
def _solve(kern: Kernel, cfg: ProbeConfig) -> solvers.Fit:
    """The configured solver on one head's kernel."""
    if cfg.solver == "paper":
        return solvers.paper(kern, l2=cfg.l2, lr=cfg.lr, steps=cfg.steps, max_grad_norm=cfg.max_grad_norm)
    kern = kern._replace(b0=None if kern.b0 is None else jnp.zeros_like(kern.b0))
    return solvers.converged(kern, l2=1.0 / (cfg.C * kern.y.shape[0]), tol=cfg.tol, max_newton=cfg.max_newton)


def _float32_products(f: Callable) -> Callable:
    """``f`` traced with every float32 matrix product computed in float32. By default accelerators
    round the operands of float32 products (to TF32 on recent NVIDIA GPUs, to bfloat16 on TPUs),
    which would change Gram matrices, scores and solver steps by about 1e-3 relative and make
    results depend on the device; on CPUs this changes nothing."""

    @wraps(f)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return f(*args, **kwargs)

    return traced


@partial(jax.jit, static_argnames=("cfg",))
@_float32_products
def _solve_kernel(K, u, w0w0, grid, slot, mask, y, b0, *, cfg: ProbeConfig) -> solvers.Fit:
    """:func:`_solve` on a kernel computed on the host (one head)."""
    mc = cfg.head == "mc"
    return _solve(Kernel(K, u, w0w0, grid if mc else None, slot if mc else None, mask, y, b0), cfg)


def _fit_one(Xs, rows, labels, hseed, flat, ref, valid, grid, mask, slot, *, cfg: ProbeConfig):
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
    mc = cfg.head == "mc"
    kern = Kernel(K, u, jnp.vdot(w0, w0), grid if mc else None, slot if mc else None, mask, labels, b0)
    fit = _solve(kern, cfg)
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
    return p_gold, ((pred == gold[None, :]) & jnp.isfinite(p_gold)).astype(jnp.int8)  # no credit for NaN weights


@partial(jax.jit, static_argnames=("cfg",))
@_float32_products
def _fit_chunk(Xs, *per_head, cfg: ProbeConfig):
    return jax.vmap(partial(_fit_one, cfg=cfg), in_axes=(None,) + (0,) * len(per_head))(Xs, *per_head)


_score_jit = jax.jit(_float32_products(_score), static_argnames=("cfg",))


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


def on_host(devices: Sequence[jax.Device] | None = None) -> bool:
    """Whether heads are fitted with host BLAS (every device is a CPU) rather than on accelerators."""
    return all(d.platform == "cpu" for d in (devices or jax.devices()))


def put_layer(X: np.ndarray | jax.Array, devices: Sequence[jax.Device] | None = None) -> np.ndarray | jax.Array:
    """A layer matrix where :func:`fit_and_score` reads it: float32 numpy when fitting on the host
    (CPU devices), otherwise replicated on every device (a no-op for one already placed so).

    Hand the result to :func:`fit_and_score` and drop the original, so that one copy of the
    layer is held while heads are fitted."""
    if on_host(devices):
        return np.asarray(X, np.float32)
    return jax.device_put(X, NamedSharding(_mesh(devices), PartitionSpec()))


_HOST_BUDGET = 128 << 20  # bytes of gathered rows per chunk where a device does not report its memory
_MAX_CHUNK = 512


def _device_budget(devices: Sequence[jax.Device]) -> int:
    """Bytes a chunk of heads may use: a quarter of the memory still free on the fullest device (as
    its allocator reports it, the replicated layer already counted), or 128 MiB where a device does
    not report its memory (CPUs)."""
    free = []
    for d in devices:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return _HOST_BUDGET
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return max(_HOST_BUDGET, min(free) // 4)


def default_chunk(n_rows: int, dim: int, n_devices: int, budget_bytes: int = _HOST_BUDGET,
                  heads: int | None = None) -> int:
    """Heads per chunk: as many as keep ``budget_bytes`` of gathered rows (a few copies of each head's
    (n_rows, dim) rows live at once), a multiple of the device count, at most 512. Given the number
    of ``heads``, the chunks are evened out (75 heads at most 64 a chunk: two chunks of 38, not 64
    and 11 padded to 64)."""
    per_head = 3 * 4 * n_rows * dim
    h = min(_MAX_CHUNK, max(1, budget_bytes // per_head))
    if heads is not None:
        h = -(-heads // -(-heads // h))  # the same number of chunks, as even as can be
    return int(max(n_devices, -(-h // n_devices) * n_devices))


def default_workers() -> int:
    """Host threads fitting heads concurrently: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
    workers: int | None = None,
    host: bool | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> HeadResults:
    """Fit heads on the feature set ``Xs`` and score every item with each.

    ``Xs``: the layers to concatenate (middle first), each (N, C, d) for ``cfg.head == "mc"`` or
    (N, d) for ``"multinomial"``; ``n_choices`` (N,) real choices per item; ``gold`` (N,) the
    labels used for scoring; ``rows`` (H, n) training item rows per head; ``labels`` (H, n)
    training labels (noisy ones for label-noise heads); ``seeds`` (H,) per-head initialisation
    seeds (:func:`head_seed`). ``on_chunk(k)`` is called as fits complete with their count.

    With ``host`` (the default on CPU devices) each head's rows, Gram matrix, weight recovery and
    scoring use numpy BLAS in ``workers`` threads (default: one per core; BLAS itself runs
    single-threaded meanwhile), and the solver runs jitted on the head's kernel, heads spread over
    ``devices`` in turn. Otherwise (the default on accelerators) heads are fitted in chunks of
    ``chunk`` heads (default: as many as a quarter of the devices' free memory holds, see
    :func:`default_chunk`), each one jitted, vmapped computation sharded over ``devices`` along the
    head axis.

    Example:
        >>> res = fit_and_score([X], n_choices, gold, rows, labels, seeds, ProbeConfig(pad="zero"))
        >>> res.p_gold.shape  # (heads, items)
    """
    return fit_and_score_many(Xs, n_choices, gold, rows, labels, seeds, [cfg], devices=devices, chunk=chunk,
                              workers=workers, host=host, on_chunk=on_chunk)[0]


def fit_and_score_many(
    Xs: Sequence[np.ndarray],
    n_choices: np.ndarray,
    gold: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    seeds: np.ndarray,
    cfgs: Sequence[ProbeConfig],
    *,
    devices: Sequence[jax.Device] | None = None,
    chunk: int | None = None,
    workers: int | None = None,
    host: bool | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[HeadResults]:
    """:func:`fit_and_score` for several configurations of the same heads (e.g. both solvers), one
    result per configuration. They must agree on ``head`` and ``pad``; on the host each head's
    rows and Gram matrix are computed once and shared by every configuration.

    Example:
        >>> paper, conv = fit_and_score_many([X], n_choices, gold, rows, labels, seeds,
        ...                                  [ProbeConfig(solver="paper"), ProbeConfig(solver="converged")])
    """
    cfgs = list(cfgs)
    if not cfgs or len({(c.head, c.pad) for c in cfgs}) != 1:
        raise ProbekitError(f"configurations fitted together must share head and pad, got {cfgs}")
    cfg = cfgs[0]
    rows = np.asarray(rows, np.int32)
    labels = np.asarray(labels, np.int32)
    seeds = np.asarray(seeds, np.int64)
    H, n = rows.shape
    C = Xs[0].shape[1] if cfg.head == "mc" else int(np.max(n_choices))
    if labels.shape != rows.shape or seeds.shape != (H,):
        raise ProbekitError(f"rows {rows.shape}, labels {labels.shape} and seeds {seeds.shape} disagree")
    if n < 2:
        raise ProbekitError(f"heads need at least 2 training items, got {n}")
    n_choices = np.asarray(n_choices, np.int32)
    gold = np.asarray(gold, np.int32)
    layout = _layout(n_choices, rows, cfg, C)
    seeds31 = (seeds & 0x7FFFFFFF).astype(np.int32)
    if on_host(devices) if host is None else host:
        return _fit_and_score_host(Xs, n_choices, gold, rows, labels, seeds31, layout, cfgs,
                                   devices=list(devices or jax.devices()), workers=workers or default_workers(),
                                   on_chunk=on_chunk)
    return [_fit_and_score_device(Xs, n_choices, gold, rows, labels, seeds31, layout, c,
                                  devices=devices, chunk=chunk, on_chunk=on_chunk) for c in cfgs]


def _kernel_size(n_choices: np.ndarray, rows: np.ndarray, cfg: ProbeConfig) -> int:
    """Rows of every head's kernel: the most any head needs, rounded up to a multiple of 8."""
    if cfg.head != "mc":
        return rows.shape[1]
    m = max(mc_rows_needed(n_choices[r], cfg.pad) for r in rows)
    return -(-m // 8) * 8


def _layout(n_choices: np.ndarray, rows: np.ndarray, cfg: ProbeConfig, C: int) -> list[np.ndarray]:
    """Host-side per-head layout: the :class:`Slots` fields stacked over heads."""
    if cfg.head == "mc":
        m = _kernel_size(n_choices, rows, cfg)
        slots = [mc_slots(r, n_choices, C, m, cfg.pad) for r in rows]
        return [np.stack([getattr(s, f) for s in slots]) for f in Slots._fields]
    # no slots: classes are the item's choice positions, padded classes masked
    real = np.arange(C)[None, None, :] < n_choices[rows][:, :, None]
    none = np.zeros((len(rows), 1), np.int32)
    return [none, none, none.astype(np.float32), none[:, :, None], real, none]


# ----- on the host: numpy BLAS for the D-wide work, the solver jitted per head ---------------------
def compile_host(n_choices: np.ndarray, rows: np.ndarray, cfgs: Sequence[ProbeConfig], dim: int,
                 max_choices: int) -> None:
    """Compile what fitting these heads on the host runs (each configuration's solver, the initial
    weights of width ``dim``) before any layer is read, then hand the compiler's freed scratch
    memory back to the operating system: compiling never adds to the footprint of a layer.

    ``rows`` (H, n) as for :func:`fit_and_score_many`; ``max_choices``: the answer slots of a
    multiple-choice layer (its second axis).
    """
    cfg = cfgs[0]
    mc = cfg.head == "mc"
    rows = np.asarray(rows)
    n = rows.shape[1]
    C = max_choices if mc else int(np.max(n_choices))
    m = _kernel_size(np.asarray(n_choices), rows, cfg)
    spec = jax.ShapeDtypeStruct
    f32, i32 = np.float32, np.int32
    kernel = (spec((m, m), f32), spec((m,) if mc else (m, C), f32), spec((), f32),
              spec((n, C) if mc else (1, 1), i32), spec((m,) if mc else (1,), i32), spec((n, C), np.bool_),
              spec((n,), i32), None if mc else spec((C,), f32))
    for c in cfgs:
        _solve_kernel.lower(*kernel, cfg=c).compile()
    _init_block.lower(spec((_INIT_BLOCK,), i32), dim, None if mc else C).compile()
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A long-lived pool of ``workers`` threads (reused across calls, so are their allocator arenas)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="probekit")
    return _POOLS[workers]


_INIT_BLOCK = 64  # heads whose initial weights are drawn in one call (and in flight per step)


@partial(jax.jit, static_argnums=(1, 2))
def _init_block(seeds, dim: int, n_out: int | None):
    """:func:`init_weights` of every head in a block (the same numbers as one head at a time)."""
    return jax.vmap(lambda s: init_weights(head_key(s), dim, n_out))(seeds)


def _fit_and_score_host(Xs, n_choices, gold, rows, labels, seeds31, layout, cfgs, *, devices, workers, on_chunk):
    H = rows.shape[0]
    mc = cfgs[0].head == "mc"
    Xs = [np.asarray(X, np.float32) for X in Xs]
    Xrows = [X.reshape(-1, X.shape[-1]) for X in Xs] if mc else Xs  # (N*C, d) slots or (N, d) items
    dims = [X.shape[-1] for X in Xs]
    C = layout[4].shape[-1]
    m = layout[0].shape[1] if mc else rows.shape[1]
    local = threading.local()  # each worker thread's scratch buffers

    def head(i: int, w0: np.ndarray, b0: np.ndarray | None):
        """Head ``i`` under every configuration: [(folded weights, offset, fit stats)]."""
        scratch = local.__dict__.setdefault("scratch", Scratch())
        w0s = np.split(w0, np.cumsum(dims)[:-1], axis=0)
        if mc:
            sl = Slots(*(a[i] for a in layout))
            parts = [host_mc_rows(Xf, rows[i], sl, cfgs[0].pad, scratch, f"Z{j}") for j, Xf in enumerate(Xrows)]
            grid, mask, slot = sl.grid, sl.mask, sl.slot
        else:
            parts = [host_item_rows(X, rows[i], scratch, f"Z{j}") for j, X in enumerate(Xrows)]
            grid, mask, slot = layout[3][i], layout[4][i], layout[5][i]
        k = len(parts[0].Z)  # the head's own rows; the kernel's others are zero
        K = np.zeros((m, m), np.float32)
        u = np.zeros((m,) + w0.shape[1:], np.float32)
        for p, w in zip(parts, w0s):
            K[:k, :k] += p.Z @ p.Z.T
            u[:k] += np.dot(p.Z, w)  # np.dot releases the GIL for a matrix-vector product; @ does not
        args = (K, u, np.vdot(w0, w0), grid, slot, mask, labels[i], b0)  # numpy: jit's own transfer is the fastest
        out = []
        with jax.default_device(devices[i % len(devices)]) if len(devices) > 1 else contextlib.nullcontext():
            fits = [jax.device_get(_solve_kernel(*args, cfg=cfg)) for cfg in cfgs]
        for fit in fits:
            folded, offset = _fold(parts, w0s, fit._replace(a=fit.a[:k]), mc)
            out.append((folded, offset, (fit.loss, fit.converged, fit.grad_norm, fit.steps)))
        return out

    def submit(lo: int) -> list:
        """Draw the initial weights of heads ``lo ..`` (one block) and queue their fits."""
        idx = np.minimum(np.arange(lo, lo + _INIT_BLOCK), H - 1)  # a fixed block shape: one compilation
        W0, B0 = jax.device_get(_init_block(seeds31[idx], sum(dims), None if mc else C))
        return [pool.submit(head, i, W0[i - lo], None if B0 is None else B0[i - lo])
                for i in range(lo, min(H, lo + _INIT_BLOCK))]

    pool = _pool(workers)
    heads = []
    with threadpool_limits(limits=1, user_api="blas"):
        # at most two blocks in flight: the next block's weights are drawn while this one is fitted
        queued = submit(0)
        for lo in range(0, H, _INIT_BLOCK):
            following = submit(lo + _INIT_BLOCK) if lo + _INIT_BLOCK < H else []
            for f in queued:
                heads.append(f.result())
                if on_chunk is not None:
                    on_chunk(len(cfgs))
            queued = following
        results = []
        for j, cfg in enumerate(cfgs):
            out = [h[j] for h in heads]
            folded = [np.stack([o[0][l] for o in out]) for l in range(len(Xs))]
            offsets = np.stack([o[1] for o in out])
            p_gold, correct = _score_host(Xs, folded, offsets, n_choices, gold, cfg, pool)
            loss, conv, gnorm, steps = (np.array([o[2][k] for o in out]) for k in range(4))
            results.append(HeadResults(p_gold, correct, loss, conv, gnorm, steps))
    return results


def _fold(parts: Sequence[LayerRows], w0s: Sequence[np.ndarray], fit: solvers.Fit, mc: bool):
    """Weights that score raw features, ``score = x . v + offset``: ``v_l = w_l / sigma_l`` with
    ``w = beta * w0 + Z.T a``, ``offset = -sum_l mu_l . v_l (+ bias)``."""
    folded = []
    offset = np.zeros(() if mc else fit.b.shape, np.float32)
    for p, w0 in zip(parts, w0s):
        v = fit.beta * w0 + p.Z.T @ fit.a
        v /= p.sigma if mc else p.sigma[:, None]
        folded.append(v.astype(np.float32))
        offset = offset - p.mu @ v
    if fit.b is not None:
        offset = offset + fit.b
    return folded, offset.astype(np.float32)


def _score_host(Xs, folded, offsets, n_choices, gold, cfg, pool, block: int = 256):
    """Every head's p(gold) and correctness on every item, (H, N) each, a block of items per task."""
    N, H = Xs[0].shape[0], offsets.shape[0]
    mc = cfg.head == "mc"

    def items(lo: int):
        hi = min(N, lo + block)
        if mc:  # (b*C, d) x (d, H) per layer
            S = sum(X[lo:hi].reshape(-1, X.shape[-1]) @ v.T for X, v in zip(Xs, folded))
            S = S.T.reshape(H, hi - lo, -1) + offsets[:, None, None]
        else:  # (b, d) x (d, H*C)
            S = sum(X[lo:hi] @ np.moveaxis(v, 0, 1).reshape(X.shape[1], -1) for X, v in zip(Xs, folded))
            S = np.moveaxis(S.reshape(hi - lo, H, -1), 1, 0) + offsets[:, None, :]
        Cs = S.shape[-1]
        real = np.arange(Cs)[None, :] < n_choices[lo:hi, None]
        mask = np.ones_like(real) if (mc and cfg.pad == "zero") else real
        S = np.where(mask[None], S, -np.inf)
        top = S.max(-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(S - top).sum(-1))
        g = gold[lo:hi]
        s_gold = np.take_along_axis(S, np.broadcast_to(g[None, :, None], (H, hi - lo, 1)), axis=-1)[..., 0]
        p = np.exp(s_gold - lse).astype(np.float32)
        return p, ((S.argmax(-1) == g[None, :]) & np.isfinite(p)).astype(np.int8)  # no credit for NaN weights

    parts = list(pool.map(items, range(0, N, block)))
    return np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)


# ----- on accelerators: one jitted, vmapped computation per chunk of heads --------------------------
def _fit_and_score_device(Xs, n_choices, gold, rows, labels, seeds31, layout, cfg, *, devices, chunk, on_chunk):
    H, n = rows.shape
    mesh = _mesh(devices)
    n_dev = mesh.devices.size
    dim = sum(X.shape[-1] for X in Xs)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_head = NamedSharding(mesh, PartitionSpec("heads"))
    Xd = [put_layer(X, devices) for X in Xs]
    h_chunk = chunk or default_chunk(layout[0].shape[1] if cfg.head == "mc" else n, dim, n_dev,
                                     _device_budget(mesh.devices.flat), H)
    h_chunk = max(n_dev, -(-h_chunk // n_dev) * n_dev)
    nc_d = jax.device_put(n_choices, replicated)
    gold_d = jax.device_put(gold, replicated)
    per_head = [rows, labels, seeds31, *layout]
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
