"""A question set before a model scores it: the items to run, and items a multiple-choice pass can score.

:func:`limit_items` and :func:`with_template` give the set an extraction or an ICL run scores (its
first items, another prompt template). :func:`check_items` runs before anything is written or loaded:
a set whose answer is generated (GSM8k: one "choice", the gold answer) is for ``probekit generate``,
every item needs at least two choices, and the prompt template must be able to show every item's
choices. That every prompt fits the model is checked once it is loaded
(:func:`probekit.llm.tokens.check_context`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from probekit.data.prompts import render_prompt
from probekit.errors import ProbekitError


def with_template(items, template: str | None):
    """``items`` rendered with ``template`` instead of its set's prompt (None: unchanged); an unknown
    template is refused here, before any model loads."""
    if template is None:
        return items
    render_prompt("q", ["a", "b"], template)
    return dataclasses.replace(items, prompt_template=template)


def limit_items(items, limit: int | None):
    """The first ``limit`` items of a set (a new ItemSet, its own fingerprint)."""
    if limit is None:
        return items
    if limit < 1:
        raise ProbekitError(f"limit must be a positive integer, got {limit}")
    return dataclasses.replace(items, table=items.table.iloc[:limit].reset_index(drop=True))


def check_items(items, template: str | None = None) -> None:
    """Refuse a set a multiple-choice pass cannot score, in one line: a generative set (use
    ``probekit generate``), an item with fewer than two choices, or an item whose choices the
    template cannot show (``template``: default, the set's)."""
    table = items.table.reset_index(drop=True)
    if getattr(items, "generative", False):
        raise ProbekitError(f"dataset {items.name} has no answer choices to score (its answer is generated): "
                            "use `probekit generate` for it")
    if not len(table):
        return
    counts = table["choices"].map(len).to_numpy()
    if counts.min() < 2:
        row = int(np.argmin(counts))
        raise ProbekitError(f"dataset {items.name}: item {str(table['id'].iat[row])!r} has {int(counts[row])} "
                            "answer choice(s); a multiple-choice item needs at least two")
    row = int(np.argmax(counts))
    try:
        render_prompt(str(table["question"].iat[row]), [str(c) for c in table["choices"].iat[row]],
                      template or items.prompt_template)
    except ProbekitError as exc:
        raise ProbekitError(f"dataset {items.name}: item {str(table['id'].iat[row])!r}: {exc}") from None
