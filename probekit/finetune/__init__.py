"""LoRA fine-tuning, the study's third supervision method, on the sweep's training draws.

Public entry points::

    from probekit.finetune import finetune, Recipe
    record = finetune("cache/smollm2__arc", items, "results/ft", measures=["grade"], n_train=[32], draws=1)

:mod:`probekit.finetune.recipe` holds the settings and schedule, :mod:`probekit.finetune.train` the
adapters, the packed objective and scoring, :mod:`probekit.finetune.run` the resumable run,
:mod:`probekit.finetune.select` the choice of a
learning rate and length on a validation split of one training draw.
"""

from probekit.entry import entry_package
from probekit.finetune.recipe import Recipe, Schedule, schedule
from probekit.finetune.run import finetune, part_key
from probekit.finetune.select import select_recipe
from probekit.finetune.train import attach_lora, detach_lora, score_items, train_adapters

__all__ = ["Recipe", "Schedule", "schedule", "finetune", "part_key", "attach_lora", "detach_lora", "score_items",
           "train_adapters", "select_recipe"]

entry_package(__name__, "probekit.finetune.run", "finetune")  # probekit.finetune(...) calls probekit.finetune.run.finetune
