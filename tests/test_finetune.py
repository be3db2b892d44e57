"""LoRA fine-tuning: the recipe, the packed objective, step-0 scores, training, the resumable run.

The model tests use the offline SmolLM2 on a few short items of the real test cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit.errors import ProbekitError
from probekit.finetune import Recipe, schedule

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / "cache"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def questions(real_cache, demo_items):
    from probekit.finetune.run import cache_questions
    from probekit.store import Cache

    return cache_questions(demo_items, Cache(real_cache))


def _short(lm, questions, n):
    """The ``n`` items with the fewest packed tokens (cache rows, encoded)."""
    from probekit.llm.tokens import encode_rows

    enc = encode_rows(lm, questions.table, questions.prompt_template, lm.rules)
    rows = np.argsort([e.n_tokens_shared for e in enc], kind="stable")[:n]
    return rows, [enc[i] for i in rows]


# ----- the recipe ----------------------------------------------------------------------------------
def test_schedule_follows_the_study():
    r = Recipe()
    assert schedule(160, r) == schedule(160, r)
    s = schedule(160, r)
    assert (s.effective_batch, s.updates_per_epoch, s.epochs, s.updates) == (50, 4, 3, 12)
    s = schedule(32, r)  # one update per epoch: epochs raised to reach 10 updates
    assert (s.effective_batch, s.updates_per_epoch, s.epochs, s.updates) == (32, 1, 10, 10)
    s = schedule(500, r)
    assert (s.effective_batch, s.epochs, s.updates) == (50, 3, 30)
    assert Recipe(target_modules="q_proj, k_proj").target_modules == ("q_proj", "k_proj")
    with pytest.raises(ProbekitError, match="optimizer"):
        Recipe(optimizer="sgd")
    d = Recipe().describe()
    assert (d["r"], d["alpha"], d["dropout"], d["lr"], d["weight_decay"], d["warmup_updates"]) == (16, 32, 0.1, 1e-4,
                                                                                                   1e-5, 0)
    assert Recipe().optimizer_for("8bit") == "adam8bit" and Recipe().optimizer_for(None) == "adamw"


def test_learning_rate_decays_linearly_to_a_tenth():
    import torch

    from probekit.finetune.train import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.requires_grad_(True)
    opt, sched, name = make_optimizer(model, Recipe(), None, updates=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert name == "adamw" and lrs[0] == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)  # after the last update: 10% of lr
    assert np.allclose(np.diff(lrs), -9e-6)
    decay = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert decay == {1e-5: 1, 0.0: 1}  # the weight decays, the bias does not


# ----- the packed objective and step 0 -------------------------------------------------------------
@pytest.mark.slow
def test_step0_scores_equal_the_caches_zero_shot_logprobs(lm, real_cache, questions):
    """LoRA's B starts at zero: the adapted model scores items exactly as the base model did in extract."""
    from probekit.finetune.train import attach_lora, detach_lora, score_items
    from probekit.store import Cache

    rows, enc = _short(lm, questions, 12)
    cached, _ = Cache(real_cache).logprobs()
    model = attach_lora(lm, Recipe(), seed=3)
    try:
        scores = score_items(lm, enc, batch_size=5, max_choices=cached.shape[1])
    finally:
        detach_lora(lm, model)
    assert np.array_equal(np.isfinite(scores), np.isfinite(cached[rows]))
    fin = np.isfinite(scores)
    # float32, other batch compositions than the cache's: agreement to 1e-4 nats
    assert np.abs(scores[fin] - cached[rows][fin]).max() < 1e-4


@pytest.mark.slow
def test_packed_and_per_choice_losses_and_lora_gradients_agree(lm, questions):
    """float32: loss to 1e-5 relative, every LoRA gradient to 1e-4 of the largest gradient entry."""
    import torch

    from probekit.finetune.train import adapter_parameters, attach_lora, detach_lora, gold_nll, item_nll
    from tests.reference import score_choices_naive

    rows, enc = _short(lm, questions, 3)
    labels = questions.table["label"].to_numpy()[rows]
    model = attach_lora(lm, Recipe(dropout=0.0), seed=1)
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in adapter_parameters(model):
                if "lora_B" in name:  # B = 0 at the start would leave A without gradient
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        params = [p for _, p in adapter_parameters(model)]
        grads = []
        for scores_of in (lambda: item_nll(lm, enc, labels), lambda: gold_nll(score_choices_naive(lm, enc), labels)):
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = scores_of().sum()
                loss.backward()
            grads.append((float(loss.detach()), [p.grad.detach().clone() for p in params]))
    finally:
        detach_lora(lm, model)
    (packed, g1), (naive, g2) = grads
    assert packed == pytest.approx(naive, rel=1e-5)
    scale = max(float(g.abs().max()) for g in g2)
    assert scale > 0
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) <= 1e-4 * scale


