"""Probes that choose their own strength (`sweep --select cvK`, probekit/probe/cvpath.py) against plain
references: scikit-learn's LogisticRegressionCV on the same folds, grid and scoring; scipy's L-BFGS and
a numpy loop of the paper recipe fitted fold by fold; the folds of a real plan against its test items;
the sweep's record, its reproducibility and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegressionCV
from typer.testing import CliRunner

from probekit.cli import app
from probekit.data.draws import cv_folds
from probekit.design import head_seed, item_frame, plan
from probekit.design import tested_rows as rows_tested  # (not collected as a test)
from probekit.errors import ProbekitError
from probekit.probe import RESULTS, SWEEP_JSON, sweep
from probekit.probe.cvpath import Selection, head_folds
from probekit.probe.engine import ProbeConfig, fit_and_score, head_key
from probekit.probe.kernel import init_weights
from probekit.store import Cache
from probekit.store.results import cv_table
from tests.test_sweep import build_cache

GRID = [0.001, 0.01, 0.1, 1.0, 10.0]


def draw_z(X, rows):
    """Every item z-scored with the draw's statistics (unbiased standard deviation), as the path does."""
    Xtr = X[rows].astype(np.float64)
    return (X - Xtr.mean(0)) / Xtr.std(0, ddof=1)


def sklearn_cv(Z, y, folds, grid):
    """LogisticRegressionCV on the given folds: the chosen C, per-fold held-out log-loss (folds, Cs), and
    the refit's predicted probabilities of every item."""
    cv = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(folds.max() + 1)]
    clf = LogisticRegressionCV(Cs=grid, cv=cv, scoring="neg_log_loss", tol=1e-10, max_iter=20000).fit(Z, y)
    scores = clf.scores_
    scores = np.asarray(next(iter(scores.values())) if isinstance(scores, dict) else scores)
    return float(np.ravel(clf.C_)[0]), -scores.reshape(len(cv), len(grid)), clf


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn 1.9 announces LogisticRegressionCV changes
@pytest.mark.parametrize("host", [True, False])
def test_chosen_C_matches_logistic_regression_cv(host):
    """Multinomial heads with the converged solver (scikit-learn's objective): the same C as
    LogisticRegressionCV on the same folds, grid (ascending, so ties go to the smallest C in both) and
    scoring (neg_log_loss), the same curve, and the refit's probabilities; on the host path and the
    vmapped device path."""
    rng = np.random.default_rng(11)
    N, D, n, K = 300, 30, 100, 4
    gold = rng.integers(0, K, N)
    means = rng.normal(size=(K, D)) * 0.5
    X = (rng.normal(size=(N, D)) * rng.uniform(0.5, 3, D) + means[gold] + 2.0).astype(np.float32)
    rows = np.stack([rng.choice(N, n, replace=False) for _ in range(3)])
    folds = np.stack([cv_folds(gold[r], 5, seed=0, key=f"h{h}") for h, r in enumerate(rows)])
    cfg = ProbeConfig(head="multinomial", solver="converged", select=Selection.for_solver("converged", 5, GRID[::-1]))
    assert cfg.select.grid == tuple(GRID)  # strongest penalty first: C ascending
    res = fit_and_score([X], np.full(N, K), gold, rows, gold[rows], np.arange(3), cfg, folds=folds, host=host)
    assert res.converged.all() and res.cv_converged.all()
    chosen = []
    for h in range(3):
        Z = draw_z(X, rows[h])
        C, curve, clf = sklearn_cv(Z[rows[h]], gold[rows[h]], folds[h], GRID)
        chosen.append(C)
        assert GRID[res.chosen[h]] == C
        np.testing.assert_allclose(res.cv_loss[h], curve, atol=5e-4)  # the bias converges to 1e-7 of the loss
        P = clf.predict_proba(Z)
        np.testing.assert_allclose(res.p_gold[h], P[np.arange(N), gold], atol=1e-3)
        assert np.array_equal(res.correct[h], (P.argmax(1) == gold).astype(np.int8))
    assert len(set(chosen)) > 1 and set(chosen) <= {0.01, 0.1, 1.0}  # inside the grid, and not the same everywhere


