"""Answer extraction and scoring of generated chains of thought (docs/protocol.md §12).

Two rules, chosen with ``scoring``:

``"reference"`` is the rule of the paper's code (``utils/metrics.py``,
``generative_exact_match_accuracy_sum`` with ``trigger_phrase="the answer is"`` and, for prompted
generation, ``stop_string="\\n"``), step by step:

1. the generation and the gold answer are lower-cased, stripped, and stripped of "." at both ends;
2. without "the answer is" the generation is wrong; with it, the text between the first and the
   second occurrence is kept (``split(trigger)[1]``), cut at the first newline, stripped again;
3. for GSM8k (``numeric=True``) the last two words of that text keep only the characters
   ``0-9`` and ``.``; if nothing is left, every word with a digit is visited from the last one to
   the first, each replacing the result, so the first word with a digit wins;
4. correct when the result equals the gold answer string.

Step 3 removes "," and "-" from predictions but not from gold answers, so a gold answer with a
thousands comma ("1,000") or a minus sign can never be matched, and "18.00" never matches "18".

``"default"`` fixes that and otherwise does the same: steps 1 and 2, then for numeric answers the
last number of the kept text (``-1,234.5``: commas removed, the sign kept) compared with the gold
answer as a number (``18.00 == 18``); non-numeric answers (StrategyQA's yes/no) as in the reference.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from probekit.errors import ProbekitError

TRIGGER = "the answer is"
SCORINGS = ("default", "reference")
#: The reference's placeholder for a generation without the trigger phrase (never equals a gold answer).
NO_TRIGGER = "[PRED DID NOT HAVE TRIGGER PHRASE]"

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _standardize(text: str) -> str:
    return str(text).lower().strip().strip(".")


def answer_segment(text: str, stop: str | None = "\n") -> str | None:
    """Steps 1-2: the text after the first "the answer is" up to the next one, cut at ``stop``
    (None: not cut), stripped; None when the generation has no trigger phrase."""
    pred = _standardize(text)
    if TRIGGER not in pred:
        return None
    pred = pred.split(TRIGGER)[1]
    if stop is not None and stop in pred:
        pred = pred[:pred.index(stop)]
    return pred.strip().strip("\n").strip().strip(".")


def reference_numeric(pred: str) -> str:
    """Step 3 of the reference rule (``extract_numeric`` of the paper's code), as written there."""
    numeric = re.sub(r"[^0-9.]", "", " ".join(pred.split()[-2:]))
    if numeric in ("", "."):
        for word in reversed(pred.split(" ")):
            if re.search(r"\d", word):
                numeric = re.sub(r"[^0-9.]", "", word)
    return numeric


def parse_number(text: str) -> Decimal | None:
    """A number written with optional sign, thousands commas and decimals, or None."""
    try:
        return Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None


def last_number(pred: str) -> Decimal | None:
    """The last number in ``pred`` (commas removed, the sign kept), or None."""
    for match in reversed(_NUMBER.findall(pred)):
        value = parse_number(match.rstrip(",").rstrip("."))
        if value is not None:
            return value
    return None


def extract_answer(text: str, *, numeric: bool, scoring: str = "default", stop: str | None = "\n") -> str:
    """The answer a generation gives, as the rule compares it ("" when it gives none)."""
    if scoring not in SCORINGS:
        raise ProbekitError(f"unknown scoring rule {scoring!r}: choose {' or '.join(SCORINGS)}")
    pred = answer_segment(text, stop)
    if pred is None:
        return NO_TRIGGER if scoring == "reference" else ""
    if not numeric:
        return pred
    if scoring == "reference":
        return reference_numeric(pred)
    value = last_number(pred)
    return "" if value is None else _plain(value)


def _plain(value: Decimal) -> str:
    """A number as plain text without trailing zeros: 18.00 -> "18", -0.50 -> "-0.5"."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def is_correct(answer: str, gold: str, *, numeric: bool, scoring: str = "default") -> bool:
    """Whether an extracted answer (:func:`extract_answer`) matches the gold answer under the rule."""
    if scoring not in SCORINGS:
        raise ProbekitError(f"unknown scoring rule {scoring!r}: choose {' or '.join(SCORINGS)}")
    if scoring == "reference" or not numeric:
        return answer == _standardize(gold)
    if answer == "":
        return False
    target = parse_number(_standardize(gold))
    if target is None:
        raise ProbekitError(f"gold answer {gold!r} is not a number (numeric scoring)")
    return Decimal(answer) == target


def score(text: str, gold: str, *, numeric: bool, scoring: str = "default", stop: str | None = "\n") -> tuple[str, bool]:
    """(extracted answer, correct) of one generation."""
    answer = extract_answer(text, numeric=numeric, scoring=scoring, stop=stop)
    return answer, is_correct(answer, gold, numeric=numeric, scoring=scoring)
