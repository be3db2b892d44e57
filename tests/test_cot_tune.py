"""Fine-tuning on chains of thought (the seq2seq objective) and generation with the adapted model:
the packed loss against a plain transformers forward with masked labels, a tiny fine-tune, the
adapted model's batched generation against one plain ``generate`` call per item, determinism,
resumption and the results rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from probekit.errors import ProbekitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    from probekit.data import load_dataset

    return load_dataset("gsm8k", shared_data)


def _targets(lm, gsm8k, level="easy", n=3):
    from probekit.cot import tune
    from probekit.cot.run import demo_rows, gold_answer

    rows = demo_rows(gsm8k, "num_steps", level, n, seed=0, draw=0, what="training items")
    return rows, tune.encode_targets(lm, gsm8k, rows, lambda r: gold_answer(gsm8k, r))


def _plain_losses(lm, encoded):
    """Per item: summed target-token NLL from a transformers forward with labels -100 on the prompt
    (one item at a time), and from one left-padded batch with -100 on the prompt and the padding."""
    import torch

    one = []
    for e in encoded:
        ids = torch.tensor([e.prompt + e.choices[0]])
        labels = torch.tensor([[-100] * len(e.prompt) + e.choices[0]])
        with torch.no_grad():
            out = lm.model(input_ids=ids, labels=labels)
        one.append(float(out.loss) * len(e.choices[0]))  # the model's loss is the mean over target tokens
    width = max(len(e.prompt) + len(e.choices[0]) for e in encoded)
    ids = torch.full((len(encoded), width), lm.pad_id)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    for i, e in enumerate(encoded):
        seq = e.prompt + e.choices[0]
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        labels[i, width - len(e.choices[0]):] = torch.tensor(e.choices[0])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                            ignore_index=-100)
    return np.array(one), nll.sum(-1).numpy()


@pytest.mark.slow
def test_seq2seq_loss_equals_a_plain_forward_with_masked_labels(lm, gsm8k):
    import torch

    from probekit.cot.tune import PROMPT_ID
    from probekit.data.prompts import render_cot
    from probekit.finetune.train import item_nll

    rows, enc = _targets(lm, gsm8k, n=3)
    e = enc[0]
    text = lm.tokenizer.decode(e.prompt + e.choices[0])
    question = gsm8k.table["question"].iat[int(rows[0])]
    assert text.startswith(render_cot([], question, PROMPT_ID) + " ") and " So the answer is " in text
    assert e.choices[0][-1] == lm.tokenizer.eos_token_id
    with torch.no_grad():
        packed = item_nll(lm, enc, None, 1, objective="seq2seq").double().numpy()  # three items, one packed forward
    one, padded = _plain_losses(lm, enc)
    print("packed - one:", packed - one, "padded - one:", padded - one)
    np.testing.assert_allclose(packed, one, rtol=2e-5, atol=2e-3)  # float32 sums over ~100-250 tokens
    # a plain left-padded batch is itself ~1e-4 (relative) off the one-by-one sums in float32
    np.testing.assert_allclose(padded, one, rtol=3e-4)
    assert (one > 10).all()


@pytest.mark.slow
def test_a_tiny_finetune_lowers_the_loss_and_the_adapted_model_generates_like_plain_generate(lm, gsm8k):
    import torch

    from probekit.cot import tune
    from probekit.cot.decode import generate
    from probekit.data.prompts import render_cot
    from probekit.finetune.recipe import Recipe
    from probekit.finetune.train import adapter_parameters, item_nll
    from probekit.llm.tokens import encode_prompt

    _, enc = _targets(lm, gsm8k, n=6)
    recipe = Recipe(lr=1e-3, micro_batch=3, min_updates=150)
    with torch.no_grad():
        before = float(item_nll(lm, enc, None, 1, objective="seq2seq").mean())
    table = gsm8k.table
    prompts = [encode_prompt(lm.tokenizer, render_cot([], table["question"].iat[r], tune.PROMPT_ID), lm.rules)
               for r in range(2)]
    runs = []
    for _ in range(2):
        with tune.tuned(lm, enc, recipe, seed=7, max_updates=2) as log:
            model = lm.model
            b = [p for n, p in adapter_parameters(model) if "lora_B" in n]
            assert b and all(bool(p.ne(0).any()) for p in b)  # B starts at 0; the updates moved it
            with torch.no_grad():
                after = float(item_nll(lm, enc, None, 1, objective="seq2seq").mean())
            gens, _ = generate(lm, prompts, 6, batch_size=2)
            plain = []
            for p in prompts:
                ids = torch.tensor([p])
                with torch.inference_mode():
                    full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                          do_sample=False, pad_token_id=lm.pad_id)
                plain.append(full[0, len(p):].tolist())
        runs.append((log.losses, [g.text for g in gens], after))
        assert log.updates == 2 and after < before
        for g, ids in zip(gens, plain):
            eos = lm.tokenizer.eos_token_id
            ids = ids[:ids.index(eos)] if eos in ids else ids
            assert g.ids == ids[:len(g.ids)]
            if g.stopped == "length":
                assert g.ids == ids
    assert runs[0] == runs[1]  # same seed, same losses, same text
    assert not adapter_parameters(lm.model)  # the adapters are gone
    with torch.no_grad():
        assert float(item_nll(lm, enc, None, 1, objective="seq2seq").mean()) == pytest.approx(before, rel=1e-6)


@pytest.mark.slow
def test_finetune_cot_run_writes_rows_repeats_exactly_and_skips_finished_units(tmp_path, lm, gsm8k):
    from probekit.cot.run import demo_rows, generate_cot
    from probekit.finetune.recipe import Recipe
    from probekit.store.generations import read_generations, read_header
    from probekit.store.results import read_results

    kw = dict(conditions="zero_shot", finetune="easy,hard", n_train=4, max_updates=1, n_test=3, max_new_tokens=5,
              batch_size=3, recipe=Recipe(micro_batch=4, min_updates=150), progress=False)
    a = generate_cot(gsm8k, tmp_path / "a", lm, **kw)
    assert sorted(a.units_written) == ["tuned_easy/0", "tuned_hard/0", "zero_shot/0"]
    generate_cot(gsm8k, tmp_path / "b", lm, **kw)
    fa, fb = read_generations(tmp_path / "a"), read_generations(tmp_path / "b")
    pd.testing.assert_frame_equal(fa, fb)
    again = generate_cot(gsm8k, tmp_path / "a", lm, **kw)
    assert again.units_written == []
    res = read_results(tmp_path / "a").table
    tuned = res[res["method"] == "finetune_cot"]
    assert set(tuned["train_level"]) == {"easy", "hard"} and set(tuned["n_train"]) == {4}
    assert set(res["method"]) == {"zero_shot_cot", "finetune_cot"}
    for level in ("easy", "hard"):  # training items are the ICL draw's and are not tested
        train = gsm8k.table["id"].to_numpy()[demo_rows(gsm8k, "num_steps", level, 4, 0, 0)]
        assert not set(train) & set(tuned[tuned["train_level"] == level]["item_id"].astype(str))
        log = json.loads((tmp_path / "a" / f"log-tuned_{level}-000.json").read_text())
        assert log["train_items"] == list(train) and log["updates"] == 1 and len(log["losses"]) == 1
    header = read_header(tmp_path / "a")
    ft = header["generate"]["finetune"]
    assert ft["levels"] == ["easy", "hard"] and ft["n_train"] == 4 and ft["objective"] == "seq2seq"
    assert ft["recipe"]["min_updates"] == 150 and ft["schedule"]["updates"] == 150 and ft["max_updates"] == 1
    assert header["prompt"]["finetune"] == "0305"
    config = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert config["kind"] == "generate" and config["config"]["finetune"]["n_train"] == 4
    assert set(config["training"]) == {"tuned_easy/0", "tuned_hard/0"}
    assert config["training"]["tuned_easy/0"]["updates"] == 1


@pytest.mark.slow
def test_a_fine_tuned_unit_sliced_over_ranks_trains_on_each_and_merges_to_the_one_process_files(tmp_path, lm, gsm8k,
                                                                                               monkeypatch):
    """One fine-tuned unit, 3 ranks run one after another in this process (RANK/WORLD_SIZE as torchrun
    sets them): ranks 0 and 1 train the adapters and decode their batch, rank 2's slice is empty (no
    training); the last merges the unit file and results of one process, and one training log."""
    from probekit.cot.run import generate_cot
    from probekit.finetune.recipe import Recipe

    kw = dict(conditions="", finetune="easy", n_train=4, max_updates=1, n_test=3, max_new_tokens=5, batch_size=2,
              recipe=Recipe(micro_batch=4, min_updates=150), progress=False)
    one = generate_cot(gsm8k, tmp_path / "one", lm, **kw)
    assert one.units_written == ["tuned_easy/0"]
    assert len(pd.read_parquet(tmp_path / "one" / "gen-tuned_easy-000.parquet")) == 3  # two batches: 2 + 1
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        summary = generate_cot(gsm8k, tmp_path / "ranks", lm, **kw)
        assert summary.units_written == [f"tuned_easy/0 part {rank + 1}/3"] and summary.merged == (rank == 2)
        assert summary.new_tokens > 0 if rank < 2 else summary.new_tokens == 0
    for name in ("gen-tuned_easy-000.parquet", "results.parquet", "generate.json"):
        assert (tmp_path / "ranks" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    log = json.loads((tmp_path / "ranks" / "log-tuned_easy-000.json").read_text())
    ref = json.loads((tmp_path / "one" / "log-tuned_easy-000.json").read_text())
    assert {k: log[k] for k in ("train_items", "updates", "losses")} == {k: ref[k] for k in ("train_items", "updates",
                                                                                           "losses")}
    assert [x["last_loss"] for x in log["slices"]] == ref["losses"] * 2  # ranks 0 and 1 trained alike; 2 did not
    assert sorted(p.name for p in (tmp_path / "ranks" / "parts").iterdir()) == [f"rank-{r}-of-3.json" for r in range(3)]


def test_levels_and_recipe_settings_are_checked():
    from probekit.cot.run import parse_levels
    from probekit.cot.tune import condition, tuned_level
    from probekit.finetune.recipe import recipe_with

    assert parse_levels("easy, hard,easy") == ["easy", "hard"] and parse_levels(None) == []
    assert tuned_level(condition("all")) == "all" and tuned_level("easy") is None
    with pytest.raises(ProbekitError, match="unknown fine-tuning level 'easiest'"):
        parse_levels("easy,easiest")
    r = recipe_with(["lr=2e-4", "micro_batch=4", "target_modules=q_proj,k_proj"], min_updates=150)
    assert (r.lr, r.micro_batch, r.target_modules, r.min_updates) == (2e-4, 4, ("q_proj", "k_proj"), 150)
    with pytest.raises(ProbekitError, match="recipe setting 'speed=1': write KEY=VALUE"):
        recipe_with(["speed=1"])
    with pytest.raises(ProbekitError, match="'2.5' is not a valid int"):
        recipe_with(["micro_batch=2.5"])


@pytest.mark.slow
def test_finetune_errors_are_one_line(tmp_path, lm, gsm8k):
    from probekit.cot.run import generate_cot
    from probekit.data import load_dataset

    arc = load_dataset("bundled")
    with pytest.raises(ProbekitError, match="dataset arc-sample has no reasoning text"):
        generate_cot(arc, tmp_path / "x", lm, conditions=None, finetune="easy", n_train=2, measure="grade", n_test=3,
                     progress=False)
    with pytest.raises(ProbekitError, match=r"n_train = 1000000 training items but level 'hard'"):
        generate_cot(gsm8k, tmp_path / "y", lm, conditions=None, finetune="hard", n_train=1_000_000, n_test=3,
                     progress=False)
    with pytest.raises(ProbekitError, match="no condition given"):
        generate_cot(gsm8k, tmp_path / "z", lm, conditions=None, n_test=3, progress=False)
    assert not any((tmp_path / d).exists() for d in "xyz")


@pytest.fixture(scope="module")
def cot_runs(tmp_path_factory, lm, gsm8k, one_torch_thread):
    """Two real GSM8k runs on one test sample: zero-shot and k-shot CoT (k=1), and CoT fine-tuning
    (one update per level) with a zero-shot CoT unit of its own."""
    from probekit.cot.run import generate_cot
    from probekit.finetune.recipe import Recipe

    d = tmp_path_factory.mktemp("cot")
    common = dict(n_test=9, max_new_tokens=4, batch_size=8, progress=False)
    generate_cot(gsm8k, d / "prompted", lm, conditions="zero_shot,easy,hard", k=1, **common)
    generate_cot(gsm8k, d / "tuned", lm, conditions="zero_shot", finetune="easy,hard", n_train=2, max_updates=1,
                 recipe=Recipe(micro_batch=2, min_updates=150), **common)
    return d


@pytest.mark.slow
def test_reports_set_cot_methods_against_zero_shot_cot(cot_runs, tmp_path):
    from probekit.report import build_report
    from probekit.report.compare import build_comparison

    single = build_report(cot_runs / "tuned", tmp_path / "single", n_boot=200, n_boot_sgr=200)
    by_solver = {r["solver"]: r for r in single["population"]}
    assert set(by_solver) == {"lora"} and by_solver["lora"]["accuracy"]["zero_shot"] is not None
    both = build_report(cot_runs / "prompted", tmp_path / "single2", n_boot=200, n_boot_sgr=200)
    assert {r["solver"] for r in both["population"]} == {"cot"}
    assert both["population"][0]["accuracy"]["zero_shot"] is not None

    dirs = [cot_runs / "prompted", cot_runs / "tuned"]
    summary = build_comparison(dirs, tmp_path / "cmp", n_boot=200, n_boot_sgr=200)
    recs = {r["method"]: r for r in summary["population"]}
    assert set(recs) == {"icl_cot", "finetune_cot"}
    assert {r["baseline"] for r in recs.values()} == {"zero_shot_cot"}
    assert all(r["accuracy"]["zero_shot"] is not None and r["sgr"] is not None for r in recs.values())
    assert recs["finetune_cot"]["accuracy"]["zero_shot"] == single["population"][0]["accuracy"]["zero_shot"]
    assert summary["settings"]["baseline"].startswith("per method")
    forced = build_comparison(dirs, tmp_path / "cmp2", n_boot=200, n_boot_sgr=200, baseline="zero_shot")
    assert all(r["accuracy"].get("zero_shot") is None for r in forced["population"])
    assert sum("no zero_shot rows" in n for n in forced["notes"]) == 2
