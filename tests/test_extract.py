"""Extraction on the real SmolLM2-135M and real ARC questions.

Every fast path is compared with a plain reference: the prefix-shared packed capture with a
per-choice pass and with a direct ``model(ids, output_hidden_states=True)``; the pipeline's cache
with the capture it wrote; resumed, multi-process and ICL results with uninterrupted,
single-process and full-prompt runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probekit.errors import ProbekitError
from tests.reference import plain_forward as _direct

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / "cache"
LAYERS = [0, 16, 30]


# ----- fixtures ------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encode(lm, raw_items):
    from probekit.data.prompts import render_prompt
    from probekit.llm.tokens import encode_item

    rules = lm.rules
    return [encode_item(lm.tokenizer, render_prompt(r["question"], r["choices"]["text"]), r["choices"]["text"], rules, r["id"])
            for r in raw_items]


# ----- layers and sites ----------------------------------------------------------------------------
def test_resolve_layers_and_sites():
    from probekit.extract.capture import resolve_sites
    from probekit.layers import resolve_layers

    assert resolve_layers("middle_and_last", 30) == [16, 30]
    assert resolve_layers("middle_and_last", 32) == [17, 32]  # Llama-2-7b (docs/protocol.md §3)
    assert resolve_layers("middle_and_last", 40) == [21, 40]
    assert resolve_layers("middle_and_last", 80) == [41, 80]
    assert resolve_layers("all", 3) == [0, 1, 2, 3]
    assert resolve_layers("0,5,17", 30) == [0, 5, 17]
    assert resolve_layers([-1, 0], 30) == [30, 0]
    with pytest.raises(ProbekitError, match=r"layer 31 is out of range: this model has hidden_states indices 0\.\.30"):
        resolve_layers([0, 31], 30)
    with pytest.raises(ProbekitError, match="layers='mid'"):
        resolve_layers("mid", 30)
    assert resolve_sites("answer_end,question_end") == ["answer_end", "question_end"]
    with pytest.raises(ProbekitError, match="unknown site 'choice_end'"):
        resolve_sites(["answer_end", "choice_end"])


# ----- capture against references ------------------------------------------------------------------
def test_prefix_shared_equals_per_choice_pass(lm, mixed_items):
    from probekit.extract.capture import capture_batch
    from tests.reference import capture_naive

    enc = _encode(lm, mixed_items)
    layers = [0, 5, 17, 30]
    sites = ["answer_end", "question_end"]
    packed = capture_batch(lm, enc, layers, sites, max_choices=5)
    naive = capture_naive(lm, enc, layers, sites, max_choices=5)
    np.testing.assert_allclose(packed.answer_end, naive.answer_end, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(packed.question_end, naive.question_end, rtol=1e-4, atol=2e-4)
    np.testing.assert_array_equal(packed.choice_tokens, naive.choice_tokens)
    np.testing.assert_array_equal(np.isinf(packed.choice_sum), np.isinf(naive.choice_sum))
    fin = np.isfinite(naive.choice_sum)
    np.testing.assert_allclose(packed.choice_sum[fin], naive.choice_sum[fin], rtol=1e-5, atol=1e-4)
    # padded choices: zeros and -inf; the 3-choice item has two padded slots
    assert np.isinf(packed.choice_sum[5, 3:]).all() and (packed.answer_end[:, 5, 3:] == 0).all()
    assert packed.n_tokens < naive.n_tokens / 2.5  # the prompt ran once instead of once per choice
    # one item at a time gives the same as the padded batch
    single = capture_batch(lm, enc[4:5], layers, sites, max_choices=5)
    np.testing.assert_allclose(single.answer_end[:, 0], packed.answer_end[:, 4], rtol=1e-4, atol=2e-4)


def test_capture_equals_direct_forward(lm, mixed_items):
    from probekit.extract.capture import capture_batch

    enc = _encode(lm, mixed_items[2:6])
    cap = capture_batch(lm, enc, LAYERS, ["answer_end", "question_end"], max_choices=5)
    for i, e in enumerate(enc):
        for j, (last, q_end, total) in enumerate(_direct(lm, e.prompt, e.choices)):
            for li, layer in enumerate(LAYERS):
                np.testing.assert_allclose(cap.answer_end[li, i, j], last[layer], rtol=1e-4, atol=2e-4)
                np.testing.assert_allclose(cap.question_end[li, i], q_end[layer], rtol=1e-4, atol=2e-4)
            assert cap.choice_sum[i, j] == pytest.approx(total, abs=2e-4)
            assert cap.choice_tokens[i, j] == len(e.choices[j])


def test_model_ranks_the_plausible_answer(lm, raw_arc):
    from probekit.extract.capture import capture_batch

    lichen = raw_arc["MCAS_2007_8_5189"]  # "carbon dioxide", "food", "protection", "water"
    cap = capture_batch(lm, _encode(lm, [lichen]), [30], ["answer_end"], max_choices=4)
    assert np.isfinite(cap.choice_sum).all() and cap.choice_sum[0].max() < 0


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.slow
@pytest.mark.parametrize("quantize,threshold,tol", [("8bit", 0.0, 1e-5), ("4bit", 6.0, 1e-2)])
def test_quantized_capture_equals_direct_forward(mixed_items, quantize, threshold, tol):
    """bitsandbytes on the CPU: 8-bit without outlier columns is row-wise, so it matches exactly; the
    4-bit CPU kernels round at bfloat16 level depending on the matrix shape, so 4-bit matches to ~1e-2."""
    from probekit.extract.capture import capture_batch
    from probekit.llm.models import ModelSpec, load_model

    spec = ModelSpec(quantize=quantize, int8_threshold=threshold, bnb_4bit_type="nf4", cache_root=CACHE_ROOT)
    qlm = load_model(spec)
    layer_type = type(qlm.model.model.layers[3].mlp.down_proj).__name__
    assert layer_type == ("Linear8bitLt" if quantize == "8bit" else "Linear4bit")
    assert qlm.identity["quantization"]["bits"] == (8 if quantize == "8bit" else 4)
    enc = _encode(qlm, mixed_items[:3])
    cap = capture_batch(qlm, enc, LAYERS, ["answer_end", "question_end"], max_choices=4)
    for i, e in enumerate(enc):
        for j, (last, q_end, total) in enumerate(_direct(qlm, e.prompt, e.choices)):
            for li, layer in enumerate(LAYERS):
                assert _rel(cap.answer_end[li, i, j], last[layer]) < tol
                assert _rel(cap.question_end[li, i], q_end[layer]) < tol
            assert cap.choice_sum[i, j] == pytest.approx(total, abs=100 * tol)


@pytest.mark.slow
def test_int8_outlier_threshold_is_close_not_exact(mixed_items):
    """LLM.int8 picks outlier columns per forward pass, so a packed batch differs slightly from a lone sequence."""
    from probekit.extract.capture import capture_batch
    from probekit.llm.models import ModelSpec, load_model

    qlm = load_model(ModelSpec(quantize="8bit", cache_root=CACHE_ROOT))
    assert qlm.identity["quantization"]["int8_threshold"] == 6.0
    enc = _encode(qlm, mixed_items[:2])
    cap = capture_batch(qlm, enc, [30], ["answer_end"], max_choices=4)
    for i, e in enumerate(enc):
        for j, (last, _, total) in enumerate(_direct(qlm, e.prompt, e.choices)):
            a, b = cap.answer_end[0, i, j], last[30]
            assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.98
            assert abs(cap.choice_sum[i, j] - total) < 1.5


# ----- models ----------------------------------------------------------------------------------------
def test_model_errors(tmp_path, monkeypatch):
    from probekit.llm.models import ModelSpec, load_model
    from probekit.llm.weights import weights_sha256

    t0 = time.perf_counter()
    with pytest.raises(ProbekitError, match="'no-such-org/no-such-model' is not a local folder or file"):
        load_model(ModelSpec(model="no-such-org/no-such-model", cache_root=CACHE_ROOT))
    assert time.perf_counter() - t0 < 10  # no hub retries
    with pytest.raises(ProbekitError, match="model path not found: ./nowhere/model"):
        load_model(ModelSpec(model="./nowhere/model", cache_root=CACHE_ROOT))
    with pytest.raises(ProbekitError, match="has no config.json"):
        load_model(ModelSpec(model=str(tmp_path), cache_root=CACHE_ROOT))
    with pytest.raises(ProbekitError, match="dtype='float8'"):
        load_model(ModelSpec(dtype="float8", cache_root=CACHE_ROOT))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ProbekitError, match="quantize=4bit needs bitsandbytes"):
        load_model(ModelSpec(quantize="4bit", cache_root=CACHE_ROOT))
    folder = CACHE_ROOT / "models" / "SmolLM2-135M-Instruct"
    hashes = weights_sha256(folder)
    assert list(hashes) == ["model.safetensors"] and len(hashes["model.safetensors"]) == 64
    assert (folder / ".probekit-weights-sha256.json").is_file()


def test_auto_is_settled_in_the_model_spec():
    """"auto" device, dtype and quantize are settled by ModelSpec.resolved alone; a settled spec comes back equal."""
    import torch

    from probekit.llm.models import ModelSpec

    gpu = torch.cuda.is_available()
    auto = ModelSpec().resolved()
    assert (auto.device, auto.dtype, auto.quantize) == (("cuda", "float16", None) if gpu else ("cpu", "float32", None))
    assert ModelSpec().resolved(train=True).quantize == ("8bit" if gpu else None)  # a QLoRA base on a GPU only
    assert ModelSpec(device="cuda:1").resolved(train=True).quantize == "8bit"
    assert ModelSpec(device="cpu").resolved(train=True).quantize is None
    assert ModelSpec(quantize="none", device="cuda").resolved(train=True).quantize is None
    assert ModelSpec(quantize="4bit", device="cpu").resolved().quantize == "4bit"
    assert ModelSpec(dtype="auto", device="cpu").resolved().dtype == "float32"
    assert ModelSpec(dtype="auto", device="cuda:1").resolved().dtype == "float16"
    assert ModelSpec(dtype="auto", device="cpu", device_map="auto").resolved().dtype == "float16"
    assert ModelSpec(dtype="bfloat16", device="auto").resolved().dtype == "bfloat16"
    settled = ModelSpec(dtype="float32", device="cpu", quantize=None)
    assert settled.resolved() == settled and settled.resolved(local_rank=1, world_size=2) == settled
    assert settled.resolved(train=True) == settled
    ranked = ModelSpec(device="cuda").resolved(local_rank=3, world_size=4)
    assert ranked.device == (f"cuda:{3 % torch.cuda.device_count()}" if gpu else "cuda")
    with pytest.raises(ProbekitError, match="dtype='int4' is not one of float32, float16, bfloat16, auto"):
        ModelSpec(dtype="int4").resolved()
    with pytest.raises(ProbekitError, match="quantize='2bit' is not one of none, 8bit, 4bit, auto"):
        ModelSpec(quantize="2bit").resolved()
    with pytest.raises(ProbekitError, match="threads=0 must be a positive integer"):
        ModelSpec(threads=0).resolved()


def test_the_library_and_every_command_share_the_model_defaults():
    """One default for each model setting: ModelSpec's, which every command that runs a model shows."""
    import typer

    from probekit.cli import app
    from probekit.llm import ModelSpec

    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    assert {k: defaults[k] for k in ("dtype", "quantize", "device", "device_map")} == {
        "dtype": "auto", "quantize": "auto", "device": "auto", "device_map": None}
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    for name in ("extract", "finetune", "generate"):
        params = {p.name: p for p in commands[name].params}
        for setting in ("dtype", "quantize", "device", "device_map"):
            assert params[setting].default == defaults[setting], (name, setting)
        assert "none | 8bit | 4bit | auto" in params["quantize"].help, name


