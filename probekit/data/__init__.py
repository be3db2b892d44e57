"""Question sets, difficulty measures, levels and training draws (docs/protocol.md §1)."""

from probekit.data.levels import LEVELS, Fixed, Quantile, cut_levels, cutoff_for, level_names
from probekit.data.schema import ItemSet
from probekit.data.sets import SETS, dataset_names, load_dataset

__all__ = [
    "ItemSet", "SETS", "LEVELS", "Fixed", "Quantile",
    "load_dataset", "dataset_names", "cutoff_for", "cut_levels", "level_names",
]
