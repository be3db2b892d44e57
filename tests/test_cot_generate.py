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
    from probekit.llm.tokens import encode_prompt

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
    from probekit.llm.tokens import encode_prompt

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


# ----- several ranks: the work dealt out, the merge, a killed rank, --device-map ---------------------
def test_pieces_deal_whole_units_then_slices_and_every_batch_once():
    from probekit.cot.decode import batch_rows
    from probekit.cot.run import unit_pieces
    from probekit.llm.batches import rank_share

    units = [("zero_shot", 0), ("easy", 0), ("easy", 1)]
    assert unit_pieces(units, 1) == [(u, 0, 1) for u in units]
    pieces = unit_pieces(units, 2)  # two whole units, the third in two slices
    assert pieces == [(("zero_shot", 0), 0, 1), (("easy", 0), 0, 1), (("easy", 1), 0, 2), (("easy", 1), 1, 2)]
    assert rank_share(pieces, 0, 2) == [pieces[0], pieces[2]] and rank_share(pieces, 1, 2) == [pieces[1], pieces[3]]
    assert unit_pieces(units[:1], 3) == [(units[0], j, 3) for j in range(3)]  # fewer units than ranks
    assert [p for p, _, _ in unit_pieces(units, 3)] == units  # as many units as ranks: whole
    tuned = [("easy", 0), ("tuned_easy", 0), ("hard", 0)]  # fine-tuned units are dealt whole first
    assert unit_pieces(tuned, 2)[:2] == [(("tuned_easy", 0), 0, 1), (("easy", 0), 0, 1)]
    assert [s for _, _, s in unit_pieces(tuned, 2)[2:]] == [2, 2]
    prompts = [[1] * n for n in (5, 3, 9, 3, 7, 1, 4)]
    whole = batch_rows(prompts, 2)
    assert [len(prompts[i[0]]) for i in whole] == sorted(len(prompts[i[0]]) for i in whole)  # by length
    parts = [batch_rows(prompts, 2, (j, 3)) for j in range(3)]
    assert sorted(b for p in parts for b in p) == sorted(whole) and parts[1] == whole[1::3]  # disjoint, all
    with pytest.raises(ProbekitError, match="part must be"):
        batch_rows(prompts, 2, (3, 3))


#: Two zero-shot and easy draws of 3 items, 6 new tokens, batches of 2: under 2 ranks the units
#: zero_shot/0 and easy/0 go whole, easy/1 in two slices (its batches 0 and 1).
RANKS = dict(conditions="zero_shot,easy", k=2, draws=2, n_test=3, max_new_tokens=6, batch_size=2, progress=False)
RANKS_CLI = ["--demos-from", "zero_shot,easy", "--k", "2", "--draws", "2", "--n-test", "3", "--max-new-tokens", "6",
             "--batch-size", "2"]