def test_importing_the_llm_runtime_loads_neither_jax_nor_torch():
    code = "import sys, probekit.llm; print(sorted(m for m in ('jax', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_extract_command_leaves_torch_to_the_library():
    """The command line settles nothing itself: a bad dataset is refused before torch is imported."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom probekit.cli import app\n"
            "res = CliRunner().invoke(app, ['extract', '--dataset', 'nonesuch', '--dtype', 'auto', '--threads', '1'])\n"
            "assert res.exit_code == 2 and 'unknown dataset' in res.output, res.output\n"
            "print('torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-1000:]
    assert res.stdout.strip() == "False"


def test_identity(lm):
    ident = lm.identity
    assert ident["id"] == "SmolLM2-135M-Instruct" and ident["converted_from"].endswith(".gguf")
    assert ident["n_layers"] == 30 and ident["hidden_size"] == 576 and ident["dtype"] == "float32"
    assert ident["quantization"] is None and len(ident["weights_sha256"]["model.safetensors"]) == 64
    # the tied output embedding is still the input embedding after loading
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight


# ----- the pipeline ----------------------------------------------------------------------------------
def _read_all(path):
    from probekit.store import Cache

    c = Cache(path)
    assert c.verify() == []
    hidden = {(s, layer): c.read_layer(s, layer) for s in c.sites for layer in c.layers}
    return c, c.items, hidden, c.logprobs()


def _assert_same_cache(a, b):
    ca, ia, ha, (sa, ta) = _read_all(a)
    cb, ib, hb, (sb, tb) = _read_all(b)
    assert ca.n_items == cb.n_items and ca.layers == cb.layers
    assert ia["id"].tolist() == ib["id"].tolist() and ia["label"].tolist() == ib["label"].tolist()
    for key in ha:
        np.testing.assert_allclose(ha[key], hb[key], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-3)


RUN = dict(limit=12, shard_size=2, batch_size=2, layers=LAYERS, progress=False)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, lm, arc):
    from probekit.extract.run import extract

    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = extract(arc, out, lm, **RUN)
    assert summary.complete and summary.items_run == 12 and len(summary.shards_written) == 6
    return out


def test_pipeline_writes_what_the_capture_computes(tmp_path, lm, arc):
    from probekit.extract.capture import capture_batch
    from probekit.extract.run import extract
    from probekit.llm.tokens import encode_rows

    out = tmp_path / "c"
    summary = extract(arc, out, lm, limit=10, shard_size=4, batch_size=3, layers=[5, 30], progress=False)
    assert summary.complete and summary.shards_written == [0, 1, 2] and summary.bytes_on_disk > 0
    assert "10 items" in summary.line()
    c, items, hidden, (csum, ctok) = _read_all(out)
    table = arc.table.iloc[:10]
    assert items["id"].tolist() == table["id"].tolist()
    assert items["label"].tolist() == table["label"].tolist()
    assert items["n_choices"].tolist() == table["choices"].map(len).tolist()
    assert items["pool"].tolist() == table["pool"].tolist() and items["source"].tolist() == table["source"].tolist()
    for m in arc.measures:
        np.testing.assert_array_equal(items[m].to_numpy(), table[m].to_numpy(np.float64))
    # the choices' surface features: plain word and character counts of each choice's text, 0 on padding
    surface = c.choice_surface()
    for i, choices in enumerate(table["choices"]):
        words = [len(x.split()) for x in choices] + [0] * (arc.max_choices - len(choices))
        chars = [len(x) for x in choices] + [0] * (arc.max_choices - len(choices))
        assert surface["choice_words"][i].tolist() == words and surface["choice_chars"][i].tolist() == chars
    man = c.manifest
    assert man["choice_surface"] is True
    assert man["model"]["id"] == "SmolLM2-135M-Instruct" and man["dataset"]["fingerprint"]
    assert man["prompt"]["template"] == "0040" and man["layers"] == [5, 30]
    # reference: one capture of all ten items in a single batch (per-choice equality is tested above)
    ref = capture_batch(lm, encode_rows(lm, table, "0040", lm.rules), [5, 30],
                        ["answer_end", "question_end"], max_choices=arc.max_choices)
    for li, layer in enumerate([5, 30]):
        np.testing.assert_allclose(hidden[("answer_end", layer)], ref.answer_end[li], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(hidden[("question_end", layer)], ref.question_end[li], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(csum, ref.choice_sum, rtol=1e-5, atol=2e-4)
    np.testing.assert_array_equal(ctok, ref.choice_tokens)
    # a rerun finds nothing to do
    again = extract(arc, out, lm, limit=10, shard_size=4, batch_size=3, layers=[5, 30], progress=False)
    assert again.shards_written == [] and again.complete
    # a different model configuration in the same directory is refused
    with pytest.raises(ProbekitError):
        extract(arc, out, lm, limit=10, shard_size=4, batch_size=3, layers=[5, 16], progress=False)


def test_empty_dataset_is_an_error(tmp_path, lm, arc):
    from probekit.extract.run import extract

    empty = dataclasses.replace(arc, table=arc.table.iloc[:0])
    with pytest.raises(ProbekitError, match="has no items"):
        extract(empty, tmp_path / "e", lm, progress=False)
    assert not (tmp_path / "e").exists()


KILL_SCRIPT = """
import sys
from probekit.data import load_dataset
from probekit.extract.run import extract
from probekit.llm import ModelSpec
items = load_dataset("arc", data_dir=sys.argv[1])
extract(items, sys.argv[2], ModelSpec(cache_root=sys.argv[3]), limit=12, shard_size=2, batch_size=2,
        layers=[0, 16, 30], progress=False)
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, lm, arc, shared_data, reference_cache):
    from probekit.extract.run import extract

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(shared_data), str(out), str(CACHE_ROOT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    recorded = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file():
            try:
                recorded = len(json.loads(manifest.read_text())["shards"])
            except (ValueError, KeyError):
                recorded = 0
            if recorded >= 1:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the extraction ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 1 <= len(state["shards"]) < 6
    summary = extract(arc, out, lm, **RUN)
    assert summary.complete and 0 < len(summary.shards_written) < 6
    assert not list(out.glob(".*.tmp"))
    _assert_same_cache(out, reference_cache)


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path, shared_data, reference_cache):
    out = tmp_path / "dist"
    env = {**os.environ, "PROBEKIT_CACHE": str(CACHE_ROOT), "OMP_NUM_THREADS": "1"}
    probekit = Path(sys.executable).with_name("probekit")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           str(probekit), "extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "12",
           "--shard-size", "2", "--batch-size", "2", "--layers", "0,16,30", "--device", "cpu", "--out", str(out),
           "--no-progress"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["world_size"] == 2
    assert sorted({e["rank"] for e in man["shards"]}) == [0, 1]
    assert all(e["rank"] == e["index"] % 2 for e in man["shards"])
    _assert_same_cache(out, reference_cache)


