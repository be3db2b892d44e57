"""The report from a results table: files exist, numbers agree with direct statistics calls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit.errors import ProbekitError
from probekit.report import build_report, load_results
from probekit.stats.shared import SharedBootstrap
from probekit.store.results import CACHE_HASH_KEY

N_BOOT, N_BOOT_SGR, SEED = 300, 1000, 3
MEASURES = ("grade", "question_num_words")
COLUMNS = ["experiment", "site", "layer", "measure", "train_level", "draw", "n_train", "label_noise",
           "solver", "item_id", "test_level", "correct", "p_gold"]
ALL_EXPERIMENTS = ("population", "all_to_all", "learning_curve", "label_noise")


# ----------------------------------------------------------------------------------------------
# Test input: a results table in the sweep's schema, drawn from a seeded simulation


def make_results(out: Path, seed: int = 0, n_items: int = 150, draws: int = 3,
                 experiments=ALL_EXPERIMENTS) -> pd.DataFrame:
    """Write RES/results.parquet and RES/sweep.json: heads whose test items exclude their training items."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"q{i:04d}" for i in range(n_items)])
    levels = {m: rng.choice(np.array(["easy", "medium", "hard"]), n_items) for m in MEASURES}
    ability = rng.uniform(0.3, 0.9, n_items)
    bonus = {"easy": 0.05, "medium": 0.07, "hard": 0.08, "all": 0.07}
    rows: list[tuple] = []

    def add(exp, layer, measure, level, draw, n_train, noise, solver, train, lv, shift):
        test = np.setdiff1d(np.arange(n_items), train)
        correct = (rng.random(len(test)) < np.clip(ability[test] + shift, 0, 1)).astype(np.int8)
        for i, c in zip(test, correct):
            rows.append((exp, "answer_end", layer, measure, level, draw, n_train, noise, solver, ids[i], lv[i], c, 0.5))

    def train_draw(pool, n):
        return rng.choice(pool, n, replace=False)

    for m in MEASURES:
        lv = levels[m]
        if "population" in experiments:
            add("population", "", m, "zero_shot", 0, 0, 0.0, "zero_shot", np.array([], int), lv, -0.2)
            for layer, shift in (("10", -0.05), ("20", 0.0), ("10+20", 0.01)):
                for level in ("easy", "medium", "hard", "all"):
                    pool = np.arange(n_items) if level == "all" else np.flatnonzero(lv == level)
                    for d in range(draws):
                        add("population", layer, m, level, d, 12, 0.0, "paper", train_draw(pool, 12), lv, bonus[level] + shift)
        for level in ("easy", "hard"):
            pool = np.flatnonzero(lv == level)
            for d in range(draws):
                if "learning_curve" in experiments:
                    for n in (5, 10, 20):
                        add("learning_curve", "20", m, level, d, n, 0.0, "paper", train_draw(pool, n), lv, bonus[level] * n / 20)
                if "label_noise" in experiments:
                    for noise in (0.0, 0.1, 0.2):
                        add("label_noise", "20", m, level, d, 12, noise, "paper", train_draw(pool, 12), lv, bonus[level] - noise)
    if "all_to_all" in experiments:
        for d in range(draws):
            add("all_to_all", "20", "all", "all", d, 20, 0.0, "paper", train_draw(np.arange(n_items), 20),
                levels["grade"], 0.07)
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"p_gold": np.float32, "correct": np.int8})
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "results.parquet")
    sweep = {"seed": seed, "dataset": "synthetic", "cache": "cache/x", CACHE_HASH_KEY: "ab" * 32}
    (out / "sweep.json").write_text(json.dumps(sweep))
    return df


def matrix(df: pd.DataFrame, **where) -> np.ndarray:
    """Item x draw matrix built with a plain loop: rows = sorted item ids, columns = sorted draws."""
    sel = df
    for col, value in where.items():
        sel = sel[sel[col] == value]
    ids, draws = sorted(set(sel["item_id"])), sorted(set(sel["draw"]))
    M = np.full((len(ids), len(draws)), np.nan)
    for item, draw, correct in zip(sel["item_id"], sel["draw"], sel["correct"]):
        M[ids.index(item), draws.index(draw)] = correct
    return M, ids


