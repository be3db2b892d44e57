"""The method registry: every way of scoring items that writes rows into a results table.

A results table's ``method`` column names one :class:`Method` of :data:`METHODS`; each is declared
here once, and the writers (probe sweep, fine-tuning, generation), the results file's owner
(:mod:`probekit.store.results`) and the reports take their rules from it:

* ``baseline``: the method whose rows are this method's zero-shot baseline in a report (None for a
  baseline itself). A comparison falls back to ``zero_shot`` when a run of the model and dataset
  holds no rows of the registered baseline.
* ``paired``: its heads are the training draws of :func:`probekit.design.plan.plan` (the probe's), so
  two runs of such methods pair item by item when they share the seed.
* ``probe_head``: its rows come from a head fitted on cached features and carry that head's ``site``,
  ``layer`` and ``solver``; every other method's rows leave the three empty.
* ``p_gold``: its rows carry the probability of the gold answer (False: generated text is scored,
  ``p_gold`` is NaN).
* ``finetunes``: it trains adapters on the model, so a report names it with the base it trained on
  (quantized or not, as the run records it).
* ``label``, ``colour``, ``order``: how reports name, draw and sort it.
* ``report_head``: for a method without a probe head, the (site, solver) under which a single-run
  report keys and names its heads (two methods of one table stay apart, and the bootstrap's
  resamples, keyed by these names, stay those of earlier versions).

A new method is one entry here (and its own package and command); the registry lives below
:mod:`probekit.store` because the results file's owner refuses a table naming an unregistered
method, when it is committed and when it is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from probekit.errors import ProbekitError


@dataclass(frozen=True)
class Method:
    """One method of the registry (see the module docstring)."""

    name: str
    label: str
    colour: str
    order: int
    baseline: str | None = None
    paired: bool = False
    probe_head: bool = False
    p_gold: bool = True
    finetunes: bool = False
    report_head: tuple[str, str] | None = None


#: The registry, in the order error messages list the methods (display order: ``order``).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("probe", "probe", "#0072B2", 2, baseline="zero_shot", paired=True, probe_head=True),
    Method("icl", "icl", "#E69F00", 1, baseline="zero_shot", report_head=("icl", "icl")),
    Method("finetune", "finetune", "#009E73", 3, baseline="zero_shot", paired=True, finetunes=True,
           report_head=("finetune", "lora")),
    Method("zero_shot", "zero_shot", "#555555", 0),
    Method("zero_shot_cot", "zero_shot_cot", "#999999", 6, p_gold=False),
    Method("icl_cot", "icl_cot", "#56B4E9", 5, baseline="zero_shot_cot", p_gold=False, report_head=("cot", "cot")),
    Method("finetune_cot", "finetune_cot", "#CC79A7", 4, baseline="zero_shot_cot", p_gold=False, finetunes=True,
           report_head=("cot", "lora")),
)}
#: The method every other method falls back to as its baseline.
ZERO_SHOT = "zero_shot"


def method(name: str) -> Method:
    """The registered method ``name``; an unregistered name is refused in one line."""
    found = METHODS.get(str(name))
    if found is None:
        raise ProbekitError(f"unknown method {name!r}: one of {', '.join(METHODS)} (probekit.methods.METHODS)")
    return found


def method_order(names: Iterable[str]) -> list[str]:
    """The given methods in display order (``order``); names outside the registry follow, sorted."""
    names = {str(n) for n in names}
    known = sorted((n for n in names if n in METHODS), key=lambda n: METHODS[n].order)
    return known + sorted(names - set(METHODS))


def baselines() -> list[str]:
    """The methods other methods are compared with (registry order)."""
    return [m.name for m in METHODS.values() if m.baseline is None]
