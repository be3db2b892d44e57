"""The probe engine against plain references: a per-fit numpy loop of the paper recipe (same init),
scikit-learn's LogisticRegression and scipy's L-BFGS for the converged solver, and one device
against four."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from probekit.design import head_seed
from probekit.errors import ProbekitError
from probekit.probe import engine
from probekit.probe.engine import (
    ProbeConfig,
    compile_heads,
    default_chunk,
    fit_and_score,
    fit_and_score_many,
    head_key,
)
from probekit.probe.kernel import Scratch, init_weights, mc_rows, mc_rows_needed, mc_slots

C = 5
#: How far the converged solver's p_gold may be from the exact optimum's at its default tolerance.
P_GOLD_ATOL = 5e-4


def make_problem(seed=0, N=240, D=48, layers=1, full=False):
    """Answer-slot features with a planted direction on the gold slot; padded slots are zeros."""
    rng = np.random.default_rng(seed)
    n_choices = np.full(N, C) if full else rng.choice([3, 4, 5], size=N, p=[0.1, 0.75, 0.15])
    gold = rng.integers(0, n_choices)
    signal = rng.normal(size=D)
    Xs = []
    for _ in range(layers):
        X = rng.normal(size=(N, C, D)).astype(np.float32) * rng.uniform(0.5, 2.0, D).astype(np.float32) + 1.0
        X += 0.4 * (np.arange(C)[None, :] == gold[:, None])[..., None] * signal.astype(np.float32)
        X[np.arange(C)[None, :] >= n_choices[:, None]] = 0.0
        Xs.append(X)
    return Xs, n_choices, gold, rng


def correlated_problem(seed=0, N=300, D=384, strength=0.8):
    """Answer slots shaped like real hidden states: covariance eigenvalues proportional to 1/i in a
    random basis (as ``bench/sweep.py``), noise shared by an item's choices, offsets, a faint planted
    gold direction, 3 to 5 choices. More features than training rows: the solver's hard case."""
    rng = np.random.default_rng(seed)
    n_choices = rng.choice([3, 4, 5], size=N, p=[0.05, 0.9, 0.05])
    gold = rng.integers(0, n_choices)
    lam = 1.0 / np.arange(1, D + 1)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    basis = np.sqrt(lam * D / lam.sum())[:, None] * q.T
    noise = np.sqrt(0.5) * (rng.standard_normal((N, C, D)) + rng.standard_normal((N, 1, D)))
    X = noise @ basis + 2 * rng.normal(size=D)
    direction = rng.standard_normal(D)
    X += strength * (np.arange(C)[None, :] == gold[:, None])[..., None] * direction / np.linalg.norm(direction)
    X[np.arange(C)[None, :] >= n_choices[:, None]] = 0.0
    return [X.astype(np.float32)], n_choices, gold, rng


def softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def paper_reference(X, n_choices, gold, rows, y, w0, pad, l2=1.0, lr=0.05, steps=100):
    """docs/protocol.md §4 written plainly for one multiple-choice head, in float64 and D dimensions."""
    X = X.astype(np.float64)
    N, Cm, D = X.shape
    n = len(rows)
    real = np.arange(Cm)[None, :] < n_choices[:, None]
    train = X[rows].reshape(-1, D) if pad == "zero" else X[rows][real[rows]]
    mu, sd = train.mean(0), train.std(0, ddof=1)
    Z = (X - mu) / sd
    mask = np.ones_like(real) if pad == "zero" else real
    w = np.asarray(w0, np.float64).copy()
    onehot = np.eye(Cm)[y]
    for t in range(steps):
        p = softmax(Z[rows] @ w, mask[rows])
        g = np.einsum("nc,ncd->d", (p - onehot) * mask[rows] / n, Z[rows]) + l2 * w / np.linalg.norm(w)
        g *= min(1.0, 1.0 / (np.linalg.norm(g) + 1e-6))
        w -= lr * (1 - 0.9 * t / steps) * g
    p = softmax(Z @ w, mask)
    return p[np.arange(N), gold], w


