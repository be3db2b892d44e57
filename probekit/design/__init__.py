"""What every method on the study's design shares, below the methods (probe/, finetune/, cot/).

* :mod:`probekit.design.plan`: the item frame of a cache, the heads of an experiment (training rows,
  labels, test exclusions) and each head's seed;
* :mod:`probekit.design.rows`: result rows over an item frame, and the zero-shot rows;
* :mod:`probekit.design.cache`: opening a cache for a run (verified) and its item table.

The method registry is :mod:`probekit.methods`; the results table and its run record belong to
:mod:`probekit.store.results`. Nothing here imports an engine (JAX, torch).
"""

from probekit.design.cache import load_items, open_cache
from probekit.design.plan import ALL, Head, ItemFrame, head_seed, item_frame, layer_label, plan, tested_rows
from probekit.design.rows import FrameRows, zero_shot_p, zero_shot_tables

__all__ = ["ALL", "FrameRows", "Head", "ItemFrame", "head_seed", "item_frame", "layer_label", "load_items",
           "open_cache", "plan", "tested_rows", "zero_shot_p", "zero_shot_tables"]
