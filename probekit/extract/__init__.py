"""The cache pipeline and ICL scoring, on the LLM runtime of :mod:`probekit.llm`.

Public entry points::

    from probekit.extract import extract, extract_icl
    summary = extract(items, "cache/smollm2__arc", layers="middle_and_last")
    print(summary.line())
"""

from probekit.entry import entry_package
from probekit.extract.capture import SITES, Captured, capture_batch, resolve_sites
from probekit.extract.icl import extract_icl, load_icl
from probekit.extract.run import ExtractSummary, extract

__all__ = ["SITES", "Captured", "capture_batch", "resolve_sites", "extract_icl", "load_icl", "ExtractSummary",
           "extract"]

entry_package(__name__, "probekit.extract.run", "extract")  # probekit.extract(...) calls probekit.extract.run.extract