@pytest.mark.parametrize("pad", ["zero", "mask"])
@pytest.mark.parametrize("layers", [1, 2])
def test_paper_matches_numpy_loop(pad, layers):
    Xs, n_choices, gold, rng = make_problem(layers=layers)
    H, n = 3, 40
    rows = np.stack([rng.choice(len(gold), n, replace=False) for _ in range(H)])
    labels = gold[rows].copy()
    labels[1, :8] = (labels[1, :8] + 1) % n_choices[rows[1, :8]]  # a noisy head
    seeds = np.array([head_seed(0, f"head{h}") for h in range(H)])
    res = fit_and_score(Xs, n_choices, gold, rows, labels, seeds, ProbeConfig(head="mc", solver="paper", pad=pad))
    X = np.concatenate(Xs, axis=-1)  # middle first: concatenation order = list order
    for h in range(H):
        w0, _ = init_weights(head_key(int(seeds[h])), X.shape[-1])
        p_ref, _ = paper_reference(X, n_choices, gold, rows[h], labels[h], np.asarray(w0), pad)
        np.testing.assert_allclose(res.p_gold[h], p_ref, atol=2e-5)
        assert res.correct[h].mean() > 0.4  # the planted signal is learnt
        assert set(np.unique(res.correct[h])) <= {0, 1}


def test_paper_multinomial_matches_numpy_loop():
    rng = np.random.default_rng(3)
    N, D, n = 200, 40, 60
    n_choices = rng.choice([4, 5], size=N)
    gold = rng.integers(0, n_choices)
    X = (rng.normal(size=(N, D)) + 0.8 * np.eye(D)[gold * 3] + 2.0).astype(np.float32)
    rows = np.stack([rng.choice(N, n, replace=False) for _ in range(2)])
    seeds = np.array([head_seed(1, "a"), head_seed(1, "b")])
    res = fit_and_score([X], n_choices, gold, rows, gold[rows], seeds, ProbeConfig(head="multinomial", solver="paper"))
    for h in range(2):
        W0, b0 = (np.asarray(a, np.float64) for a in init_weights(head_key(int(seeds[h])), D, C))
        Xtr = X[rows[h]].astype(np.float64)
        mu, sd = Xtr.mean(0), Xtr.std(0, ddof=1)
        Z = (X - mu) / sd
        mask = np.arange(C)[None, :] < n_choices[:, None]
        W, b, y = W0.copy(), b0.copy(), gold[rows[h]]
        for t in range(100):
            P = softmax(Z[rows[h]] @ W + b, mask[rows[h]])
            R = (P - np.eye(C)[y]) * mask[rows[h]] / n
            gW = Z[rows[h]].T @ R + W / np.linalg.norm(W)
            gb = R.sum(0)
            clip = min(1.0, 1.0 / (np.sqrt((gW**2).sum() + (gb**2).sum()) + 1e-6))
            W -= 0.05 * (1 - 0.9 * t / 100) * clip * gW
            b -= 0.05 * (1 - 0.9 * t / 100) * clip * gb
        p_ref = softmax(Z @ W + b, mask)[np.arange(N), gold]
        np.testing.assert_allclose(res.p_gold[h], p_ref, atol=2e-5)