def mc_problem(seed=3, N=160, D=20, n=60):
    rng = np.random.default_rng(seed)
    n_choices = rng.choice([3, 4], size=N, p=[0.3, 0.7])
    gold = rng.integers(0, n_choices)
    X = rng.normal(size=(N, 4, D)) * rng.uniform(0.5, 2, D) + 1.0
    X += 0.35 * (np.arange(4)[None, :] == gold[:, None])[..., None] * rng.normal(size=D)
    X[np.arange(4)[None, :] >= n_choices[:, None]] = 0.0
    rows = rng.choice(N, n, replace=False)
    return X.astype(np.float32), n_choices, gold, rows


def mc_draw_z(X, n_choices, rows):
    """Answer slots z-scored with the statistics of the draw's real slots (--pad mask)."""
    real = np.arange(X.shape[1])[None, :] < n_choices[:, None]
    stats = X[rows].astype(np.float64)[real[rows]]
    return (X - stats.mean(0)) / stats.std(0, ddof=1), real


def held_out_nll(Z, real, items, y, w):
    s = np.where(real[items], Z[items] @ w, -np.inf)
    m = s.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
    return float((lse - s[np.arange(len(items)), y]).mean())


def test_mc_path_matches_fold_by_fold_references():
    """Multiple-choice heads: every fold fit is the fit of that fold's training items alone (the held-out
    items' labels take no part): the converged solver against scipy L-BFGS, the paper recipe against its
    numpy loop from the same initial weights, each scored on the held-out fold; the refit is a plain fit at
    the chosen strength."""
    X, n_choices, gold, rows = mc_problem()
    y = gold[rows]
    k = 3
    fold = cv_folds(y, k, seed=0, key="mc")
    Z, real = mc_draw_z(X, n_choices, rows)
    Zr = Z[rows]
    Cs, l2s = [0.01, 0.1, 1.0], [1.0, 0.3, 0.1, 0.03]
    conv = ProbeConfig(solver="converged", select=Selection.for_solver("converged", k, Cs))
    paper = ProbeConfig(solver="paper", select=Selection.for_solver("paper", k, l2s))
    seed = head_seed(0, "mc")
    res_c = fit_and_score([X], n_choices, gold, rows[None], y[None], np.array([seed]), conv, folds=fold[None])
    res_p = fit_and_score([X], n_choices, gold, rows[None], y[None], np.array([seed]), paper, folds=fold[None])
    w0 = np.asarray(init_weights(head_key(seed), X.shape[-1])[0], np.float64)
    for f in range(k):
        fit, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        for j, C in enumerate(Cs):
            lam = 1.0 / (C * len(fit))

            def loss(w):
                s = np.where(real[rows[fit]], Zr[fit] @ w, -np.inf)
                m = s.max(1, keepdims=True)
                lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
                p = np.exp(s - lse[:, None])
                p[np.arange(len(fit)), y[fit]] -= 1
                g = np.einsum("nc,ncd->d", p / len(fit), Zr[fit]) + lam * w
                return (lse - s[np.arange(len(fit)), y[fit]]).mean() + 0.5 * lam * w @ w, g

            w = minimize(loss, np.zeros(X.shape[-1]), jac=True, method="L-BFGS-B",
                         options={"gtol": 1e-10, "maxiter": 5000}).x
            assert res_c.cv_loss[0, f, j] == pytest.approx(held_out_nll(Zr, real[rows], held, y[held], w), abs=2e-4)
        for j, l2 in enumerate(l2s):
            w = w0.copy()
            onehot = np.eye(4)[y[fit]]
            for t in range(100):  # docs/protocol.md §4 on the fold's training items
                s = np.where(real[rows[fit]], Zr[fit] @ w, -np.inf)
                p = np.exp(s - s.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                g = np.einsum("nc,ncd->d", (p - onehot) / len(fit), Zr[fit]) + l2 * w / np.linalg.norm(w)
                g *= min(1.0, 1.0 / (np.linalg.norm(g) + 1e-6))
                w -= 0.05 * (1 - 0.9 * t / 100) * g
            assert res_p.cv_loss[0, f, j] == pytest.approx(held_out_nll(Zr, real[rows], held, y[held], w), abs=2e-4)
    for res, name, grid in ((res_c, "C", Cs), (res_p, "l2", l2s)):
        assert res.chosen[0] == np.argmin(res.cv_loss[0].mean(0))
        plain = fit_and_score([X], n_choices, gold, rows[None], y[None], np.array([seed]),
                              ProbeConfig(solver=res is res_c and "converged" or "paper", **{name: grid[res.chosen[0]]}))
        np.testing.assert_allclose(res.p_gold, plain.p_gold, atol=2e-4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_holdout=150)


def test_folds_of_a_real_plan_hold_no_test_item(cache_dir):
    """The folds the sweep uses (cvpath.head_folds) for every head of a real population plan: they cut the
    head's own training draw and nothing else, so no test item is ever in a fold; stratified by label;
    the same for the same seed, other for another."""
    cache = Cache(cache_dir)
    frame = item_frame(cache.items, "arc", ["grade", "difficulty"])
    heads = plan(frame, "population", ["grade", "difficulty"], n_train=[40], draws=3, seed=5)
    folds = head_folds(heads, 3, seed=5)
    assert set(folds) == {h.name for h in heads}
    for h in heads:
        fold = folds[h.name]
        assert fold.shape == h.rows.shape and set(np.unique(fold)) == set(range(3))
        in_folds = h.rows[np.isin(fold, range(3))]
        assert set(in_folds) == set(h.rows)
        assert not np.isin(in_folds, rows_tested(frame, h)).any()
        sizes = np.bincount(fold)
        assert sizes.max() - sizes.min() <= 1
        for label in np.unique(h.labels):
            per_fold = np.bincount(fold[h.labels == label], minlength=3)
            assert per_fold.max() - per_fold.min() <= 1
    again = head_folds(heads, 3, seed=5)
    other = head_folds(heads, 3, seed=6)
    assert all(np.array_equal(again[k], v) for k, v in folds.items())
    assert sum(not np.array_equal(other[k], v) for k, v in folds.items()) == len(heads)


SMALL = dict(measures=["grade"], layers="4", n_train=[40], draws=2, zero_shot=False)


@pytest.fixture(scope="module")
def cv_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "r"
    sweep(cache_dir, out, solver="both", C=[0.01, 0.1, 1, 10], l2=[1, 0.3, 0.1, 0.03], select="cv4", seed=3, **SMALL)
    return out, json.loads((out / SWEEP_JSON).read_text())


def test_sweep_records_choice_and_curve(cache_dir, cv_run, tmp_path):
    """sweep.json's cv holds every fit's choice and per-fold curve (the grid strongest first), its
    configuration the grid in place of the strength; the results table keeps its columns, its rows are the
    refit's; the report lists the choices in cv_path.csv and summary.json. The same seed gives the same
    record and rows."""
    out, rec = cv_run
    cv = rec["cv"]
    assert cv["folds"] == 4 and cv["scoring"] == "log_loss"
    assert cv["grids"] == {"paper": {"option": "l2", "values": [1.0, 0.3, 0.1, 0.03]},
                           "converged": {"option": "C", "values": [0.01, 0.1, 1.0, 10.0]}}
    assert rec["config"]["probe"]["converged"]["select"]["grid"] == [0.01, 0.1, 1.0, 10.0]
    assert "C" not in rec["config"]["probe"]["converged"] and "l2" not in rec["config"]["probe"]["paper"]
    assert len(cv["fits"]) == 2 * rec["counts"]["heads"]
    for fit in cv["fits"]:
        option = cv["grids"][fit["solver"]]["option"]
        curve = np.asarray(fit["log_loss"]).mean(0)
        assert np.shape(fit["log_loss"]) == (4, 4) and fit[option] == cv["grids"][fit["solver"]]["values"][
            int(np.argmin(curve))]
    table = cv_table(rec)
    assert len(table) == 2 * rec["counts"]["heads"] * 4 and table["chosen"].sum() == 2 * rec["counts"]["heads"]
    df = pd.read_parquet(out / RESULTS)
    df = df[df.site == "answer_end"]  # the shortcut controls are fitted as always, beside the chosen heads
    assert list(df["solver"].unique()) == ["paper", "converged"]

    # the refit of one head is a plain sweep at its chosen strength
    fit = next(f for f in cv["fits"] if f["solver"] == "converged" and f["train_level"] == "hard" and f["draw"] == 1)
    plain = sweep(cache_dir, tmp_path / "plain", solver="converged", C=fit["C"], seed=3, levels=["hard"], **SMALL)
    ref = pd.read_parquet(tmp_path / "plain" / RESULTS)
    pick = lambda t: t[(t.site == "answer_end") & (t.solver == "converged") & (t.train_level == "hard")  # noqa: E731
                       & (t.draw == 1)].sort_values("item_id")
    np.testing.assert_allclose(pick(df)["p_gold"].to_numpy(), pick(ref)["p_gold"].to_numpy(), atol=2e-4)
    assert plain["counts"]["not_converged"] == 0

    sweep(cache_dir, tmp_path / "again", solver="both", C=[0.01, 0.1, 1, 10], l2=[1, 0.3, 0.1, 0.03], select="cv4",
          seed=3, **SMALL)
    assert json.loads((tmp_path / "again" / SWEEP_JSON).read_text())["cv"] == rec["cv"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / RESULTS), pd.read_parquet(out / RESULTS))

    from probekit.report import build_report

    summary = build_report(out, tmp_path / "rep", n_boot=20, n_boot_sgr=20)
    counts = {(r["solver"], r["train_level"]): r for r in summary["cv"]["counts"]}
    assert sum(sum(r["chosen"].values()) for r in counts.values()) == 2 * rec["counts"]["heads"]
    csv = pd.read_csv(tmp_path / "rep" / "cv_path.csv")
    assert len(csv) == len(table) and csv["chosen"].sum() == table["chosen"].sum()
    assert "Strength chosen by cross-validation" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_path_and_its_errors_are_one_line(cache_dir, tmp_path):
    """`--C 0.1,1 --select cv3` runs and says what was chosen; a bad grid, a grid without --select, --select
    without a grid, a bad --select and more folds than a label has items each stop with one line and
    exit code 2 before anything is written."""
    runner = CliRunner()
    base = ["sweep", str(cache_dir), "--measures", "grade", "--layers", "4", "--draws", "1", "--no-zero-shot"]
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "ok"), "--n-train", "40", "--solver", "converged",
                             "--C", "0.1,1", "--select", "cv3"])
    assert ok.exit_code == 0, ok.output
    assert "converged: C chosen by 3-fold cross-validation" in ok.output
    bad = [
        (["--C", "0.1,x", "--select", "cv5"], "--C must be comma-separated numbers"),
        (["--C", "0.1,0.1", "--select", "cv5"], "C grid lists 0.1 more than once"),
        (["--C", "0.1,0", "--select", "cv5"], "C must be a finite number > 0, got 0.0"),
        (["--C", "0.1,nan", "--select", "cv5"], "--C must be finite numbers"),
        (["--C", "0.1,1"], "C has 2 values: a grid needs select cvK"),
        (["--select", "cv5"], "select cv5 chooses the converged solver's C from a grid"),
        (["--C", "0.1,1", "--select", "cv1"], "select must be cvK"),
        (["--C", "0.1,1", "--select", "fold5"], "select must be cvK"),
        (["--l2", "0.1,1", "--C", "0.1,1", "--select", "cv5"], "l2 is a grid, but no solver of this sweep"),
        (["--C", "0.1,1", "--select", "cv5", "--n-train", "12"], "5-fold cross-validation needs at least 5 training "
                                                                  "items of every label; draw 'population/grade/"),
    ]
    for args, message in bad:
        extra = [] if "--n-train" in args else ["--n-train", "40"]
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "r"), "--solver", "converged", *extra, *args])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, res.output)
        assert not (tmp_path / "r").exists()
    with pytest.raises(ProbekitError, match="needs each head's folds"):
        X, n_choices, gold, rows = mc_problem()
        fit_and_score([X], n_choices, gold, rows[None], gold[rows][None], np.array([0]),
                      ProbeConfig(solver="converged", select=Selection.for_solver("converged", 3, [0.1, 1])))
