"""LoRA adapters on a loaded model: attach fresh ones from a seed, train them, score with them.

The objective and the scores come from the same packed forward the cache's zero-shot scores use
(:func:`probekit.llm.forward.score_choices`): each item is its prompt once plus its choices as
continuations under a 4-D mask; a choice's score is the summed log-prob of its answer tokens, the
item's loss the NLL of the gold choice under a softmax over its choices.

PEFT injects the adapters into the loaded model's own modules, so the packed forward runs through
them unchanged; :func:`detach_lora` removes them again (the base weights are never changed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probekit.errors import ProbekitError
from probekit.finetune.recipe import Recipe, schedule
from probekit.llm.batches import length_batches
from probekit.llm.forward import score_choices
from probekit.llm.spec import check_trainable
from probekit.llm.tokens import Encoded

#: Training objectives: the gold choice's NLL over the item's choices, or a target sequence's token NLL.
OBJECTIVES = ("choices", "seq2seq")
#: Called after every optimizer update: (updates done, updates in all, that update's loss).
OnUpdate = Callable[[int, int, float], None]
#: Called after the updates named in ``checkpoints``, adapters' dropout off: (updates done).
OnCheckpoint = Callable[[int], None]


def lora_module_names(model) -> list[str]:
    """Short names of the modules LoRA can adapt (linear layers, quantized or not; not the output head)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, targets: Sequence[str]) -> None:
    """One line naming the model's LoRA-able modules when a target is not among them."""
    known = lora_module_names(model)
    if not known:
        raise ProbekitError(f"model {type(model).__name__} has no linear layers LoRA can adapt")
    missing = [t for t in targets if t not in known]
    if missing:
        raise ProbekitError(f"unknown target module(s) {', '.join(missing)}: this model's LoRA-able modules are "
                            f"{', '.join(known)}")


@contextmanager
def seeded(seed: int, device) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside the block, restored after it."""
    import torch

    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def attach_lora(lm, recipe: Recipe, seed: int):
    """Fresh LoRA adapters (A from ``seed``, B = 0) on ``lm.model``; returns the PEFT model.

    Only the adapters train; the base stays in eval mode (its own dropout off), the adapters'
    dropout is on during :func:`train_adapters`.
    """
    from peft import LoraConfig, get_peft_model

    check_targets(lm.model, recipe.target_modules)
    config = LoraConfig(task_type="CAUSAL_LM", r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                        target_modules=list(recipe.target_modules), bias="none", inference_mode=False)
    with seeded(seed, lm.device):
        peft_model = get_peft_model(lm.model, config)
    peft_model.eval()
    return peft_model


def detach_lora(lm, peft_model) -> None:
    """Remove the adapters: ``lm.model`` is the base model again, unchanged."""
    base = peft_model.unload()
    if base is not lm.model:
        lm.model = base
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(lm.model, attr):
            try:
                delattr(lm.model, attr)
            except AttributeError:
                pass
    lm.model.eval()
    lm.model.requires_grad_(False)


def adapter_parameters(model) -> list[tuple[str, Any]]:
    """The trainable (adapter) parameters, by name, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _set_adapter_dropout(model, on: bool) -> None:
    for name, module in model.named_modules():
        if ".lora_dropout." in f".{name}." or name.endswith("lora_dropout"):
            module.train(on)


def make_optimizer(model, recipe: Recipe, quantize: str | None, updates: int):
    """(optimizer, lr scheduler, its name): weight decay except norms and biases; linear decay of lr
    to ``final_lr_fraction`` of it at the last update."""
    import torch

    named = adapter_parameters(model)
    if not named:
        raise ProbekitError("the model has no trainable adapter parameters")
    exempt = [p for n, p in named if "norm" in n.lower() or "bias" in n.lower()]
    decay = [p for n, p in named if not ("norm" in n.lower() or "bias" in n.lower())]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    name = recipe.optimizer_for(quantize)
    if name == "adam8bit":
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.Adam8bit(groups, lr=recipe.lr)
        except Exception as exc:  # noqa: BLE001
            raise ProbekitError(f"optimizer adam8bit needs a working bitsandbytes: {str(exc).splitlines()[0]}") from None
    else:
        opt = torch.optim.AdamW(groups, lr=recipe.lr)
    drop = 1.0 - recipe.final_lr_fraction
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - drop * min(t, updates) / max(updates, 1))
    return opt, sched, name


def gold_nll(scores, labels):
    """Per-item NLL of the gold choice under a softmax over the item's choices (-inf = no choice)."""
    import torch

    logp = torch.log_softmax(scores, dim=-1)
    gold = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=scores.device)
    return -logp[torch.arange(len(gold), device=scores.device), gold]


def item_nll(lm, batch: Sequence[Encoded], labels, max_choices: int | None = None, objective: str = "choices"):
    """Per-item training loss of a batch from one packed forward (differentiable).

    ``objective="choices"``: NLL of the gold choice under a softmax over the item's choices.
    ``objective="seq2seq"``: each item has one continuation, its target (e.g. a chain of thought
    with its answer, :mod:`probekit.cot.tune`); the loss is the summed NLL of the target's tokens
    given the prompt, the prompt's own tokens not scored (``labels`` unused).
    """
    if objective not in OBJECTIVES:
        raise ProbekitError(f"unknown objective {objective!r}: choose {' or '.join(OBJECTIVES)}")
    scores = score_choices(lm, batch, max_choices)
    if objective == "seq2seq":
        return -scores[:, 0]
    return gold_nll(scores, labels)


