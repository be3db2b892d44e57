"""Batched greedy decoding with a shared prompt prefix (docs/protocol.md §12).

The prompts of one draw share their demonstrations. The longest token prefix common to every
prompt runs once (:func:`probekit.llm.forward.compute_prefix`); each batch then continues a
copy of its key/value cache: ``[prefix][left padding][rest of the prompt]`` with the padding
masked out, so every row sees exactly its own prompt at the positions a lone run gives it, and
decoding is greedy from there, step by step as ``model.generate`` does, each row leaving the batch
(and its keys the cache) as soon as it ends. Rows are grouped by prompt length (little padding).
With ``part=(j, s)`` only every s-th of those batches runs, from the j-th: s processes sharing one
set of prompts run the same batches on the same shared prefix as one process does.

A row stops at the end-of-sequence token, after ``max_new_tokens``, or, with ``stop="answer"``,
at the first newline after "the answer is": the scoring rules cut the answer there
(:mod:`probekit.cot.answers`), so nothing after it could change a score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from probekit.cot.answers import TRIGGER
from probekit.errors import ProbekitError
from probekit.llm.batches import length_batches
from probekit.llm.forward import compute_prefix, expanded_cache
from probekit.llm.tokens import Encoded, common_prefix, context_limit

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


def _greedy(lm, ids, mask, cache, max_new_tokens: int, stop: str, ends: set[int]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each row's tokens up to and including its last.

    The steps of ``model.generate(do_sample=False)`` (positions from the attention mask, one token
    per step on the key/value cache), except that a finished row leaves the batch at once: its keys
    are dropped from the cache, so the rows still running do not pay for the finished ones (with a
    long shared prefix, copying and attending over the cache is most of a step's cost). A row ends
    at a token of ``ends`` (end of sequence, padding), after ``max_new_tokens``, or, with
    ``stop="answer"``, at the token that completes its answer line.
    """
    import torch

    model, tok = lm.model, lm.tokenizer
    b = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    live = torch.arange(b)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    done_len = cache.get_seq_length()  # the shared prefix, already run
    step_ids, step_pos = ids[:, done_len:], positions[:, done_len:]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1, :]
            nxt = logits.argmax(-1)
            keep = []
            for j, t in enumerate(nxt.tolist()):
                row = out[int(live[j])]
                row.append(t)
                done = t in ends or len(row) >= max_new_tokens
                if not done and stop == "answer" and "\n" in tok.decode([t]):
                    done = answer_complete(tok.decode(row, skip_special_tokens=True))
                if not done:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep)  # on the CPU: it indexes the cache on every device of a device map
                live, nxt, mask, positions = live[keep], nxt[sel], mask[sel], positions[sel]
                cache.batch_select_indices(sel)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            positions = positions[:, -1:] + 1
            step_ids, step_pos = nxt[:, None], positions
    return out


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


def batch_rows(prompts: Sequence[Sequence[int]], batch_size: int, part: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """The batches :func:`generate` runs, as prompt indices: grouped by prompt length
    (:func:`probekit.llm.batches.length_batches`); with ``part=(j, s)`` the batches j, j+s, j+2s, ...
    (the s parts are disjoint and together every batch)."""
    j, s = part
    if not (isinstance(s, int) and s >= 1 and isinstance(j, int) and 0 <= j < s):
        raise ProbekitError(f"part must be (j, s) with 0 <= j < s, got {part!r}")
    return length_batches([Encoded(prompt=list(p), choices=[]) for p in prompts], batch_size)[j::s]


def generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 8,
             stop: str = "answer", bar=None, part: tuple[int, int] = (0, 1)) -> tuple[list[Generation | None], dict]:
    """Greedy continuations of token-id ``prompts`` (see the module docstring).

    Returns the generations in prompt order and counts: ``prefix_tokens`` (the shared prefix, run
    once), ``prompt_tokens`` (prompt tokens run, prefix once), ``new_tokens`` (generated tokens).
    ``bar.advance(rows, new_tokens)`` is called after every batch. ``part=(j, s)``: run only those
    batches of :func:`batch_rows` (the shared prefix is still that of every prompt); the other rows'
    generations are None.
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
    batches = batch_rows(prompts, batch_size, part)  # by length: the same order as by length after the prefix
    m = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # every row keeps a token to run
    prefix = compute_prefix(lm, list(prompts[0][:m])) if m > 0 and batches else None
    rest = [Encoded(prompt=list(p[m:]), choices=[]) for p in prompts]
    eos = lm.tokenizer.eos_token_id
    ends = {t for t in (eos, lm.pad_id) if t is not None}
    out: list[Generation | None] = [None] * len(prompts)
    counts = {"prefix_tokens": m, "prompt_tokens": m, "new_tokens": 0}
    for idx in batches:
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
        cache = expanded_cache(prefix, b) if prefix is not None else None
        new = _greedy(lm, ids.to(lm.device), mask.to(lm.device), cache, max_new_tokens, stop, ends)
        n_new = 0
        for row, i in enumerate(idx):
            toks = new[row]
            cut = next((j for j, t in enumerate(toks) if t in ends), len(toks))
            kept = toks[:cut]
            text = lm.tokenizer.decode(kept, skip_special_tokens=True)
            if stop == "answer" and answer_complete(text):
                why = "answer"
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
