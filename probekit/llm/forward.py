"""The packed forward every LLM-side method runs: prompt and choices in one row, a shared prefix once.

For every item the prompt runs once and its choices are scored as continuations of it. Each item
becomes ONE packed row: ``prompt + choice_0 + choice_1 + ...`` with a 4-D attention mask in which
the prompt is causal, each choice attends to the whole prompt and causally to itself (never to
another choice), and the position ids of every choice continue from the end of the prompt. Rows
are right-padded and several items run in one forward. This is the same computation as running
``prompt + choice_j`` separately for every j (the tests' reference, ``tests/reference.py``), with
the prompt's work done once instead of once per choice (docs/protocol.md §3, §5). Sliding-window
layers (Gemma 3) get the same mask with their window applied by position id (:func:`attention_masks`);
the output projection runs only at the positions that predict an answer token (:func:`choice_sums`).

An optional :class:`Prefix` (e.g. the k-shot demonstrations of an ICL draw, a chain-of-thought
prompt's shared start) is run once; its key/value cache is reused by every batch that continues it.

:func:`score_choices` is the differentiable choice score fine-tuning trains on; the cache pipeline
keeps hidden states from the same :func:`packed_forward`
(:func:`probekit.extract.capture.capture_batch`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probekit.errors import ProbekitError
from probekit.llm.tokens import Encoded


@dataclass
class Prefix:
    """A token prefix shared by every row (k-shot demonstrations), run once; its KV cache is reused."""

    ids: list[int]
    cache: Any

    def __len__(self) -> int:
        return len(self.ids)


def model_parts(lm):
    """(decoder body, output projection) of a loaded model; refused for an attention implementation
    that ignores the packed 4-D mask."""
    model = lm.model
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    if impl.startswith("flash"):
        raise ProbekitError(
            f"attention implementation {impl!r} ignores the packed 4-D attention mask; load the model with sdpa or eager"
        )
    base = getattr(model, model.base_model_prefix, None) if getattr(model, "base_model_prefix", "") else None
    if base is None:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    return base, head


def _compute_dtype(lm):
    import torch

    w = lm.model.get_input_embeddings().weight
    return w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def hidden_request(layers: list[int] | None):
    """The ``output_hidden_states`` argument that keeps ``layers`` (only those, where transformers can)."""
    if not layers:
        return False
    try:
        from transformers.utils import output_capturing

        if hasattr(output_capturing, "selected_hidden_states"):
            return list(layers)  # only these entries of the tuple are kept
    except ImportError:
        pass
    return True


def _logprobs_at(lm, head, hidden, targets, rows=None):
    """log p(target) from final hidden states: the output projection of ``hidden`` (U, d), then for
    every target its row (``rows``, default one row per target) -> (N,) float32 on their device
    (differentiable)."""
    import torch

    logits = head(hidden).float()
    cfg = lm.model.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    lp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(lp.shape[0], device=lp.device) if rows is None else rows.to(lp.device)
    return lp[rows, targets.to(lp.device)]


def no_grad(fn):
    """Run ``fn`` under ``torch.inference_mode`` (no autograd bookkeeping, nothing global changed)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@no_grad
def compute_prefix(lm, ids: Sequence[int]) -> Prefix:
    """Run a shared prefix once (batch of one) and keep its key/value cache.

    The cache keeps every key of every layer (a model's own cache would keep only the last window of
    a sliding-attention layer), so the packed rows that continue it see the keys their mask allows.
    """
    import torch
    from transformers import DynamicCache

    base, _ = model_parts(lm)
    ids_t = torch.tensor([list(ids)], dtype=torch.long, device=lm.device)
    out = base(input_ids=ids_t, use_cache=True, past_key_values=DynamicCache())
    return Prefix(ids=list(ids), cache=out.past_key_values)


