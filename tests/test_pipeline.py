"""End to end on the real model: extract -> sweep -> report, checked against plain references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from typer.testing import CliRunner

from probekit.cli import app
from probekit.data import cut_levels, cutoff_for, level_names
from probekit.store import Cache

REPO_CACHE = REPO / "cache"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(real_cache, tmp_path_factory):
    res = tmp_path_factory.mktemp("res") / "population"
    runner = CliRunner()
    out = runner.invoke(app, ["sweep", str(real_cache), "--out", str(res), "--measures", "grade",
                              "--n-train", "10", "--draws", "3", "--layers", "middle_and_last", "--solver", "paper"])
    assert out.exit_code == 0, out.output
    return res


def test_cache_is_whole_and_verified(real_cache, demo_items):
    cache = Cache(real_cache)
    assert cache.verify() == []
    assert cache.n_items == len(demo_items) == 180
    assert list(cache.items["id"]) == list(demo_items.table["id"])
    assert cache.layers == [16, 30]  # ceil((30 + 1) / 2) and L for SmolLM2's 30 layers


def test_sweep_rows_follow_the_protocol(swept, real_cache):
    results = pd.read_parquet(swept / "results.parquet")
    cache = Cache(real_cache)
    items = cache.items.set_index("id")
    expected_level = pd.Series(level_names(cut_levels(items["grade"].to_numpy(), cutoff_for("arc", "grade"))),
                               index=items.index)
    probes = results[results["solver"] == "paper"]
    assert set(probes["train_level"]) == {"easy", "medium", "hard", "all"}
    for _, head in probes.groupby(["train_level", "draw"]):
        # every probe item not drawn for training is tested, exactly once, labelled by its level
        assert head["item_id"].is_unique and len(head) == cache.n_items - 10
        assert (head["test_level"].to_numpy() == expected_level[head["item_id"]].to_numpy()).all()
    # zero-shot rows are the softmax of the cached choice log-probs
    zs = results[results["train_level"] == "zero_shot"].set_index("item_id")
    choice_sum, _ = cache.logprobs()
    logits = np.where(np.isfinite(choice_sum), choice_sum, -np.inf)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gold = p[np.arange(len(p)), items["label"].to_numpy()]
    np.testing.assert_allclose(zs.loc[items.index, "p_gold"].to_numpy(), gold, rtol=1e-5, atol=1e-6)
    assert (zs.loc[items.index, "correct"].to_numpy() == (p.argmax(1) == items["label"].to_numpy())).all()
    # correct is the argmax of the head's probabilities: p_gold above 1/2 always means correct
    assert (probes.loc[probes["p_gold"] > 0.5, "correct"] == 1).all()


def test_sweep_is_reproducible_from_the_seed(swept, real_cache, tmp_path):
    runner = CliRunner()
    again = tmp_path / "again"
    out = runner.invoke(app, ["sweep", str(real_cache), "--out", str(again), "--measures", "grade",
                              "--n-train", "10", "--draws", "3", "--layers", "middle_and_last", "--solver", "paper"])
    assert out.exit_code == 0, out.output
    pd.testing.assert_frame_equal(pd.read_parquet(swept / "results.parquet"), pd.read_parquet(again / "results.parquet"))
    config = json.loads((swept / "sweep.json").read_text())
    assert config["seed"] == 0 and Cache(real_cache).manifest_sha256 in json.dumps(config)
    assert config["prompt"] == Cache(real_cache).manifest["prompt"]  # the template a comparison keeps apart


def test_report_from_a_real_sweep(swept, tmp_path):
    rep = tmp_path / "report"
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(swept), "--out", str(rep), "--boot", "500", "--boot-sgr", "2000"])
    assert out.exit_code == 0, out.output
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["settings"]["headline"] == {"site": "answer_end", "layer": "16+30", "solver": "paper"}
    rec = next(r for r in summary["population"] if (r["measure"], r["layer"]) == ("grade", "16+30"))
    results = pd.read_parquet(swept / "results.parquet")
    hard = results[(results["measure"] == "grade") & (results["test_level"] == "hard")]
    for level in ("easy", "hard"):
        rows = hard[(hard["layer"] == "16+30") & (hard["train_level"] == level)]
        # each (item, draw) is one cell of the item x draw matrix, so the point estimate is their mean
        assert rec["accuracy"][level]["point"] == pytest.approx(rows["correct"].mean(), abs=1e-12)
        assert rec["accuracy"][level]["lo"] <= rec["accuracy"][level]["point"] <= rec["accuracy"][level]["hi"]
    zs = hard[hard["train_level"] == "zero_shot"]
    assert rec["accuracy"]["zero_shot"]["point"] == pytest.approx(zs["correct"].mean(), abs=1e-12)
    sgr = rec["sgr"]
    assert sgr["n_resamples"] == 2000 and 0 <= sgr["p_value"] <= 1 and sgr["lo"] <= sgr["hi"]
    assert (rep / "report.md").exists() and {"sgr.png", "layer_curves.png"} <= {p.name for p in rep.glob("*.png")}
    assert "grade" in out.output and "16+30" in out.output
    # the printed accuracies are the point estimates (plain means of the observed cells), not resample means
    means = {lv: hard[(hard["layer"] == "16+30") & (hard["train_level"] == lv)]["correct"].mean()
             for lv in ("easy", "medium", "hard", "all")}
    line = next(x for x in out.output.splitlines() if x.startswith("grade "))
    printed = line.split()[1:6]
    assert printed == [f"{100 * v:.1f}" for v in (zs["correct"].mean(), *means.values())]
    md = (rep / "report.md").read_text()
    assert f"| {100 * means['easy']:.1f} [{100 * rec['accuracy']['easy']['lo']:.1f}, " in md
    # every test of the report agrees with its interval: p < 0.05 exactly when the 95% interval excludes 0
    tests = [r[k] for r in summary["population"] for k in ("sgr", "hard_minus_easy", "easy_minus_zero_shot")
             if r.get(k) and r[k]["p_value"] is not None]
    tests += [c["hard_minus_control"] for r in summary["population"] for c in (r.get("controls") or {}).values()
              if c["hard_minus_control"]]
    assert len(tests) >= 10
    for t in tests:
        assert (t["lo"] > 0 or t["hi"] < 0) == (t["p_value"] < 0.05), t


def test_icl_scores_join_the_sweep_and_the_report(real_cache, demo_items, tmp_path):
    from probekit.extract.icl import extract_icl, load_icl
    from probekit.llm import ModelSpec

    dirs = []
    for level in ("easy", "hard"):
        out = tmp_path / f"icl-{level}"
        extract_icl(demo_items, out, ModelSpec(cache_root=REPO_CACHE), k=1, demos_from=level, measure="grade", draws=2,
                    limit=24, min_test=4, batch_size=8, progress=False)
        dirs.append(out)
    res = tmp_path / "res"
    runner = CliRunner()
    args = ["sweep", str(real_cache), "--out", str(res), "--measures", "grade", "--n-train", "10", "--draws", "2",
            "--layers", "last"] + [a for d in dirs for a in ("--icl", str(d))]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    results = pd.read_parquet(res / "results.parquet")
    icl = results[results["method"] == "icl"]
    assert set(icl["site"]) == set(icl["layer"]) == set(icl["solver"]) == {""}  # ICL has no probe head
    assert set(icl["train_level"]) == {"easy", "hard"} and set(icl["n_train"]) == {1}
    manifest, ids, choice_sum, _ = load_icl(dirs[1])
    gold = demo_items.table.set_index("id").loc[ids, "label"].to_numpy()
    for b in range(2):
        rows = icl[(icl["train_level"] == "hard") & (icl["draw"] == b)].set_index("item_id")
        demo = set(manifest["draw_info"][str(b)]["demo_ids"])
        assert len(rows) == len(ids) - len(demo) and not demo & set(rows.index)
        s = choice_sum[b]
        keep = np.isfinite(s).any(1)
        logits = s[keep] - s[keep].max(1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        expected = p[np.arange(keep.sum()), gold[keep]]
        np.testing.assert_allclose(rows.loc[ids[keep], "p_gold"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    rep = tmp_path / "rep"
    out = runner.invoke(app, ["report", str(res), "--out", str(rep), "--boot", "200", "--boot-sgr", "500"])
    assert out.exit_code == 0, out.output
    summary = json.loads((rep / "summary.json").read_text())
    rec = next(r for r in summary["population"] if r["site"] == "icl")
    assert set(rec["accuracy"]) == {"zero_shot", "easy", "hard"} and rec["n_train"]["easy"] == 1
