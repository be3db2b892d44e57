"""The sweep planner and its outputs on a small cache written through probekit.store.

The cache holds the bundled real ARC items (questions, labels and the paper's difficulty
annotations) with synthetic hidden states: a planted direction marks the gold answer slot, fainter
for harder grades, so probes learn something real and harder items are harder."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.data import load_dataset
from probekit.data.draws import train_draw
from probekit.data.levels import cut_levels, cutoff_for
from probekit.errors import ProbekitError
from probekit.probe import RESULTS, SWEEP_JSON, hardness, sweep
from probekit.store import Cache, write_cache

COLUMNS = ["experiment", "site", "layer", "measure", "train_level", "draw", "n_train", "label_noise", "solver",
           "item_id", "test_level", "correct", "p_gold", "method", "zero_weights", "n_choices"]
LAYERS = [2, 3, 4]  # a 4-layer model: middle = ceil(5/2) = 3, last = 4
D, C = 24, 5


def build_cache(path, *, n_holdout=0, nan_item=None, seed=0):
    items = load_dataset("bundled")
    t = items.table.reset_index(drop=True)
    measures = ["grade", "difficulty", "question_num_words"]
    rng = np.random.default_rng(seed)
    N = len(t)
    n_choices = t["choices"].map(len).to_numpy()
    gold = t["label"].to_numpy()
    pool = np.array(["probe"] * N, dtype=object)
    if n_holdout:
        pool[rng.choice(N, n_holdout, replace=False)] = "holdout"
    strength = 1.6 - 0.12 * np.nan_to_num(t["grade"].to_numpy(float), nan=6.0)
    direction = rng.normal(size=(len(LAYERS), D))
    is_gold = np.arange(C)[None, :] == gold[:, None]
    real = np.arange(C)[None, :] < n_choices[:, None]
    ans = rng.normal(size=(len(LAYERS), N, C, D)) + 0.5
    ans += (is_gold * strength[:, None])[None, :, :, None] * direction[:, None, None, :]
    ans[:, ~real] = 0.0
    qst = rng.normal(size=(len(LAYERS), N, D)) + 3 * np.eye(D)[gold * 3][None] * strength[None, :, None]
    if nan_item is not None:
        ans[1, nan_item, 0, 0] = np.nan
    choice_sum = np.where(real, rng.normal(-8, 2, (N, C)) + 3 * is_gold, -np.inf).astype(np.float32)
    table = pd.DataFrame({"id": t["id"], "label": gold, "n_choices": n_choices, "pool": pool,
                          "source": t["source"], **{m: t[m] for m in measures}})
    write_cache(
        path, {"model": {"id": "synthetic", "n_layers": 4}, "dataset": {"name": items.name, "fingerprint": "x"},
               "prompt": {"id": "0040"}},
        table, {"answer_end": ans.astype(np.float16), "question_end": qst.astype(np.float16),
                "choice_sum": choice_sum, "choice_tokens": np.where(real, 3, 0)},
        layers=LAYERS, sites=["answer_end", "question_end"], hidden_size=D, max_choices=C,
        measures=measures, shard_size=200)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("cache") / "c", n_holdout=150)


@pytest.fixture(scope="module")
def population(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pop")
    rec = sweep(cache_dir, out, measures=["grade", "difficulty"], layers="middle_and_last,4", solver="both",
                n_train=[40], draws=2, seed=3, pad="zero")
    return out, rec, pd.read_parquet(out / RESULTS)


def test_population_table(cache_dir, population):
    out, rec, df = population
    assert list(df.columns) == COLUMNS
    cache = Cache(cache_dir)
    items = cache.items
    probe = items[items.pool == "probe"]
    # heads: 2 measures x (easy, medium, hard) + one "all" head serving both measures, x 2 draws
    assert rec["counts"]["heads"] == (2 * 3 + 1) * 2
    assert set(df.layer) == {"3+4", "4", ""}
    assert set(df.solver) == {"paper", "converged", "", "majority"}  # no surface features: majority only
    # every row records its test item's number of choices
    assert (df.n_choices.to_numpy() == df.item_id.astype(str).map(items.set_index("id")["n_choices"]).to_numpy()).all()
    assert set(df.train_level) == {"easy", "medium", "hard", "all", "zero_shot"}
    assert rec["cache_manifest_sha256"] == cache.manifest_sha256
    # the test set of a head is every probe item except its training draw (drawn as the planner does)
    levels = cut_levels(probe["grade"].to_numpy(), cutoff_for("arc-sample", "grade"))
    pool = np.flatnonzero(items.pool.to_numpy() == "probe")[levels == 2]
    train = train_draw(pool, 40, seed=3, draw=1, key="grade/hard")
    head = df[(df.measure == "grade") & (df.train_level == "hard") & (df.draw == 1) & (df.layer == "4")
              & (df.solver == "paper")]
    assert len(head) == len(probe) - 40
    assert set(head.item_id) == set(probe.id) - set(items.id.iloc[train])
    # test levels follow the measure's cut over the probe items
    lv = dict(zip(probe.id, np.array(["easy", "medium", "hard", ""], dtype=object)[np.where(levels < 0, 3, levels)]))
    assert (head.test_level.astype(str).to_numpy() == head.item_id.astype(str).map(lv).to_numpy()).all()
    # zero-shot rows: one per (measure, probe item)
    zs = df[df.train_level == "zero_shot"]
    assert len(zs) == 2 * len(probe) and (zs.n_train == 0).all() and (zs.draw == 0).all()
    # probes learn the planted signal; easy items are easier than hard ones
    fitted = df[df.method != "zero_shot"]
    assert fitted.correct.mean() > 0.5
    acc = fitted[fitted.measure == "grade"].groupby("test_level", observed=True).correct.mean()
    assert acc["easy"] > acc["hard"]
    assert ((fitted.p_gold >= 0) & (fitted.p_gold <= 1)).all()
    meta = json.loads((out / SWEEP_JSON).read_text())
    assert meta["seed"] == 3 and meta["config"]["pad"] == "zero" and meta["heads_per_second"] > 0
    assert meta["counts"]["rows"] == len(df)
    # heads whose exact optimum has zero weights: flagged per head (paper solver only), counted in sweep.json
    assert df.zero_weights.dtype == bool and not df[df.solver != "paper"].zero_weights.any()
    flagged = df[df.zero_weights].groupby(["layer", "measure", "train_level", "draw"], observed=True).ngroups
    assert meta["counts"]["zero_weight_fits"] == sum(meta["counts"]["zero_weight_fits_by_layer"].values()) <= flagged
    assert not list(out.glob(".*tmp"))


def test_same_seed_same_numbers(cache_dir, population, tmp_path):
    _, _, df = population
    sweep(cache_dir, tmp_path / "again", measures=["grade", "difficulty"], layers="middle_and_last,4",
          solver="both", n_train=[40], draws=2, seed=3, pad="zero")
    again = pd.read_parquet(tmp_path / "again" / RESULTS)
    pd.testing.assert_frame_equal(df, again)
    sweep(cache_dir, tmp_path / "other", measures=["grade"], layers="4", n_train=[40], draws=1, seed=4,
          zero_shot=False)
    other = pd.read_parquet(tmp_path / "other" / RESULTS)
    mine = df[(df.layer == "4") & (df.solver == "paper") & (df.measure == "grade") & (df.draw == 0)]
    assert not np.array_equal(np.sort(mine.p_gold.to_numpy()), np.sort(other.p_gold.to_numpy()))


def test_learning_curve_and_label_noise(cache_dir, tmp_path):
    sweep(cache_dir, tmp_path / "lc", experiment="learning_curve", measures=["difficulty"], layers="4",
          n_train=[10, 40], draws=1, zero_shot=False)
    lc = pd.read_parquet(tmp_path / "lc" / RESULTS)
    assert sorted(set(lc.n_train)) == [10, 40]
    for level in ("easy", "all"):
        sets = [set(lc[(lc.train_level == level) & (lc.n_train == n)].item_id) for n in (10, 40)]
        assert sets[0] == sets[1]  # every size is tested on the items outside the largest pool
    sweep(cache_dir, tmp_path / "ln", experiment="label_noise", measures=["grade"], layers="4", n_train=[40],
          label_noise=[0.0, 0.3], draws=1, zero_shot=False)
    ln = pd.read_parquet(tmp_path / "ln" / RESULTS)
    assert set(ln.train_level) == {"easy", "hard"} and sorted(set(ln.label_noise)) == [0.0, 0.3]
    assert set(ln.experiment) == {"label_noise"}
    sweep(cache_dir, tmp_path / "a2a", experiment="all_to_all", layers="3", n_train=[40], draws=2)
    a2a = pd.read_parquet(tmp_path / "a2a" / RESULTS)
    assert set(a2a.measure) == {"all"} and set(a2a.train_level) == {"all", "zero_shot"}


def test_question_end_multinomial(cache_dir, tmp_path):
    rec = sweep(cache_dir, tmp_path / "q", site="question_end", measures=["grade"], layers="4", n_train=[60],
                draws=1, solver="both", zero_shot=False)
    q = pd.read_parquet(tmp_path / "q" / RESULTS)
    assert rec["config"]["head"] == "multinomial" and set(q.site) == {"question_end", "majority"}
    assert q[q.site == "question_end"].correct.mean() > 0.4


def test_hardness_then_mdl_sweep(cache_dir, tmp_path):
    rec = hardness(cache_dir, layers="4", sizes=[5, 20, 80], draws=2)
    probe_ids = set(Cache(cache_dir).items.query("pool == 'probe'").id)
    assert set(rec["mdl"]) == probe_ids
    assert all(0.0 <= v <= 1.0 for v in rec["mdl"].values())
    assert json.loads((cache_dir / "hardness.json").read_text())["mdl"] == rec["mdl"]
    sweep(cache_dir, tmp_path / "mdl", measures=["mdl"], layers="4", n_train=[40], draws=1, zero_shot=False)
    df = pd.read_parquet(tmp_path / "mdl" / RESULTS)
    assert set(df.measure) == {"mdl"}
    acc = df.groupby("test_level", observed=True).correct.mean()
    assert acc["easy"] > acc["hard"]  # items the hold-out probes found hard are hard for the sweep's probes


def test_errors(cache_dir, tmp_path):
    with pytest.raises(ProbekitError, match="unknown measure 'bogus'.*grade"):
        sweep(cache_dir, tmp_path / "e", measures=["bogus"], verify=False)
    with pytest.raises(ProbekitError, match=r"level 'difficulty/easy' has 111 items, fewer than n_train \+ 50 = 250"):
        sweep(cache_dir, tmp_path / "e", measures=["difficulty"], layers="4", n_train=[200], verify=False)
    with pytest.raises(ProbekitError, match="layer 7 is not in the cache"):
        sweep(cache_dir, tmp_path / "e", measures=["grade"], layers="7", verify=False)
    assert not (tmp_path / "e" / RESULTS).exists()


def test_bad_caches(tmp_path):
    bad = build_cache(tmp_path / "nan", nan_item=5)
    item = Cache(bad).items.id[5]
    with pytest.raises(ProbekitError, match=f"layer 3 .*first '{item}'"):
        sweep(bad, tmp_path / "r", measures=["grade"], layers="3", n_train=[40], draws=1)
    with h5py.File(bad / "shard-00001.h5", "r+") as f:
        f["items/label"][0] = (f["items/label"][0] + 1) % 4
    with pytest.raises(ProbekitError, match="fails verification: shard-00001.h5"):
        sweep(bad, tmp_path / "r", measures=["grade"], layers="4")


def test_cli(cache_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
    res = runner.invoke(app, ["sweep", str(cache_dir), "--out", str(tmp_path / "r"), "--measures", "grade",
                              "--layers", "4", "--n-train", "40", "--draws", "1", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / RESULTS).exists()
    res = runner.invoke(app, ["sweep", str(cache_dir), "--out", str(tmp_path / "r2"), "--measures", "nope"])
    assert res.exit_code == 2 and "error: unknown measure 'nope'" in res.output
    res = runner.invoke(app, ["hardness", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output


# ----- the results directory: one writer, whole commits, leftovers removed ---------------------
SMALL = dict(measures=["grade"], layers="4", n_train=[40], draws=1, verify=False)


def test_second_sweep_into_the_same_out_is_refused(cache_dir, tmp_path):
    out = tmp_path / "r"
    refused = []

    def second(done, total, label):
        if not refused:
            with pytest.raises(ProbekitError) as exc:
                sweep(cache_dir, out, solver="converged", **SMALL)
            refused.append(str(exc.value))

    first = sweep(cache_dir, out, progress=second, **SMALL)
    assert len(refused) == 1 and "\n" not in refused[0]
    assert f"results directory {out} is being written by another process" in refused[0]
    df = pd.read_parquet(out / RESULTS)  # the first sweep's output is whole and its own
    assert len(df) == first["counts"]["rows"] and set(df.solver) == {"paper", "", "majority"}
    assert json.loads((out / SWEEP_JSON).read_text())["config"]["solvers"] == ["paper"]
    assert not list(out.glob(".*tmp"))


def test_rerun_removes_leftover_temporaries(cache_dir, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in (".results.parquet.tmp", ".results.parquet.4242-0badcafe.tmp", ".sweep.json.tmp"):
        (out / name).write_bytes(b"left by a killed run")
    sweep(cache_dir, out, **SMALL)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == [RESULTS, SWEEP_JSON]


def test_results_and_config_of_different_runs_are_refused(cache_dir, tmp_path):
    from probekit.report import build_report

    sweep(cache_dir, tmp_path / "a", seed=1, **SMALL)
    sweep(cache_dir, tmp_path / "b", seed=2, **SMALL)
    (tmp_path / "b" / RESULTS).replace(tmp_path / "a" / RESULTS)
    with pytest.raises(ProbekitError, match=f"{RESULTS} does not belong to .*{SWEEP_JSON}") as exc:
        build_report(tmp_path / "a", tmp_path / "rep", n_boot=10, n_boot_sgr=10)
    assert "\n" not in str(exc.value) and not (tmp_path / "rep").exists()


def test_failed_sweep_leaves_no_folder(cache_dir, tmp_path):
    with pytest.raises(ProbekitError, match="is not an ICL score directory"):
        sweep(cache_dir, tmp_path / "r", icl=[tmp_path / "no-icl"], **SMALL)
    assert not (tmp_path / "r").exists()


def test_non_finite_probe_options_are_refused_in_one_line(cache_dir, tmp_path):
    """`--C nan` (inf, <= 0) and a bad `--tol` stop the sweep before it reads the cache: exit code 2, one
    line naming the option, nothing written. The tolerance used is recorded in sweep.json."""
    import inspect

    from probekit.cli.sweep_cmd import sweep_cmd
    from probekit.probe.solvers import DEFAULT_TOL

    runner = CliRunner()
    base = ["sweep", str(cache_dir), "--out", str(tmp_path / "r"), "--solver", "converged", "--measures", "grade",
            "--layers", "4", "--n-train", "40", "--draws", "1"]
    for option, value in (("--C", "nan"), ("--C", "inf"), ("--C", "0"), ("--C", "-1"), ("--tol", "nan"),
                          ("--tol", "0")):
        res = runner.invoke(app, [*base, option, value])
        assert res.exit_code == 2, (option, value, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"error: (--)?{option[2:]} must be (a )?finite number", lines[0]), res.output
        assert not (tmp_path / "r").exists()
    res = runner.invoke(app, [*base, "--tol", "1e-6", "--no-verify"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "r" / SWEEP_JSON).read_text())
    assert meta["config"]["probe"]["converged"]["tol"] == 1e-6
    assert inspect.signature(sweep_cmd).parameters["tol"].default.default == DEFAULT_TOL
