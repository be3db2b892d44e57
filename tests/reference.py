"""Plain references the tests and benches compare the library's fast paths with (not part of the package).

* :func:`capture_naive`: every (item, choice) runs as its own left-padded sequence
  ``prompt + choice``, the computation :func:`probekit.extract.capture.capture_batch` does with
  the prompt shared by all choices;
* :func:`plain_forward`: a direct ``model(ids, output_hidden_states=True)`` of every
  ``prompt + choice``, its log-probs from the model's own logits;
* :func:`bare_forward`: the packed forward with no hidden states kept and nothing written, the
  floor the capture and the pipeline are measured against (``bench/extract.py``);
* :func:`full_head_forward`: the same with the output projection over every position, as a plain
  causal-LM forward computes it (``bench/extract.py`` measures what restricting it saves).

Tests import it as ``tests.reference`` (the repository root is on pytest's path); the bench puts
the repository root on ``sys.path`` first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probekit.extract.capture import Captured, score_arrays
from probekit.llm.forward import (
    attention_masks,
    check_fits,
    choice_sums,
    choice_targets,
    hidden_request,
    model_parts,
    no_grad,
    pack_batch,
)
from probekit.llm.tokens import Encoded


def plain_forward(lm, prompt, choices, tail_logits: bool = False):
    """Reference: a plain forward of every ``prompt + choice`` (right-padded, so real tokens never see
    padding); per choice the hidden-states tuple at its last token and at the last prompt token, and
    its summed log-prob from the model's logits. ``tail_logits`` asks the model for the logits of the
    positions from the last prompt token on only (``logits_to_keep``; a long prompt's logits over a
    262k vocabulary would take gigabytes); else it computes them at every position."""
    import torch

    seqs = [prompt + c for c in choices]
    width = max(map(len, seqs))
    p = len(prompt)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=lm.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=lm.device)
    keep = {"logits_to_keep": width - p + 1} if tail_logits else {}
    out = lm.model(ids, attention_mask=mask, output_hidden_states=True, **keep)
    assert out.logits.shape[1] == (width - p + 1 if tail_logits else width)
    lp = torch.log_softmax(out.logits[:, -(width - p + 1):].double(), -1)  # position p - 1 + t is row t
    result = []
    for j, c in enumerate(choices):
        last = [h[j, p + len(c) - 1].float().cpu().numpy() for h in out.hidden_states]
        q_end = [h[j, p - 1].float().cpu().numpy() for h in out.hidden_states]
        total = sum(lp[j, t, tok].item() for t, tok in enumerate(c))
        result.append((last, q_end, total))
    return result


def _naive_forward(lm, batch: Sequence[Encoded], layers: Sequence[int]):
    """Every (item, choice) as its own left-padded row ``prompt + choice``: (out, owners, width, targets)."""
    import torch

    base, _ = model_parts(lm)
    seqs, owners = [], []
    for i, e in enumerate(batch):
        for j, c in enumerate(e.choices):
            seqs.append(e.prompt + c)
            owners.append((i, j))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    pad = lm.pad_id
    ids = np.full((n, width), pad, dtype=np.int64)
    att = np.zeros((n, width), dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = s
        att[r, width - len(s):] = 1
        pos[r, width - len(s):] = np.arange(len(s))
    dev = lm.device
    out = base(
        input_ids=torch.as_tensor(ids, device=dev),
        attention_mask=torch.as_tensor(att, device=dev),
        position_ids=torch.as_tensor(pos, device=dev),
        output_hidden_states=hidden_request(list(layers)),
        use_cache=False,
    )
    rows, poss, tgts, oi, oj = [], [], [], [], []
    for r, (i, j) in enumerate(owners):
        t_len = len(batch[i].choices[j])
        for t, tok in enumerate(batch[i].choices[j]):
            rows.append(r)
            poss.append(width - t_len - 1 + t)
            tgts.append(tok)
            oi.append(i)
            oj.append(j)
    return out, owners, width, (rows, poss, tgts, oi, oj)


def score_choices_naive(lm, batch: Sequence[Encoded], max_choices: int | None = None):
    """Per-choice reference of :func:`probekit.llm.forward.score_choices` (differentiable)."""
    max_choices = max(len(e.choices) for e in batch) if max_choices is None else max_choices
    _, head = model_parts(lm)
    out, _, _, targets = _naive_forward(lm, batch, [])
    return choice_sums(lm, head, out.last_hidden_state, *targets, len(batch), max_choices, batch)


@no_grad
def capture_naive(
    lm, batch: Sequence[Encoded], layers: Sequence[int], sites: Sequence[str], max_choices: int
) -> Captured:
    """Reference path: every (item, choice) runs as its own left-padded sequence ``prompt + choice``."""
    check_fits(batch, max_choices)
    _, head = model_parts(lm)
    layers = list(layers) if sites else []
    out, owners, width, targets = _naive_forward(lm, batch, layers)
    b, d = len(batch), lm.hidden_size
    ae = np.zeros((len(layers), b, max_choices, d), dtype=np.float32) if "answer_end" in sites and layers else None
    qe = np.zeros((len(layers), b, d), dtype=np.float32) if "question_end" in sites and layers else None
    for li, layer in enumerate(layers):
        h = out.hidden_states[layer].float().cpu().numpy()
        for r, (i, j) in enumerate(owners):
            if ae is not None:
                ae[li, i, j] = h[r, -1]
            if qe is not None and j == 0:
                qe[li, i] = h[r, width - 1 - len(batch[i].choices[j])]
    choice_sum, choice_tokens = score_arrays(lm, head, out.last_hidden_state, *targets, b, max_choices, batch)
    return Captured(ae, qe, choice_sum, choice_tokens, int(sum(e.n_tokens_naive for e in batch)))


@no_grad
def bare_forward(lm, batch: Sequence[Encoded], scores: bool = True) -> int:
    """The packed forward with no hidden states kept and nothing written: the floor capture is measured against.

    With ``scores`` the choice log-probs are computed too (the logits a plain causal-LM forward
    gives, at the positions that score choices); without, only the transformer body runs.
    """
    import torch

    base, head = model_parts(lm)
    ids, pos, seg, starts = pack_batch(batch, lm.pad_id)
    dev = lm.device
    mask = attention_masks(lm, seg, pos, 0)
    out = base(input_ids=torch.as_tensor(ids, device=dev), attention_mask=mask,
               position_ids=torch.as_tensor(pos, device=dev), use_cache=False)
    if scores:
        p_end = [len(e.prompt) - 1 for e in batch]
        rows, poss, tgts, oi, oj = choice_targets(batch, p_end, starts)
        score_arrays(lm, head, out.last_hidden_state, rows, poss, tgts, oi, oj, len(batch),
                max(len(e.choices) for e in batch), batch)
    return int(sum(e.n_tokens_shared for e in batch))


@no_grad
def full_head_forward(lm, batch: Sequence[Encoded]) -> int:
    """:func:`bare_forward` with the output projection over every position of every row, as a plain
    causal-LM forward computes it (``model(...).logits``), and the choice log-probs taken from those
    logits: what the capture's projection at the scored positions alone saves (``bench/extract.py``)."""
    import torch

    ids, pos, seg, starts = pack_batch(batch, lm.pad_id)
    dev = lm.device
    out = lm.model(input_ids=torch.as_tensor(ids, device=dev), attention_mask=attention_masks(lm, seg, pos, 0),
                   position_ids=torch.as_tensor(pos, device=dev), use_cache=False)
    rows, poss, tgts, _, _ = choice_targets(batch, [len(e.prompt) - 1 for e in batch], starts)
    logits = out.logits[torch.as_tensor(rows, device=dev), torch.as_tensor(poss, device=dev)].float()
    torch.log_softmax(logits, -1).gather(1, torch.as_tensor(tgts, device=dev)[:, None])
    return int(sum(e.n_tokens_shared for e in batch))
