"""Tokenisation of prompts and answers (docs/protocol.md §2).

Each (item, choice) sequence is ``[BOS if the tokenizer adds one by default] + enc(prompt) +
enc(answer)``, with the prompt and the answer encoded separately and without special tokens.

The space between ``Answer:`` and the answer comes from the tokenizer: a SentencePiece tokenizer
with a dummy prefix (Llama) puts it in front of the answer's first piece; a byte-level BPE
tokenizer (GPT-2 style: SmolLM2, Llama-3, Mistral-Nemo...) has no dummy prefix, and neither has
Gemma's SentencePiece tokenizer (``" carbon"`` is ``▁carbon``, ``"carbon"`` is ``carbon``), so the
answer is encoded as ``" " + choice``. :func:`adds_dummy_prefix` tells the two apart by comparing
encodings. BOS is kept when the tokenizer adds it by default (Gemma needs it; SmolLM2 adds none).

:func:`check_context` runs once a model is loaded, before the first item is scored: a prompt that,
with its longest choice, does not fit the model's context (``max_position_embeddings``) is refused,
naming the item and its length. Long prompts are refused rather than truncated: a truncated question
is another question, and its scores would be passed off as the item's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from probekit.data.prompts import render_prompt
from probekit.errors import ProbekitError

_PROBE_WORD = "carbon dioxide"


@dataclass
class Encoded:
    """One item, tokenised: the prompt ids (BOS included) and each choice's ids."""

    prompt: list[int]
    choices: list[list[int]]
    item_id: str = ""

    @property
    def n_tokens_naive(self) -> int:
        """Tokens a per-choice pass runs: the prompt once per choice plus every choice."""
        return len(self.prompt) * len(self.choices) + sum(len(c) for c in self.choices)

    @property
    def n_tokens_shared(self) -> int:
        """Tokens a prefix-shared pass runs: the prompt once plus every choice."""
        return len(self.prompt) + sum(len(c) for c in self.choices)


@dataclass
class TokenRules:
    """How a tokenizer is used: BOS id (or None) and whether answers need an explicit leading space."""

    bos_id: int | None
    dummy_prefix: bool
    pad_id: int

    def describe(self) -> dict:
        return {"bos_id": self.bos_id, "dummy_prefix": self.dummy_prefix, "answer_prefix": "" if self.dummy_prefix else " "}


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_dummy_prefix(tokenizer: Any) -> bool:
    """True when the tokenizer encodes a bare word as if a space preceded it (SentencePiece dummy prefix)."""
    bare, spaced = _enc(tokenizer, _PROBE_WORD), _enc(tokenizer, " " + _PROBE_WORD)
    if bare == spaced:
        return True
    first = tokenizer.convert_ids_to_tokens(bare[:1])
    return bool(first) and isinstance(first[0], str) and first[0].startswith("\u2581")


def default_bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer prepends it by default, else None."""
    plain = list(tokenizer("x")["input_ids"])
    bare = _enc(tokenizer, "x")
    if len(plain) > len(bare) and plain[0] == tokenizer.bos_token_id and plain[1:1 + len(bare)] == bare:
        return int(plain[0])
    return None


def token_rules(tokenizer: Any) -> TokenRules:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenRules(bos_id=default_bos(tokenizer), dummy_prefix=adds_dummy_prefix(tokenizer), pad_id=int(pad))


def answer_text(choice: str, rules: TokenRules) -> str:
    """The string encoded for an answer continuation: the choice, with a leading space for BPE tokenizers."""
    return str(choice) if rules.dummy_prefix else " " + str(choice)


def encode_prompt(tokenizer: Any, prompt: str, rules: TokenRules) -> list[int]:
    ids = _enc(tokenizer, prompt)
    return ([rules.bos_id] if rules.bos_id is not None else []) + ids


def encode_item(
    tokenizer: Any, prompt: str, choices: Sequence[str], rules: TokenRules, item_id: str = ""
) -> Encoded:
    """Tokenise one item: prompt ids (with BOS when default) and each choice's continuation ids."""
    p = encode_prompt(tokenizer, prompt, rules)
    cs = []
    for j, c in enumerate(choices):
        ids = _enc(tokenizer, answer_text(c, rules))
        if not ids:
            raise ProbekitError(f"item {item_id!r}: choice {j} ({c!r}) encodes to no tokens")
        cs.append(ids)
    if not p:
        raise ProbekitError(f"item {item_id!r}: the prompt encodes to no tokens")
    return Encoded(prompt=p, choices=cs, item_id=item_id)


def encode_rows(lm, table, template: str, rules: TokenRules) -> list[Encoded]:
    """Every row of an item table (id, question, choices) rendered with ``template`` and tokenised."""
    out = []
    for row in table[["id", "question", "choices"]].itertuples(index=False):
        choices = [str(c) for c in row.choices]
        out.append(encode_item(lm.tokenizer, render_prompt(str(row.question), choices, template), choices, rules, str(row.id)))
    return out


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to every sequence."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        m = 0
        while m < n and s[m] == first[m]:
            m += 1
        n = m
    return n


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