def _cli_args(shared_data, out, extra) -> list[str]:
    return ["generate", "--dataset", "gsm8k", "--data-dir", str(shared_data), *extra, "--dtype", "float32",
            "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out)]


def _env(**ranks) -> dict:
    return {**os.environ, "PROBEKIT_CACHE": str(REPO / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            **{k: str(v) for k, v in ranks.items()}}


def _same_folders(a: Path, b: Path) -> None:
    """The files of two generation folders are equal byte for byte (``sweep.json``: but for the ranks' record)."""
    import json

    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names == sorted(p.name for p in b.glob("*.parquet")) and "results.parquet" in names
    for name in [*names, "generate.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "sweep.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in ("world_size", "ranks")} == \
        {k: v for k, v in sb.items() if k not in ("world_size", "ranks")}
    assert not [p.name for p in a.rglob("*.tmp")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, lm, gsm8k):
    from probekit.cot.run import generate_cot

    out = tmp_path_factory.mktemp("one") / "gen"
    summary = generate_cot(gsm8k, out, lm, **RANKS)
    assert sorted(summary.units_written) == ["easy/0", "easy/1", "zero_shot/0"]
    return out


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_the_files_of_one_process(tmp_path, one_process, shared_data):
    import json

    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "probekit.cli",
           *_cli_args(shared_data, out, RANKS_CLI)]
    res = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    said = " ".join(res.stdout.split())
    assert "rank 0 of 2: 2 pieces written" in said and "rank 1 of 2: 2 pieces written" in said
    _same_folders(out, one_process)
    record = json.loads((out / "sweep.json").read_text())
    assert record["world_size"] == 2 and [r["pieces"] for r in record["ranks"]] == [2, 2]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["rank-0-of-2.json", "rank-1-of-2.json"]  # slices merged


@pytest.fixture(scope="module")
def one_process_three_draws(tmp_path_factory, lm, gsm8k):
    from probekit.cot.run import generate_cot

    out = tmp_path_factory.mktemp("one3") / "gen"
    generate_cot(gsm8k, out, lm, **{**RANKS, "conditions": "easy", "draws": 3})
    return out


@pytest.mark.slow
def test_a_killed_rank_resumes_its_share_and_the_last_rank_merges(tmp_path, one_process_three_draws, shared_data):
    """Ranks as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): rank 0 holds
    easy/0 and slice 0 of easy/2, rank 1 easy/1 and slice 1. Rank 0 is SIGKILLed after its first unit;
    rank 1 finishes and leaves the merge to rank 0, whose rerun writes only its missing slice and merges."""
    out = tmp_path / "killed"
    extra = ["--demos-from", "easy", "--k", "2", "--draws", "3", "--n-test", "3", "--max-new-tokens", "6",
             "--batch-size", "2"]
    cmd = [sys.executable, "-m", "probekit.cli", *_cli_args(shared_data, out, extra)]
    ranks = dict(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=29531)
    zero = subprocess.Popen(cmd, cwd=tmp_path, env=_env(RANK=0, LOCAL_RANK=0, **ranks), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    one = subprocess.Popen(cmd, cwd=tmp_path, env=_env(RANK=1, LOCAL_RANK=1, **ranks), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "gen-easy-000.parquet").exists() and zero.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        zero.send_signal(signal.SIGKILL)
        zero.wait()
        stdout, stderr = one.communicate(timeout=600)
    finally:
        zero.kill()
        one.kill()
    assert zero.returncode == -signal.SIGKILL and (out / "gen-easy-000.parquet").exists(), zero.stderr.read()[-2000:]
    said = " ".join(stdout.split())
    assert one.returncode == 0 and "rank 1 of 2: 2 pieces written" in said and "last rank to finish merges" in said, \
        stderr[-2000:]
    assert not (out / "parts" / "gen-easy-002.0-of-2.parquet").exists()  # killed before its second piece
    assert (out / "parts" / "gen-easy-002.1-of-2.parquet").exists() and (out / "gen-easy-001.parquet").exists()
    assert not (out / "results.parquet").exists() and not (out / "gen-easy-002.parquet").exists()  # nothing merged
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(RANK=0, LOCAL_RANK=0, **ranks), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    said = " ".join(res.stdout.split())
    assert "rank 0 of 2: 1 pieces written (1 written before)" in said and "accuracy" in said  # its slice; the merge
    _same_folders(out, one_process_three_draws)


@pytest.mark.slow
def test_device_map_on_the_cpu_loads_and_generates_the_same_text(tmp_path, one_process, shared_data):
    from typer.testing import CliRunner

    from probekit.cli import app
    from probekit.store.generations import read_generations

    res = CliRunner().invoke(app, [*_cli_args(shared_data, tmp_path / "auto", RANKS_CLI), "--device-map", "auto"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(read_generations(tmp_path / "auto"), read_generations(one_process))
    for name in ("gen-zero_shot-000.parquet", "gen-easy-000.parquet", "gen-easy-001.parquet", "results.parquet"):
        assert (tmp_path / "auto" / name).read_bytes() == (one_process / name).read_bytes()
