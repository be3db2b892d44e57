"""Fine-tuning on chains of thought ("QLoRA-CoT", docs/protocol.md §12.1), scored by generation.

For one level of a measure and one draw, fresh LoRA adapters (:func:`probekit.finetune.attach_lora`,
the study's recipe) are trained on that draw's items with the authors' ``seq2seq`` objective: the
prompt is the zero-shot CoT prompt "0305" (``Q: {question}\\nA:``), the target its worked answer
``" {reasoning} So the answer is {answer}"`` followed by the end-of-sequence token, and an item's
loss is the summed NLL of the target's tokens given the prompt (the prompt's tokens are not scored;
:func:`probekit.finetune.train.item_nll` with ``objective="seq2seq"``). The adapted model then
decodes every test item outside the draw from the same prompt, as ``probekit generate`` does.

The training items of ``(measure, level, draw)`` are the draw of k-shot CoT and ICL
(:func:`probekit.cot.run.demo_rows`, key ``icl/{measure}/{level}``): the first k of ``n_train``
training items are the k demonstrations of that draw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from probekit.data.levels import ALL, LEVELS
from probekit.data.prompts import cot_answer, render_cot
from probekit.errors import ProbekitError
from probekit.llm.tokens import Encoded, context_limit, encode_item

#: Condition names of fine-tuned units in a generation folder: ``tuned_easy``, ``tuned_all``...
PREFIX = "tuned_"
TUNE_LEVELS = LEVELS + (ALL,)
#: The prompt the adapters are trained and scored with (the authors' QLoRA-CoT runs use "0305").
PROMPT_ID = "0305"
#: The method of the fine-tuned units' rows (:data:`probekit.methods.METHODS`).
METHOD = "finetune_cot"


def condition(level: str) -> str:
    """The condition name of fine-tuning on ``level``: ``tuned_easy``."""
    return PREFIX + level


def tuned_level(cond: str) -> str | None:
    """The training level of a fine-tuned condition, None for a prompting condition."""
    return cond[len(PREFIX):] if cond.startswith(PREFIX) else None


def encode_targets(lm, items, rows: np.ndarray, gold) -> list[Encoded]:
    """Each row as (prompt "0305", one continuation: its worked answer then end-of-sequence).

    ``gold(row)`` gives an item's answer text. The worked answer is encoded as a continuation of the
    prompt with the tokenizer's answer rule (:func:`probekit.llm.tokens.answer_text`: a leading
    space for byte-level BPE tokenizers, none with a SentencePiece dummy prefix).
    """
    table = items.table
    eos = lm.tokenizer.eos_token_id
    if eos is None:
        raise ProbekitError("the tokenizer has no end-of-sequence token; the seq2seq target ends with one")
    limit = context_limit(lm)
    out = []
    for r in rows:
        r = int(r)
        item_id = str(table["id"].iat[r])
        target = cot_answer(str(table["reasoning"].iat[r]), gold(r))
        e = encode_item(lm.tokenizer, render_cot([], str(table["question"].iat[r]), PROMPT_ID), [target], lm.rules,
                        item_id)
        e.choices[0].append(int(eos))
        n = len(e.prompt) + len(e.choices[0])
        if limit is not None and n > limit:
            raise ProbekitError(f"training item {item_id!r}: prompt and target are {n} tokens, more than the model's "
                                f"context of {limit}")
        out.append(e)
    return out


@contextmanager
def tuned(lm, encoded: Sequence[Encoded], recipe, seed: int, *, quantize: str | None = None,
          max_updates: int | None = None, on_update=None) -> Iterator:
    """Inside the block ``lm.model`` carries fresh adapters (from ``seed``) trained on ``encoded``
    with the seq2seq objective; yields the :class:`~probekit.finetune.train.TrainLog`. The adapters
    are removed on exit, leaving the base model unchanged."""
    from probekit.finetune.train import attach_lora, detach_lora, train_adapters

    peft_model = attach_lora(lm, recipe, seed)
    try:
        yield train_adapters(lm, peft_model, encoded, None, recipe, seed, quantize=quantize, objective="seq2seq",
                             max_updates=max_updates, on_update=on_update)
    finally:
        detach_lora(lm, peft_model)