def expanded_cache(prefix: Prefix, b: int):
    """A copy of a prefix's key/value cache for a batch of ``b`` rows."""
    cache = copy.deepcopy(prefix.cache)
    if b > 1:
        cache.batch_repeat_interleave(b)
    return cache


def pack_batch(batch: Sequence[Encoded], pad_id: int, offset: int = 0):
    """Packed rows ``prompt + choice_0 + ...``: ids, position ids, segment ids (-1 pad, 0 prompt, j+1 choice j), choice starts."""
    b = len(batch)
    width = max(e.n_tokens_shared for e in batch)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    seg = np.full((b, width), -1, dtype=np.int64)
    starts: list[list[int]] = []
    for i, e in enumerate(batch):
        p = len(e.prompt)
        ids[i, :p] = e.prompt
        pos[i, :p] = offset + np.arange(p)
        seg[i, :p] = 0
        o, row = p, []
        for j, c in enumerate(e.choices):
            t = len(c)
            ids[i, o:o + t] = c
            pos[i, o:o + t] = offset + p + np.arange(t)
            seg[i, o:o + t] = j + 1
            row.append(o)
            o += t
        pos[i, o:] = pos[i, o - 1] if o > 0 else 0
        starts.append(row)
    return ids, pos, seg, starts


def packed_mask(seg, prefix_len: int, dtype, pos=None, window: int | None = None):
    """Additive 4-D mask (b, 1, S, prefix_len + S): prompt causal, each choice sees the prompt and itself.

    With ``window`` (a sliding-attention layer's window) a query also sees only the keys whose position
    id is less than ``window`` before its own (``pos``: the rows' position ids; the prefix holds
    positions ``0..prefix_len-1``), as such a layer does in a plain forward.
    """
    import torch

    seg_t = torch.as_tensor(seg)
    b, s = seg_t.shape
    q, k = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None]
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    eye = torch.eye(s, dtype=torch.bool)[None].expand(b, s, s)
    allowed = torch.where(q < 0, eye, allowed)  # padding rows see only themselves (no all-masked row)
    if prefix_len:
        allowed = torch.cat([torch.ones(b, s, prefix_len, dtype=torch.bool), allowed], dim=2)
    if window is not None:
        pos_t = torch.as_tensor(pos)
        keys = torch.cat([torch.arange(prefix_len).expand(b, prefix_len), pos_t], dim=1)
        allowed = allowed & (pos_t[:, :, None] - keys[:, None, :] < window)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def sliding_window(lm) -> tuple[int | None, bool]:
    """(window, hybrid): the sliding-attention window of the model's layers (None: every layer attends
    to all earlier tokens), and whether only some layers slide (the model then takes one mask per layer
    type, as Gemma 3: five sliding layers to one full layer)."""
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ProbekitError(f"layer type(s) {', '.join(unknown)} of {type(lm.model).__name__}: the packed attention "
                            "mask knows full and sliding attention only")
    if not window or (types and "sliding_attention" not in types):
        return None, False
    return int(window), bool(types) and "full_attention" in types


def attention_masks(lm, seg, pos, prefix_len: int, dtype=None):
    """The packed mask in the form the model's forward takes: one tensor (:func:`packed_mask`, with the
    sliding window when every layer slides), or for a model whose layers differ a mapping from layer
    type to its mask."""
    dtype = _compute_dtype(lm) if dtype is None else dtype
    window, hybrid = sliding_window(lm)
    if not hybrid:
        return packed_mask(seg, prefix_len, dtype, pos, window).to(lm.device)
    return {"full_attention": packed_mask(seg, prefix_len, dtype).to(lm.device),
            "sliding_attention": packed_mask(seg, prefix_len, dtype, pos, window).to(lm.device)}


