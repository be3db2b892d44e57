"""Tokenisation of prompts and answers (docs/protocol.md §2).

Each (item, choice) sequence is ``[BOS if the tokenizer adds one by default] + enc(prompt) +
enc(answer)``, with the prompt and the answer encoded separately and without special tokens.

The space between ``Answer:`` and the answer comes from the tokenizer: a SentencePiece tokenizer
with a dummy prefix (Llama) puts it in front of the answer's first piece; a byte-level BPE
tokenizer (GPT-2 style: SmolLM2, Llama-3, Mistral-Nemo...) has no dummy prefix, and neither has
Gemma's SentencePiece tokenizer (``" carbon"`` is ``▁carbon``, ``"carbon"`` is ``carbon``), so the
answer is encoded as ``" " + choice``. :func:`adds_dummy_prefix` tells the two apart by comparing
encodings. BOS is kept when the tokenizer adds it by default (Gemma needs it; SmolLM2 adds none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