def frame(df: pd.DataFrame, **where) -> pd.DataFrame:
    """:func:`matrix` as an item x draw frame (item ids as the index, draws as the columns)."""
    M, ids = matrix(df, **where)
    sel = df
    for col, value in where.items():
        sel = sel[sel[col] == value]
    return pd.DataFrame(M, index=ids, columns=sorted(set(sel["draw"])))


def direct(register, n_boot: int = N_BOOT) -> object:
    """One statistic computed directly: ``register(boot)`` adds it to a fresh SharedBootstrap."""
    boot = SharedBootstrap(n_boot, SEED)
    h = register(boot)
    return boot.run()[h]


def same(summary_stat: dict, direct) -> bool:
    """A summary entry (after its JSON round trip) equals a direct statistics call (an SGR's q-value
    belongs to its family, not to the statistic, and is checked on its own)."""
    stat = {k: v for k, v in summary_stat.items() if k != "q_value"}
    return stat == json.loads(json.dumps(direct.to_dict()))


# ----------------------------------------------------------------------------------------------
# The full report, built once


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    df = make_results(root / "res")
    summary = build_report(root / "res", root / "rep", n_boot=N_BOOT, n_boot_sgr=N_BOOT_SGR, seed=SEED, layer="20")
    return df, summary, root / "rep"