def test_converged_multinomial_matches_sklearn():
    rng = np.random.default_rng(5)
    N, D, n, Cinv = 260, 64, 120, 0.5
    n_choices = np.full(N, 4)
    gold = rng.integers(0, 4, N)
    X = (rng.normal(size=(N, D)) + 0.7 * np.eye(D)[gold * 5] + 1.0).astype(np.float32)
    rows = np.stack([rng.choice(N, n, replace=False) for _ in range(2)])
    seeds = np.array([head_seed(0, "x"), head_seed(0, "y")])
    res = fit_and_score([X], n_choices, gold, rows, gold[rows], seeds,
                        ProbeConfig(head="multinomial", solver="converged", C=Cinv, tol=1e-6))
    at_default = fit_and_score([X], n_choices, gold, rows, gold[rows], seeds,
                               ProbeConfig(head="multinomial", solver="converged", C=Cinv))
    assert res.converged.all()
    for h in range(2):
        Xtr = X[rows[h]].astype(np.float64)
        mu, sd = Xtr.mean(0), Xtr.std(0, ddof=1)
        Z = (X - mu) / sd
        clf = LogisticRegression(C=Cinv, tol=1e-12, max_iter=20000).fit(Z[rows[h]], gold[rows[h]])
        P = clf.predict_proba(Z)
        nll = -np.log(P[rows[h], gold[rows[h]]]).mean()
        ref_loss = nll + (clf.coef_**2).sum() / (2 * Cinv * n)
        assert abs(res.loss[h] - ref_loss) / ref_loss <= 1e-4
        np.testing.assert_allclose(res.p_gold[h], P[np.arange(N), gold], atol=2e-3)
        # at the default tolerance p_gold is scikit-learn's optimum to the precision results are compared at
        assert at_default.converged[h] and abs(at_default.loss[h] - ref_loss) / ref_loss <= 1e-5
        np.testing.assert_allclose(at_default.p_gold[h], P[np.arange(N), gold], atol=P_GOLD_ATOL)


@pytest.mark.parametrize("pad", ["mask", "zero"])
def test_converged_mc_matches_scipy(pad):
    Xs, n_choices, gold, rng = make_problem(seed=7, N=200, D=40)
    X = Xs[0]
    n, Cinv = 80, 2.0
    rows = np.stack([rng.choice(len(gold), n, replace=False) for _ in range(2)])
    seeds = np.array([0, 1])
    res = fit_and_score([X], n_choices, gold, rows, gold[rows], seeds,
                        ProbeConfig(head="mc", solver="converged", pad=pad, C=Cinv, tol=1e-6))
    at_default = fit_and_score([X], n_choices, gold, rows, gold[rows], seeds,
                               ProbeConfig(head="mc", solver="converged", pad=pad, C=Cinv))
    assert res.converged.all() and at_default.converged.all()
    for h in range(2):
        real = np.arange(C)[None, :] < n_choices[rows[h]][:, None]
        Xtr = X[rows[h]].astype(np.float64)
        stats = Xtr.reshape(-1, X.shape[-1]) if pad == "zero" else Xtr[real]
        mu, sd = stats.mean(0), stats.std(0, ddof=1)
        Z = (Xtr - mu) / sd
        mask = np.ones_like(real) if pad == "zero" else real
        y = gold[rows[h]]
        lam = 1.0 / (Cinv * n)

        def loss(w):
            s = np.where(mask, Z @ w, -np.inf)
            m = s.max(1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
            p = np.exp(s - lse[:, None])
            g = np.einsum("nc,ncd->d", (p - np.eye(C)[y]) * mask / n, Z) + lam * w
            return (lse - s[np.arange(n), y]).mean() + 0.5 * lam * w @ w, g

        opt = minimize(loss, np.zeros(X.shape[-1]), jac=True, method="L-BFGS-B",
                       options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 20000})
        assert abs(res.loss[h] - opt.fun) / opt.fun <= 1e-4
        # at the default tolerance: the optimum's p_gold on every item, to the precision results are compared at
        assert abs(at_default.loss[h] - opt.fun) / opt.fun <= 1e-5  # float32 evaluation
        every = np.arange(C)[None, :] < n_choices[:, None]
        s = np.where(np.ones_like(every) if pad == "zero" else every, ((X - mu) / sd) @ opt.x, -np.inf)
        np.testing.assert_allclose(at_default.p_gold[h], softmax(s, np.isfinite(s))[np.arange(len(gold)), gold],
                                   atol=P_GOLD_ATOL)


