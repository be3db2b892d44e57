"""Loading a model: a :class:`~probekit.llm.spec.ModelSpec` in, a :class:`LoadedModel` out.

:func:`settle_model` and :func:`prepare_model` are what every entry point that runs a model calls:
the first settles a name or spec for this process and checks it before anything is read or locked,
the second loads it (a :class:`LoadedModel` passes through both unchanged). :func:`load_model` loads
a spec: dtype, bitsandbytes 8/4-bit, device or device map, the tokenizer and how it is used.

The identity recorded in a cache manifest (:attr:`LoadedModel.identity`) names the model (hub id or
path), its revision or the sha256 of its weight files, the dtype and the quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from probekit.errors import ProbekitError
from probekit.llm.spec import ModelSpec, check_trainable, torch_dtype
from probekit.llm.tokens import TokenRules, token_rules
from probekit.llm.weights import first_line, resolve_model, weights_sha256


@dataclass
class LoadedModel:
    """A causal LM ready for capture, with its tokenizer, how that tokenizer is used, and its manifest identity."""

    model: Any
    tokenizer: Any
    name: str
    identity: dict
    n_layers: int
    hidden_size: int
    device: Any
    rules: TokenRules

    @property
    def pad_id(self) -> int:
        """The token id padded positions hold (masked out; any id would do)."""
        return self.rules.pad_id

    @property
    def quantize(self) -> str | None:
        """``"8bit"`` / ``"4bit"`` when bitsandbytes quantized the weights, else None."""
        bits = (self.identity.get("quantization") or {}).get("bits")
        return None if bits is None else f"{bits}bit"


class _DropCastNotice:
    def filter(self, record) -> bool:  # noqa: A003 - logging API
        return "inputs will be cast from" not in record.getMessage()


def _quiet_int8_cast_notice() -> None:
    """bitsandbytes logs one line per 8-bit matmul when activations are float32; keep the log readable."""
    import logging

    for name in ("bitsandbytes.autograd._functions", "bitsandbytes"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropCastNotice) for f in log.filters):
            log.addFilter(_DropCastNotice())


def quantization_config(spec: ModelSpec):
    """(transformers' BitsAndBytesConfig, the quantization's identity) of a resolved spec, or (None, None)
    unquantized; refused in one line without a working bitsandbytes."""
    if spec.quantize is None:
        return None, None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ProbekitError(f"quantize={spec.quantize} needs bitsandbytes: pip install -e '.[quant]' "
                            "from the source tree, or pip install bitsandbytes") from None
    except Exception as exc:  # noqa: BLE001
        raise ProbekitError(f"quantize={spec.quantize} needs a working bitsandbytes: {first_line(exc)}") from None
    from transformers import BitsAndBytesConfig

    if spec.quantize == "8bit":
        _quiet_int8_cast_notice()
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(spec.int8_threshold))
        return cfg, {"method": "bitsandbytes", "bits": 8, "int8_threshold": float(spec.int8_threshold)}
    compute = spec.compute_dtype or spec.dtype
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.bnb_4bit_type,
        bnb_4bit_compute_dtype=torch_dtype(compute),
    )
    return cfg, {"method": "bitsandbytes", "bits": 4, "quant_type": spec.bnb_4bit_type, "compute_dtype": compute}


def _device(spec: ModelSpec):
    """The torch device of a resolved spec, after checking it exists."""
    import torch

    dev = str(spec.device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ProbekitError(f"device={spec.device!r} requested but no CUDA device is available")
    return torch.device(dev)


def _materialize_cpu_weights(model) -> None:
    """Copy memory-mapped CPU weights into ordinary memory.

    Weights loaded from safetensors stay backed by the file mapping; on CPU the first forward
    passes over such tensors run many times slower (seconds per call for a 135M model). One copy
    right after loading removes that warm-up.
    """
    import torch

    seen: set[int] = set()
    for module in model.modules():
        for _, param in list(module.named_parameters(recurse=False)):
            if type(param) is not torch.nn.Parameter or param.device.type != "cpu" or id(param) in seen:
                continue
            seen.add(id(param))
            param.data = param.data.clone()


def load_model(spec: ModelSpec | None = None, **kwargs) -> LoadedModel:
    """Load a causal LM and its tokenizer as ``spec`` says (keyword arguments build a :class:`ModelSpec`).

    Every "auto" is settled by :meth:`ModelSpec.resolved` (single process, not fine-tuned: an "auto"
    quantize is none here; :func:`prepare_model` settles it for training).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec is None:
        spec = ModelSpec(**kwargs)
    elif kwargs:
        raise TypeError("pass either a ModelSpec or keyword arguments, not both")
    spec = spec.resolved()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    qconfig, qident = quantization_config(spec)
    device = _device(spec)  # before a model is converted or fetched
    name, folder, ident = resolve_model(spec)
    load_kw: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
    if qconfig is not None:
        load_kw["quantization_config"] = qconfig
    if spec.device_map is not None:
        load_kw["device_map"] = spec.device_map
    elif qconfig is not None:
        load_kw["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
    source = str(folder) if folder is not None else name
    if folder is None:
        load_kw["revision"] = spec.revision
        load_kw["local_files_only"] = ident.pop("local_files_only", False)
    try:
        tok_kw = {k: v for k, v in load_kw.items() if k in ("revision", "local_files_only", "trust_remote_code")}
        tok = AutoTokenizer.from_pretrained(source, **tok_kw)
        model = AutoModelForCausalLM.from_pretrained(source, **load_kw)
    except ProbekitError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ProbekitError(f"cannot load model {name!r}: {first_line(exc)}") from None
    if qconfig is None and spec.device_map is None:
        model.to(device)
    if qconfig is None:
        _materialize_cpu_weights(model)
    model.eval()
    model.requires_grad_(False)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = int(text_cfg.num_hidden_layers)
    hidden = int(text_cfg.hidden_size)
    if folder is not None:
        ident["weights_sha256"] = weights_sha256(folder)
    else:
        ident["revision"] = getattr(cfg, "_commit_hash", None) or spec.revision or "main"
    ident.update(
        {
            "architecture": (cfg.architectures or [type(model).__name__])[0],
            "n_layers": n_layers,
            "hidden_size": hidden,
            "dtype": spec.dtype,
            "quantization": qident,
        }
    )
    try:
        first = next(model.parameters())
        run_device = first.device
    except StopIteration:
        run_device = device
    if spec.device_map is not None:
        run_device = model.get_input_embeddings().weight.device
    return LoadedModel(model=model, tokenizer=tok, name=name, identity=ident, n_layers=n_layers,
                       hidden_size=hidden, device=run_device, rules=token_rules(tok))


def settle_model(model: str | ModelSpec | LoadedModel | None, local_rank: int = 0, world_size: int = 1, *,
                 train: bool = False) -> ModelSpec | LoadedModel:
    """``model`` ready to load, settled and checked before anything is read, locked or loaded: a name
    (or None) or a spec becomes the spec with every "auto" settled for this process
    (:meth:`ModelSpec.resolved`; ``train``: it is to be fine-tuned), refused in one line when this
    machine cannot run (or fine-tune) it (:meth:`ModelSpec.check_available`); a :class:`LoadedModel` is
    returned as given (refused if ``train`` and it cannot be fine-tuned, :func:`check_trainable`)."""
    if isinstance(model, LoadedModel):
        if train:
            check_trainable(model.quantize, model.device)
        return model
    spec = ModelSpec.of(model).resolved(local_rank, world_size, train=train)
    spec.check_available(train)
    return spec


def prepare_model(model: str | ModelSpec | LoadedModel | None, local_rank: int = 0, world_size: int = 1, *,
                  train: bool = False) -> LoadedModel:
    """The model to run: a :class:`LoadedModel` as given; else the spec (``model`` itself, or
    ``ModelSpec(model=model)``) resolved for this process (:meth:`ModelSpec.resolved`) and loaded."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(ModelSpec.of(model).resolved(local_rank, world_size, train=train))
