"""ICL demonstration pools: every probe item (``--demos-from all``), another question set's level
(ARC easy demonstrations scored on MMLU college items), and scoring only some test levels.

Real SmolLM2 on a handful of real items; scores are compared with a plain forward of the rendered
k-shot prompt, and the rows ``sweep --icl`` makes of them are checked for their labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from probekit.errors import ProbekitError


def _plain_scores(lm, items, row: int, demos: list[tuple[str, list[str], str]]) -> list[float]:
    """Reference: one forward of the whole k-shot prompt + choice, per choice; summed log-probs."""
    import torch

    from probekit.data.prompts import render_kshot
    from probekit.llm.tokens import answer_text

    t = items.table.reset_index(drop=True)
    choices = [str(c) for c in t.at[row, "choices"]]
    text = render_kshot(demos, str(t.at[row, "question"]), choices, items.prompt_template)
    prompt = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for c in choices:
        ids = lm.tokenizer(answer_text(c, lm.rules), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append(sum(lp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(ids)))
    return out


def _demos(table, ids) -> list[tuple[str, list[str], str]]:
    t = table.set_index(table["id"].astype(str))
    return [(str(t.at[i, "question"]), [str(c) for c in t.at[i, "choices"]],
             str(t.at[i, "choices"][int(t.at[i, "label"])])) for i in ids]


def _shortest(table, mask, n):
    lengths = table["question"].str.len().to_numpy()
    rows = np.flatnonzero(mask)
    return rows[np.argsort(lengths[rows], kind="stable")[:n]]


@pytest.mark.slow
def test_demos_from_all_draw_from_every_level_and_report_under_every_measure(lm, demo_items, real_cache, tmp_path):
    from probekit.data.levels import cut_levels, cutoff_for
    from probekit.extract.icl import extract_icl, load_icl
    from probekit.probe import sweep
    from probekit.store.results import read_results

    t = demo_items.table
    codes = cut_levels(t["grade"].to_numpy(np.float64), cutoff_for("arc", "grade"))
    rows = np.sort(np.concatenate([_shortest(t, codes == k, 3) for k in range(3)]))
    items = dataclasses.replace(demo_items, table=t.iloc[rows].reset_index(drop=True))
    out = tmp_path / "icl-all"
    s = extract_icl(items, out, lm, k=2, demos_from="all", measure="grade", draws=2, min_test=4, batch_size=4,
                    progress=False)
    assert s.complete and s.n_items == 9
    man, ids, csum, _ = load_icl(out)
    assert man["icl"]["key"] == "icl/all" and "test_levels" not in man["icl"] and "demos_dataset" not in man["icl"]
    assert ids.tolist() == items.table["id"].tolist()
    demo_ids = [man["draw_info"][str(b)]["demo_ids"] for b in range(2)]
    for b in range(2):
        is_demo = np.isin(ids, demo_ids[b])
        assert is_demo.sum() == 2 and np.isnan(csum[b][is_demo]).all() and np.isfinite(csum[b][~is_demo]).all()
    level_of = dict(zip(items.table["id"], cut_levels(items.table["grade"].to_numpy(np.float64),
                                                      cutoff_for("arc", "grade"))))
    assert len({level_of[i] for d in demo_ids for i in d}) >= 2  # the pool spans levels
    # the shared-prefix scores equal one plain forward of the rendered 2-shot prompt
    row = int(np.flatnonzero(~np.isin(ids, demo_ids[0]))[0])
    ref = _plain_scores(lm, items, row, _demos(items.table, demo_ids[0]))
    n = len(ref)
    assert np.abs(csum[0][row, :n] - np.array(ref)).max() < 5e-4

    sweep(real_cache, tmp_path / "res", measures=["grade", "difficulty"], layers="-1", n_train=[8], draws=1,
          levels=["all"], icl=[out])
    df = read_results(tmp_path / "res").table
    icl = df[df["method"] == "icl"]
    assert set(icl["train_level"]) == {"all"} and set(icl["n_train"]) == {2}
    assert set(icl["site"].astype(str)) == set(icl["solver"].astype(str)) == {""}  # no probe head
    assert set(icl["measure"]) == {"grade", "difficulty"}  # as the probes' "all" heads
    for m in ("grade", "difficulty"):
        one = icl[icl["measure"] == m]
        assert len(one) == 14 and one.groupby("draw", observed=True).size().tolist() == [7, 7]
    grade = icl[(icl["measure"] == "grade") & (icl["draw"] == 0)].set_index("item_id")
    assert {str(i): level for i, level in grade["test_level"].items()} == {
        i: ["easy", "medium", "hard"][level_of[i]] for i in ids if i not in demo_ids[0]}


@pytest.fixture(scope="module")
def college(shared_data):
    """Four MMLU high-school and four college items (the shortest), the full ARC set for demonstrations."""
    from probekit.data import load_dataset

    mmlu = load_dataset("mmlu", data_dir=shared_data)
    t = mmlu.table
    rows = np.sort(np.concatenate([_shortest(t, t["human_hardness"].to_numpy() == h, 4) for h in (0, 1)]))
    return dataclasses.replace(mmlu, table=t.iloc[rows].reset_index(drop=True)), load_dataset("arc", data_dir=shared_data)


@pytest.mark.slow
def test_arc_easy_demonstrations_scored_on_mmlu_college_items(lm, college, tmp_path):
    from probekit.design import item_frame, load_items
    from probekit.extract.icl import extract_icl, load_icl
    from probekit.extract.run import extract
    from probekit.probe.sweep import icl_tables
    from probekit.store import Cache
    from probekit.store.results import SCHEMA

    mmlu, arc = college
    out = tmp_path / "arc-to-mmlu"
    kw = dict(k=2, demos_items=arc, demos_measure="grade", demos_from="easy", measure="human_hardness",
              test_levels=["hard"], draws=1, batch_size=4, progress=False)
    s = extract_icl(mmlu, out, lm, **kw)
    assert s.complete and s.n_items == 4
    man, ids, csum, _ = load_icl(out)
    assert man["dataset"]["name"] == "mmlu" and man["icl"]["key"] == "icl/arc/grade/easy"
    assert man["icl"]["demos_dataset"] == {"name": "arc", "fingerprint": arc.fingerprint}
    assert man["icl"]["demos_measure"] == "grade" and man["icl"]["test_levels"] == ["hard"]
    college_ids = mmlu.table.loc[mmlu.table["human_hardness"] == 1, "id"].tolist()
    assert sorted(ids) == sorted(college_ids) and np.isfinite(csum[0][:, :4]).all()  # no test item is a demo
    demo_ids = man["draw_info"]["0"]["demo_ids"]
    arc_t = arc.table.set_index("id")
    assert len(demo_ids) == 2 and (arc_t.loc[demo_ids, "grade"] <= 5).all()  # ARC easy (grade <= 5)
    assert (arc_t.loc[demo_ids, "pool"] == "probe").all()
    row = int(np.flatnonzero(mmlu.table["id"] == ids[0])[0])
    ref = _plain_scores(lm, mmlu, row, _demos(arc.table, demo_ids))
    assert np.abs(csum[0][0, :len(ref)] - np.array(ref)).max() < 5e-4
    again = extract_icl(mmlu, out, lm, **kw)
    assert again.draws_written == []  # resumes
    with pytest.raises(ProbekitError, match="another icl"):
        extract_icl(mmlu, out, lm, **{**kw, "demos_from": "hard"})

    # rows for the results table: labelled by where the demonstrations came from
    cache_dir = tmp_path / "mmlu-cache"
    extract(mmlu, cache_dir, lm, layers="-1", sites="answer_end", batch_size=8, progress=False)
    cache = Cache(cache_dir)
    items, measures = load_items(cache, ["human_hardness"])
    frame = item_frame(items, "mmlu", measures)
    tables = icl_tables(cache, frame, "population", out)
    assert len(tables) == 1 and tables[0].schema == SCHEMA
    df = tables[0].to_pandas()
    assert set(df["train_level"]) == {"arc:grade:easy"} and set(df["measure"]) == {"human_hardness"}
    assert set(df["test_level"]) == {"hard"} and set(df["method"]) == {"icl"} and len(df) == 4
    # the labels follow the zero-shot rule of docs/protocol.md §5 on the stored scores
    gold = mmlu.table.set_index("id").loc[ids, "label"].to_numpy()
    expect = (np.nan_to_num(csum[0], nan=-np.inf).argmax(1) == gold).astype(int)
    assert dict(zip(df["item_id"].astype(str), df["correct"])) == dict(zip(ids, expect))


def test_icl_pool_options_are_checked_in_one_line(tmp_path, demo_items):
    from probekit.cli import app
    from probekit.extract.icl import extract_icl

    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--test-levels", "hard", "--out", str(tmp_path / "x"), "--no-progress"])
    assert res.exit_code == 2 and "--test-levels hard: applies to --icl K only" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    with pytest.raises(ProbekitError, match="demos measure 'difficulty' needs demonstrations from another"):
        extract_icl(demo_items, tmp_path / "y", None, k=1, demos_measure="difficulty", progress=False)
    with pytest.raises(ProbekitError, match="level 'al' is not one of easy, medium, hard or all"):
        extract_icl(demo_items, tmp_path / "y", None, k=1, demos_from="al", progress=False)
    with pytest.raises(ProbekitError, match="test level 'all'"):
        extract_icl(demo_items, tmp_path / "y", None, k=1, test_levels=["all"], progress=False)
    assert not (tmp_path / "y").exists()


def test_default_folder_names_say_where_demonstrations_come_from():
    from probekit.cli.extract_cmd import _default_out

    assert _default_out(None, None, "nf4", "arc", None, 10, "easy", "grade").name.endswith("__arc__icl-k10-easy-grade")
    assert _default_out(None, None, "nf4", "arc", None, 10, "all", "grade").name.endswith("__arc__icl-k10-all")
    name = _default_out(None, None, "nf4", "mmlu", None, 10, "easy", "human_hardness", "arc", ["hard"], "grade").name
    assert name.endswith("__mmlu__icl-k10-arc-easy-grade-test-hard-human_hardness")