def test_converged_head_fitted_alone_equals_the_head_fitted_in_a_batch():
    """A head fitted alone, in a batch (a vmapped chunk on the device path, a shared kernel size on
    the host) and on the other path gives the same p_gold to 1e-4 at the default tolerance: each fit
    is at the optimum, whatever rounding its path took (a looser tolerance stops each path at its
    own distance from the optimum)."""
    Xs, n_choices, gold, rng = correlated_problem()
    rows = np.stack([rng.choice(len(gold), 100, replace=False) for _ in range(8)])
    seeds = np.array([head_seed(0, f"h{h}") for h in range(8)])
    cfg = ProbeConfig(solver="converged")
    batch = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds, cfg, host=False)
    alone = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds, cfg, host=False, chunk=1)
    host = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds, cfg, host=True)
    host_alone = [fit_and_score(Xs, n_choices, gold, rows[h:h + 1], gold[rows[h:h + 1]], seeds[h:h + 1], cfg,
                                host=True).p_gold[0] for h in range(2)]
    for res in (batch, alone, host):
        assert res.converged.all()
    np.testing.assert_allclose(alone.p_gold, batch.p_gold, atol=1e-4)
    np.testing.assert_allclose(host.p_gold, batch.p_gold, atol=1e-4)
    np.testing.assert_allclose(host_alone, host.p_gold[:2], atol=1e-4)


@pytest.mark.parametrize("head", ["mc", "multinomial"])
def test_host_and_device_paths_agree(head):
    """The host path (numpy BLAS rows and Gram, one jitted solve per head, both solvers sharing the
    Gram) gives the fits of the vmapped, jitted path used on accelerators."""
    if head == "mc":
        Xs, n_choices, gold, rng = make_problem(seed=13, N=160, D=40, layers=2)
    else:
        rng = np.random.default_rng(13)
        n_choices = rng.choice([4, 5], size=160)
        gold = rng.integers(0, n_choices)
        Xs = [(rng.normal(size=(160, 36)) + 0.8 * np.eye(36)[gold * 3] + 2.0).astype(np.float32)]
    rows = np.stack([rng.choice(len(gold), 50, replace=False) for _ in range(3)])
    seeds = np.array([head_seed(2, f"h{h}") for h in range(3)])
    for pad in (["mask", "zero"] if head == "mc" else ["mask"]):
        cfgs = [ProbeConfig(head=head, solver=s, pad=pad, tol=1e-6) for s in ("paper", "converged")]
        shared = fit_and_score_many(Xs, n_choices, gold, rows, gold[rows], seeds, cfgs, host=True)
        for cfg, both in zip(cfgs, shared):
            dev = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds, cfg, host=False)
            one = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds, cfg, host=True)
            np.testing.assert_array_equal(both.p_gold, one.p_gold)
            np.testing.assert_allclose(one.p_gold, dev.p_gold, atol=1e-5)
            np.testing.assert_allclose(one.loss, dev.loss, rtol=1e-4)
            assert one.converged.all() and dev.converged.all()
            assert one.correct[one.p_gold > 0.5].all()  # a choice with most of the mass is the argmax
    with pytest.raises(ProbekitError, match="share head and pad"):
        fit_and_score_many(Xs, n_choices, gold, rows, gold[rows], seeds,
                           [ProbeConfig(head=head, pad="mask"), ProbeConfig(head=head, pad="zero")])


def test_device_chunks_fill_the_budget_evenly():
    """Chunks of heads on accelerators: as many heads as the memory budget holds, evened out over
    the chunks a layer needs, a multiple of the device count."""
    per_head = 3 * 4 * 488 * 4096  # one head's gathered rows, a few copies
    assert default_chunk(488, 4096, 1) == 5  # 128 MiB where a device does not report its memory
    assert default_chunk(488, 4096, 1, 64 * per_head, heads=75) == 38  # 2 chunks of 38, not 64 + 11
    assert default_chunk(488, 4096, 4, 64 * per_head, heads=75) == 40
    assert default_chunk(488, 4096, 1, 1 << 40, heads=75) == 75  # one chunk, no padding
    assert default_chunk(488, 4096, 1, 1 << 40, heads=5000) == 500  # at most 512: 10 chunks of 500
    assert default_chunk(488, 4096, 8, 1) == 8  # never fewer heads than devices
    assert engine._device_budget(jax.devices("cpu")) == 128 << 20  # CPUs report no memory


