"""Checks of a question set before a model scores it: items it can score, prompts that fit the model.

:func:`check_items` runs before anything is written or loaded: a set whose answer is generated
(GSM8k: one "choice", the gold answer) is for ``probekit generate``, every item needs at least
two choices, and the prompt template must be able to show every item's choices. :func:`check_context`
runs once the model is loaded, before the first item is scored: a prompt that, with its longest
choice, does not fit the model's context (``max_position_embeddings``) is refused, naming the item
and its length. Long prompts are refused rather than truncated: a truncated question is another
question, and its scores would be passed off as the item's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probekit.data.prompts import render_prompt
from probekit.errors import ProbekitError
from probekit.extract.tokens import answer_text, encode_item


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


def context_limit(lm) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), if it states one."""
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(lm, ids: Sequence[str], prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> None:
    """Refuse the first item whose prompt plus its longest choice is longer than the model's
    context, naming the item and its length in tokens. Only prompts long enough in bytes to be
    over the limit are tokenised (a token covers at least one byte)."""
    limit = context_limit(lm)
    if limit is None:
        return
    for item, prompt, cs in zip(ids, prompts, choices):
        longest = max((len(answer_text(c, lm.rules).encode()) for c in cs), default=0)
        if len(prompt.encode()) + longest + 2 <= limit:
            continue
        enc = encode_item(lm.tokenizer, prompt, [str(c) for c in cs], lm.rules, str(item))
        n = len(enc.prompt) + max((len(c) for c in enc.choices), default=0)
        if n > limit:
            raise ProbekitError(f"item {str(item)!r}: its prompt and longest choice are {n} tokens, more than the "
                                f"model's context of {limit} tokens; shorten the question or leave the item out")


def check_table_context(lm, table, template: str) -> None:
    """:func:`check_context` for every item of an item table rendered with ``template``."""
    rows = table.reset_index(drop=True)
    choices = [[str(c) for c in cs] for cs in rows["choices"]]
    prompts = [render_prompt(str(q), cs, template) for q, cs in zip(rows["question"], choices)]
    check_context(lm, rows["id"].astype(str).tolist(), prompts, choices)
