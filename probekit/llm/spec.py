"""What model to load and how: :class:`ModelSpec`, the one place where every "auto" is settled.

Every entry point that runs a model (``extract``, ``extract_icl``, ``finetune``, ``generate_cot`` and
their commands) takes it as a name (hub id, local folder, ``.gguf`` file, a named offline model such
as ``gemma3-270m``, or None for the offline SmolLM2 default), a :class:`ModelSpec`, or a
:class:`~probekit.llm.models.LoadedModel` used as it is. A name means ``ModelSpec(model=name)``: the
library and the command line share the defaults below, all "auto".

"auto" means, as :meth:`ModelSpec.resolved` settles it when the model loads:

* ``device``: cuda when a GPU is visible, else cpu (under several processes: ``cuda:<local rank mod GPUs>``);
* ``dtype``: float16 on a GPU or with a device map, float32 on the CPU;
* ``quantize``: 8bit when the model is fine-tuned on a GPU (a QLoRA base), else none.

On a machine without a GPU every default is therefore the plain float32 model on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from probekit.errors import ProbekitError

AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
#: ``quantize`` values: bitsandbytes 8-bit or 4-bit weights, none, or auto (8bit when fine-tuning on a GPU).
QUANTIZE = ("none", "8bit", "4bit", AUTO)
BNB_4BIT_TYPES = ("nf4", "fp4")


def parse_quantize(value: Any) -> str | None:
    """A ``quantize`` setting in its one vocabulary (:data:`QUANTIZE`): ``"8bit"``, ``"4bit"``,
    ``"auto"``, or None for ``"none"`` (None itself is accepted too); anything else is refused."""
    if value is None or value == "none":
        return None
    if value not in QUANTIZE:
        raise ProbekitError(f"quantize={value!r} is not one of {', '.join(QUANTIZE)}")
    return value


def check_trainable(quantize: str | None, device) -> None:
    """Refuse a base that cannot be fine-tuned through: bitsandbytes' 4-bit layers have no autograd
    kernel on the CPU (their backward is silently wrong)."""
    if quantize == "4bit" and getattr(device, "type", str(device).split(":")[0]) == "cpu":
        raise ProbekitError("a 4-bit base cannot be fine-tuned on the CPU (bitsandbytes' 4-bit kernels there pass "
                            "no correct gradient back); use --quantize none or 8bit, or a GPU")


def torch_dtype(name: str):
    """The torch dtype of a :data:`DTYPES` name."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class ModelSpec:
    """What to load.

    model: hub id, local folder, a ``.gguf`` file, a name of :data:`~probekit.llm.weights.NAMED_MODELS`
    (``gemma3-270m``), or None for the offline SmolLM2 default.
    dtype: ``float32`` | ``float16`` | ``bfloat16`` (weights and activations; for 8/4-bit the dtype
    of the layers bitsandbytes leaves unquantized) | ``auto``.
    quantize: ``none`` (or None) | ``8bit`` | ``4bit`` (bitsandbytes) | ``auto``; ``bnb_4bit_type``
    ``nf4`` (default) or ``fp4``; ``compute_dtype`` of the 4-bit matmuls (default: ``dtype``);
    ``int8_threshold`` the LLM.int8 outlier threshold (bitsandbytes default 6.0; with outlier columns
    chosen per forward pass, 8-bit results depend slightly on what else is in the batch; 0 turns that off).
    device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``; ``device_map`` (e.g. ``"auto"``) spreads a
    large model over several GPUs and overrides ``device``.
    threads: torch CPU threads, set when the model loads (None: torch's choice).

    "auto" (the module docstring says what it means) is settled in one place, :meth:`resolved`,
    which every entry point and :func:`~probekit.llm.models.load_model` apply.
    """

    model: str | None = None
    dtype: str = AUTO
    quantize: str | None = AUTO
    bnb_4bit_type: str = "nf4"
    compute_dtype: str | None = None
    int8_threshold: float = 6.0
    device: str = AUTO
    device_map: str | dict | None = None
    revision: str | None = None
    cache_root: Path | str | None = None
    trust_remote_code: bool = False
    threads: int | None = None

    @classmethod
    def of(cls, model: str | ModelSpec | None) -> ModelSpec:
        """``model`` as a spec: a spec as given, a name (or None) as ``ModelSpec(model=name)``."""
        return model if isinstance(model, ModelSpec) else cls(model=model)

    def validate(self) -> None:
        if self.dtype not in (*DTYPES, AUTO):
            raise ProbekitError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}, {AUTO}")
        parse_quantize(self.quantize)
        if self.bnb_4bit_type not in BNB_4BIT_TYPES:
            raise ProbekitError(f"bnb_4bit_type={self.bnb_4bit_type!r} is not one of nf4, fp4")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ProbekitError(f"compute_dtype={self.compute_dtype!r} is not one of {', '.join(DTYPES)}")
        dev = str(self.device)
        if not (dev in ("cpu", "cuda", AUTO) or dev.startswith("cuda:")):
            raise ProbekitError(f"device={self.device!r} is not one of cpu, cuda, cuda:N, auto")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ProbekitError(f"threads={self.threads!r} must be a positive integer")
        if dev.startswith("cuda:") and not dev[len("cuda:"):].isdigit():
            raise ProbekitError(f"device={self.device!r} is not one of cpu, cuda, cuda:N, auto")

    def check_available(self, train: bool = False) -> None:
        """Refuse, before anything loads, what this machine cannot run: a base it cannot fine-tune
        (``train``, :func:`check_trainable`), a CUDA device it does not have, or quantization without a
        working bitsandbytes (one line naming the setting)."""
        from probekit.llm.models import quantization_config

        self.validate()
        if train:
            check_trainable(parse_quantize(self.quantize), self.device)
        dev = str(self.device)
        if dev.startswith("cuda"):
            n = _cuda_count()
            if n == 0:
                raise ProbekitError(f"device={dev!r}: no CUDA device is available on this machine (use cpu)")
            if ":" in dev and int(dev.split(":", 1)[1]) >= n:
                raise ProbekitError(f"device={dev!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        if parse_quantize(self.quantize) not in (None, AUTO):
            quantization_config(self)

    def resolved(self, local_rank: int = 0, world_size: int = 1, *, train: bool = False) -> ModelSpec:
        """This spec with every "auto" settled (a spec without any comes back equal); ``train``: the
        model is to be fine-tuned (``quantize="auto"`` is then 8bit on a GPU).

        device: ``auto`` is cuda when a GPU is visible, else cpu; under several processes
        (``world_size > 1``, no device map) ``cuda``/``auto`` become ``cuda:<local_rank mod GPUs>``.
        dtype: ``auto`` is float16 on a GPU or with a device map, float32 on the CPU.
        quantize: ``auto`` is 8bit when ``train`` and the device is a GPU, else none (None).
        """
        self.validate()
        device = str(self.device)
        if device in ("cuda", AUTO) and world_size > 1 and self.device_map is None and _cuda_count() > 0:
            device = f"cuda:{local_rank % _cuda_count()}"
        elif device == AUTO:
            device = "cuda" if _cuda_count() > 0 else "cpu"
        dtype = self.dtype
        if dtype == AUTO:
            dtype = "float16" if device.startswith("cuda") or self.device_map is not None else "float32"
        quantize = parse_quantize(self.quantize)
        if quantize == AUTO:
            quantize = "8bit" if train and device.startswith("cuda") else None
        return replace(self, device=device, dtype=dtype, quantize=quantize)
