"""The fine-tuning recipe and its optimisation schedule.

Defaults are the easy-to-hard study's QLoRA setup (the authors' ``utils.PEFT_wrap_model``,
``probes.Probe.finetune`` and ``utils.standardize_optimization_config``):

- LoRA r=16, alpha=32, dropout 0.1 on the attention query and value projections (``q_proj``,
  ``v_proj``), no LoRA bias; the base model's own dropout stays off;
- Adam: AdamW, or bitsandbytes' 8-bit Adam on an 8-bit base; lr 1e-4; weight decay 1e-5 except
  norms and biases; the learning rate decays linearly to 10% of its start over the run (no
  warm-up); gradients clipped to norm 1.0 before each update;
- an update averages the loss over min(n_train, 50) items (gradient accumulation over micro
  batches of ``micro_batch`` items); 3 epochs, raised until there are at least 10 updates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from probekit.errors import OptionError, ProbekitError

OPTIMIZERS = ("auto", "adamw", "adam8bit")
#: The least updates of a fine-tune on chains of thought (the ``seq2seq`` objective): the authors
#: multiply their minimum of 10 by 15 for their CoT runs (``run_jobs.py``).
SEQ2SEQ_MIN_UPDATES = 150
OBJECTIVE_TEXT = {
    "choices": "NLL of the gold choice under a softmax over the item's choices, each scored by the summed log-prob "
               "of its answer tokens given the prompt (packed: prompt once, choices as continuations under a 4-D "
               "mask); no L2",
    "seq2seq": "summed NLL of the target's tokens (' {reasoning} So the answer is {answer}' then end-of-sequence) "
               "given the prompt, prompt tokens not scored; an update averages it over items; no L2",
}


@dataclass(frozen=True)
class Recipe:
    """Every setting of one fine-tune (see the module docstring for the defaults' origin)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 1e-4
    weight_decay: float = 1e-5
    final_lr_fraction: float = 0.1
    max_grad_norm: float = 1.0
    max_batch: int = 50
    epochs: int = 3
    min_updates: int = 10
    micro_batch: int = 8
    eval_batch: int = 16
    optimizer: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules",
                               tuple(m.strip() for m in self.target_modules.split(",") if m.strip()))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("r", "alpha", "max_batch", "epochs", "micro_batch", "eval_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(name, value, "a positive integer")
        if isinstance(self.min_updates, bool) or not isinstance(self.min_updates, int) or self.min_updates < 0:
            raise OptionError("min_updates", self.min_updates, "a non-negative integer")
        for name, ok, rule in (("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"), ("lr", self.lr > 0, "positive"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("max_grad_norm", self.max_grad_norm > 0, "positive"),
                               ("final_lr_fraction", 0.0 <= self.final_lr_fraction <= 1.0, "in [0, 1]")):
            if not (ok and math.isfinite(getattr(self, name))):
                raise OptionError(name, getattr(self, name), rule)
        if not self.target_modules:
            raise OptionError("target_modules", ",".join(self.target_modules), "at least one module name (e.g. q_proj,v_proj)")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")

    def optimizer_for(self, quantize: str | None) -> str:
        """The optimizer ``auto`` stands for: 8-bit Adam on an 8-bit base, AdamW otherwise."""
        if self.optimizer != "auto":
            return self.optimizer
        return "adam8bit" if quantize == "8bit" else "adamw"

    def describe(self, objective: str = "choices") -> dict[str, Any]:
        """The settings as recorded in a run's JSON, with the fixed parts of the recipe spelled out."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        out.update({
            "lora_bias": "none", "warmup_updates": 0, "schedule": "linear decay to final_lr_fraction * lr",
            "decay_exempt": "parameters whose name contains 'norm' or 'bias'",
            "objective": OBJECTIVE_TEXT[objective],
            "batch": "an update averages over min(n_train, max_batch) items; micro batches accumulate",
            "epochs_rule": "epochs raised until updates >= min_updates",
        })
        return out


@dataclass(frozen=True)
class Schedule:
    """How many items an update averages over, updates per epoch, epochs and updates in all."""

    effective_batch: int
    updates_per_epoch: int
    epochs: int
    updates: int


def schedule(n_train: int, recipe: Recipe) -> Schedule:
    """The optimisation schedule of ``n_train`` items (``standardize_optimization_config``)."""
    if n_train < 1:
        raise ProbekitError(f"n_train must be at least 1, got {n_train}")
    batch = min(n_train, recipe.max_batch)
    per_epoch = math.ceil(n_train / batch)
    epochs = recipe.epochs
    if per_epoch * epochs < recipe.min_updates:
        epochs = math.ceil(recipe.min_updates / per_epoch)
    return Schedule(batch, per_epoch, epochs, per_epoch * epochs)


def recipe_with(pairs: list[str] | tuple[str, ...] = (), **defaults: Any) -> Recipe:
    """A :class:`Recipe` from ``defaults`` and ``KEY=VALUE`` overrides (``lr=2e-4``, ``micro_batch=4``,
    ``target_modules=q_proj,k_proj``); one clear error for an unknown key or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    values = dict(defaults)
    for pair in pairs:
        key, sep, text = str(pair).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ProbekitError(f"recipe setting {pair!r}: write KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(fields[key].default)
        try:
            values[key] = text.strip() if kind in (str, tuple) else kind(text.strip())
        except ValueError:
            raise ProbekitError(f"recipe setting {pair!r}: {text!r} is not a valid {kind.__name__}") from None
    return Recipe(**values)