# ----- ICL --------------------------------------------------------------------------------------------
def test_icl_shared_prefix_equals_full_prompt(lm, arc):
    from probekit.data.prompts import render_kshot
    from probekit.extract.icl import plan_draw, score_plan

    table = arc.table
    rows, demos = np.arange(3), np.array([10, 11])
    plan = plan_draw(lm, arc, rows, demos, 0, lm.rules, max_seq_len=2048)
    assert plan.k_used == 2 and len(plan.prefix_ids) > 80
    csum, ctok = score_plan(lm, plan, arc.max_choices, batch_size=3)
    examples = [(table.at[r, "question"], list(table.at[r, "choices"]), table.at[r, "choices"][table.at[r, "label"]])
                for r in demos]
    for i, r in enumerate(rows):
        text = render_kshot(examples, table.at[r, "question"], list(table.at[r, "choices"]))
        full = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        e = plan.encoded[i]
        assert e.prompt == full  # the k-shot prompt is tokenised as one string
        for j, (_, _, total) in enumerate(_direct(lm, full, e.choices)):
            assert csum[i, j] == pytest.approx(total, abs=5e-4)
    # a prompt longer than max_seq_len drops demonstrations from the end
    short = plan_draw(lm, arc, rows, demos, 0, lm.rules, max_seq_len=len(plan.encoded[0].prompt) - 20)
    assert short.k_used == 1


