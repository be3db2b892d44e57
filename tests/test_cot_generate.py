"""Chain-of-thought generation with the real model: batched shared-prefix decoding against one plain
``generate`` call per item, determinism, resumption after a kill, errors, and the report."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from probekit.errors import ProbekitError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    from probekit.data import load_dataset

    return load_dataset("gsm8k", shared_data)


def kshot_texts(gsm8k, seed: int) -> list[str]:
    """2-shot CoT prompts (easy demonstrations) for 4 sampled GSM8k items."""
    from probekit.cot.run import demo_rows, gold_answer, test_sample
    from probekit.data.prompts import render_cot

    table = gsm8k.table
    rows = test_sample(gsm8k, "num_steps", 4, seed=seed)[:4]
    demo = demo_rows(gsm8k, "num_steps", "easy", 2, seed=seed, draw=0)
    examples = [(table["question"].iat[r], table["reasoning"].iat[r], gold_answer(gsm8k, r)) for r in demo]
    return [render_cot(examples, table["question"].iat[r]) for r in rows]


def plain_generate(lm, prompt: list[int], n: int) -> list[int]:
    """One plain greedy ``model.generate`` call: the new tokens."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        full = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=lm.pad_id)
    return full[0, len(prompt):].tolist()


@pytest.mark.slow
def test_batched_shared_prefix_equals_plain_generate_per_item(lm, gsm8k):
    from probekit.cot.decode import generate
    from probekit.extract.tokens import encode_prompt

    prompts = [encode_prompt(lm.tokenizer, t, lm.rules) for t in kshot_texts(gsm8k, seed=0)]
    n = 8
    gens, counts = generate(lm, prompts, n, batch_size=3)  # two batches, left-padded, one shared prefix
    assert counts["prefix_tokens"] > 300  # the two demonstrations
    for p, g in zip(prompts, gens):
        plain = plain_generate(lm, p, n)
        plain = plain[:plain.index(lm.tokenizer.eos_token_id)] if lm.tokenizer.eos_token_id in plain else plain
        assert g.ids == plain[:len(g.ids)]
        if g.stopped == "length":
            assert g.ids == plain and len(g.ids) == n
        assert g.text == lm.tokenizer.decode(g.ids, skip_special_tokens=True)


@pytest.mark.slow
def test_rows_that_end_early_leave_the_batch_without_changing_the_others(lm, gsm8k):
    """Rows whose answer line completes in a few tokens leave the batch mid-way; every row still equals
    its own plain ``generate`` call, the early ones stopped at their answer line."""
    from probekit.cot.decode import answer_complete, generate
    from probekit.cot.run import test_sample
    from probekit.extract.tokens import encode_prompt

    rows = test_sample(gsm8k, "num_steps", 4, seed=1)[:4]
    # rows 0 and 2 already hold their reasoning: they state the answer within a few tokens, 1 and 3 run on
    texts = [t + (f" {gsm8k.table['reasoning'].iat[r]}" if i % 2 == 0 else "")
             for i, (t, r) in enumerate(zip(kshot_texts(gsm8k, seed=1), rows))]
    prompts = [encode_prompt(lm.tokenizer, t, lm.rules) for t in texts]
    n = 32
    gens, _ = generate(lm, prompts, n, batch_size=4, stop="answer")
    assert [g.stopped for g in gens[0::2]] == ["answer", "answer"] and all(len(g.ids) < n for g in gens[0::2])
    assert [len(g.ids) for g in gens[1::2]] == [n, n]
    for p, g in zip(prompts, gens):
        assert g.ids == plain_generate(lm, p, n)[:len(g.ids)]
        if g.stopped == "answer":
            assert answer_complete(g.text) and not answer_complete(lm.tokenizer.decode(g.ids[:-1]))



