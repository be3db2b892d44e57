"""The JAX probe engine: batched linear heads over cached hidden states, the sweep and MDL hardness.

* :func:`sweep` runs an experiment (population, all_to_all, learning_curve, label_noise) over a
  cache and writes ``results.parquet`` + ``sweep.json``.
* :func:`hardness` writes model-based (MDL) hardness next to the cache.
* :func:`fit_and_score` fits a batch of heads on one feature set and scores every item
  (:class:`ProbeConfig` picks the head, solver and padding).
"""

from probekit.probe.engine import HeadResults, ProbeConfig, fit_and_score, fit_and_score_many
from probekit.probe.hardness import MDL_SIZES, hardness
from probekit.probe.sweep import sweep
from probekit.store.results import CONFIG as SWEEP_JSON
from probekit.store.results import RESULTS, SCHEMA

__all__ = [
    "MDL_SIZES", "RESULTS", "SCHEMA", "SWEEP_JSON", "HeadResults", "ProbeConfig", "fit_and_score",
    "fit_and_score_many", "hardness", "sweep",
]