# ----- training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_finetune_changes_the_adapters_lowers_the_loss_and_repeats_exactly(lm, questions):
    import torch

    from probekit.finetune.train import adapter_parameters, attach_lora, detach_lora, item_nll, train_adapters

    rows, enc = _short(lm, questions, 8)
    labels = questions.table["label"].to_numpy()[rows]
    recipe = Recipe(max_batch=4, micro_batch=4)

    def loss_now():
        with torch.inference_mode():
            return float(item_nll(lm, enc, labels).mean())

    runs = []
    for _ in range(2):
        model = attach_lora(lm, recipe, seed=5)
        try:
            before = {n: p.detach().clone() for n, p in adapter_parameters(model)}
            l0 = loss_now()
            log = train_adapters(lm, model, enc, labels, recipe, seed=5, max_updates=2)
            l1 = loss_now()
            after = {n: p.detach().clone() for n, p in adapter_parameters(model)}
        finally:
            detach_lora(lm, model)
        runs.append((l0, l1, log.losses, before, after))
    l0, l1, losses, before, after = runs[0]
    assert len(losses) == 2 and l1 < l0
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert runs[1][2] == losses and all(torch.equal(runs[1][4][n], after[n]) for n in after)  # same seed, same numbers
    assert not any(n for n in after if "lora" not in n)  # only adapters train
    with torch.inference_mode():  # detached: the base model is back
        assert float(item_nll(lm, enc, labels).mean()) == pytest.approx(l0, abs=1e-6)


def test_unknown_target_modules_name_the_models_modules(lm):
    from probekit.finetune.train import attach_lora

    with pytest.raises(ProbekitError, match="unknown target module.*query_key_value.*q_proj.*v_proj"):
        attach_lora(lm, Recipe(target_modules=("query_key_value",)), seed=0)


def test_a_model_without_linear_layers_is_refused():
    import torch

    from probekit.finetune.train import check_targets

    with pytest.raises(ProbekitError, match="no linear layers LoRA can adapt"):
        check_targets(torch.nn.Sequential(torch.nn.ReLU()), ["q_proj"])


# ----- the run: the sweep's training items, resumable parts ---------------------------------------
@pytest.fixture()
def training_seen(monkeypatch):
    """Which items and labels each fine-tune trains on, with which seed: the real training, its
    arguments recorded on the way in."""
    import probekit.finetune.run as run

    seen, real = [], run.train_adapters

    def train(lm, model, encoded, labels, recipe, seed, **kw):
        seen.append(([e.item_id for e in encoded], list(np.asarray(labels)), seed))
        return real(lm, model, encoded, labels, recipe, seed, **kw)

    monkeypatch.setattr(run, "train_adapters", train)
    return seen


