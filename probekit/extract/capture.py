"""Hidden-state capture and choice scoring for the cache and ICL scoring (docs/protocol.md §3, §5).

Every batch runs through the packed forward of :mod:`probekit.llm.forward` (prompt once, its
choices as continuations, an optional shared :class:`~probekit.llm.forward.Prefix`); the capture
keeps, per item and requested layer of the ``hidden_states`` tuple (0 = embedding output, L = last,
after the final norm):

* ``answer_end``: the hidden state at the last token of prompt+choice, for every choice;
* ``question_end``: the hidden state at the last prompt token;
* per choice, the summed log-prob of its tokens given the prompt, and its token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probekit.errors import ProbekitError
from probekit.llm.forward import (
    Prefix,
    check_fits,
    choice_sums,
    choice_targets,
    model_parts,
    no_grad,
    packed_forward,
)
from probekit.llm.tokens import Encoded

SITES = ("answer_end", "question_end")


def resolve_sites(sites: str | Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    out = []
    for s in sites:
        if s not in SITES:
            raise ProbekitError(f"unknown site {s!r}; known sites: {', '.join(SITES)}")
        if s not in out:
            out.append(s)
    return out


@dataclass
class Captured:
    """What one batch yields (numpy, on the CPU)."""

    answer_end: np.ndarray | None  # (n_layers, b, C, d)
    question_end: np.ndarray | None  # (n_layers, b, d)
    choice_sum: np.ndarray  # (b, C) float32, -inf for padded choices
    choice_tokens: np.ndarray  # (b, C) int32, 0 for padded choices
    n_tokens: int  # tokens run through the model (padding excluded)


def score_arrays(lm, head, last, rows, poss, tgts, oi, oj, b, max_choices, batch):
    """Choice log-prob sums (float32, -inf padded) and token counts as numpy arrays."""
    choice_sum = choice_sums(lm, head, last, rows, poss, tgts, oi, oj, b, max_choices, batch)
    choice_sum = choice_sum.detach().float().cpu().numpy()
    choice_tokens = np.zeros((b, max_choices), dtype=np.int32)
    for i, e in enumerate(batch):
        choice_tokens[i, :len(e.choices)] = [len(c) for c in e.choices]
    return choice_sum, choice_tokens


@no_grad
def capture_batch(
    lm,
    batch: Sequence[Encoded],
    layers: Sequence[int],
    sites: Sequence[str],
    max_choices: int,
    prefix: Prefix | None = None,
) -> Captured:
    """Prefix-shared capture of a batch of items (one packed forward)."""
    check_fits(batch, max_choices)
    _, head = model_parts(lm)
    layers = list(layers) if sites else []
    out, p_end, starts = packed_forward(lm, batch, layers, prefix)
    b = len(batch)
    result = _gather_hidden(out, layers, sites, batch, p_end, starts, max_choices, lm.hidden_size)
    rows, poss, tgts, oi, oj = choice_targets(batch, p_end, starts)
    choice_sum, choice_tokens = score_arrays(lm, head, out.last_hidden_state, rows, poss, tgts, oi, oj, b, max_choices, batch)
    return Captured(result[0], result[1], choice_sum, choice_tokens, int(sum(e.n_tokens_shared for e in batch)))


def _gather_hidden(out, layers, sites, batch, p_end, starts, max_choices, d):
    import torch

    b = len(batch)
    ae = qe = None
    if not layers:
        return ae, qe
    hs = out.hidden_states
    if "answer_end" in sites:
        ae = np.zeros((len(layers), b, max_choices, d), dtype=np.float32)
        ri, pi, ii, jj = [], [], [], []
        for i, e in enumerate(batch):
            for j, c in enumerate(e.choices):
                ri.append(i)
                pi.append(starts[i][j] + len(c) - 1)
                ii.append(i)
                jj.append(j)
        for li, layer in enumerate(layers):
            h = hs[layer]
            vals = h[torch.as_tensor(ri, device=h.device), torch.as_tensor(pi, device=h.device)].float().cpu().numpy()
            ae[li, ii, jj] = vals
    if "question_end" in sites:
        qe = np.zeros((len(layers), b, d), dtype=np.float32)
        rows = torch.arange(b)
        cols = torch.as_tensor(p_end)
        for li, layer in enumerate(layers):
            h = hs[layer]
            qe[li] = h[rows.to(h.device), cols.to(h.device)].float().cpu().numpy()
    return ae, qe