@pytest.mark.slow
def test_icl_draws_end_to_end(tmp_path, lm, arc):
    from probekit.data.levels import cut_levels, cutoff_for
    from probekit.extract.icl import extract_icl, load_icl

    table = arc.table[arc.table["pool"] == "probe"]
    codes = cut_levels(table["grade"].to_numpy(np.float64), cutoff_for("arc", "grade"))
    sub = pd.concat([table[codes == 0].iloc[:8], table[codes == 2].iloc[:4]]).reset_index(drop=True)
    items = dataclasses.replace(arc, table=sub)
    out = tmp_path / "icl"
    with pytest.raises(ProbekitError, match="fewer than n_train"):  # the protocol keeps >= 50 items to test on
        extract_icl(items, out, lm, k=1, demos_from="easy", measure="grade", draws=2, progress=False)
    s = extract_icl(items, out, lm, k=1, demos_from="easy", measure="grade", draws=2, batch_size=6, min_test=4,
                    progress=False)
    assert s.complete and s.draws_written == [0, 1]
    man, ids, csum, ctok = load_icl(out)
    assert csum.shape == (2, 12, 4) and ids.tolist() == sub["id"].tolist()
    assert man["icl"]["k"] == 1 and man["icl"]["key"] == "icl/grade/easy"
    for b in range(2):
        demo_ids = man["draw_info"][str(b)]["demo_ids"]
        is_demo = np.isin(ids, demo_ids)
        assert is_demo.sum() == 1 and np.isnan(csum[b][is_demo]).all() and np.isfinite(csum[b][~is_demo]).all()
        assert sub.set_index("id").loc[demo_ids, "grade"].max() <= 5  # demonstrations come from the easy level
    assert man["draw_info"]["0"]["demo_ids"] != man["draw_info"]["1"]["demo_ids"]
    again = extract_icl(items, out, lm, k=1, demos_from="easy", measure="grade", draws=2, min_test=4, progress=False)
    assert again.draws_written == []
    with pytest.raises(ProbekitError, match="another icl"):
        extract_icl(items, out, lm, k=2, demos_from="easy", measure="grade", draws=2, min_test=4, progress=False)