@pytest.mark.parametrize("head", ["mc", "multinomial"])
def test_compile_heads_compiles_what_the_host_path_runs(head):
    """After compile_heads (which a sweep runs before reading any layer) fitting the same heads on the
    host compiles nothing more: its shapes are those of the real calls. Sizes unique to this test."""
    Xs, n_choices, gold, rng = make_problem(seed=17, N=70, D=27, layers=2)
    if head == "multinomial":
        Xs = [X[:, 0] for X in Xs]
    rows = np.stack([rng.choice(70, 23, replace=False) for _ in range(3)])
    cfgs = [ProbeConfig(head=head, solver=s) for s in ("paper", "converged")]
    compiles = []

    def on_event(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        compile_heads(n_choices, rows, cfgs, 2 * 27, C, host=True)
        assert len(compiles) == 3  # both solvers and the initial weights
        fit_and_score_many(Xs, n_choices, gold, rows, gold[rows], np.arange(3), cfgs, host=True)
        assert len(compiles) == 3
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.mark.parametrize("head", ["mc", "multinomial"])
def test_every_matrix_product_asks_for_float32(head, tmp_path):
    """Accelerators compute float32 products with rounded operands unless told otherwise (TF32 on
    recent NVIDIA GPUs: about 1e-3 relative), which would make Gram matrices, solver steps and scores
    differ between a GPU and this CPU. Every dot_general the engine lowers (host and device paths,
    both solvers) must carry HIGHEST precision. Sizes unique to this test, so all of it is lowered."""
    Xs, n_choices, gold, rng = make_problem(seed=23, N=64, D=29)
    if head == "multinomial":
        Xs = [X[:, 0] for X in Xs]
    rows = np.stack([rng.choice(64, 21, replace=False) for _ in range(2)])
    cfgs = [ProbeConfig(head=head, solver=s) for s in ("paper", "converged")]
    jax.config.update("jax_dump_ir_to", str(tmp_path))
    try:
        fit_and_score_many(Xs, n_choices, gold, rows, gold[rows], np.arange(2), cfgs, host=True)
        for cfg in cfgs:
            fit_and_score(Xs, n_choices, gold, rows, gold[rows], np.arange(2), cfg, host=False)
    finally:
        jax.config.update("jax_dump_ir_to", "")
    dots = [line for f in tmp_path.glob("*.mlir") for line in f.read_text().splitlines()
            if "stablehlo.dot_general" in line and "f32>" in line]
    modules = {f.name.split(".")[0] for f in tmp_path.glob("*.mlir")}
    assert any("_fit_chunk" in m for m in modules) and any("_solve_kernel" in m for m in modules), modules
    assert len(dots) > 5 and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), \
        [d for d in dots if "HIGHEST" not in d][:3]


def test_paper_refits_non_finite_weights():
    """safe_fit (docs/protocol.md §4): weights that come out non-finite are fitted again (clipping / 4, l2 x 4), up
    to three times; a head that never gives finite weights is flagged and earns no correct answers."""
    Xs, n_choices, gold, rng = make_problem(seed=19, N=60, D=12)
    rows = np.stack([rng.choice(60, 20, replace=False) for _ in range(2)])
    for host in (True, False):
        ok = fit_and_score(Xs, n_choices, gold, rows, gold[rows], np.arange(2), ProbeConfig(), host=host)
        assert ok.converged.all() and (ok.steps == 100).all() and ok.correct.any()
        bad = fit_and_score(Xs, n_choices, gold, rows, gold[rows], np.arange(2), ProbeConfig(lr=1e30),
                            host=host)  # steps that overflow float32
        assert not bad.converged.any() and (bad.steps == 400).all()
        assert np.isnan(bad.p_gold).all() and not bad.correct.any()