@dataclass
class TrainLog:
    """What one fine-tune did: the loss of every update (mean over its items, before the step)."""

    losses: list[float] = field(default_factory=list)
    updates: int = 0
    epochs: int = 0
    effective_batch: int = 0
    optimizer: str = ""
    seconds: float = 0.0


def train_adapters(lm, model, encoded: Sequence[Encoded], labels, recipe: Recipe, seed: int, *,
                   quantize: str | None = None, on_update: OnUpdate | None = None,
                   max_updates: int | None = None, objective: str = "choices",
                   checkpoints: Collection[int] = (), on_checkpoint: OnCheckpoint | None = None) -> TrainLog:
    """Train the adapters of ``model`` (from :func:`attach_lora`) on ``encoded`` items with ``labels``.

    Each epoch visits the items in an order drawn from ``seed``; every update averages the loss
    (:func:`item_nll` with ``objective``; ``labels`` may be None for "seq2seq") over
    :func:`~probekit.finetune.recipe.schedule`'s effective batch. ``max_updates`` stops early
    (tests, benchmarks); the learning-rate schedule still spans the full run. After each update
    counted in ``checkpoints`` (and before the first, for 0) ``on_checkpoint(updates done)`` runs with
    the adapters' dropout off (to score the model as it is then); it draws no random numbers, so the
    run goes on exactly as without it.
    """
    import torch

    check_trainable(quantize, lm.device)
    if objective not in OBJECTIVES:
        raise ProbekitError(f"unknown objective {objective!r}: choose {' or '.join(OBJECTIVES)}")
    labels = np.zeros(len(encoded), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(labels) != len(encoded):
        raise ProbekitError(f"{len(encoded)} items but {len(labels)} labels")
    plan = schedule(len(encoded), recipe)
    max_choices = max(len(e.choices) for e in encoded)
    opt, sched, opt_name = make_optimizer(model, recipe, quantize, plan.updates)
    params = [p for _, p in adapter_parameters(model)]
    log = TrainLog(updates=0, epochs=plan.epochs, effective_batch=plan.effective_batch, optimizer=opt_name)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    stop = plan.updates if max_updates is None else min(plan.updates, max_updates)
    t0 = time.perf_counter()
    marks = {int(c) for c in checkpoints}

    def checkpoint() -> None:
        if on_checkpoint is not None and log.updates in marks:
            _set_adapter_dropout(model, False)
            on_checkpoint(log.updates)
            _set_adapter_dropout(model, True)

    _set_adapter_dropout(model, True)
    try:
        checkpoint()
        with seeded(seed + 1, lm.device), torch.enable_grad():
            for _ in range(plan.epochs):
                order = rng.permutation(len(encoded))
                for u in range(plan.updates_per_epoch):
                    if log.updates >= stop:
                        break
                    chunk = order[u * plan.effective_batch:(u + 1) * plan.effective_batch]
                    opt.zero_grad(set_to_none=True)
                    total = 0.0
                    for part in length_batches([encoded[i] for i in chunk], recipe.micro_batch):
                        idx = chunk[part]  # micro batches of similar length: less padding, same sum
                        loss = item_nll(lm, [encoded[i] for i in idx], labels[idx], max_choices,
                                        objective).sum() / len(chunk)
                        loss.backward()
                        total += float(loss.detach())
                    if log.updates == 0:
                        _check_gradients(params, quantize, lm.device)
                    torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                    opt.step()
                    sched.step()
                    log.losses.append(total)
                    log.updates += 1
                    if on_update is not None:
                        on_update(log.updates, stop, total)
                    checkpoint()
    finally:
        _set_adapter_dropout(model, False)
        opt.zero_grad(set_to_none=True)
    log.seconds = time.perf_counter() - t0
    return log


def library_versions() -> dict[str, str]:
    """The versions of the libraries a fine-tune ran on (torch, transformers, peft), as runs record them."""
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _check_gradients(params, quantize: str | None, device) -> None:
    """After the first backward pass some adapter gradient must be non-zero (LoRA's B always gets
    one); bitsandbytes' 4-bit layers on the CPU silently pass none back."""
    if not any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params):
        how = f"with quantize={quantize} on {device}" if quantize else f"on {device}"
        raise ProbekitError(f"no gradient reaches the adapters {how} (the quantized layers do not backpropagate "
                            "there); use --quantize none or 8bit on the CPU, or a GPU")


def score_items(lm, encoded: Sequence[Encoded], batch_size: int = 16, max_choices: int | None = None) -> np.ndarray:
    """Choice scores (summed answer-token log-probs) of every item with the model as it is now:
    (n, max_choices) float32, -inf for padded choices; packed batches of similar length."""
    import torch

    max_choices = max(len(e.choices) for e in encoded) if max_choices is None else max_choices
    out = np.full((len(encoded), max_choices), -np.inf, dtype=np.float32)
    with torch.inference_mode():
        for idx in length_batches(encoded, batch_size):
            out[idx] = score_choices(lm, [encoded[i] for i in idx], max_choices).float().cpu().numpy()
    return out
