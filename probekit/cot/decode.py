"""Batched greedy decoding with a shared prompt prefix (docs/protocol.md §12).

The prompts of one draw share their demonstrations. The longest token prefix common to every
prompt runs once (:func:`probekit.extract.capture.compute_prefix`); each batch then continues a
copy of its key/value cache: ``[prefix][left padding][rest of the prompt]`` with the padding
masked out, so every row sees exactly its own prompt at the positions a lone run gives it, and
``model.generate`` decodes greedily from there. Rows are grouped by prompt length (little padding).

A row stops at the end-of-sequence token, after ``max_new_tokens``, or, with ``stop="answer"``,
at the first newline after "the answer is": the scoring rules cut the answer there
(:mod:`probekit.cot.answers`), so nothing after it could change a score.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

from probekit.cot.answers import TRIGGER
from probekit.errors import ProbekitError
from probekit.extract.capture import compute_prefix
from probekit.extract.icl import common_prefix
from probekit.extract.run import length_batches
from probekit.extract.tokens import Encoded

STOPS = ("answer", "none")


@dataclass
class Generation:
    """One row's continuation: token ids (end-of-sequence and padding removed), text, why it ended."""

    ids: list[int]
    text: str
    stopped: str  # "eos" | "answer" | "length"


def answer_complete(text: str) -> bool:
    """Whether ``text`` has a newline after its first "the answer is" (case-insensitive)."""
    low = text.lower()
    at = low.find(TRIGGER)
    return at >= 0 and "\n" in low[at + len(TRIGGER):]


class _AnswerLineStop:
    """Stopping criterion: a row is done once its continuation completes the answer line."""

    def __init__(self, tokenizer, start: int) -> None:
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(input_ids.shape[0]):
            if "\n" in self.tokenizer.decode(input_ids[i, -1:]):
                done[i] = answer_complete(self.tokenizer.decode(input_ids[i, self.start:], skip_special_tokens=True))
        return done


def context_limit(lm) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), if it states one."""
    value = getattr(lm.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_lengths(lm, prompts: Sequence[Sequence[int]], item_ids: Sequence[str], max_new_tokens: int) -> None:
    """One error line for the first prompt that, with ``max_new_tokens``, exceeds the model's context."""
    limit = context_limit(lm)
    if limit is None:
        return
    for ids, item in zip(prompts, item_ids):
        if len(ids) + max_new_tokens > limit:
            raise ProbekitError(
                f"item {item!r}: the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's context of {limit} tokens (use fewer demonstrations or a smaller --max-new-tokens)"
            )


def generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
             stop: str = "answer", bar=None) -> tuple[list[Generation], dict]:
    """Greedy continuations of token-id ``prompts`` (see the module docstring).

    Returns the generations in prompt order and counts: ``prefix_tokens`` (the shared prefix, run
    once), ``prompt_tokens`` (prompt tokens run, prefix once), ``new_tokens`` (generated tokens).
    ``bar.advance(rows, new_tokens)`` is called after every batch.
    """
    import torch

    if stop not in STOPS:
        raise ProbekitError(f"unknown stop rule {stop!r}: one of {', '.join(STOPS)}")
    if max_new_tokens < 1:
        raise ProbekitError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if not prompts:
        return [], {"prefix_tokens": 0, "prompt_tokens": 0, "new_tokens": 0, "seconds": 0.0}
    if any(len(p) == 0 for p in prompts):
        raise ProbekitError("a prompt encodes to no tokens")
    t0 = time.perf_counter()
    m = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # every row keeps a token to run
    prefix = compute_prefix(lm, list(prompts[0][:m])) if m > 0 else None
    rest = [Encoded(prompt=list(p[m:]), choices=[]) for p in prompts]
    eos = lm.tokenizer.eos_token_id
    ends = {t for t in (eos, lm.pad_id) if t is not None}
    out: list[Generation | None] = [None] * len(prompts)
    counts = {"prefix_tokens": m, "prompt_tokens": m, "new_tokens": 0}
    for idx in length_batches(rest, batch_size):
        b, width = len(idx), max(len(rest[i].prompt) for i in idx)
        ids = torch.full((b, m + width), lm.pad_id, dtype=torch.long)
        mask = torch.zeros((b, m + width), dtype=torch.long)
        ids[:, :m] = torch.tensor(prompts[0][:m], dtype=torch.long)
        mask[:, :m] = 1
        for row, i in enumerate(idx):
            p = rest[i].prompt
            ids[row, m + width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, m + width - len(p):] = 1
            counts["prompt_tokens"] += len(p)
        kwargs = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix.cache)
            if b > 1:
                cache.batch_repeat_interleave(b)
            kwargs["past_key_values"] = cache
        criteria = [_AnswerLineStop(lm.tokenizer, m + width)] if stop == "answer" else []
        with torch.inference_mode():
            seqs = lm.model.generate(
                input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=lm.pad_id, eos_token_id=eos,
                stopping_criteria=criteria, **kwargs)
        new = seqs[:, m + width:].tolist()
        n_new = 0
        for row, i in enumerate(idx):
            toks = new[row]
            cut = next((j for j, t in enumerate(toks) if t in ends), len(toks))
            kept = toks[:cut]
            text = lm.tokenizer.decode(kept, skip_special_tokens=True)
            if stop == "answer" and answer_complete(text):
                why = "answer"  # checked first: a stopped row is padded with the pad id, often the eos id
            elif cut < len(toks) and toks[cut] == eos:
                why = "eos"
            else:
                why = "length"
            out[i] = Generation(ids=kept, text=text, stopped=why)
            n_new += len(kept) + (why == "eos")
        counts["new_tokens"] += n_new
        if bar is not None:
            bar.advance(b, n_new)
    counts["seconds"] = time.perf_counter() - t0
    return out, counts
