"""Question sets, levels and draws against the real files in ../shared/data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from probekit.cli import app
from probekit.data import Fixed, Quantile, cut_levels, cutoff_for, load_dataset
from probekit.data import sets as sets_module
from probekit.data.draws import noisy_labels, random_split, train_draw
from probekit.data.levels import level_counts, parse_cutoff
from probekit.errors import ProbekitError


@pytest.fixture(scope="module")
def arc(shared_data):
    return load_dataset("arc", shared_data)


def counts(items, measure):
    codes = cut_levels(items.table[measure].to_numpy(), cutoff_for(items.name, measure))
    return [int((codes == k).sum()) for k in (0, 1, 2)]


# ----------------------------------------------------------------------------- real set counts
def test_arc_levels_match_the_paper(arc):
    assert len(arc) == 4521
    assert counts(arc, "grade") == [1434, 1055, 2032]
    assert counts(arc, "difficulty") == [1056, 2878, 587]
    assert counts(arc, "bloom") == [2357, 1314, 850]
    assert arc.table["pool"].value_counts().to_dict() == {"probe": 3521, "holdout": 1000}
    assert arc.max_choices == 4


def test_mmlu_stem5_counts(shared_data):
    mmlu = load_dataset("mmlu", shared_data)
    assert counts(mmlu, "human_hardness") == [1143, 0, 603]
    assert mmlu.table["subject"].nunique() == 10
    assert (mmlu.table["pool"] == "probe").all()


def test_strategyqa_and_gsm8k_counts(shared_data):
    sqa = load_dataset("strategyqa", shared_data)
    assert len(sqa) == 2290 and sqa.prompt_template == "0306"
    # decomposition steps (train + dev): 1:18, 2:626, 3:1219, 4:342, 5:85
    assert counts(sqa, "num_steps") == [18 + 626, 1219, 342 + 85]
    gsm = load_dataset("gsm8k", shared_data)
    assert len(gsm) == 8792 and gsm.generative
    assert gsm.table["pool"].value_counts().to_dict() == {"probe": 7792, "holdout": 1000}
    assert gsm.table["num_steps"].max() == 10


# ------------------------------------------------------------------------- pinned known items
def test_known_items_are_pinned(shared_data, arc):
    row = arc.table.set_index("id").loc["Mercury_SC_407695"]
    assert row["question"].startswith("Juan and LaKeisha roll a few objects down a ramp.")
    assert row["choices"] == ["Put the objects in groups.", "Change the height of the ramp.",
                              "Choose different objects to roll.", "Record the details of the investigation."]
    assert (row["label"], row["source"]) == (3, "ARC-Challenge/validation")
    assert (row["grade"], row["difficulty"], row["bloom"], row["depth_of_knowledge"]) == (4, 2, 3, 2)
    assert (row["question_num_words"], row["answer_num_words"], row["answer_num_chars"]) == (29, 6, 40)

    mmlu = load_dataset("mmlu", shared_data).table.set_index("id")
    row = mmlu.loc["college_physics/test/0"]
    assert row["label"] == 1 and row["human_hardness"] == 1 and row["choices"][3].endswith("about 0.1")

    sqa = load_dataset("strategyqa", shared_data).table.set_index("id")
    row = sqa.loc["2bc9c4f9c19c167187f2"]
    assert (row["choices"], row["label"], row["num_steps"], row["reasoning_num_words"]) == (["yes", "no"], 0, 3, 30)

    gsm = load_dataset("gsm8k", shared_data).table.set_index("id")
    row = gsm.loc["gsm8k/test/0"]
    assert (row["choices"], row["label"], row["num_steps"], row["answer_num_chars"]) == (["18"], 0, 2, 2)
    assert row["reasoning"].endswith("every day at the farmer’s market.")


def test_fingerprint_is_stable_and_content_sensitive(shared_data, arc):
    again = load_dataset("arc", shared_data)
    assert again.fingerprint == arc.fingerprint
    assert load_dataset("arc", shared_data, holdout=False).fingerprint != arc.fingerprint


# ----------------------------------------------------- the hub source gives the same table
def _hub_layout_rows(shared_data):
    """The local files rewritten in the Hugging Face hub's record layout, keyed like the hub."""
    import csv

    rows: dict[tuple, list[dict]] = {}
    for line in (shared_data / "arc" / "arc_all_splits.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = ("allenai/ai2_arc", rec.pop("arc_set"), rec.pop("split"))
        rows.setdefault(key, []).append(rec)
    for subject in sets_module._mmlu_names():
        for split, folder in sets_module.MMLU_SPLITS:
            with open(shared_data / "mmlu" / folder / f"{subject}_{folder}.csv", newline="") as fh:
                rows[("tasksource/mmlu", subject, split)] = [
                    {"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5]), "subject": subject}
                    for r in csv.reader(fh)]
    sqa = []
    for name in ("dev.json", "train.json"):  # a different order than the local reader uses
        sqa += [{k: v for k, v in r.items() if k != "evidence"}  # the hub's layout has no evidence
                for r in json.loads((shared_data / "strategyqa" / name).read_text())]
    rows[("wics/strategy-qa", None, "test")] = sqa
    for split in ("train", "test"):
        rows[("openai/gsm8k", "main", split)] = [
            json.loads(x) for x in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    return rows


@pytest.mark.parametrize("name", ["arc", "mmlu", "strategyqa", "gsm8k"])
def test_hub_and_local_sources_give_identical_tables(shared_data, monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    rows = _hub_layout_rows(shared_data)
    # The network is the only thing replaced: the hub's answer, as datasets.Dataset objects.
    monkeypatch.setattr(sets_module, "_hub_rows",
                        lambda path, config, split: datasets.Dataset.from_list(rows[(path, config, split)]))
    hub = load_dataset(name, source="hub")
    local = load_dataset(name, shared_data)
    pd.testing.assert_frame_equal(hub.table, local.table)
    assert hub.fingerprint == local.fingerprint


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProbekitError, match="Hugging Face hub.*--data-dir"):
        load_dataset("strategyqa", source="hub")


# -------------------------------------------------------------------------- bundled sample
def test_bundled_sample_is_reproducible_and_usable(shared_data, tmp_path):
    from probekit.data.sample import write_arc_sample

    out = tmp_path / "sample.jsonl"
    write_arc_sample(shared_data, out)
    bundled = sets_module._bundled("arc_sample.jsonl")
    assert out.read_bytes() == bundled.read_bytes()
    sample = load_dataset("bundled")
    assert sample.name == "arc-sample" and 300 <= len(sample) <= 800
    for m in ("grade", "difficulty", "bloom"):
        assert min(counts(sample, m)) >= 150
    full = load_dataset("arc", shared_data, holdout=False).table.set_index("id")
    for col in ("question", "choices", "label", "grade", "bloom"):
        assert sample.table.set_index("id")[col].equals(full.loc[sample.table["id"], col])


# ----------------------------------------------------------------------------- user files
def test_user_jsonl_and_csv(tmp_path):
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "question": "2+2?", "choices": ["3", "4"], "label": 1, "steps": 1},
        {"id": "q2", "question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "label": "A", "steps": 3},
        {"id": "q3", "question": "Largest planet?", "choices": ["Mars", "Jupiter"], "label": "Jupiter", "steps": 2},
    ]))
    items = load_dataset(str(jl))
    assert items.name == "mine" and list(items.table["label"]) == [1, 0, 1]
    assert items.measures[0] == "steps" and "question_num_words" in items.measures
    assert items.max_choices == 3

    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("question,A,B,C,label,score\nWhy?,x,y,,B,0.5\nHow?,p,q,r,2,0.9\n")
    items = load_dataset(str(csv_path))
    assert list(items.table["choices"]) == [["x", "y"], ["p", "q", "r"]]
    assert list(items.table["label"]) == [1, 2] and "score" in items.measures
    assert isinstance(cutoff_for(items.name, "score"), Quantile)


