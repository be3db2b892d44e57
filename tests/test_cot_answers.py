"""Answer extraction and scoring of chains of thought, on every real GSM8k and StrategyQA item."""

from __future__ import annotations

import pytest

from probekit.cot.answers import NO_TRIGGER, extract_answer, is_correct, reference_numeric, score
from probekit.data.prompts import render_cot
from probekit.errors import ProbekitError

#: GSM8k items whose gold reasoning, rendered as a generation, the reference rule scores wrong although
#: the rendered answer is the gold one: not a thousands comma or a minus sign, but an answer stated in
#: the reasoning itself after "the answer is" with a calculator annotation or a word after it.
REFERENCE_STATED = {"gsm8k/train/1297", "gsm8k/train/2291", "gsm8k/train/5415"}


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    from probekit.data import load_dataset

    return load_dataset("gsm8k", shared_data, holdout=False)


def _rendered(reasoning: str, gold: str) -> str:
    return f" {reasoning} So the answer is {gold}"  # the k-shot demonstration's answer part, as generated


def test_every_gsm8k_gold_reasoning_scores_correct_by_default(gsm8k):
    table = gsm8k.table
    assert len(table) == 8792
    wrong = [r.id for r in table.itertuples() if not score(_rendered(r.reasoning, r.choices[0]), r.choices[0], numeric=True)[1]]
    assert wrong == []


def test_reference_rule_fails_exactly_the_documented_gsm8k_items(gsm8k):
    table = gsm8k.table
    failed = {r.id: r.choices[0] for r in table.itertuples()
              if not score(_rendered(r.reasoning, r.choices[0]), r.choices[0], numeric=True, scoring="reference")[1]}
    comma = {i for i, g in failed.items() if "," in g}
    negative = {i for i, g in failed.items() if g.startswith("-")}
    assert (len(comma), len(negative)) == (93, 5)
    assert comma == {r.id for r in table.itertuples() if "," in r.choices[0]}  # every gold answer with a comma
    assert negative == {r.id for r in table.itertuples() if r.choices[0].startswith("-")}
    assert set(failed) - comma - negative == REFERENCE_STATED
    assert len(failed) == 101


def test_every_strategyqa_gold_reasoning_scores_correct_under_both_rules(shared_data):
    from probekit.data import load_dataset

    table = load_dataset("strategyqa", shared_data).table
    assert len(table) == 2290
    for rule in ("default", "reference"):
        wrong = [r.id for r in table.itertuples()
                 if not score(_rendered(r.reasoning, r.choices[r.label]), r.choices[r.label], numeric=False, scoring=rule)[1]]
        assert wrong == [], rule
    # the other answer is wrong, and so is an answer without the trigger phrase
    r = table.iloc[0]
    other = r.choices[1 - r.label]
    assert not score(_rendered(r.reasoning, other), r.choices[r.label], numeric=False)[1]
    assert not score(f"{r.reasoning} {r.choices[r.label]}", r.choices[r.label], numeric=False)[1]


@pytest.mark.parametrize(("text", "gold", "default", "reference"), [
    ("so the answer is 18.00.", "18", True, False),           # numbers compared as numbers
    ("So the answer is $1,200.", "1,200", True, False),       # the gold comma
    ("So the answer is -5", "-5", True, False),               # the sign is kept
    ("So the answer is 5", "-5", False, False),
    ("The Answer Is 42 apples\nQ: next question", "42", True, True),
    ("So the answer is 3 + 4 = 7", "7", True, True),
    ("So the answer is \n7", "7", False, False),              # the answer ends at the newline
    ("I think it is 7", "7", False, False),                   # no trigger phrase: wrong
    ("the answer is 7. so the answer is 8", "7", True, False),  # text up to the second trigger ("7. so")
])
def test_numeric_rules(text, gold, default, reference):
    assert score(text, gold, numeric=True)[1] is default
    assert score(text, gold, numeric=True, scoring="reference")[1] is reference


def test_reference_pieces_follow_the_papers_code():
    assert reference_numeric("2 + 3 = 5") == "5"  # the last two words keep digits and dots
    assert reference_numeric("18 18") == "1818"
    assert reference_numeric("12 apples and 3 pears ok") == "12"  # no digit at the end: the first word with one
    assert extract_answer("no trigger here", numeric=True, scoring="reference") == NO_TRIGGER
    assert extract_answer("no trigger here", numeric=True) == ""
    assert extract_answer("So the answer is Yes.", numeric=False) == "yes"
    assert is_correct("yes", "Yes", numeric=False)
    with pytest.raises(ProbekitError, match="unknown scoring rule"):
        score("the answer is 1", "1", numeric=True, scoring="paper")


def test_cot_prompts_match_the_papers_layout():
    zero = render_cot([], "How many?", "5305")
    assert zero.startswith("This worksheet contain math word problems. Here's an example:\nQ: [question text here].\n")
    assert zero.endswith("Therefore, the answer is [answer here]\n\nNow you try!\n\nQ: How many?\nA:")
    two = render_cot([("Q1?", "R1.\nR2.", "1"), ("Q2?", "S1.", "2")], "Q3?")
    assert two == "Q: Q1?\nA: R1.\nR2. So the answer is 1\n\nQ: Q2?\nA: S1. So the answer is 2\n\nQ: Q3?\nA:"
    assert render_cot([], "Is it?", "0305") == "Q: Is it?\nA:"
    with pytest.raises(ProbekitError, match="unknown chain-of-thought prompt"):
        render_cot([], "x", "9999")