def test_report_writes_every_file(full):
    _, summary, rep = full
    expected = {"summary.json", "report.md", "population.csv", "transfer.csv", "all_to_all.csv",
                "learning_curves.csv", "label_noise.csv", "sgr.png", "layer_curves.png", "transfer.png",
                "learning_curves.png", "label_noise.png"}
    assert expected <= {p.name for p in rep.iterdir()}
    assert set(summary["files"]) == expected
    for png in rep.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (rep / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"sgr.png", "layer_curves.png", "transfer.png", "learning_curves.png", "label_noise.png"} <= set(links)
    assert all((rep / link).is_file() for link in links)
    assert not list(rep.parent.glob(".rep.tmp-*"))  # the temporary directory is gone
    on_disk = json.loads((rep / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["cache_manifest_sha256"] == "ab" * 32
    assert on_disk["sweep"]["dataset"] == "synthetic"
    assert on_disk["settings"]["headline"] == {"site": "answer_end", "layer": "20", "solver": "paper"}


@pytest.mark.parametrize("measure", MEASURES)
def test_population_numbers_equal_direct_calls(full, measure):
    df, summary, _ = full
    rec = next(r for r in summary["population"] if (r["measure"], r["layer"]) == (measure, "20"))
    pop = df[(df["experiment"] == "population") & (df["measure"] == measure) & (df["test_level"] == "hard")]
    # the conditions under their documented names (probekit.report.tables.condition_name)
    zero = (frame(pop, train_level="zero_shot"), f"zero_shot/{measure}")
    trained = {lv: (frame(pop, train_level=lv, layer="20"), f"population/{measure}/answer_end/20/paper/{lv}")
               for lv in ("easy", "medium", "hard", "all")}
    assert same(rec["accuracy"]["zero_shot"], direct(lambda b: b.accuracy(*zero)))
    for lv, (M, name) in trained.items():
        assert same(rec["accuracy"][lv], direct(lambda b: b.accuracy(M, name)))
    (Z, z), (E, e), (H, h) = zero, trained["easy"], trained["hard"]
    assert same(rec["sgr"], direct(lambda b: b.sgr(Z, E, H, (z, e, h), N_BOOT_SGR)))
    assert same(rec["hard_minus_easy"], direct(lambda b: b.difference(E, H, (e, h))))
    assert same(rec["easy_minus_zero_shot"], direct(lambda b: b.difference(Z, E, (z, e))))
    assert rec["sgr"]["n_items"] == rec["easy_minus_zero_shot"]["n_items"] == len(set(pop["item_id"]))


def test_training_items_are_not_test_items(full):
    df, summary, _ = full
    # hard-trained heads never test on their own training items: each draw misses 12 hard items
    rec = next(r for r in summary["population"] if (r["measure"], r["layer"]) == ("grade", "20"))
    M, ids = matrix(df[(df["experiment"] == "population") & (df["measure"] == "grade")], train_level="hard",
                    layer="20", test_level="hard")
    assert (np.isnan(M).sum(axis=0) == 12).all()
    assert rec["accuracy"]["hard"]["n_items"] == len(ids)
    assert rec["accuracy"]["hard"]["point"] == np.nanmean(M)


def test_csvs_agree_with_summary(full):
    _, summary, rep = full
    pop = pd.read_csv(rep / "population.csv", dtype={"layer": str})
    assert len(pop) == len(summary["population"]) == 2 * 3
    for rec in summary["population"]:
        row = pop[(pop["measure"] == rec["measure"]) & (pop["layer"] == rec["layer"])].iloc[0]
        assert row["acc_hard"] == pytest.approx(rec["accuracy"]["hard"]["point"], abs=1e-12)
        assert row["sgr"] == pytest.approx(rec["sgr"]["point"], abs=1e-12)
        assert row["sgr_p"] == pytest.approx(rec["sgr"]["p_value"], abs=1e-12)
    curves = pd.read_csv(rep / "learning_curves.csv")
    assert set(curves["n_train"]) == {0, 5, 10, 20}
    noise = pd.read_csv(rep / "label_noise.csv")
    assert set(noise["label_noise"]) == {0.0, 0.1, 0.2}


def test_curves_and_all_to_all_equal_direct_calls(full):
    df, summary, _ = full
    rec = next(r for r in summary["learning_curve"] if (r["measure"], r["train_level"], r["n_train"]) == ("grade", "easy", 10))
    sel = df[(df["experiment"] == "learning_curve") & (df["measure"] == "grade") & (df["n_train"] == 10)]
    M = frame(sel, train_level="easy", test_level="hard")
    assert same(rec["accuracy"], direct(lambda b: b.accuracy(M, "learning_curve/grade/answer_end/20/paper/easy/n_train=10")))
    rec = next(r for r in summary["all_to_all"] if r["test_level"] == "medium")
    sel = df[df["experiment"] == "all_to_all"]
    M = frame(sel, test_level="medium")
    assert same(rec["accuracy"], direct(lambda b: b.accuracy(M, "all_to_all/all/answer_end/20/paper/all")))
    # the zero-shot reference of the curves is the population's zero-shot accuracy: same items, same name
    zero = next(r for r in summary["learning_curve"] if r["train_level"] == "zero_shot" and r["measure"] == "grade")
    pop = next(r for r in summary["population"] if r["measure"] == "grade")
    assert zero["accuracy"] == pop["accuracy"]["zero_shot"]
    transfer = {(t["measure"], t["train_level"], t["test_level"]): t["accuracy"] for t in summary["transfer"]}
    M, _ = matrix(df[(df["experiment"] == "population") & (df["measure"] == "grade")], train_level="easy",
                  layer="20", test_level="easy")
    assert transfer[("grade", "easy", "easy")] == np.nanmean(M)


def test_report_is_reproducible(full, tmp_path):
    _, summary, rep = full
    again = build_report(rep.parent / "res", tmp_path / "rep", n_boot=N_BOOT, n_boot_sgr=N_BOOT_SGR, seed=SEED,
                         layer="20")
    assert again["population"] == summary["population"]


# ----------------------------------------------------------------------------------------------
# Partial results, headline choice, bad input


def test_progress_total_counts_every_unit_of_work(full, tmp_path):
    calls = []
    build_report(full[2].parent / "res", tmp_path / "rep", n_boot=20, n_boot_sgr=20, layer="20",
                 progress=lambda done, total, what: calls.append((done, total, what)))
    assert calls and {total for _, total, _ in calls} == {len(calls)}  # the total announced is the work done
    assert [done for done, _, _ in calls] == list(range(1, len(calls) + 1))
    assert {what.split()[0] for _, _, what in calls} == {"population", "all-to-all", "learning_curve", "label_noise"}


def test_only_population(tmp_path):
    make_results(tmp_path / "res", experiments=("population",), n_items=90, draws=2)
    summary = build_report(tmp_path / "res", tmp_path / "rep", n_boot=50, n_boot_sgr=100, layer="10+20")
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"summary.json", "report.md", "population.csv", "sgr.png", "layer_curves.png"} <= names
    assert not {"all_to_all.csv", "learning_curves.png", "label_noise.png"} & names
    assert summary["all_to_all"] == [] and summary["learning_curve"] == []
    assert summary["settings"]["headline"]["layer"] == "10+20"


def test_default_headline_is_middle_and_last_with_full_sgr_resamples(tmp_path):
    make_results(tmp_path / "res", experiments=("population",), n_items=90, draws=2)
    summary = build_report(tmp_path / "res", tmp_path / "rep", n_boot=50, n_boot_sgr=300)
    assert summary["settings"]["headline"]["layer"] == "10+20"
    resamples = {(r["measure"], r["layer"]): r["sgr"]["n_resamples"] for r in summary["population"] if r["sgr"]}
    assert resamples and all(n == (300 if layer == "10+20" else 50) for (_, layer), n in resamples.items())


def test_without_population(tmp_path):
    make_results(tmp_path / "res", experiments=("learning_curve",), n_items=90, draws=2)
    summary = build_report(tmp_path / "res", tmp_path / "rep", n_boot=50, n_boot_sgr=100)
    assert summary["population"] == [] and summary["learning_curve"]
    assert (tmp_path / "rep" / "learning_curves.png").is_file()
    assert not (tmp_path / "rep" / "sgr.png").exists()


def broken(tmp_path: Path, change) -> Path:
    df = make_results(tmp_path / "res", experiments=("population",), n_items=60, draws=2)
    df = change(df)
    if df is not None:
        df.to_parquet(tmp_path / "res" / "results.parquet")
    return tmp_path / "res"


def no_hard_grade(df):
    df.loc[(df["measure"] == "grade") & (df["test_level"] == "hard"), "test_level"] = "medium"
    return df


def garbage(df):
    return None


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns=["test_level"]), "lacks column(s) test_level"),
    (no_hard_grade, "no hard-test rows for measure 'grade'"),
    (lambda df: df.assign(correct=2), "correct must be 0 or 1 (the table was changed"),
    (lambda df: pd.concat([df, df[df["train_level"] == "hard"].iloc[[0]]]), "appears twice"),
    (lambda df: df.iloc[:0], "has no rows"),
])
def test_malformed_results_raise_one_line(tmp_path, change, message):
    res = broken(tmp_path, change)
    with pytest.raises(ProbekitError, match=re.escape(message)) as exc:
        build_report(res, tmp_path / "rep", n_boot=20, n_boot_sgr=20)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "rep").exists()