def test_icl_demonstrations_cut_by_another_rule(tmp_path, lm, arc):
    """--demos-cutoff: third-grade demonstrations (grade <= 3, the paper's Figure 1) are drawn from the items
    that rule calls easy, recorded, and labelled so they are never read as the default easy level."""
    from probekit.data.levels import Fixed
    from probekit.extract.icl import extract_icl, level_pool, load_icl
    from probekit.store.icl_scores import demo_level

    table = arc.table.reset_index(drop=True)
    third = level_pool(arc, "grade", "easy", Fixed(3, 8))
    assert len(third) and (table.loc[third, "grade"] <= 3).all()
    assert set(third) < set(level_pool(arc, "grade", "easy"))
    probe = table[table["pool"] == "probe"]
    sub = pd.concat([probe[probe["grade"] <= 3].iloc[:3], probe[probe["grade"] >= 8].iloc[:3]]).reset_index(drop=True)
    items = dataclasses.replace(arc, table=sub)
    s = extract_icl(items, tmp_path / "icl", lm, k=1, demos_from="easy", measure="grade", demos_cutoff=Fixed(3, 8),
                    draws=2, min_test=2, progress=False)
    man, ids, _, _ = load_icl(tmp_path / "icl")
    assert s.complete and man["icl"]["demos_cutoff"] == "3,8" and man["icl"]["key"] == "icl/grade/easy@3,8"
    for b in range(2):
        assert sub.set_index("id").loc[man["draw_info"][str(b)]["demo_ids"], "grade"].max() <= 3
    assert demo_level(man["icl"]) == "easy@grade=3,8"
    assert demo_level({"demos_from": "easy", "measure": "human_hardness", "demos_measure": "grade",
                       "demos_dataset": {"name": "arc"}, "demos_cutoff": "3,8"}) == "arc:grade@3,8:easy"
    with pytest.raises(ProbekitError, match="applies to a level"):
        extract_icl(items, tmp_path / "all", lm, k=1, demos_from="all", measure="grade", demos_cutoff=Fixed(3, 8))