@pytest.mark.parametrize("content, message", [
    ('{"question": "Q?", "choices": [], "label": 0}', "row 1: no choices"),
    ('{"question": "Q?", "choices": ["a", "b"], "label": 5}', "label 5 outside its 2 choices"),
    ('{"question": "Q?", "label": 0}', "no 'choices' column"),
    ('{"question": "Q?", "choices": ["a", "b"], "label": "zzz"}', "label 'zzz' is neither"),
])
def test_user_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(ProbekitError, match=message):
        load_dataset(str(path))


def test_missing_file_and_unknown_names(tmp_path, shared_data):
    (tmp_path / "mmlu" / "val").mkdir(parents=True)
    with pytest.raises(ProbekitError, match=r"missing mmlu/val/high_school_biology_val.csv"):
        load_dataset("mmlu", tmp_path)
    with pytest.raises(ProbekitError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ProbekitError, match="unknown measure 'color'"):
        level_counts(load_dataset("bundled"), ["color"])
    with pytest.raises(ProbekitError, match="no cut-off known for measure 'mystery'"):
        cutoff_for("arc", "mystery")


# ---------------------------------------------------------------------------------- levels
def test_fixed_and_quantile_cuts():
    values = np.array([3, 5, 6, 7, 8, np.nan])
    assert cut_levels(values, Fixed(5, 8)).tolist() == [0, 0, 1, 1, 2, -1]
    values = np.arange(10, dtype=float)  # q30 = 2.7, q70 = 6.3
    assert cut_levels(values, Quantile()).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert parse_cutoff("5,8") == Fixed(5, 8) and parse_cutoff("q20,q80") == Quantile(0.2, 0.8)
    with pytest.raises(ProbekitError, match="cut-off '8,5'"):
        parse_cutoff("8,5")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200))