@pytest.mark.slow
def test_training_rows_and_test_items_are_the_sweeps(lm, real_cache, demo_items, tmp_path, training_seen):
    from probekit.design import item_frame, load_items, open_cache, plan
    from probekit.finetune import finetune
    from probekit.probe import sweep
    from probekit.store.results import read_results

    kw = dict(measures=["grade"], n_train=[8], draws=2, seed=7, levels=["easy", "hard"])
    finetune(real_cache, demo_items, tmp_path / "ft", lm, max_updates=1, **kw)
    cache = open_cache(real_cache)
    items, measures = load_items(cache, ["grade"])
    frame = item_frame(items, cache.manifest["dataset"]["name"], measures)
    heads = plan(frame, "population", measures, n_train=[8], draws=2, seed=7, levels=["easy", "hard"])
    assert [(ids, labels) for ids, labels, _ in training_seen] == [
        (list(frame.ids[h.rows]), list(h.labels)) for h in heads]
    sweep(real_cache, tmp_path / "probe", layers="-1", **kw)
    key = ["train_level", "draw", "n_train", "measure"]
    ft = read_results(tmp_path / "ft").table
    pr = read_results(tmp_path / "probe").table
    assert set(ft["method"]) == {"finetune", "zero_shot"} and set(pr["method"]) == {"probe", "zero_shot"}
    ft_items = ft[ft.method == "finetune"].groupby(key, observed=True)["item_id"].apply(lambda s: sorted(map(str, s)))
    probe = pr[(pr.method == "probe") & (pr.site == "answer_end")]  # the shortcut controls share the draws
    pr_items = probe.groupby(key, observed=True)["item_id"].apply(lambda s: sorted(map(str, s)))
    assert len(ft_items) == 4 and ft_items.to_dict() == pr_items.to_dict()
    zs = lambda t: t[t.method == "zero_shot"].sort_values("item_id")[["item_id", "correct", "p_gold"]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(zs(ft).astype(str), zs(pr).astype(str))


@pytest.mark.slow
def test_a_rerun_skips_finished_heads_and_equals_an_uninterrupted_run(lm, real_cache, demo_items, tmp_path,
                                                                     training_seen):
    from probekit.finetune import finetune
    from probekit.store.results import read_results

    kw = dict(measures=["grade"], n_train=[4], draws=2, levels=["easy"], test_levels=["hard"], max_updates=1)
    full = finetune(real_cache, demo_items, tmp_path / "a", lm, save_adapters=tmp_path / "adapters", **kw)
    assert full["counts"]["trained_now"] == 2 and len(training_seen) == 2
    assert (tmp_path / "adapters" / "population__grade__easy__1__4__0" / "adapter_config.json").is_file()
    parts = sorted(p.name for p in (tmp_path / "a" / "parts").iterdir())
    assert parts == ["population__grade__easy__0__4__0.parquet", "population__grade__easy__1__4__0.parquet",
                     "run.json", "zero_shot.parquet"]
    # a run killed after its first head: one part, no results table
    finetune(real_cache, demo_items, tmp_path / "b", lm, **{**kw, "draws": 1})
    (tmp_path / "b" / "results.parquet").unlink()
    (tmp_path / "b" / "sweep.json").unlink()
    again = finetune(real_cache, demo_items, tmp_path / "b", lm, **kw)
    assert (again["counts"]["trained_now"], again["counts"]["resumed"]) == (1, 1)
    a, b = read_results(tmp_path / "a").table, read_results(tmp_path / "b").table
    pd.testing.assert_frame_equal(a.astype(str), b.astype(str))
    assert set(a[a.method == "finetune"]["test_level"].astype(str)) == {"hard"}
    record = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert record["config"]["recipe"]["r"] == 16 and record["kind"] == "finetune"
    assert record["prompt"] == json.loads((real_cache / "manifest.json").read_text())["prompt"]
    from probekit.report import build_report

    summary = build_report(tmp_path / "a", tmp_path / "rep", n_boot=200, n_boot_sgr=200)  # a report of fine-tunes
    assert "site `finetune`" in (tmp_path / "rep" / "report.md").read_text() and summary


@pytest.mark.slow
def test_cli_errors_are_one_line(real_cache, demo_items, tmp_path, lm):
    from probekit.cli import app
    from probekit.finetune import finetune

    runner = CliRunner()
    out = runner.invoke(app, ["finetune", str(real_cache), "--out", str(tmp_path / "x"), "--n-train", "500",
                              "--measures", "grade", "--levels", "easy"])
    assert out.exit_code == 2 and "fewer than n_train + 50" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # a directory holding another run (other settings)
    finetune(real_cache, demo_items, tmp_path / "y", lm, measures=["grade"], n_train=[4], draws=1,
             levels=["easy"], test_levels=["hard"], max_updates=1)
    with pytest.raises(ProbekitError, match="holds another run"):
        finetune(real_cache, demo_items, tmp_path / "y", lm, measures=["grade"], n_train=[4], draws=1,
                 levels=["easy"], test_levels=["hard"], max_updates=1, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_bases_run_a_tiny_step_or_fail_in_one_line(questions, quantize):
    """On the CPU, 8-bit trains (8-bit Adam); 4-bit layers pass no correct gradient back: refused."""
    from probekit.finetune.train import attach_lora, detach_lora, train_adapters
    from probekit.llm.models import ModelSpec, load_model

    qlm = load_model(ModelSpec(dtype="float32", device="cpu", quantize=quantize, cache_root=CACHE_ROOT))
    rows, enc = _short(qlm, questions, 2)
    labels = questions.table["label"].to_numpy()[rows]
    model = attach_lora(qlm, Recipe(max_batch=2), seed=0)
    try:
        if quantize == "8bit":
            log = train_adapters(qlm, model, enc, labels, Recipe(max_batch=2), seed=0, quantize=quantize, max_updates=1)
            assert log.optimizer == "adam8bit" and np.isfinite(log.losses).all()
        else:
            with pytest.raises(ProbekitError, match="4-bit base cannot be fine-tuned on the CPU"):
                train_adapters(qlm, model, enc, labels, Recipe(max_batch=2), seed=0, quantize=quantize, max_updates=1)
    finally:
        detach_lora(qlm, model)


# ----- real runs at tiny sizes: several ranks, SIGKILL, --model, the other experiments --------------
#: One update of 4 easy items per fine-tune, scored on the hard items: the CLI options and the API's.
TINY_CLI = ["--measures", "grade", "--levels", "easy", "--n-train", "4", "--draws", "2", "--test-levels", "hard",
            "--max-batch", "4", "--micro-batch", "4", "--epochs", "1", "--min-updates", "1", "--no-verify"]
TINY = dict(measures=["grade"], levels=["easy"], n_train=[4], draws=2, test_levels=["hard"],
            recipe=Recipe(max_batch=4, micro_batch=4, epochs=1, min_updates=1), verify=False)


def _cli_env():
    import os

    return {**os.environ, "PROBEKIT_CACHE": str(CACHE_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "probekit.cli", "finetune", *args]


def _rows(path) -> pd.DataFrame:
    from probekit.store.results import read_results

    t = read_results(path).table
    key = ["method", "measure", "train_level", "draw", "n_train", "item_id"]
    return t.astype({c: str for c in key}).sort_values(key).reset_index(drop=True)


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal results: every column but p_gold exactly; p_gold to 1e-5 (float32, other processes)."""
    assert len(a) == len(b) > 0
    cols = [c for c in a.columns if c != "p_gold"]
    pd.testing.assert_frame_equal(a[cols].astype(str), b[cols].astype(str))
    assert np.abs(a["p_gold"].to_numpy(np.float64) - b["p_gold"].to_numpy(np.float64)).max() < 1e-5


@pytest.fixture(scope="module")
def tiny_reference(lm, real_cache, demo_items, tmp_path_factory):
    """An uninterrupted one-process run of two tiny fine-tunes."""
    from probekit.finetune import finetune

    out = tmp_path_factory.mktemp("ft") / "reference"
    record = finetune(real_cache, demo_items, out, lm, **TINY)
    assert record["counts"]["trained_now"] == 2 and record["world_size"] == 1
    return out


@pytest.mark.slow
def test_two_ranks_under_torchrun_train_disjoint_heads_and_merge_one_table(real_cache, tiny_reference, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "probekit.cli", "finetune", str(real_cache), "--out", str(out), *TINY_CLI]
    res = subprocess.run(cmd, env=_cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["world_size"] == 2 and record["counts"]["trained_now"] == 2 and record["counts"]["resumed"] == 0
    ranks = [json.loads((out / "parts" / f"rank-{r}-of-2.json").read_text()) for r in range(2)]
    assert list(ranks[0]["final_loss"]) == ["population/grade/easy/0/4/0"]  # rank r: the heads i % 2 == r
    assert list(ranks[1]["final_loss"]) == ["population/grade/easy/1/4/0"]
    assert record["final_loss"] == {**ranks[0]["final_loss"], **ranks[1]["final_loss"]}
    _same_rows(_rows(out), _rows(tiny_reference))
    assert not [p.name for p in out.rglob("*.tmp")]


@pytest.mark.slow
def test_sigkill_after_the_first_part_then_rerun_equals_an_uninterrupted_run(real_cache, tiny_reference, tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "killed"
    first = out / "parts" / "population__grade__easy__0__4__0.parquet"
    proc = subprocess.Popen(_cli(str(real_cache), "--out", str(out), *TINY_CLI), env=_cli_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no part in time"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.parquet").exists() and not (out / "sweep.json").exists()  # killed mid-run
    res = subprocess.run(_cli(str(real_cache), "--out", str(out), *TINY_CLI), env=_cli_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"]["resumed"] >= 1 and record["counts"]["trained_now"] + record["counts"]["resumed"] == 2
    _same_rows(_rows(out), _rows(tiny_reference))
    assert not [p.name for p in out.rglob("*.tmp")]


@pytest.mark.slow
def test_model_override_loads_the_given_model_and_refuses_another(lm, real_cache, demo_items, tiny_reference,
                                                                   tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from probekit.cli import app
    from probekit.finetune import finetune

    folder = CACHE_ROOT / "models" / "SmolLM2-135M-Instruct"  # the cache's model, given as a folder
    record = finetune(real_cache, demo_items, tmp_path / "same", str(folder), **{**TINY, "draws": 1})
    assert record["finetune_model"]["weights_sha256"] == record["model"]["weights_sha256"]
    ref = _rows(tiny_reference)
    _same_rows(_rows(tmp_path / "same"), ref[ref["draw"].astype(int) == 0].reset_index(drop=True))
    # another model (a tiny random Llama with SmolLM2's tokenizer) is refused before any training
    other = tmp_path / "other-model"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    res = CliRunner().invoke(app, ["finetune", str(real_cache), "--out", str(tmp_path / "x"), "--model",
                                         str(other), *TINY_CLI])
    assert res.exit_code == 2 and "is not the model cache" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_device_map_on_the_cpu_loads_the_cache_model_and_trains_the_same_adapters(real_cache, demo_items,
                                                                                   tiny_reference, tmp_path):
    from probekit.finetune import finetune
    from probekit.llm import ModelSpec

    spec = ModelSpec(dtype="float32", device="cpu", device_map="auto")  # no model: the cache's
    record = finetune(real_cache, demo_items, tmp_path / "auto", spec, **{**TINY, "draws": 1})  # every module on the CPU
    assert record["finetune_model"]["weights_sha256"] == record["model"]["weights_sha256"]
    ref = _rows(tiny_reference)
    _same_rows(_rows(tmp_path / "auto"), ref[ref["draw"].astype(int) == 0].reset_index(drop=True))
    head = "population/grade/easy/0/4/0"
    assert list(record["final_loss"]) == [head]
    assert record["final_loss"][head] == pytest.approx(
        json.loads((tiny_reference / "sweep.json").read_text())["final_loss"][head], abs=1e-5)


@pytest.mark.slow
def test_all_to_all_learning_curve_and_label_noise_run_for_finetune(lm, real_cache, demo_items, tmp_path):
    from probekit.finetune import finetune

    tiny = Recipe(max_batch=4, micro_batch=4, epochs=1, min_updates=1)
    kw = dict(recipe=tiny, verify=False, draws=1, measures=["grade"], zero_shot=False)
    finetune(real_cache, demo_items, tmp_path / "lc", lm, experiment="learning_curve", n_train=[2, 4],
             levels=["easy"], test_levels=["hard"], **kw)
    lc = _rows(tmp_path / "lc")
    assert set(lc["experiment"]) == {"learning_curve"} and sorted(set(lc["n_train"].astype(int))) == [2, 4]
    by_n = lc.groupby("n_train")["item_id"].apply(lambda s: sorted(s))
    assert by_n.iloc[0] == by_n.iloc[1] and set(lc["test_level"]) == {"hard"}  # every size on the same items
    finetune(real_cache, demo_items, tmp_path / "noise", lm, experiment="label_noise", n_train=[4],
             label_noise=[0.3], levels=["easy"], test_levels=["hard"], **kw)
    noise = _rows(tmp_path / "noise")
    assert set(noise["experiment"]) == {"label_noise"} and set(noise["label_noise"]) == {0.3}
    assert len(noise) == len(lc) // 2
    finetune(real_cache, demo_items, tmp_path / "a2a", lm, experiment="all_to_all", n_train=[4], **kw)
    a2a = _rows(tmp_path / "a2a")
    assert set(a2a["measure"]) == {"all"} and set(a2a["train_level"]) == {"all"}
    assert len(a2a) == 180 - 4 and set(a2a["method"]) == {"finetune"}  # every probe item but the training ones