def test_second_icl_writer_into_one_folder_is_refused(tmp_path, lm, arc):
    import fcntl

    from probekit.extract.icl import extract_icl

    out = tmp_path / "icl"
    out.mkdir()
    with open(out / ".lock-rank0", "w") as held:  # another extract --icl is writing this folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(ProbekitError, match=f"ICL score folder {out} is being written by another process "
                                                r"\(pid 4242\)") as exc:
            extract_icl(arc, out, lm, k=1, demos_from="easy", measure="grade", draws=1, limit=40, min_test=4,
                        batch_size=8, progress=False)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in out.iterdir()) == [".lock-rank0"]  # nothing written


# ----- the command line -------------------------------------------------------------------------------
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, shared_data, monkeypatch):
    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.setenv("PROBEKIT_CACHE", str(CACHE_ROOT))
    runner = CliRunner()
    out = tmp_path / "never"
    base = ["extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "2", "--out", str(out), "--no-progress"]
    for extra, message in [
        (["--model", "no-such-org/no-such-model"], "is not a local folder or file"),
        (["--layers", "0,31"], "layer 31 is out of range"),
        (["--sites", "middle"], "unknown site 'middle'"),
        (["--quantize", "2bit"], "quantize='2bit' is not one of none, 8bit, 4bit, auto"),
        (["--dtype", "int4"], "dtype='int4'"),
    ]:
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 2, (extra, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], res.output
        assert not out.exists()
    res = runner.invoke(app, ["extract", "--dataset", "nonesuch", "--out", str(out)])
    assert res.exit_code == 2 and "unknown dataset" in res.output and not out.exists()


def test_cli_runs_and_help_has_an_example(tmp_path, shared_data, monkeypatch):
    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.setenv("PROBEKIT_CACHE", str(CACHE_ROOT))
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
    out = tmp_path / "cli"
    res = runner.invoke(app, ["extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "3",
                              "--layers", "middle_and_last", "--sites", "answer_end", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 items" in res.output and "complete" in res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["layers"] == [16, 30] and man["sites"] == ["answer_end"] and man["complete"]
