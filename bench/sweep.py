"""Benchmark: the probe engine's population sweep against careful per-fit loops, measured side by side.

1. Writes (once; reused while its shape matches) a synthetic cache shaped like a Llama-2-7B ARC run
   (3521 probe items with the real ARC difficulty annotations when ../shared/data is there,
   5 answer slots, 33 layers, width 4096, float16) THROUGH probekit.store's writer, shard by shard.
   Features have a real model's covariance spectrum (``--features isotropic``: white noise; see
   ``feature_basis``); a planted direction marks each gold answer slot (fainter for higher
   grades), so probes learn.
2. Times ``probekit.probe.sweep`` on the population experiment (every layer x 5 measures x
   easy/medium/hard x 5 draws, n_train 160; ``--pad mask`` (default) or ``zero``, the protocol's
   zero-padding) with each solver, and the converged multinomial head on question_end, each in a
   fresh child process so its peak RSS is its own.
3. Times, on a sample of the same heads and the same layer, per-fit loops a careful user would write:
   the paper recipe in plain numpy (vectorised within the fit, folded z-normalisation for scoring),
   and scipy L-BFGS on the converged solver's loss to the same optimum. On a CUDA machine (or with
   ``--torch-loop``) also the paper recipe one fit at a time in torch on the GPU, which kernel
   launches bound, and the GPU's float32 GEMM rate.
4. Measures the machine: numpy float32 GEMM GFLOP/s and memory bandwidth (large array copy).

Prints fits/s, ratios, the engine's achieved GFLOP/s (flops executed: the Gram as the symmetric
rank-k update numpy runs, initial scores, weight recovery, the solver's own steps where fixed,
scoring; and the same with the Gram counted as a full product) beside the GEMM rate, and peak RSS
beside one layer's size (float32, as the engine holds it).

5. ``--cv``: only the cross-validated strength path (``sweep --select cvK``) on the last layer, for a
   sample of the population heads: the batched path (every fold and strength of every head, and the
   refit) against scikit-learn's ``LogisticRegressionCV`` fitted head by head on the same folds, grid
   and scoring (question_end, the converged solver: scikit-learn's objective), with how often the two
   choose the same C; and the path against one plain fit of the same heads (question_end and
   answer_end, both solvers), i.e. what choosing the strength costs.

Example:
    python bench/sweep.py                      # the full shape (writes ~5 GB once, takes a while)
    python bench/sweep.py --layers 4 --sample 4
    python bench/sweep.py --startup            # sweep start-up only: first sweep vs a repeated one
    python bench/sweep.py --cv --layers 2 --cache /tmp/probekit-bench/cv-cache   # the CV path only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

# jax would otherwise claim most of a GPU's memory in this process, leaving none to the sweep's own
# process or to the torch per-fit loop
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = Path(__file__).resolve().parents[1]
MEASURES = ["grade", "difficulty", "bloom", "question_num_words", "answer_num_words"]
C = 5


# ----- the synthetic cache -------------------------------------------------------------------------
def arc_items(n_items: int, rng: np.random.Generator) -> pd.DataFrame:
    """Probe items with real ARC annotations (../shared/data, else the bundled sample, resampled)."""
    from probekit.data import load_dataset

    shared = REPO.parent / "shared" / "data"
    try:
        t = load_dataset("arc", data_dir=shared).table if (shared / "arc").is_dir() else None
    except Exception:  # noqa: BLE001 - fall back to the bundled sample
        t = None
    if t is None:
        t = load_dataset("bundled").table
    t = t[t["pool"] == "probe"].reset_index(drop=True)
    pick = np.arange(n_items) % len(t) if n_items > len(t) else np.arange(n_items)
    t = t.iloc[pick].reset_index(drop=True)
    return pd.DataFrame({
        "id": [f"{i}-{k}" for k, i in enumerate(t["id"])], "label": t["label"].to_numpy(),
        "n_choices": t["choices"].map(len).to_numpy(), "pool": "probe", "source": t["source"],
        **{m: t[m].to_numpy(float) for m in MEASURES},
    })


def feature_basis(width: int, features: str, rng: np.random.Generator) -> np.ndarray | None:
    """Rows that map white noise to features with a realistic covariance, or None for white noise.

    ``correlated`` (the default): covariance eigenvalues proportional to 1/i (mean 1) in a random
    orthonormal basis. That is the spectrum of real hidden states: z-normalised answer_end states
    of SmolLM2 on ARC put 16% of the variance in the top direction, 1.4% in the 10th and 0.19% in
    the 100th (1/i at width 576: 14.5%, 1.4%, 0.15%), and on synthetic width-576 features with
    this spectrum scipy L-BFGS needs as many iterations per probe (59-68) as on the real states
    (56-69), where white noise needs 13-18. ``isotropic``: white noise (every direction alike).
    """
    if features == "isotropic":
        return None
    lam = 1.0 / np.arange(1, width + 1)
    lam *= width / lam.sum()
    q, _ = np.linalg.qr(rng.standard_normal((width, width), dtype=np.float32))
    return (np.sqrt(lam)[:, None] * q.T).astype(np.float32)


def write_bench_cache(path: Path, n_items: int, n_layers: int, width: int, features: str = "correlated",
                      seed: int = 0) -> Path:
    """The synthetic cache (reused while its shape and feature kind match; see :func:`feature_basis`).

    Each answer slot is noise shared by the item's choices (half the variance: the choices follow
    one prompt) plus its own, mapped through the basis; the gold slot is shifted along a planted
    unit direction by about 2.5 noise standard deviations, less for higher grades and earlier
    layers, so that probes land near the accuracies real 7B probes reach (60-80%, not 100%).
    """
    from probekit.store import Cache, write_cache

    shape = {"n_items": n_items, "layers": list(range(n_layers)), "hidden_size": width}
    if (path / "manifest.json").exists():
        try:
            c = Cache(path)
            if ((c.n_items, c.layers, c.hidden_size) == (n_items, shape["layers"], width)
                    and c.manifest.get("model", {}).get("features") == features):
                return path
        except Exception:  # noqa: BLE001 - rewrite an unusable cache
            pass
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    items = arc_items(n_items, rng)
    gold = items["label"].to_numpy()
    n_choices = items["n_choices"].to_numpy()
    strength = 2.5 * (1.6 - 0.12 * np.nan_to_num(items["grade"].to_numpy(), nan=6.0))
    basis = feature_basis(width, features, rng)
    direction = rng.standard_normal((n_layers, width), dtype=np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    depth = np.linspace(0.2, 1.0, n_layers, dtype=np.float32)
    class_dirs = rng.standard_normal((C, width), dtype=np.float32)
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)

    def noise(r: np.random.Generator, shape: tuple[int, ...], shared_axis: int | None) -> np.ndarray:
        e = r.standard_normal(shape, dtype=np.float32)
        if shared_axis is not None:
            e *= np.sqrt(0.5, dtype=np.float32)
            e += np.sqrt(0.5, dtype=np.float32) * r.standard_normal(
                shape[:shared_axis] + (1,) + shape[shared_axis + 1:], dtype=np.float32)
        return e if basis is None else (e.reshape(-1, width) @ basis).reshape(shape)

    def shard(lo: int, hi: int) -> dict:
        r = np.random.default_rng([seed, lo])
        b = hi - lo
        ans = noise(r, (n_layers, b, C, width), shared_axis=2)
        is_gold = (np.arange(C)[None, :] == gold[lo:hi, None]).astype(np.float32) * strength[lo:hi, None]
        ans += depth[:, None, None, None] * is_gold[None, :, :, None] * direction[:, None, None, :]
        real = np.arange(C)[None, :] < n_choices[lo:hi, None]
        ans[:, ~real] = 0.0
        cs = np.where(real, r.normal(-9, 2, (b, C)) + 1.5 * (np.arange(C)[None, :] == gold[lo:hi, None]), -np.inf)
        qst = noise(r, (n_layers, b, width), shared_axis=None)
        qst += depth[:, None, None] * (strength[lo:hi, None] * class_dirs[gold[lo:hi]])[None]
        return {"answer_end": ans.astype(np.float16), "question_end": qst.astype(np.float16),
                "choice_sum": cs.astype(np.float32), "choice_tokens": np.where(real, 4, 0)}

    t0 = time.perf_counter()
    write_cache(
        path, {"model": {"id": "synthetic-llama-2-7b-shape", "n_layers": n_layers - 1, "features": features},
               "dataset": {"name": "arc", "fingerprint": "synthetic"}, "prompt": {"id": "0040"}},
        items, shard, layers=shape["layers"], sites=["answer_end", "question_end"], hidden_size=width, max_choices=C,
        measures=MEASURES, shard_size=128,
    )
    print(f"wrote {path} ({n_items} items x {n_layers} layers x {C} x {width}, {features} features) "
          f"in {time.perf_counter() - t0:.0f} s")
    return path


# ----- machine rates -------------------------------------------------------------------------------
def gemm_gflops(n: int = 4096) -> float:
    """numpy float32 GEMM rate, the better of one BLAS thread and all of them (on a busy machine
    threads that wait on each other can make the default setting the slower one)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    rates = []
    for threads in (1, None):
        with threadpool_limits(limits=threads):
            a @ a
            rates.append(2 * n**3 / min(_timed(lambda: a @ a) for _ in range(3)) / 1e9)
    return max(rates)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    return 2 * nbytes / best / 1e9  # read + write


