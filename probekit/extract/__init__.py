"""One LLM pass per question set: model loading, prompts and tokens, prefix-shared capture, the cache.

Public entry points::

    from probekit.extract import extract, extract_icl, load_model, ModelSpec
    summary = extract(items, "cache/smollm2__arc", layers="middle_and_last")
    print(summary.line())
"""

from probekit.extract.capture import SITES, Captured, capture_batch, resolve_sites
from probekit.extract.icl import extract_icl, load_icl
from probekit.extract.models import LoadedModel, ModelSpec, convert_gguf, default_model_dir, load_model
from probekit.extract.run import ExtractSummary, extract
from probekit.extract.tokens import Encoded, encode_item, token_rules

__all__ = [
    "SITES", "Captured", "capture_batch", "resolve_sites",
    "extract_icl", "load_icl", "LoadedModel", "ModelSpec", "convert_gguf", "default_model_dir", "load_model",
    "ExtractSummary", "extract", "Encoded", "encode_item", "token_rules",
]