@pytest.mark.slow
def test_generate_is_deterministic_and_reported(tmp_path, lm, gsm8k):
    from probekit.cot.run import generate_cot
    from probekit.report.build import build_report
    from probekit.store.generations import read_generations
    from probekit.store.results import read_results

    kw = dict(conditions="zero_shot,easy,hard", k=2, n_test=3, max_new_tokens=6, batch_size=3, progress=False)
    a = generate_cot(gsm8k, tmp_path / "a", lm, **kw)
    generate_cot(gsm8k, tmp_path / "b", lm, **kw)
    assert sorted(a.units_written) == ["easy/0", "hard/0", "zero_shot/0"] and a.n_test == 3
    fa, fb = read_generations(tmp_path / "a"), read_generations(tmp_path / "b")
    pd.testing.assert_frame_equal(fa, fb)
    assert set(fa["condition"]) == {"zero_shot", "easy", "hard"} and (fa["new_tokens"] <= 6).all()
    assert fa.groupby("condition").size().to_dict() == {"easy": 3, "hard": 3, "zero_shot": 3}
    res = read_results(tmp_path / "a").table
    assert set(res["method"]) == {"zero_shot_cot", "icl_cot"}
    assert set(res["train_level"]) == {"zero_shot", "easy", "hard"} and set(res["test_level"]) == {"easy", "medium", "hard"}
    assert res["correct"].sum() == fa["correct"].sum()
    # sweep.json names the question set as the sweep's does, so a comparison groups the runs together
    sweep = read_results(tmp_path / "a").sweep
    assert sweep["dataset"] == gsm8k.name and sweep["dataset_fingerprint"] == gsm8k.fingerprint
    # the report reads it like any other method: accuracy per condition, SGR with the zero-shot CoT baseline
    summary = build_report(tmp_path / "a", tmp_path / "rep", n_boot=200, n_boot_sgr=200)
    pop = summary["population"][0] if isinstance(summary.get("population"), list) else None
    assert pop is not None and set(pop["accuracy"]) == {"zero_shot", "easy", "hard"}
    assert (tmp_path / "rep" / "report.md").is_file()
    # a rerun finds every unit done; another configuration is refused
    assert generate_cot(gsm8k, tmp_path / "a", lm, **kw).units_written == []
    with pytest.raises(ProbekitError, match="holds another run"):
        generate_cot(gsm8k, tmp_path / "a", lm, **{**kw, "k": 3})


@pytest.mark.slow
def test_kill_and_rerun_gives_the_same_files(tmp_path, lm, gsm8k, shared_data):
    from probekit.cot.run import generate_cot
    from probekit.store.generations import read_generations
    from probekit.store.results import read_results

    args = ["--dataset", "gsm8k", "--data-dir", str(shared_data), "--demos-from", "easy", "--k", "2", "--draws", "3",
            "--n-test", "3", "--max-new-tokens", "6", "--batch-size", "3", "--threads", "1", "--no-progress"]
    killed = tmp_path / "killed"
    code = "from probekit.cli import main; main()"
    env = {**os.environ, "PROBEKIT_CACHE": str(REPO / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code, "generate", *args, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "gen-easy-000.parquet").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in killed.glob("gen-*.parquet"))
    assert "gen-easy-000.parquet" in done and len(done) < 3  # killed after its first unit, before the last
    items = dataclasses.replace(gsm8k)
    kw = dict(conditions="easy", k=2, draws=3, n_test=3, max_new_tokens=6, batch_size=3, progress=False)
    rerun = generate_cot(items, killed, lm, **kw)
    assert sorted(rerun.units_written) == sorted({"easy/0", "easy/1", "easy/2"} - {f"easy/{int(n[9:12])}" for n in done})
    whole = tmp_path / "whole"
    generate_cot(items, whole, lm, **kw)
    pd.testing.assert_frame_equal(read_generations(killed), read_generations(whole))
    for name in ("gen-easy-000.parquet", "gen-easy-001.parquet", "gen-easy-002.parquet"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes()
    pd.testing.assert_frame_equal(read_results(killed).table, read_results(whole).table)
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_errors_are_one_line(tmp_path, lm, gsm8k):
    from probekit.cot.run import generate_cot
    from probekit.data import load_dataset

    arc = load_dataset("bundled")
    with pytest.raises(ProbekitError, match="dataset arc-sample has no reasoning text: chain-of-thought generation "
                                            "is for sets with worked reasoning .*; score multiple-choice items with "
                                            "`probekit extract`"):
        generate_cot(arc, tmp_path / "x", lm, conditions="easy", k=2, measure="grade", n_test=3, progress=False)
    with pytest.raises(ProbekitError, match=r"k = 1000000 demonstrations but level 'easy' of 'num_steps' has only \d+ items"):
        generate_cot(gsm8k, tmp_path / "y", lm, conditions="easy", k=1_000_000, n_test=3, progress=False)
    with pytest.raises(ProbekitError, match=r"item 'gsm8k/.*': the prompt is \d+ tokens; with max_new_tokens=8192 it "
                                            r"exceeds the model's context of 8192 tokens"):
        generate_cot(gsm8k, tmp_path / "z", lm, conditions="zero_shot", n_test=3, max_new_tokens=8192, progress=False)
    with pytest.raises(ProbekitError, match="unknown condition 'easiest'"):
        generate_cot(gsm8k, tmp_path / "w", lm, conditions="zero_shot,easiest", progress=False)
    assert not any((tmp_path / d).exists() for d in "xyzw")  # nothing half-written