def gram_seconds(k: int, d: int) -> float:
    """One head's Gram matrix ``Z @ Z.T`` ((k, d) float32, numpy's symmetric rank-k update) on one core."""
    z = np.random.default_rng(0).standard_normal((k, d), dtype=np.float32)
    with threadpool_limits(limits=1):
        z @ z.T
        return min(_timed(lambda: z @ z.T) for _ in range(5))


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ----- per-fit references --------------------------------------------------------------------------
def _train_rows(X, n_choices, rows, pad):
    """A head's normalised training slots (float32) in plain numpy: (n, C, D) rows and the softmax mask.

    zero: the protocol's zero-padding (padded slots are zero vectors in the statistics and the
    softmax); mask: padded slots left out of both."""
    N, Cm, D = X.shape
    Xtr = X[rows]
    real = np.arange(Cm)[None, :] < n_choices[rows][:, None]
    stats = Xtr.reshape(-1, D) if pad == "zero" else Xtr[real]
    mu, sd = stats.mean(0), stats.std(0, ddof=1)
    sd[sd == 0] = 1
    mask = np.ones_like(real) if pad == "zero" else real
    return ((Xtr - mu) / sd).astype(np.float32), mask, mu, sd


def _softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def numpy_paper_fit(X, n_choices, gold, rows, w0, pad, steps=100):
    """docs/protocol.md §4 for one head in plain numpy (float32, vectorised within the fit), then every item
    scored with folded normalisation. Returns p(gold) for all items."""
    N, Cm, D = X.shape
    n = len(rows)
    Z, mask, mu, sd = _train_rows(X, n_choices, rows, pad)
    keep = mask.reshape(-1)
    Zk = np.ascontiguousarray(Z.reshape(-1, D)[keep])  # only the slots in the softmax do any work
    onehot = np.eye(Cm, dtype=np.float32)[gold[rows]]
    w = w0.copy()
    for t in range(steps):
        s = np.zeros((n, Cm), np.float32)
        s[mask] = Zk @ w
        p = _softmax(s, mask)
        r = ((p - onehot) / n)[mask]
        g = Zk.T @ r + w / np.linalg.norm(w)
        g *= min(1.0, 1.0 / (np.linalg.norm(g) + 1e-6))
        w -= 0.05 * (1 - 0.9 * t / steps) * g
    v = w / sd
    s = (X.reshape(-1, D) @ v).reshape(N, Cm) - mu @ v
    real = np.arange(Cm)[None, :] < n_choices[:, None]
    return _softmax(s, np.ones_like(real) if pad == "zero" else real)[np.arange(N), gold]