def test_missing_or_damaged_results(tmp_path):
    with pytest.raises(ProbekitError, match="results directory not found"):
        load_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbekitError, match="no results.parquet"):
        load_results(tmp_path / "empty")
    res = broken(tmp_path, garbage)
    (res / "results.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ProbekitError, match="cannot read"):
        load_results(res)
    with pytest.raises(ProbekitError, match="layer '7' is not in the results"):
        make_results(tmp_path / "ok", experiments=("population",), n_items=60, draws=2)
        build_report(tmp_path / "ok", tmp_path / "rep", n_boot=20, n_boot_sgr=20, layer="7")


def test_failure_keeps_old_report_whole(tmp_path):
    make_results(tmp_path / "res", experiments=("population",), n_items=60, draws=2)
    build_report(tmp_path / "res", tmp_path / "rep", n_boot=20, n_boot_sgr=20)
    before = (tmp_path / "rep" / "summary.json").read_text()
    (tmp_path / "res" / "results.parquet").write_bytes(b"damaged")
    with pytest.raises(ProbekitError):
        build_report(tmp_path / "res", tmp_path / "rep", n_boot=20, n_boot_sgr=20)
    assert (tmp_path / "rep" / "summary.json").read_text() == before
    assert not list(tmp_path.glob(".rep.tmp-*"))


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_report(tmp_path):
    from probekit.cli import app

    make_results(tmp_path / "res", experiments=("population",), n_items=60, draws=2)
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep"),
                              "--boot", "50", "--boot-sgr", "100", "--seed", "1"], terminal_width=160)
    assert out.exit_code == 0, out.output
    assert "grade" in out.output and "question_num_words" in out.output and "report.md" in out.output
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["settings"]["seed"] == 1
    bad = runner.invoke(app, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep2")])
    assert bad.exit_code == 2 and "error: results directory not found" in bad.output
    help_text = runner.invoke(app, ["report", "--help"]).output
    assert "Example:" in help_text


def test_zero_weight_heads_under_each_treatment(tmp_path):
    """Heads flagged in the zero_weights column (exact optimum at zero weights) are counted per layer and
    per (measure, training level). By default (chance) they stay in every statistic, each cell their
    expected accuracy 1 / n_choices; `exclude` leaves them out (the draws of a paired difference are then
    those both levels keep); `include` keeps their SGD predictions. summary.json holds the headline under
    all three. Tables written without the column read as having no such heads."""
    df = make_results(tmp_path / "res", experiments=("population",))
    plain = build_report(tmp_path / "res", tmp_path / "plain", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20")
    assert plain["zero_weight_heads"]["zero_weight_heads"] == 0
    assert "## Heads with zero weights" not in (tmp_path / "plain" / "report.md").read_text()
    flagged = (df.layer == "20") & (df.measure == "grade") & (df.train_level == "hard") & (df.draw == 1)
    k = 3 + df["item_id"].str[-1].astype(int) % 3  # 3, 4 or 5 choices
    df["zero_weights"], df["n_choices"] = flagged, k.astype(np.int16)
    df.to_parquet(tmp_path / "res" / "results.parquet")
    where = dict(experiment="population", measure="grade", layer="20", test_level="hard")
    names = {lv: f"population/grade/answer_end/20/paper/{lv}" for lv in ("easy", "hard")}

    def grade_20(summary):
        return next(r for r in summary["population"] if (r["measure"], r["layer"]) == ("grade", "20"))

    # chance (the default): the flagged head's cells become 1 / n_choices, a plain numpy computation
    out = build_report(tmp_path / "res", tmp_path / "rep", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20")
    zero = out["zero_weight_heads"]
    assert zero["treatment"] == "chance" and not zero["excluded"] and zero["zero_weight_heads"] == 1
    by_layer = {r["layer"]: r for r in zero["by_layer"]}
    assert by_layer["20"]["zero_weight_heads"] == 1 and by_layer["20"]["which"] == ["grade/hard/draw 1"]
    rec = grade_20(out)
    chance = df.assign(correct=np.where(flagged, 1.0 / k, df["correct"]))
    M, _ = matrix(chance, train_level="hard", **where)
    assert M.shape[1] == 3 and rec["accuracy"]["hard"]["point"] == pytest.approx(np.nanmean(M), abs=1e-15)
    hard = frame(chance, train_level="hard", **where)
    assert same(rec["accuracy"]["hard"], direct(lambda b: b.accuracy(hard, names["hard"]), 200))
    assert rec["zero_weight_heads"] == {"easy": 0, "medium": 0, "hard": 1, "all": 0}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Heads with zero weights" in md and "| grade | 0 of 3 | 0 of 3 | 1 of 3 | 0 of 3 |" in md
    csv = pd.read_csv(tmp_path / "rep" / "population.csv")
    assert csv[(csv.measure == "grade") & (csv.layer.astype(str) == "20")]["zero_weight_heads_hard"].tolist() == [1]

    # exclude: today's numbers, the paired difference over the draws both levels keep
    ex = build_report(tmp_path / "res", tmp_path / "ex", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20",
                      zero_weights="exclude")
    rec = grade_20(ex)
    hard = frame(df[~flagged], train_level="hard", **where)
    assert hard.shape[1] == 2 and same(rec["accuracy"]["hard"], direct(lambda b: b.accuracy(hard, names["hard"]), 200))
    easy = frame(df, train_level="easy", **where)[[0, 2]]
    assert same(rec["hard_minus_easy"], direct(lambda b: b.difference(easy, hard, (names["easy"], names["hard"])), 200))
    assert "| grade | 0 of 3 | 0 of 3 | 1 of 3 | 0 of 3 |" in (tmp_path / "ex" / "report.md").read_text()

    # include: the SGD predictions as they are
    kept = build_report(tmp_path / "res", tmp_path / "all", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20",
                        zero_weights="include")
    hard = frame(df, train_level="hard", **where)
    assert same(grade_20(kept)["accuracy"]["hard"], direct(lambda b: b.accuracy(hard, names["hard"]), 200))

    # every report keeps the headline under all three treatments, each equal to that treatment's own report
    for summary in (out, ex, kept):
        t = summary["zero_weight_treatments"]
        assert set(t) == {"chance", "exclude", "include"}
        for name, own in (("chance", out), ("exclude", ex), ("include", kept)):
            assert t[name]["grade"]["accuracy"] == grade_20(own)["accuracy"]
            assert t[name]["grade"]["sgr"] == grade_20(own)["sgr"]
    with pytest.raises(ProbekitError, match="zero_weights must be one of chance, exclude, include"):
        build_report(tmp_path / "res", tmp_path / "bad", zero_weights="drop")
    # results without n_choices (written before the column): chance is refused in one line, exclude works
    df.drop(columns=["n_choices"]).to_parquet(tmp_path / "res" / "results.parquet")
    with pytest.raises(ProbekitError, match="lack n_choices .*--zero-weights exclude or include"):
        build_report(tmp_path / "res", tmp_path / "old", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20")
    assert not (tmp_path / "old").exists()
    build_report(tmp_path / "res", tmp_path / "old", n_boot=200, n_boot_sgr=200, seed=SEED, layer="20",
                 zero_weights="exclude")


def test_sgr_not_estimable_is_flagged_and_shown_as_n_e(tmp_path):
    """A measure whose hard training does not beat zero-shot: its SGR keeps its numbers in summary.json
    and population.csv with the flag and the reason, and the tables and the CLI show n/e."""
    from probekit.cli import app

    df = make_results(tmp_path / "res", experiments=("population",), n_items=120, draws=2)
    zero = (df["train_level"] == "zero_shot") & (df["measure"] == "grade")
    rng = np.random.default_rng(11)
    df.loc[zero, "correct"] = (rng.random(int(zero.sum())) < 0.8).astype(np.int8)  # zero-shot as good as hard
    df.to_parquet(tmp_path / "res" / "results.parquet")
    out = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep"), "--layer", "20",
                                   "--boot", "200", "--boot-sgr", "500", "--seed", "1"], terminal_width=160)
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    rec = {r["measure"]: r["sgr"] for r in summary["population"] if r["layer"] == "20"}
    flagged, kept = rec["grade"], rec["question_num_words"]
    assert flagged["estimable"] is False and flagged["den_lo"] <= 0
    assert flagged["reason"].startswith("hard - zero-shot interval [") and flagged["point"] is not None
    assert kept["estimable"] is True and kept["reason"] is None and kept["den_lo"] > 0
    line = next(x for x in (tmp_path / "rep" / "report.md").read_text().splitlines()
                if x.startswith("| grade |"))  # the headline table
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert "n/e" in cells and f"n/e: {flagged['reason']}" in cells
    other = next(x for x in (tmp_path / "rep" / "report.md").read_text().splitlines()
                 if x.startswith("| question_num_words |"))
    assert f"{kept['point']:.2f} [" in other and "n/e" not in other
    pop = pd.read_csv(tmp_path / "rep" / "population.csv")
    row = pop[(pop["measure"] == "grade") & (pop["layer"].astype(str) == "20")].iloc[0]
    assert not row["sgr_estimable"] and row["sgr_reason"] == flagged["reason"]
    assert row["sgr"] == pytest.approx(flagged["point"], abs=1e-12)
    assert re.search(r"grade .* n/e", out.output)
    assert f"n/e (grade): SGR not estimable, {flagged['reason']}" in out.output
    assert (tmp_path / "rep" / "sgr.png").exists()


def test_p_value_labels():
    from probekit.report.tables import fmt_p, fmt_test, p_label

    assert (fmt_p(0.0004), p_label(0.0004)) == ("<0.001", "p<0.001")
    assert (fmt_p(0.0125), p_label(0.0125)) == ("0.013", "p=0.013")
    stat = {"point": 0.861, "lo": 0.571, "hi": 1.26, "p_value": 0.0}
    assert fmt_test(stat) == "0.86 [0.57, 1.26] p<0.001"
