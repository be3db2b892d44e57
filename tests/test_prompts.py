"""Prompt rendering and tokenisation (docs/protocol.md §2), pinned on real items with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probekit.data.prompts import render_example, render_kshot, render_prompt
from probekit.errors import ProbekitError

REPO = Path(__file__).resolve().parents[1]

LICHEN_Q = ("Lichens are symbiotic organisms made of green algae and fungi. What do the green algae supply "
            "to the fungi in this symbiotic relationship?")
LICHEN_C = ["carbon dioxide", "food", "protection", "water"]
NERVE_Q = "When a person sees something, what carries the message from the eyes to the brain?"
NERVE_C = ["arteries", "glands", "muscles", "nerves", "veins"]
CANDY_Q = "Should you ask a neighbor for candy on New Year's Eve?"


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (the model folder is converted from the GGUF once)."""
    from transformers import AutoTokenizer

    from probekit.llm.weights import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(REPO / "cache"))


def test_real_arc_items_match_the_file(shared_data):
    rows = {}
    for line in (shared_data / "arc" / "arc_all_splits.jsonl").open():
        r = json.loads(line)
        rows[r["id"]] = r
    assert rows["MCAS_2007_8_5189"]["question"] == LICHEN_Q
    assert rows["MCAS_2007_8_5189"]["choices"]["text"] == LICHEN_C
    assert rows["TIMSS_2003_8_pg24"]["question"] == NERVE_Q
    assert rows["TIMSS_2003_8_pg24"]["choices"]["text"] == NERVE_C


def test_zero_shot_strings():
    assert render_prompt(LICHEN_Q, LICHEN_C) == (
        "Question: Lichens are symbiotic organisms made of green algae and fungi. What do the green algae supply "
        "to the fungi in this symbiotic relationship? \nA) carbon dioxide\nB) food\nC) protection\nD) water\nAnswer:"
    )
    # five choices are lettered up to E
    assert render_prompt(NERVE_Q, NERVE_C) == (
        "Question: When a person sees something, what carries the message from the eyes to the brain? "
        "\nA) arteries\nB) glands\nC) muscles\nD) nerves\nE) veins\nAnswer:"
    )
    assert render_prompt("Is it?", ["x", "y", "z"]).endswith("\nA) x\nB) y\nC) z\nAnswer:")
    assert render_prompt(CANDY_Q, ["yes", "no"], "0306") == "Q: Should you ask a neighbor for candy on New Year's Eve?\nA:"


def test_k_shot_strings():
    text = render_kshot([(LICHEN_Q, LICHEN_C, "food")], NERVE_Q, NERVE_C)
    assert text == (
        "Question: Lichens are symbiotic organisms made of green algae and fungi. What do the green algae supply "
        "to the fungi in this symbiotic relationship? \nA) carbon dioxide\nB) food\nC) protection\nD) water "
        "\nAnswer: food\n\n"
        "Question: When a person sees something, what carries the message from the eyes to the brain? "
        "\nA) arteries\nB) glands\nC) muscles\nD) nerves\nE) veins\nAnswer:"
    )
    two = render_kshot([(LICHEN_Q, LICHEN_C, "food"), (NERVE_Q, NERVE_C, "nerves")], "Q3?", ["a", "b"])
    assert two.count("\n\n") == 2 and two.endswith("\n\nQuestion: Q3? \nA) a\nB) b\nAnswer:")
    assert render_kshot([("Is the sky blue?", ["yes", "no"], "yes")], CANDY_Q, ["yes", "no"], "0306") == (
        "Q: Is the sky blue? \nA: yes\n\nQ: Should you ask a neighbor for candy on New Year's Eve?\nA:"
    )
    assert render_kshot([], CANDY_Q, ["yes", "no"], "0306") == render_prompt(CANDY_Q, ["yes", "no"], "0306")
    assert render_example("q?", ["a", "b"], "b") == "Question: q? \nA) a\nB) b \nAnswer: b"


def test_bad_templates():
    with pytest.raises(ProbekitError, match="unknown prompt template '0099'"):
        render_prompt("q", ["a"], "0099")
    with pytest.raises(ProbekitError, match="needs answer choices"):
        render_prompt("q", [], "0040")


def test_token_rules_of_a_bpe_tokenizer(tokenizer):
    from probekit.llm.tokens import adds_dummy_prefix, answer_text, default_bos, token_rules

    # GPT-2 style BPE: no dummy prefix, no BOS added by default
    encode = tokenizer.encode
    assert encode("carbon dioxide", add_special_tokens=False) != encode(" carbon dioxide", add_special_tokens=False)
    assert not adds_dummy_prefix(tokenizer)
    assert default_bos(tokenizer) is None
    rules = token_rules(tokenizer)
    assert answer_text("food", rules) == " food"


def test_pinned_token_ids(tokenizer):
    from probekit.llm.tokens import encode_item, token_rules

    rules = token_rules(tokenizer)
    e = encode_item(tokenizer, render_prompt(LICHEN_Q, LICHEN_C), LICHEN_C, rules)
    assert e.prompt == [
        17872, 42, 16621, 3139, 359, 34329, 6896, 1135, 282, 2654, 12325, 284, 13387, 30, 1812, 536, 260, 2654,
        12325, 3577, 288, 260, 13387, 281, 451, 34329, 1986, 47, 216, 198, 49, 25, 3118, 7600, 198, 50, 25, 1114,
        198, 51, 25, 3542, 198, 52, 25, 913, 198, 21350, 42,
    ]
    assert e.choices == [[3118, 7600], [1114], [3542], [913]]
    assert tokenizer.convert_ids_to_tokens(e.choices[0]) == ["\u0120carbon", "\u0120dioxide"]
    # "Question" ":" ... " " "\n" "A" ")" ... "\n" "Answer" ":" -- the prompt ends without a space
    assert tokenizer.decode(e.prompt[-2:]) == "Answer:"

    e = encode_item(tokenizer, render_prompt(NERVE_Q, NERVE_C), NERVE_C, rules)
    assert e.prompt == [
        17872, 42, 1550, 253, 1055, 10413, 1488, 28, 732, 11046, 260, 3714, 429, 260, 3497, 288, 260, 2106, 47,
        216, 198, 49, 25, 14529, 198, 50, 25, 14411, 198, 51, 25, 5501, 198, 52, 25, 12319, 198, 53, 25, 15062,
        198, 21350, 42,
    ]
    assert e.choices == [[14529], [14411], [5501], [12319], [15062]]

    e = encode_item(tokenizer, render_prompt(CANDY_Q, ["yes", "no"], "0306"), ["yes", "no"], rules)
    assert e.prompt == [65, 42, 9602, 346, 1998, 253, 6107, 327, 17924, 335, 1315, 8445, 506, 19147, 47, 198, 49, 42]
    assert e.choices == [[9805], [787]]
    assert tokenizer.decode(e.prompt + e.choices[0]) == "Q: Should you ask a neighbor for candy on New Year's Eve?\nA: yes"


def test_empty_choice_is_an_error(tokenizer):
    from probekit.llm.tokens import encode_item, token_rules

    rules = token_rules(tokenizer)
    rules.dummy_prefix = True  # a choice that encodes to nothing
    with pytest.raises(ProbekitError, match="item 'x1': choice 1"):
        encode_item(tokenizer, "Q: a\nA:", ["yes", ""], rules, "x1")