def torch_paper_fit(Xt, n_choices, gold, rows, w0, pad, steps=100):
    """:func:`numpy_paper_fit` in torch on the device of ``Xt`` (the layer, (N, C, D) float32), one fit
    at a time: the loop a careful user writes for a GPU, where it is bound by kernel launches."""
    import torch

    dev = Xt.device
    N, Cm, D = Xt.shape
    rows_t = torch.tensor(rows, device=dev)
    nc = torch.tensor(n_choices, device=dev)
    real = torch.arange(Cm, device=dev)[None, :] < nc[:, None]
    Xtr = Xt[rows_t]
    mask = torch.ones_like(real[rows_t]) if pad == "zero" else real[rows_t]
    stats = Xtr.reshape(-1, D) if pad == "zero" else Xtr[mask]
    mu, sd = stats.mean(0), stats.std(0)
    sd = torch.where(sd == 0, torch.ones_like(sd), sd)
    Zk = ((Xtr - mu) / sd)[mask]  # only the slots in the softmax do any work
    n = len(rows)
    onehot = torch.nn.functional.one_hot(torch.tensor(gold[rows], device=dev).long(), Cm).float()
    w = torch.tensor(w0, device=dev)
    s = torch.empty((n, Cm), device=dev)
    for t in range(steps):
        s.fill_(-torch.inf)
        s[mask] = Zk @ w
        r = ((torch.softmax(s, -1) - onehot) / n)[mask]
        g = Zk.T @ r + w / torch.linalg.vector_norm(w)
        g *= torch.clamp(1.0 / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
        w -= 0.05 * (1 - 0.9 * t / steps) * g
    v = w / sd
    S = (Xt.reshape(-1, D) @ v).reshape(N, Cm) - mu @ v
    score_mask = torch.ones_like(real) if pad == "zero" else real
    p = torch.softmax(torch.where(score_mask, S, -torch.inf), -1)
    return p[torch.arange(N, device=dev), torch.tensor(gold, device=dev)].cpu().numpy()


def cuda_gemm_gflops(n: int = 8192) -> float:
    """The CUDA GPU's float32 GEMM rate with float32 arithmetic (no TF32), as the engine asks for."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    return 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9


def torch_loop_device(choice: str) -> str | None:
    """The device of the torch per-fit loop: ``auto`` is a CUDA GPU when there is one."""
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def scipy_converged_fit(X, n_choices, gold, rows, pad, Cinv=1.0):
    """The converged solver's loss minimised by scipy L-BFGS to a tight gradient: (loss, iterations)."""
    from scipy.optimize import minimize

    N, Cm, D = X.shape
    n = len(rows)
    Z, mask, _, _ = _train_rows(X, n_choices, rows, pad)
    Zk = np.ascontiguousarray(Z.reshape(-1, D)[mask.reshape(-1)])
    y = gold[rows]
    lam = 1.0 / (Cinv * n)

    def f(w):
        s = np.full((n, Cm), -np.inf)
        s[mask] = Zk @ w.astype(np.float32)
        m = s.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
        p = np.exp(s - lse[:, None])
        p[np.arange(n), y] -= 1
        g = (Zk.T @ (p[mask] / n).astype(np.float32)).astype(np.float64) + lam * w
        return (lse - s[np.arange(n), y]).mean() + 0.5 * lam * w @ w, g

    opt = minimize(f, np.zeros(D), jac=True, method="L-BFGS-B", options={"gtol": 1e-6, "maxiter": 5000})
    return opt.fun, opt.nit


def sklearn_multinomial_fit(Xq, gold, rows, Cinv=1.0):
    from sklearn.linear_model import LogisticRegression

    Z = Xq[rows]
    Z = (Z - Z.mean(0)) / Z.std(0, ddof=1)
    y = gold[rows]
    clf = LogisticRegression(C=Cinv, tol=1e-6, max_iter=5000).fit(Z, y)
    p = clf.predict_proba(Z)[np.arange(len(y)), y]
    return float(-np.log(p).mean() + (clf.coef_**2).sum() / (2 * Cinv * len(y)))


# ----- sweep start-up: the cache check before the first fit -------------------------------------------
def startup_times(cache_dir: Path, repeats: int = 3) -> None:
    """Time ``open_cache`` (what every sweep runs before its first fit) with no verification stamp
    (the first sweep: every shard hashed, the stamp written), then again (the repeated sweep: each
    shard's size, mtime and inode against the stamp, the file not opened), and ``Cache.verify()``
    (``probekit info CACHE --verify``: every shard hashed)."""
    from probekit.design import open_cache
    from probekit.store import Cache
    from probekit.store.stamp import VERIFIED

    shards = sorted(cache_dir.glob("*.h5"))
    size = sum(f.stat().st_size for f in shards)
    (cache_dir / VERIFIED).unlink(missing_ok=True)
    t = time.perf_counter()
    open_cache(cache_dir)
    first = time.perf_counter() - t
    repeat = min(_timed(lambda: open_cache(cache_dir)) for _ in range(repeats))
    full = _timed(lambda: Cache(cache_dir).verify())
    print(f"sweep start-up on a {size / 1e9:.2f} GB cache ({len(shards)} shards; files likely in the page cache, "
          f"so hashing runs at memory speed, not disk speed):")
    print(f"  first sweep (no stamp: every shard hashed)      {first:8.3f} s ({size / first / 1e9:.2f} GB/s)")
    print(f"  repeated sweep (stamp: size, mtime, inode)      {repeat:8.3f} s (best of {repeats})")
    print(f"  probekit info --verify (every shard hashed)     {full:8.3f} s")
    print(f"  repeated / full hash: {100 * repeat / full:.2f}% (aim: at most 1%)")


# ----- the cross-validated strength path ------------------------------------------------------------
def sklearn_cv_fit(Xq, gold, rows, folds, grid) -> float:
    """One head as a careful scikit-learn user fits it: the draw z-scored with its own statistics (as
    the engine does), then ``LogisticRegressionCV`` on the given folds, grid and log-loss scoring.
    Returns the chosen C."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    Z = Xq[rows].astype(np.float64)
    Z = (Z - Z.mean(0)) / Z.std(0, ddof=1)
    cv = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(folds.max() + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces attribute changes
        clf = LogisticRegressionCV(Cs=list(grid), cv=cv, scoring="neg_log_loss", tol=1e-6, max_iter=5000)
        clf.fit(Z, gold[rows])
    return float(np.ravel(clf.C_)[0])


def cv_path_bench(cache, heads, args) -> None:
    """The batched cross-validated path against LogisticRegressionCV head by head, and against one fit."""
    from probekit.design import head_seed
    from probekit.probe import ProbeConfig, fit_and_score
    from probekit.probe.cvpath import Selection, head_folds
    from probekit.probe.engine import prepare

    k = args.cv_folds
    grids = {"C": [float(x) for x in args.cv_C.split(",")], "l2": [float(x) for x in args.cv_l2.split(",")]}
    rng = np.random.default_rng(2)
    sample = [heads[i] for i in np.sort(rng.choice(len(heads), min(args.cv_heads, len(heads)), replace=False))]
    folds = head_folds(sample, k, seed=0)
    rows = np.stack([h.rows for h in sample])
    labels = np.stack([h.labels for h in sample])
    fold_rows = np.stack([folds[h.name] for h in sample])
    seeds = np.array([head_seed(0, f"{h.name}/cv") for h in sample])
    items = cache.items
    n_choices, gold = items["n_choices"].to_numpy(), items["label"].to_numpy()
    layer = cache.layers[-1]
    H = len(sample)
    print(f"cross-validated path: {H} population heads (n_train {rows.shape[1]}), layer {layer}, {k} folds; "
          f"per head {k} x {len(grids['C'])} fold fits + the refit, all on one kernel; the engine on "
          f"{args.cv_workers} host thread(s), scikit-learn on one (compilation excluded: each timing repeats a "
          f"compiled call)")

    def timed_engine(layer_X, cfg, **kw):
        fit_and_score(layer_X, n_choices, gold, rows, labels, seeds, cfg, workers=args.cv_workers, **kw)  # compiles
        t = time.perf_counter()
        res = fit_and_score(layer_X, n_choices, gold, rows, labels, seeds, cfg, workers=args.cv_workers, **kw)
        return time.perf_counter() - t, res

    for site, head in (("question_end", "multinomial"), ("answer_end", "mc")):
        X = prepare([cache.read_layer(site, layer)])
        for solver, option in (("converged", "C"), ("paper", "l2")):
            grid = grids[option]
            path_cfg = ProbeConfig(head=head, solver=solver, pad=args.pad,
                                   select=Selection.for_solver(solver, k, grid))
            t_path, res = timed_engine(X, path_cfg, folds=fold_rows)
            t_one, _ = timed_engine(X, ProbeConfig(head=head, solver=solver, pad=args.pad))
            n_fits = H * (k * len(grid) + 1)
            print(f"  engine {site}/{solver}: path {t_path:.2f} s = {n_fits / t_path:.0f} fits/s "
                  f"({H / t_path:.1f} heads/s), one plain fit of the same heads {t_one:.2f} s: "
                  f"the path costs {t_path / t_one:.1f} plain fits ({k * len(grid) + 1} fits per head); "
                  f"{option} chosen {np.bincount(res.chosen, minlength=len(grid)).tolist()} over "
                  f"{list(path_cfg.select.grid)}")
            if site == "question_end" and solver == "converged":
                Xq = X.Xs[0]
                t = time.perf_counter()
                sk = [sklearn_cv_fit(Xq, gold, h.rows, folds[h.name], path_cfg.select.grid) for h in sample]
                t_sk = time.perf_counter() - t
                ours = [path_cfg.select.grid[i] for i in res.chosen]
                agree = sum(a == b for a, b in zip(ours, sk))
                print(f"  scikit-learn LogisticRegressionCV head by head (same folds, grid, scoring neg_log_loss; "
                      f"tol 1e-6): {t_sk:.2f} s = {n_fits / t_sk:.1f} fits/s; engine path / scikit-learn: "
                      f"{t_sk / t_path:.1f}x; chosen C agrees on {agree} of {H} heads"
                      + ("" if agree == H else f" (engine {ours}, scikit-learn {sk})"))
        del X


# ----- the engine, in a child process --------------------------------------------------------------
def _vm_hwm() -> int:
    """This process's peak resident set (VmHWM, bytes); unlike ru_maxrss it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_sweep(cache: str, out: str, site: str, solver: str, pad: str, queue) -> None:
    from probekit.probe import sweep

    imported = _vm_hwm()
    rec = sweep(cache, out, measures=MEASURES, layers="all", site=site, solver=solver, n_train=[160], draws=5,
                seed=0, levels=["easy", "medium", "hard"], pad=pad, zero_shot=False, verify=False)
    queue.put((rec, _vm_hwm(), imported))


def run_engine(cache: Path, out: Path, site: str, solver: str, pad: str) -> tuple[dict, int, int]:
    """One sweep in a fresh process: its record, its peak RSS and its RSS after imports (bytes)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_sweep, args=(str(cache), str(out), site, solver, pad, q))
    p.start()
    rec, peak, base = q.get()
    p.join()
    return rec, peak, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=3521)
    ap.add_argument("--layers", type=int, default=33, help="cache layers (all are swept)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--sample", type=int, default=6, help="heads timed in the per-fit loops")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/probekit-bench/cache"))
    ap.add_argument("--solvers", default="paper,converged")
    ap.add_argument("--features", default="correlated", choices=["correlated", "isotropic"],
                    help="synthetic features: a real model's covariance spectrum (default) or white noise")
    ap.add_argument("--pad", default="mask", choices=["mask", "zero"],
                    help="padded answer slots: mask (probekit's default) or zero (the protocol's zero-padding)")
    ap.add_argument("--torch-loop", default="auto", choices=["auto", "off", "cpu", "cuda"],
                    help="also time the paper recipe one fit at a time in torch on this device "
                         "(auto: on a CUDA GPU when there is one)")
    ap.add_argument("--startup", action="store_true",
                    help="only time sweep start-up (the cache check) on the cache sized by --layers/--width")
    ap.add_argument("--cv", action="store_true",
                    help="only the cross-validated strength path (sweep --select cvK) against LogisticRegressionCV")
    ap.add_argument("--cv-heads", type=int, default=12, help="heads in the --cv benchmark")
    ap.add_argument("--cv-folds", type=int, default=5)
    ap.add_argument("--cv-C", default="0.00001,0.0001,0.001,0.01,0.1,1", help="the converged solver's grid in --cv")
    ap.add_argument("--cv-l2", default="30,10,3,1,0.3,0.1", help="the paper recipe's grid in --cv")
    ap.add_argument("--cv-workers", type=int, default=1, help="the engine's host threads in --cv (scikit-learn: one)")
    args = ap.parse_args()

    from probekit.design import head_seed, item_frame, plan
    from probekit.probe import ProbeConfig, fit_and_score
    from probekit.probe.engine import head_key
    from probekit.probe.kernel import init_weights, mc_rows_needed
    from probekit.probe.runtime import default_workers
    from probekit.store import Cache

    cache_dir = write_bench_cache(args.cache, args.items, args.layers, args.width, args.features)
    if args.startup:
        startup_times(cache_dir)
        return
    gemm, bw = gemm_gflops(), copy_gbps()
    print(f"machine: numpy float32 GEMM {gemm:.0f} GFLOP/s (best BLAS thread setting), copy bandwidth {bw:.1f} GB/s, "
          f"{mp.cpu_count()} CPUs")
    cache = Cache(cache_dir)
    N, D = cache.n_items, cache.hidden_size
    layer_bytes = N * C * D * 4
    frame = item_frame(cache.items, "arc", MEASURES)
    heads = plan(frame, "population", MEASURES, n_train=[160], draws=5, levels=["easy", "medium", "hard"])
    if args.cv:
        cv_path_bench(cache, heads, args)
        return
    n_fits = len(heads) * args.layers
    m = int(np.mean([mc_rows_needed(frame.n_choices[h.rows], args.pad) for h in heads]))
    slots_np = int(np.mean([frame.n_choices[h.rows].sum() if args.pad == "mask" else 160 * C for h in heads]))
    print(f"population sweep: {len(heads)} heads x {args.layers} layers = {n_fits} fits per solver "
          f"(n_train 160, pad={args.pad}: ~{m} kernel rows per head, {slots_np} answer slots in the "
          f"per-fit loop, {N} items scored per head)")
    gram, cores = gram_seconds(m - 1, D), default_workers()
    print(f"one head's Gram matrix alone: {gram * 1e3:.1f} ms on one core, so at most "
          f"{cores / gram:.0f} multiple-choice fits/s on {cores} cores if nothing else cost time")

    # per-fit references on a sample of the same heads, last layer
    layer = cache.layers[-1]
    X = cache.read_layer("answer_end", layer)
    rng = np.random.default_rng(1)
    sample = [heads[i] for i in rng.choice(len(heads), min(args.sample, len(heads)), replace=False)]
    ref = {"paper": np.inf}
    for threads in (1, None):  # a careful user picks the faster BLAS setting for these small matvecs
        with threadpool_limits(limits=threads):
            t_np = []
            for h in sample:
                w0 = np.asarray(init_weights(head_key(head_seed(0, h.name)), D)[0])
                t_np.append(_timed(lambda: numpy_paper_fit(X, frame.n_choices, frame.gold, h.rows, w0, args.pad)))  # noqa: F821 (X: deleted later on)
        print(f"  numpy paper loop with {threads or 'all'} BLAS threads: {np.median(t_np) * 1e3:.1f} ms/fit")
        ref["paper"] = min(ref["paper"], float(np.median(t_np)))
    torch_dev = torch_loop_device(args.torch_loop)
    if torch_dev:
        import torch

        Xt = torch.as_tensor(X, device=torch_dev)
        t_tl = []
        for i, h in enumerate(sample):
            w0 = np.asarray(init_weights(head_key(head_seed(0, h.name)), D)[0])
            if i == 0:  # warm-up, and the same numbers as the numpy loop
                diff = np.nanmax(np.abs(torch_paper_fit(Xt, frame.n_choices, frame.gold, h.rows, w0, args.pad)
                                        - numpy_paper_fit(X, frame.n_choices, frame.gold, h.rows, w0, args.pad)))
            t_tl.append(_timed(lambda: torch_paper_fit(Xt, frame.n_choices, frame.gold, h.rows, w0, args.pad)))
        ref["paper_torch"] = float(np.median(t_tl))
        print(f"per-fit torch paper loop on {torch_dev}: {ref['paper_torch'] * 1e3:.1f} ms/fit "
              f"(p_gold vs the numpy loop: max abs diff {diff:.1e})")
        del Xt
    sub = sample[: max(2, len(sample) // 2)]
    t_sp, sp = [], []
    for h in sub:
        t = time.perf_counter()
        sp.append(scipy_converged_fit(X, frame.n_choices, frame.gold, h.rows, args.pad))
        t_sp.append(time.perf_counter() - t)
    ref["converged"] = float(np.median(t_sp))
    res = fit_and_score([X], frame.n_choices, frame.gold, np.stack([h.rows for h in sub]),
                        np.stack([h.labels for h in sub]), np.arange(len(sub)),
                        ProbeConfig(solver="converged", pad=args.pad))
    rel_mc = max(abs(float(res.loss[i]) - fun) / fun for i, (fun, _) in enumerate(sp))
    del X
    Xq = cache.read_layer("question_end", layer)
    t_sk = []
    for h in sub:
        t = time.perf_counter()
        sk_loss = sklearn_multinomial_fit(Xq, frame.gold, h.rows)
        t_sk.append(time.perf_counter() - t)
    ref["multinomial"] = float(np.median(t_sk))
    res = fit_and_score([Xq], frame.n_choices, frame.gold, np.stack([h.rows for h in sub[-1:]]),
                        np.stack([h.labels for h in sub[-1:]]), np.arange(1),
                        ProbeConfig(head="multinomial", solver="converged"))
    rel_mn = abs(float(res.loss[0]) - sk_loss) / sk_loss
    del Xq

    flops_score = 2 * N * C * D
    flops_np = 100 * 4 * slots_np * D + flops_score + 6 * slots_np * D
    print(f"per-fit numpy paper loop: {ref['paper'] * 1e3:.1f} ms/fit ({1 / ref['paper']:.1f} fits/s, "
          f"{flops_np / ref['paper'] / 1e9:.1f} GFLOP/s incl. scoring {N} items)")
    print(f"per-fit scipy L-BFGS, multiple-choice converged loss: {ref['converged'] * 1e3:.0f} ms/fit "
          f"(iterations {[nit for _, nit in sp]}); engine loss vs scipy: max rel diff {rel_mc:.1e}")
    print(f"per-fit scikit-learn LogisticRegression, multinomial on question_end: {ref['multinomial'] * 1e3:.0f} ms/fit; "
          f"engine loss vs sklearn: rel diff {rel_mn:.1e}")

    import jax

    if jax.default_backend() == "gpu" and torch_loop_device("auto") == "cuda":  # the engine runs on the GPU
        gemm = cuda_gemm_gflops()
        print(f"GPU: torch float32 GEMM (no TF32, as the engine asks for) {gemm:.0f} GFLOP/s; the engine's rates "
              f"below are beside this one")
    out_root = args.cache.parent / "results"
    runs = [("answer_end", s) for s in args.solvers.split(",")] + [("question_end", "converged")]
    for site, solver in runs:
        rec, peak, base = run_engine(cache_dir, out_root / f"{site}-{solver}", site, solver, args.pad)
        secs = rec["fit_seconds"]
        per_fit = secs / rec["counts"]["fits"]
        if site == "answer_end":
            k = m - 1  # the head's own rows (the last kernel row is the zero reference row)
            rest = 4 * k * D + flops_score + (100 * 2 * m * m if solver == "paper" else 0)
            versus = ref[solver]
        else:
            k, rest = 160, 4 * 160 * C * D + 2 * N * C * D
            versus = ref["multinomial"]
        # flops executed: the Gram as the symmetric rank-k update it is (one triangle, k (k+1) D), initial
        # scores and weight recovery (4 k D), scoring every item, the paper's 100 kernel matvecs; beside
        # them the rate with the Gram counted as a full product (2 k^2 D), as a GEMM would compute it
        executed, full = (k * (k + 1) * D + rest) / per_fit / 1e9, (2 * k * k * D + rest) / per_fit / 1e9
        if site == "answer_end" and solver == "paper" and "paper_torch" in ref:
            print(f"engine answer_end/paper vs the torch per-fit loop on {torch_dev}: "
                  f"{ref['paper_torch'] / per_fit:.1f}x")
        print(f"engine {site}/{solver}: {rec['counts']['fits']} fits, {secs:.1f} s fitting and compiling "
              f"({rec['wall_seconds']:.1f} s wall with layer reads and {rec['counts']['rows']:,} rows written): "
              f"{1 / per_fit:.1f} fits/s = {versus / per_fit:.1f}x the per-fit loop; "
              f"{executed:.0f} GFLOP/s executed = {executed / gemm:.0%} of GEMM "
              f"({full:.0f} GFLOP/s = {full / gemm:.0%} counting each Gram as a full product); "
              f"peak RSS {peak / 2**20:.0f} MiB ({(peak - base) / 2**20:.0f} MiB above the "
              f"{base / 2**20:.0f} MiB after imports) vs one layer {layer_bytes / 2**20:.0f} MiB")
    (out_root / "machine.json").write_text(json.dumps({"gemm_gflops": gemm, "copy_gbps": bw}))


if __name__ == "__main__":
    main()
