"""The LLM runtime that extraction, ICL scoring, fine-tuning and chain-of-thought generation share.

- :mod:`~probekit.llm.spec`: :class:`ModelSpec`, what to load, and the one place every "auto" is settled;
- :mod:`~probekit.llm.weights`: where weights come from (hub, folder, GGUF conversion, named offline models);
- :mod:`~probekit.llm.models`: loading (dtype, bitsandbytes, devices) into a :class:`LoadedModel`;
- :mod:`~probekit.llm.tokens`: prompts and answers as tokens, and prompts that fit the model;
- :mod:`~probekit.llm.forward`: the packed forward, its attention masks, the prefix cache, choice scores;
- :mod:`~probekit.llm.batches`: ranks and batches; :mod:`~probekit.llm.progress`: the progress bar.

Example::

    from probekit.llm import ModelSpec, load_model
    lm = load_model(ModelSpec(model="gemma3-270m"))  # device, dtype and quantize "auto"

Importing it loads neither torch nor JAX (torch loads with the first model).
"""

from probekit.llm.batches import dist_env, length_batches, rank_share
from probekit.llm.forward import Prefix, compute_prefix, packed_forward, score_choices
from probekit.llm.models import LoadedModel, load_model, prepare_model, settle_model
from probekit.llm.spec import DTYPES, QUANTIZE, ModelSpec, parse_quantize
from probekit.llm.tokens import Encoded, TokenRules, encode_item, encode_prompt, encode_rows, token_rules
from probekit.llm.weights import DEFAULT_NAME, NAMED_MODELS, convert_gguf, default_cache_root, default_model_dir

__all__ = [
    "dist_env", "length_batches", "rank_share",
    "Prefix", "compute_prefix", "packed_forward", "score_choices",
    "LoadedModel", "load_model", "prepare_model", "settle_model",
    "DTYPES", "QUANTIZE", "ModelSpec", "parse_quantize",
    "Encoded", "TokenRules", "encode_item", "encode_prompt", "encode_rows", "token_rules",
    "DEFAULT_NAME", "NAMED_MODELS", "convert_gguf", "default_cache_root", "default_model_dir",
]