def choice_targets(batch: Sequence[Encoded], p_end: Sequence[int], starts):
    """Flat (row, predictor position, target id, item, choice) for every choice token."""
    rows, poss, tgts, owner_i, owner_j = [], [], [], [], []
    for i, e in enumerate(batch):
        for j, c in enumerate(e.choices):
            s0 = starts[i][j]
            for t, tok in enumerate(c):
                rows.append(i)
                poss.append(p_end[i] if t == 0 else s0 + t - 1)
                tgts.append(tok)
                owner_i.append(i)
                owner_j.append(j)
    return rows, poss, tgts, owner_i, owner_j


def choice_sums(lm, head, last, rows, poss, tgts, oi, oj, b, max_choices, batch):
    """(b, max_choices) float64 tensor on ``last``'s device: each choice's summed token log-probs,
    -inf for padded choices. Differentiable: the training objective and the scores share it.

    The output projection runs once per position that predicts an answer token: not over the whole
    row, and once for the last prompt token that predicts every choice's first token."""
    import torch

    dev = last.device
    sums = torch.zeros(b * max_choices, dtype=torch.float64, device=dev)
    if rows:
        where, inverse = np.unique(np.stack([rows, poss], axis=1), axis=0, return_inverse=True)
        h = last[torch.as_tensor(where[:, 0], device=dev), torch.as_tensor(where[:, 1], device=dev)]
        lp = _logprobs_at(lm, head, h, torch.as_tensor(tgts), torch.as_tensor(inverse.reshape(-1))).double()
        flat = torch.as_tensor(np.asarray(oi) * max_choices + np.asarray(oj), device=dev)
        sums = sums.index_add(0, flat, lp)
    real = np.zeros((b, max_choices), dtype=bool)
    for i, e in enumerate(batch):
        real[i, :len(e.choices)] = True
    return torch.where(torch.as_tensor(real, device=dev), sums.view(b, max_choices), float("-inf"))


def check_fits(batch: Sequence[Encoded], max_choices: int) -> None:
    """Refuse an item with more than ``max_choices`` choices (one line naming it)."""
    for e in batch:
        if len(e.choices) > max_choices:
            raise ProbekitError(f"item {e.item_id!r} has {len(e.choices)} choices, more than max_choices={max_choices}")


def packed_forward(lm, batch: Sequence[Encoded], layers: Sequence[int] = (), prefix: Prefix | None = None):
    """One packed forward of a batch of items (gradients follow the caller's grad mode).

    Returns ``(out, p_end, starts)``: the decoder's output (``hidden_states`` when ``layers``),
    each item's last prompt position and each choice's first position.
    """
    import torch

    base, _ = model_parts(lm)
    plen = len(prefix) if prefix is not None else 0
    ids, pos, seg, starts = pack_batch(batch, lm.pad_id, offset=plen)
    dev = lm.device
    mask = attention_masks(lm, seg, pos, plen)
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        kwargs["past_key_values"] = expanded_cache(prefix, len(batch))
        kwargs["use_cache"] = True
    else:
        kwargs["use_cache"] = False
    out = base(
        input_ids=torch.as_tensor(ids, device=dev),
        attention_mask=mask,
        position_ids=torch.as_tensor(pos, device=dev),
        output_hidden_states=hidden_request(list(layers)),
        **kwargs,
    )
    return out, [len(e.prompt) - 1 for e in batch], starts


def score_choices(lm, batch: Sequence[Encoded], max_choices: int | None = None):
    """Each choice's summed answer-token log-prob given its prompt, from one packed forward:
    a (b, max_choices) float64 tensor, -inf for padded choices. Not wrapped in ``no_grad``: the
    fine-tuning objective backpropagates through it; wrap it in ``torch.inference_mode`` to score."""
    max_choices = max(len(e.choices) for e in batch) if max_choices is None else max_choices
    check_fits(batch, max_choices)
    _, head = model_parts(lm)
    out, p_end, starts = packed_forward(lm, batch)
    rows, poss, tgts, oi, oj = choice_targets(batch, p_end, starts)
    return choice_sums(lm, head, out.last_hidden_state, rows, poss, tgts, oi, oj, len(batch), max_choices, batch)