def test_quantile_levels_are_monotone_in_value(values):
    values = np.array(values)
    codes = cut_levels(values, Quantile())
    order = np.argsort(values, kind="stable")
    assert (np.diff(codes[order]) >= 0).all()


# ----------------------------------------------------------------------------------- draws
def test_draws_are_seeded_nested_and_independent():
    pool = np.arange(1000, 1500)
    a = train_draw(pool, 160, seed=0, draw=3, key="grade/easy")
    assert np.array_equal(a, train_draw(pool, 160, seed=0, draw=3, key="grade/easy"))
    assert np.array_equal(train_draw(pool, 40, seed=0, draw=3, key="grade/easy"), a[:40])  # nested
    assert len(set(a)) == 160 and set(a) <= set(pool)
    # draw 3 does not depend on which other draws were made, nor in what order
    [train_draw(pool, 160, seed=0, draw=b, key="grade/easy") for b in range(3)]
    assert np.array_equal(a, train_draw(pool, 160, seed=0, draw=3, key="grade/easy"))
    assert not np.array_equal(a, train_draw(pool, 160, seed=0, draw=4, key="grade/easy"))
    assert not np.array_equal(a, train_draw(pool, 160, seed=1, draw=3, key="grade/easy"))
    assert not np.array_equal(a, train_draw(pool, 160, seed=0, draw=3, key="grade/hard"))
    split = random_split(700, 160, seed=0, draw=0)
    assert len(np.unique(split)) == 160 and split.max() < 700


def test_small_level_names_its_size():
    with pytest.raises(ProbekitError, match="level 'difficulty/hard' has 150 items, fewer than n_train \\+ 50 = 210"):
        train_draw(np.arange(150), 160, key="difficulty/hard")


def test_noisy_labels_rate():
    labels = np.zeros(20000, dtype=np.int64)
    n_choices = np.full(20000, 4)
    assert np.array_equal(noisy_labels(labels, n_choices, 0.0), labels)
    noisy = noisy_labels(labels, n_choices, 0.4, seed=1, draw=2, key="easy")
    assert abs((noisy != labels).mean() - 0.4 * 0.75) < 0.02  # uniform redraw may return the gold
    assert noisy.max() == 3 and np.array_equal(noisy, noisy_labels(labels, n_choices, 0.4, seed=1, draw=2, key="easy"))


# -------------------------------------------------------------------------------------- CLI
def test_cli_datasets(shared_data):
    runner = CliRunner()
    res = runner.invoke(app, ["datasets"])
    assert res.exit_code == 0 and "strategyqa" in res.output
    res = runner.invoke(app, ["datasets", "show", "arc", "--measure", "grade", "--data-dir", str(shared_data)])
    assert res.exit_code == 0, res.output
    assert "1434" in res.output and "1055" in res.output and "2032" in res.output
    res = runner.invoke(app, ["datasets", "show", "nope"])
    assert res.exit_code == 2 and "unknown dataset 'nope'" in res.output
