"""Prompt templates of the paper's code (docs/protocol.md §2), zero-shot and k-shot, and a cloze template.

Two templates are the paper's:

``"0040"`` (ARC, MMLU, multiple choice from a file)::

    Question: {q} \\nA) {c0}\\nB) {c1}\\nC) {c2}\\nD) {c3}\\nAnswer:

Note the space before the first ``\\n``. Choices are lettered A), B), ... up to the number of
answers. The reference code strips the trailing space after ``Answer:`` for models named "llama";
probekit always renders the prompt without it and lets the tokenizer supply the space before the
answer (see :func:`probekit.llm.tokens.answer_text`): a SentencePiece tokenizer adds it with
its dummy prefix, a byte-level BPE tokenizer (GPT-2 style, e.g. SmolLM2) gets ``" " + choice``.
Either way the answer word is tokenised as a word that follows a space, which is what the
paper's Llama runs saw.

``"0306"`` (StrategyQA)::

    Q: {q}\\nA:

``"cloze"`` (an option for any set, ``probekit extract --template cloze``): the question alone, no
choices listed, the answer text scored as its continuation::

    Question: {q}\\nAnswer:

k-shot (``render_kshot``): each demonstration is rendered with the gold answer *text* and an extra
space before the label line (``... \\nAnswer: {gold}`` for "0040", ``Q: {q} \\nA: {gold}`` for
"0306"; for "cloze" ``Question: {q}\\nAnswer: {gold}``, without that space); demonstrations are joined
by ``\\n\\n`` and ``\\n\\n`` precedes the test item.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from probekit.errors import ProbekitError

TEMPLATES = ("0040", "0306", "cloze")
LETTERS = string.ascii_uppercase

#: Human-readable template text recorded in cache manifests.
TEMPLATE_TEXT = {
    "0040": "Question: {question} \\nA) {choice_0}\\nB) {choice_1}\\n...\\nAnswer:",
    "0306": "Q: {question}\\nA:",
    "cloze": "Question: {question}\\nAnswer:",
}


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ProbekitError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


def _choices_block(choices: Sequence[str]) -> str:
    if len(choices) > len(LETTERS):
        raise ProbekitError(f"{len(choices)} answer choices; at most {len(LETTERS)} can be lettered")
    return "".join(f"\n{LETTERS[i]}) {c}" for i, c in enumerate(choices))


def render_prompt(question: str, choices: Sequence[str] = (), template: str = "0040") -> str:
    """The zero-shot test prompt (no trailing space); the answer is appended as a continuation."""
    _check_template(template)
    if template == "0040":
        if len(choices) == 0:
            raise ProbekitError("template 0040 needs answer choices")
        return f"Question: {question} {_choices_block(choices)}\nAnswer:"
    if template == "cloze":
        return f"Question: {question}\nAnswer:"
    return f"Q: {question}\nA:"


def render_example(question: str, choices: Sequence[str], answer: str, template: str = "0040") -> str:
    """One k-shot demonstration with its gold answer text (note the space before the label line)."""
    _check_template(template)
    if template == "0040":
        return f"Question: {question} {_choices_block(choices)} \nAnswer: {answer}"
    if template == "cloze":
        return f"Question: {question}\nAnswer: {answer}"
    return f"Q: {question} \nA: {answer}"


def render_kshot(
    examples: Sequence[tuple[str, Sequence[str], str]],
    question: str,
    choices: Sequence[str] = (),
    template: str = "0040",
) -> str:
    """k demonstrations ``(question, choices, gold answer text)`` joined by blank lines, then the test prompt."""
    test = render_prompt(question, choices, template)
    if not examples:
        return test
    demos = "\n\n".join(render_example(q, c, a, template) for q, c, a in examples)
    return demos + "\n\n" + test


# --------------------------------------------------------------------------- chain of thought
#: The paper's instruction 5 ("5305"), its zero-shot chain-of-thought prompt for GSM8k; "0305"
#: (StrategyQA zero-shot, and every k-shot CoT prompt) has no instruction.
COT_INSTRUCTIONS = {
    "5305": ("This worksheet contain math word problems. Here's an example:\nQ: [question text here].\n"
             "A: Let's think step by step.\n1. [step one]\n2. [step two]\n...\nN. [last step]\n"
             "Therefore, the answer is [answer here]\n\nNow you try!\n"),
    "0305": "",
}
COT_TEMPLATE_TEXT = "[instruction\\n]Q: {question}\\nA: {reasoning} So the answer is {answer}\\n\\n...Q: {question}\\nA:"


def cot_answer(reasoning: str, answer: str) -> str:
    """A worked answer: ``{reasoning} So the answer is {answer}`` (a demonstration's answer, and the
    target of fine-tuning on chains of thought)."""
    return f"{reasoning} So the answer is {answer}"


def render_cot_example(question: str, reasoning: str, answer: str) -> str:
    """One chain-of-thought demonstration: ``Q: {question}\\nA: {reasoning} So the answer is {answer}``."""
    return f"Q: {question}\nA: {cot_answer(reasoning, answer)}"


def render_cot(examples: Sequence[tuple[str, str, str]], question: str, prompt_id: str = "0305") -> str:
    """A chain-of-thought prompt: the instruction of ``prompt_id`` (then a newline), k demonstrations
    ``(question, reasoning, answer)`` joined by blank lines, a blank line, and ``Q: {question}\\nA:``."""
    if prompt_id not in COT_INSTRUCTIONS:
        raise ProbekitError(f"unknown chain-of-thought prompt {prompt_id!r}; known: {', '.join(COT_INSTRUCTIONS)}")
    body = f"Q: {question}\nA:"
    if examples:
        body = "\n\n".join(render_cot_example(q, r, a) for q, r, a in examples) + "\n\n" + body
    instruction = COT_INSTRUCTIONS[prompt_id]
    return instruction + "\n" + body if instruction else body
