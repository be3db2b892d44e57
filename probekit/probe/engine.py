"""Fit many linear heads on one feature set and score them.

:func:`fit_and_score` takes the layer matrices of one feature set (one layer, or several to
concatenate) and a batch of heads, each given by its training item rows and (possibly noisy)
labels, and returns every head's probability of the gold answer and correctness on every item
(:func:`fit_and_score_many`: several configurations of the same heads, e.g. both solvers, sharing
each head's Gram matrix). Per head the work is one Gram GEMM over its normalised training rows, a
solver in coefficient space and one GEMM that scores all items, see :mod:`probekit.probe.kernel`.

Both execution paths run the one recipe of :mod:`probekit.probe.kernel` with a solver of
:mod:`probekit.probe.solvers`. On CPU devices (the host path) the D-wide work (rows, Gram, weight
recovery, scoring) runs in numpy BLAS, single-threaded, in one thread per core, a head at a time
per thread, and only the m x m solver is jitted; the layer is held once, as float32 numpy. On
accelerators heads are processed in fixed-size chunks, each one jitted, vmapped computation
sharded over ``jax.devices()`` along the head axis, the layer matrices replicated. Callers need
not know which: :func:`prepare` places a feature set where its heads will be fitted, and
:func:`compile_heads` compiles ahead what the path needs compiled ahead.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from probekit.errors import ProbekitError
from probekit.probe import cvpath, runtime, solvers
from probekit.probe.kernel import (
    PAD_MODES,
    Kernel,
    Scratch,
    Slots,
    fold,
    head_kernel,
    head_rows,
    init_weights,
    mc_rows_needed,
    mc_slots,
    score,
)
from probekit.probe.runtime import default_workers

HEADS = ("mc", "multinomial")


@dataclass(frozen=True)
class ProbeConfig:
    """How every head of a batch is fitted.

    ``head``: ``"mc"`` (one weight vector scores each answer slot, softmax over the item's choices;
    answer_end features) or ``"multinomial"`` (a (d, C) matrix plus bias maps the item's feature
    to class scores; question_end features). ``solver``: a name in
    :data:`probekit.probe.solvers.SOLVERS` (``"paper"``, docs/protocol.md §4, or ``"converged"``), which
    reads its options from the fields below. ``pad``: ``"mask"`` excludes padded choices
    everywhere, ``"zero"`` keeps them as zero vectors in the normalisation statistics and the
    softmax, as the protocol does (multinomial heads always mask padded classes). ``l2``: the paper's unsquared penalty
    weight. ``C``: the converged solver's inverse regularisation strength, as in scikit-learn
    (loss = mean NLL + |w|^2 / (2 C n_train)). ``tol``: converged solver's relative optimality
    (stop once the gradient bounds the loss's excess over its minimum by ``tol`` times the loss).
    ``select``: choose the solver's strength (``l2`` for paper, ``C`` for converged) by
    cross-validation inside each head's draw (:class:`~probekit.probe.cvpath.Selection`; the
    heads' folds are given to :func:`fit_and_score_many`), which then replaces that option.

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
    tol: float = solvers.DEFAULT_TOL
    max_newton: int = 50
    select: cvpath.Selection | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("head", self.head, HEADS), ("solver", self.solver, solvers.SOLVERS),
                                     ("pad", self.pad, PAD_MODES)):
            if value not in allowed:
                raise ProbekitError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name, low, strict in _NUMBERS:
            value = getattr(self, name)
            whole = name in _COUNTS
            ok = (isinstance(value, numbers.Integral) if whole else isinstance(value, numbers.Real)) \
                and not isinstance(value, bool) and math.isfinite(value) and (value > low if strict else value >= low)
            if not ok:
                kind = "a whole number" if whole else "a finite number"
                raise ProbekitError(f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {value!r}")
        if self.select is not None:
            if not isinstance(self.select, cvpath.Selection):
                raise ProbekitError(f"select must be a cvpath.Selection, got {self.select!r}")
            strength = solvers.SOLVERS[self.solver].strength
            if self.select.option != strength:
                raise ProbekitError(f"solver {self.solver!r} chooses {strength}, not {self.select.option}")
            low, strict = next((lo, st) for name, lo, st in _NUMBERS if name == strength)
            for value in self.select.grid:
                if not (value > low if strict else value >= low):
                    raise ProbekitError(f"{strength} must be a finite number {'>' if strict else '>='} {low:g}, "
                                        f"got {value!r}")


#: Numeric options of :class:`ProbeConfig` and their bounds: (name, bound, strictly above it).
_NUMBERS = (("l2", 0, False), ("lr", 0, True), ("steps", 1, False), ("max_grad_norm", 0, True), ("C", 0, True),
            ("tol", 0, True), ("max_newton", 1, False))
_COUNTS = ("steps", "max_newton")


def head_key(seed: int) -> jax.Array:
    """The jax PRNG key of a head with :func:`~probekit.design.plan.head_seed` ``seed``."""
    return jax.random.key(seed)


# ----- one head: the recipe with the configured solver -----------------------------------------------
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


def _fit_head(Xs, rows, labels, w0, b0, slots: Slots, cfgs: Sequence[ProbeConfig], solve: Callable,
              scratch: Scratch | None = None, folds=None) -> list:
    """One head fitted on the feature set ``Xs`` under each configuration (they share its rows and
    kernel): ``[(folded weights per layer, offset, Fit)]``. ``solve(kern, cfg)`` runs the solver;
    ``folds`` (n,): each training item's fold, for the configurations that cross-validate.

    The folded weights ``v_l = w_l / sigma_l`` and ``offset = -sum_l mu_l . v_l (+ bias)`` score raw
    features directly: ``score = x . v + offset`` (:func:`~probekit.probe.kernel.fold`).
    """
    cfg = cfgs[0]
    parts = head_rows(Xs, rows, slots, cfg.head == "mc", cfg.pad, scratch)
    kern, w0s = head_kernel(parts, w0, b0, slots, labels)
    out = []
    for c in cfgs:
        fit = solve(kern if c.select is None else kern._replace(fold=folds), c)
        out.append((*fold(parts, w0s, fit), fit))
    return out


def _solve(kern: Kernel, cfg: ProbeConfig) -> solvers.Fit:
    """The configured solver (:data:`~probekit.probe.solvers.SOLVERS`) on one head's kernel, or its
    cross-validated path with the refit at the chosen strength (:func:`probekit.probe.cvpath.select`)."""
    if cfg.select is not None:
        return cvpath.select(kern, solvers.SOLVERS[cfg.solver], cfg, cfg.select)
    return solvers.SOLVERS[cfg.solver](kern, cfg)


@partial(jax.jit, static_argnames=("cfg",))
@_float32_products
def _solve_kernel(kern: Kernel, *, cfg: ProbeConfig) -> solvers.Fit:
    """:func:`_solve` on a kernel computed on the host (one head)."""
    return _solve(kern, cfg)


def _fit_one(Xs, rows, labels, hseed, slots: Slots, folds, *, cfg: ProbeConfig):
    """One head traced on an accelerator: its initial weights drawn, then :func:`_fit_head`."""
    mc = cfg.head == "mc"
    w0, b0 = init_weights(head_key(hseed), sum(X.shape[-1] for X in Xs), None if mc else slots.mask.shape[-1])
    return _fit_head(Xs, rows, labels, w0, b0, slots, [cfg], _solve, folds=folds)[0]


@partial(jax.jit, static_argnames=("cfg",))
@_float32_products
def _fit_chunk(Xs, rows, labels, seeds, slots: Slots, folds, *, cfg: ProbeConfig):
    return jax.vmap(partial(_fit_one, cfg=cfg), in_axes=(None, 0, 0, 0, 0, 0))(Xs, rows, labels, seeds, slots, folds)


@partial(jax.jit, static_argnames=("mc", "every_slot"))
@_float32_products
def _score_jit(Xs, folded, offsets, n_choices, gold, *, mc: bool, every_slot: bool):
    return score(Xs, folded, offsets, n_choices, gold, mc, every_slot)


@dataclass
class HeadResults:
    """Per-head outputs of :func:`fit_and_score` (numpy): ``p_gold``/``correct`` are (H, N)."""

    p_gold: np.ndarray
    correct: np.ndarray
    loss: np.ndarray
    converged: np.ndarray
    grad_norm: np.ndarray
    steps: np.ndarray
    zero_weights: np.ndarray  # (H,) bool: zero weights are the exact optimum (solvers.zero_is_optimal)
    # a cross-validated configuration (ProbeConfig.select), else None: each fold's mean held-out
    # log-loss and accuracy at each strength and whether that fold's fit converged (H, folds,
    # strengths), and the grid index chosen (H,)
    cv_loss: np.ndarray | None = None
    cv_accuracy: np.ndarray | None = None
    cv_converged: np.ndarray | None = None
    chosen: np.ndarray | None = None


#: The per-head fields of a :class:`~probekit.probe.solvers.Fit` that :class:`HeadResults` keeps, in its order.
_STATS = ("loss", "converged", "grad_norm", "steps", "zero_weights", "cv_loss", "cv_accuracy", "cv_converged",
          "chosen")


def _results(p_gold, correct, stats: Sequence) -> HeadResults:
    """:class:`HeadResults` from the scores and the :data:`_STATS` arrays (None: not cross-validated)."""
    out = HeadResults(p_gold, correct, *stats)
    out.zero_weights = out.zero_weights.astype(bool)
    return out


def _mesh(devices: Sequence[jax.Device] | None) -> Mesh:
    return Mesh(np.asarray(list(devices or jax.devices())), ("heads",))


def on_host(devices: Sequence[jax.Device] | None = None) -> bool:
    """Whether heads are fitted with host BLAS (every device is a CPU) rather than on accelerators."""
    return all(d.platform == "cpu" for d in (devices or jax.devices()))


@dataclass(frozen=True, eq=False)
class PreparedLayer:
    """A feature set placed where its heads are fitted (:func:`prepare`): ``Xs`` the layer matrices
    to concatenate (middle first), float32 numpy on the host path, replicated over ``devices``
    otherwise; ``host`` which path fits its heads."""

    Xs: tuple
    devices: tuple
    host: bool


def prepare(Xs: Iterable[np.ndarray | jax.Array], devices: Sequence[jax.Device] | None = None, *,
            host: bool | None = None) -> PreparedLayer:
    """The feature set ``Xs`` where :func:`fit_and_score` reads it: float32 numpy when fitting on the
    host (by default when every device is a CPU), otherwise replicated on every device (a no-op for
    a matrix already placed so).

    ``Xs`` may be an iterator: each matrix is placed, and the caller's one dropped, before the next
    is read, so that one copy of each layer is held while heads are fitted.

    Example:
        >>> layer = prepare(cache.read_layer("answer_end", l) for l in (16, 30))
        >>> fit_and_score(layer, n_choices, gold, rows, labels, seeds, cfg)
    """
    devices = tuple(devices or jax.devices())
    host = on_host(devices) if host is None else host
    sharding = None if host else NamedSharding(_mesh(devices), PartitionSpec())
    placed = []
    for X in Xs:
        placed.append(np.asarray(X, np.float32) if host else jax.device_put(X, sharding))
        del X
    return PreparedLayer(tuple(placed), devices, host)


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


def fit_and_score(
    Xs: PreparedLayer | Sequence[np.ndarray],
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
    folds: np.ndarray | None = None,
) -> HeadResults:
    """Fit heads on the feature set ``Xs`` and score every item with each.

    ``Xs``: a :class:`PreparedLayer` (:func:`prepare`), or the layers to concatenate (middle first),
    each (N, C, d) for ``cfg.head == "mc"`` or (N, d) for ``"multinomial"``; ``n_choices`` (N,)
    real choices per item; ``gold`` (N,) the labels used for scoring; ``rows`` (H, n) training
    item rows per head; ``labels`` (H, n) training labels (noisy ones for label-noise heads);
    ``seeds`` (H,) per-head initialisation seeds (:func:`~probekit.design.plan.head_seed`). ``on_chunk(k)`` is called as
    fits complete with their count. ``folds`` (H, n): each training item's cross-validation fold
    (:func:`probekit.data.draws.cv_folds`), needed when ``cfg.select`` is set; the results then
    hold each head's cross-validation curve and choice (:class:`HeadResults`).

    With ``host`` (the default on CPU devices) each head's rows, Gram matrix, weight recovery and
    scoring use numpy BLAS in ``workers`` threads (default: one per core; BLAS itself runs
    single-threaded meanwhile), and the solver runs jitted on the head's kernel, heads spread over
    ``devices`` in turn. Otherwise (the default on accelerators) heads are fitted in chunks of
    ``chunk`` heads (default: as many as a quarter of the devices' free memory holds, see
    :func:`default_chunk`), each one jitted, vmapped computation sharded over ``devices`` along the
    head axis. A prepared ``Xs`` brings its own devices and path; ``host`` overrides the path.

    Example:
        >>> res = fit_and_score([X], n_choices, gold, rows, labels, seeds, ProbeConfig(pad="zero"))
        >>> res.p_gold.shape  # (heads, items)
    """
    return fit_and_score_many(Xs, n_choices, gold, rows, labels, seeds, [cfg], devices=devices, chunk=chunk,
                              workers=workers, host=host, on_chunk=on_chunk, folds=folds)[0]


def fit_and_score_many(
    Xs: PreparedLayer | Sequence[np.ndarray],
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
    folds: np.ndarray | None = None,
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
    layer = Xs if isinstance(Xs, PreparedLayer) else prepare(Xs, devices, host=host)
    if host is not None and layer.host != host:
        layer = prepare(layer.Xs, layer.devices, host=host)
    cfg = cfgs[0]
    rows = np.asarray(rows, np.int32)
    labels = np.asarray(labels, np.int32)
    seeds = np.asarray(seeds, np.int64)
    H, n = rows.shape
    C = layer.Xs[0].shape[1] if cfg.head == "mc" else int(np.max(n_choices))
    if labels.shape != rows.shape or seeds.shape != (H,):
        raise ProbekitError(f"rows {rows.shape}, labels {labels.shape} and seeds {seeds.shape} disagree")
    if n < 2:
        raise ProbekitError(f"heads need at least 2 training items, got {n}")
    folds = _check_folds(folds, cfgs, rows.shape)
    n_choices = np.asarray(n_choices, np.int32)
    gold = np.asarray(gold, np.int32)
    layout = _layout(n_choices, rows, cfg, C)
    seeds31 = (seeds & 0x7FFFFFFF).astype(np.int32)
    if layer.host:
        return _fit_and_score_host(layer, n_choices, gold, rows, labels, seeds31, layout, cfgs,
                                   workers=workers or default_workers(), on_chunk=on_chunk, folds=folds)
    return [_fit_and_score_device(layer, n_choices, gold, rows, labels, seeds31, layout, c, chunk=chunk,
                                  on_chunk=on_chunk, folds=folds) for c in cfgs]


def _check_folds(folds, cfgs: Sequence[ProbeConfig], shape: tuple[int, int]) -> np.ndarray | None:
    """The heads' folds as int32 (None when no configuration cross-validates), checked against the
    configurations' fold count: every fold of every head holds out at least one item."""
    ks = {c.select.folds for c in cfgs if c.select is not None}
    if not ks:
        return None
    if folds is None:
        raise ProbekitError("a cross-validated configuration (select) needs each head's folds")
    if len(ks) > 1:
        raise ProbekitError(f"configurations fitted together must use the same number of folds, got {sorted(ks)}")
    k = ks.pop()
    folds = np.asarray(folds)
    if folds.shape != shape:
        raise ProbekitError(f"folds {folds.shape} and rows {shape} disagree")
    counts = np.stack([(folds == f).sum(1) for f in range(k)], 1)
    if folds.min() < 0 or folds.max() >= k or (counts == 0).any():
        raise ProbekitError(f"every head needs items in each of its {k} folds 0..{k - 1}")
    return folds.astype(np.int32)


def _kernel_size(n_choices: np.ndarray, rows: np.ndarray, cfg: ProbeConfig) -> int:
    """Rows of every head's kernel: the most any head needs, rounded up to a multiple of 8."""
    if cfg.head != "mc":
        return rows.shape[1]
    m = max(mc_rows_needed(n_choices[r], cfg.pad) for r in rows)
    return -(-m // 8) * 8


def _layout(n_choices: np.ndarray, rows: np.ndarray, cfg: ProbeConfig, C: int) -> Slots:
    """Every head's :class:`Slots`, stacked over heads (numpy)."""
    if cfg.head == "mc":
        m = _kernel_size(n_choices, rows, cfg)
        slots = [mc_slots(r, n_choices, C, m, cfg.pad) for r in rows]
        return Slots(*(np.stack(f) for f in zip(*slots)))
    # no slots: classes are the item's choice positions, padded classes masked
    return Slots(None, None, None, np.arange(C)[None, None, :] < n_choices[rows][:, :, None], None)


def compile_heads(n_choices: np.ndarray, rows: np.ndarray, cfgs: Sequence[ProbeConfig], dim: int,
                  max_choices: int, *, devices: Sequence[jax.Device] | None = None,
                  host: bool | None = None) -> None:
    """Compile ahead what fitting these heads on feature sets of width ``dim`` runs, where the path
    needs it: on the host (the default on CPU devices) each configuration's solver and the initial
    weights are compiled before any layer is read, and the compiler's freed scratch memory handed
    back to the operating system, so compiling never adds to the footprint of a layer; on
    accelerators (compiled per chunk shape as heads are fitted) nothing is done.

    ``rows`` (H, n) as for :func:`fit_and_score_many`; ``max_choices``: the answer slots of a
    multiple-choice layer (its second axis).
    """
    if not (on_host(devices) if host is None else host):
        return
    cfg = cfgs[0]
    mc = cfg.head == "mc"
    rows = np.asarray(rows)
    n = rows.shape[1]
    C = max_choices if mc else int(np.max(n_choices))
    m = _kernel_size(np.asarray(n_choices), rows, cfg)
    spec = jax.ShapeDtypeStruct
    f32, i32 = np.float32, np.int32
    kern = Kernel(spec((m, m), f32), spec((m,) if mc else (m, C), f32), spec((), f32),
                  spec((n, C), i32) if mc else None, spec((m,), i32) if mc else None, spec((n, C), np.bool_),
                  spec((n,), i32), None if mc else spec((C,), f32))
    for c in cfgs:
        _solve_kernel.lower(kern if c.select is None else kern._replace(fold=spec((n,), i32)), cfg=c).compile()
    _init_block.lower(spec((_INIT_BLOCK,), i32), dim, None if mc else C).compile()
    runtime.release_freed_memory()


# ----- on the host: the recipe in numpy BLAS, the solver jitted per head ------------------------------
_INIT_BLOCK = 64  # heads whose initial weights are drawn in one call (and in flight per step)


@partial(jax.jit, static_argnums=(1, 2))
def _init_block(seeds, dim: int, n_out: int | None):
    """:func:`init_weights` of every head in a block (the same numbers as one head at a time)."""
    return jax.vmap(lambda s: init_weights(head_key(s), dim, n_out))(seeds)


def _fit_and_score_host(layer: PreparedLayer, n_choices, gold, rows, labels, seeds31, layout: Slots, cfgs, *,
                        workers, on_chunk, folds=None):
    H = rows.shape[0]
    Xs, devices = layer.Xs, layer.devices
    mc = cfgs[0].head == "mc"
    dim = sum(X.shape[-1] for X in Xs)
    C = layout.mask.shape[-1]
    local = threading.local()  # each worker thread's scratch buffers

    def solve(i: int):
        """The solver on head ``i``'s kernel, on one of the devices in turn (numpy in and out: jit's
        own transfer is the fastest)."""
        def run(kern, cfg):
            with jax.default_device(devices[i % len(devices)]) if len(devices) > 1 else contextlib.nullcontext():
                return jax.device_get(_solve_kernel(kern, cfg=cfg))
        return run

    def head(i: int, w0: np.ndarray, b0: np.ndarray | None):
        """Head ``i`` under every configuration: [(folded weights, offset, fit stats)]."""
        scratch = local.__dict__.setdefault("scratch", Scratch())
        out = _fit_head(Xs, rows[i], labels[i], w0, b0, layout.take(i), cfgs, solve(i), scratch,
                        None if folds is None else folds[i])
        return [(folded, offset, tuple(getattr(fit, k) for k in _STATS)) for folded, offset, fit in out]

    def submit(lo: int) -> list:
        """Draw the initial weights of heads ``lo ..`` (one block) and queue their fits."""
        idx = np.minimum(np.arange(lo, lo + _INIT_BLOCK), H - 1)  # a fixed block shape: one compilation
        W0, B0 = jax.device_get(_init_block(seeds31[idx], dim, None if mc else C))
        return [pool.submit(head, i, W0[i - lo], None if B0 is None else B0[i - lo])
                for i in range(lo, min(H, lo + _INIT_BLOCK))]

    pool = runtime.pool(workers)
    heads = []
    with runtime.single_threaded_blas():
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
            folded = [np.stack([o[0][k] for o in out]) for k in range(len(Xs))]
            offsets = np.stack([o[1] for o in out])
            p_gold, correct = _score_host(Xs, folded, offsets, n_choices, gold, cfg, pool)
            results.append(_results(p_gold, correct, [_stack([o[2][k] for o in out]) for k in range(len(_STATS))]))
    return results


def _stack(values: list):
    """Per-head values stacked over heads; None where the fits have none (no cross-validation)."""
    return None if values[0] is None else np.array(values)


def _score_host(Xs, folded, offsets, n_choices, gold, cfg, pool, block: int = 256):
    """:func:`~probekit.probe.kernel.score` a block of items per task."""
    mc, every_slot = cfg.head == "mc", cfg.head == "mc" and cfg.pad == "zero"

    def items(lo: int):
        hi = lo + block
        return score([X[lo:hi] for X in Xs], folded, offsets, n_choices[lo:hi], gold[lo:hi], mc, every_slot)

    parts = list(pool.map(items, range(0, Xs[0].shape[0], block)))
    return np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)


# ----- on accelerators: one jitted, vmapped computation per chunk of heads --------------------------
def _fit_and_score_device(layer: PreparedLayer, n_choices, gold, rows, labels, seeds31, layout: Slots, cfg, *,
                          chunk, on_chunk, folds=None):
    H, n = rows.shape
    Xd = layer.Xs
    mesh = _mesh(layer.devices)
    n_dev = mesh.devices.size
    dim = sum(X.shape[-1] for X in Xd)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_head = NamedSharding(mesh, PartitionSpec("heads"))
    h_chunk = chunk or default_chunk(layout.flat.shape[1] if cfg.head == "mc" else n, dim, n_dev,
                                     _device_budget(mesh.devices.flat), H)
    h_chunk = max(n_dev, -(-h_chunk // n_dev) * n_dev)
    nc_d = jax.device_put(n_choices, replicated)
    gold_d = jax.device_put(gold, replicated)
    score_chunk = max(n_dev, min(-(-H // n_dev) * n_dev, 128 // n_dev * n_dev))
    folded, offsets, stats = [], [], []
    for lo in range(0, H, h_chunk):
        idx = np.minimum(np.arange(lo, lo + h_chunk), H - 1)  # pad the last chunk with its last head
        args = jax.device_put((rows[idx], labels[idx], seeds31[idx], layout.take(idx),
                               None if cfg.select is None else folds[idx]), by_head)
        f, off, fit = _fit_chunk(Xd, *args, cfg=cfg)
        keep = min(h_chunk, H - lo)
        folded.append([v[:keep] for v in f])
        offsets.append(off[:keep])
        stats.append([None if x is None else np.asarray(x)[:keep] for x in (getattr(fit, k) for k in _STATS)])
        if on_chunk is not None:
            on_chunk(keep)
    folded = [jnp.concatenate([f[i] for f in folded]) for i in range(len(Xd))]
    offsets = jnp.concatenate(offsets)
    p_gold, correct = [], []
    for lo in range(0, H, score_chunk):  # one GEMM over the items per block of heads
        idx = np.minimum(np.arange(lo, lo + score_chunk), H - 1)
        sl = [jax.device_put(v[idx], by_head) for v in folded]
        p, c = _score_jit(Xd, sl, jax.device_put(offsets[idx], by_head), nc_d, gold_d,
                          mc=cfg.head == "mc", every_slot=cfg.head == "mc" and cfg.pad == "zero")
        keep = min(score_chunk, H - lo)
        p_gold.append(np.asarray(p)[:keep])
        correct.append(np.asarray(c)[:keep])
    return _results(np.concatenate(p_gold), np.concatenate(correct),
                    [None if stats[0][i] is None else np.concatenate([s[i] for s in stats]) for i in range(len(_STATS))])
