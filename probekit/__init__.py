"""probekit: hidden-state cache and linear probing for easy-to-hard generalization studies.

The entry points a notebook needs are names of this package (each imported on first use, so
``import probekit`` loads neither torch nor JAX)::

    import probekit

    items = probekit.load_dataset("arc-sample")
    probekit.extract(items, "cache/arc-sample", layers="middle_and_last")   # the LLM pass
    cache = probekit.Cache("cache/arc-sample")
    x = cache.read_layer("answer_end", cache.layers[-1])                    # (n_items, C, d) array
    probekit.sweep("cache/arc-sample", "results/arc-sample")                # linear heads (JAX)
    table = probekit.read_results("results/arc-sample").table               # one row per (head, item)
    summary = probekit.report("results/arc-sample", "reports/arc-sample")   # statistics, tables, plots

docs/python-api.md walks through this example. Data flows one way: ``data`` (question sets,
difficulty, levels, draws) -> ``llm`` (the model runtime) -> ``extract`` (the cache) -> ``store``
(file formats) -> ``probe`` / ``finetune`` / ``cot`` (the methods) -> ``stats`` -> ``report``.
"""

from __future__ import annotations

import importlib

from probekit.errors import ProbekitError

__version__ = "0.1.0"

# name -> module that defines it; extract, finetune and report are packages that are also callable
# (probekit.entry), so the name is the same object however the package was first imported
_API = {
    "load_dataset": "probekit.data.sets",
    "ItemSet": "probekit.data.schema",
    "ModelSpec": "probekit.llm.spec",
    "load_model": "probekit.llm.models",
    "extract": "probekit",
    "extract_icl": "probekit.extract.icl",
    "Cache": "probekit.store.reader",
    "read_results": "probekit.store.results",
    "sweep": "probekit.probe.sweep",
    "hardness": "probekit.probe.hardness",
    "finetune": "probekit",
    "generate": "probekit.cot.run",
    "report": "probekit",
    "build_report": "probekit.report.build",
    "build_comparison": "probekit.report.compare",
}
_RENAMED = {"generate": "generate_cot"}

__all__ = ["ProbekitError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'probekit' has no attribute {name!r}")
    if _API[name] == "probekit":  # a callable package: importing it binds the name
        return importlib.import_module(f"probekit.{name}")
    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