@pytest.mark.parametrize("pad", ["mask", "zero"])
def test_host_rows_keep_small_differences_of_large_features(pad):
    """Hidden states have massive activations: features of either sign in the thousands that vary
    between items but barely between an item's choices. The host rows keep (x_ij - x_i0) / sigma
    (mask) and x_ij / sigma (zero) as exact as float32 allows: equal to a float64 computation on the
    same float32 features (rows shifted by another item's value before differencing would not be)."""
    rng = np.random.default_rng(23)
    N, D = 40, 8
    X = rng.normal(size=(N, C, D))
    X[..., 0] = 1000 * rng.normal(size=(N, 1)) + 0.01 * rng.normal(size=(N, C))
    X = X.astype(np.float32)
    n_choices, rows = np.full(N, C), np.arange(30)
    m = mc_rows_needed(n_choices[rows], pad)
    slots = mc_slots(rows, n_choices, C, m, pad)
    got = mc_rows(X.reshape(-1, D), rows, slots, pad, Scratch())
    X64 = X.astype(np.float64)
    sd = X64[rows].reshape(-1, D).std(0, ddof=1)
    want = ((X64[rows, 1:] - X64[rows, :1]) if pad == "mask" else X64[rows]).reshape(-1, D) / sd
    np.testing.assert_allclose(got.sigma, sd, rtol=1e-5)
    assert (np.abs(got.Z - want) / np.abs(want).max(0)).max() < 1e-5


def test_config_validation():
    with pytest.raises(ProbekitError, match="pad must be one of"):
        ProbeConfig(pad="drop")
    with pytest.raises(ProbekitError, match="solver must be one of"):
        ProbeConfig(solver="adam")
    # every numeric option: finite and in range, refused in one line naming the option
    for name, value in (("C", float("nan")), ("C", float("inf")), ("C", 0.0), ("C", -1.0), ("tol", float("nan")),
                        ("tol", 0.0), ("l2", float("nan")), ("l2", -0.5), ("lr", float("inf")), ("lr", 0.0),
                        ("max_grad_norm", float("nan")), ("steps", 0), ("steps", 2.5), ("max_newton", 0)):
        with pytest.raises(ProbekitError, match=f"^{name} must be a (finite|whole) number [>=]+ [01], got ") as exc:
            ProbeConfig(solver="converged", **{name: value})
        assert "\n" not in str(exc.value)
    ProbeConfig(l2=0.0, C=1e-3, tol=1e-12, steps=1, max_newton=1)  # the edges that are allowed


def test_same_numbers_on_four_devices(tmp_path):
    """The head axis sharded over 4 (forced host) devices gives the numbers of one device."""
    script = textwrap.dedent(
        """
        import sys, json, numpy as np
        sys.path.insert(0, %r)
        from test_probe import make_problem
        from probekit.design import head_seed
        from probekit.probe.engine import ProbeConfig, fit_and_score
        import jax
        Xs, n_choices, gold, rng = make_problem(seed=11, N=150, D=32)
        rows = np.stack([rng.choice(150, 30, replace=False) for _ in range(6)])
        seeds = np.array([head_seed(0, str(h)) for h in range(6)])
        out = {"devices": len(jax.devices())}
        for solver in ("paper", "converged"):
            res = fit_and_score(Xs, n_choices, gold, rows, gold[rows], seeds,
                                ProbeConfig(solver=solver, pad="zero"), chunk=4)
            out[solver] = res.p_gold.tolist()
        json.dump(out, open(sys.argv[1], "w"))
        """
    ) % os.path.dirname(os.path.abspath(__file__))
    path = tmp_path / "run.py"
    path.write_text(script)
    results = {}
    for ndev in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}")
        out = tmp_path / f"out{ndev}.json"
        subprocess.run([sys.executable, str(path), str(out)], check=True, env=env, timeout=300)
        results[ndev] = json.loads(out.read_text())
    assert results[1]["devices"] == 1 and results[4]["devices"] == 4
    for solver in ("paper", "converged"):
        # float32 rounding may differ in the last bits (a batch of 4 heads vs 1 head per device)
        np.testing.assert_allclose(results[4][solver], results[1][solver], rtol=1e-5, atol=1e-5)


def test_solver_registry():
    """"both" means every registered solver, and the command line's help names each one."""
    from probekit.cli.sweep_cmd import _SOLVER_HELP
    from probekit.probe.solvers import SOLVERS, solver_names

    assert solver_names("both") == list(SOLVERS) and solver_names("paper") == ["paper"]
    for name, spec in SOLVERS.items():
        assert spec.name == name and spec.objective and f"{name}:" in _SOLVER_HELP


@pytest.mark.parametrize("head", ["mc", "multinomial"])
def test_zero_weight_heads_are_flagged_by_the_kkt_condition(head):
    """With the paper's unsquared penalty, zero weights are the exact optimum iff the NLL's gradient at
    zero weights (best bias for a multinomial head) has norm <= l2 in standardised units. The flag
    equals that condition computed plainly in D dimensions; the converged solver never flags."""
    rng = np.random.default_rng(29)
    N, D, n, H = 120, 16, 30, 6
    n_choices = rng.choice([3, 4], size=N)
    gold = rng.integers(0, n_choices)
    if head == "mc":
        X = rng.normal(size=(N, C, D)).astype(np.float32)
        X[np.arange(C)[None, :] >= n_choices[:, None]] = 0.0
    else:
        X = rng.normal(size=(N, D)).astype(np.float32)
    rows = np.stack([rng.choice(N, n, replace=False) for _ in range(H)])
    l2s = (0.3, 1.0, 3.0)
    flags = {l2: fit_and_score([X], n_choices, gold, rows, gold[rows], np.arange(H), ProbeConfig(head=head, l2=l2),
                               host=host).zero_weights for l2 in l2s for host in (True,)}
    device = fit_and_score([X], n_choices, gold, rows, gold[rows], np.arange(H), ProbeConfig(head=head), host=False)
    np.testing.assert_array_equal(device.zero_weights, flags[1.0])
    conv = fit_and_score([X], n_choices, gold, rows, gold[rows], np.arange(H), ProbeConfig(head=head, solver="converged"))
    assert not conv.zero_weights.any()
    seen = set()
    for h in range(H):
        r, y = rows[h], gold[rows[h]]
        Xt = X[r].astype(np.float64)
        if head == "mc":
            real = np.arange(C)[None, :] < n_choices[r][:, None]
            mu, sd = Xt[real].mean(0), Xt[real].std(0, ddof=1)
            Z = np.where(real[..., None], (Xt - mu) / sd, 0.0)
            P = real / real.sum(1, keepdims=True)  # uniform over the real choices at w = 0
            grad = np.einsum("nc,ncd->d", P - np.eye(C)[y], Z) / n
        else:
            mu, sd = Xt.mean(0), Xt.std(0, ddof=1)
            Z = (Xt - mu) / sd
            mask = np.arange(C)[None, :] < n_choices[r][:, None]

            def nll(b):
                s = np.where(mask, b[None, :], -np.inf)
                return -(s[np.arange(n), y] - np.log(np.exp(s).sum(1))).mean()

            b = minimize(nll, np.zeros(C), method="BFGS", options={"gtol": 1e-10}).x
            s = np.where(mask, b[None, :], -np.inf)
            P = np.exp(s - np.log(np.exp(s).sum(1, keepdims=True)))
            grad = Z.T @ (P - np.eye(C)[y]) / n
        norm = np.linalg.norm(grad)
        for l2 in l2s:
            if abs(norm - l2) > 1e-3 * l2:  # away from the boundary, where float32 decides
                assert flags[l2][h] == (norm <= l2), (h, l2, norm)
                seen.add(bool(norm <= l2))
    assert seen == {True, False}  # both kinds of head occur
