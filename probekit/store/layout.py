"""What a cache shard holds: file names, dataset names, shapes and dtypes, and the shard checks.

Hidden states are float16 (the default), float32 or bfloat16. h5py has no bfloat16, so a bfloat16
cache stores each value's bits as uint16 (the upper half of its float32 bits, rounded to nearest even
as torch rounds), says so in its manifest (``dtype_storage``) and in the dataset's attributes, and
:func:`from_storage` turns them back into float32: ``(bits.astype(np.uint32) << 16).view(np.float32)``.

Writer, reader and verifier all take shapes from :class:`Layout`, so there is one definition of a
shard. A shard of ``n`` items holds::

    items/id                 (n,)                 utf-8 str
    items/label              (n,)                 int64, gold choice index
    items/n_choices          (n,)                 int64
    items/difficulty/<m>     (n,)                 float64, NaN where unknown (one per measure)
    items/pool               (n,)                 utf-8 str ("probe" / "holdout")
    items/source             (n,)                 utf-8 str
    hidden/answer_end        (n_layers, n, C, d)  float16, chunk (1, n, C, d): one layer = one chunk
    hidden/question_end      (n_layers, n, d)     float16, chunk (1, n, d)
    logprob/choice_sum       (n, C)               float32, -inf on padded choices
    logprob/choice_tokens    (n, C)               int32
    items/choice_words       (n, C)               int32, whitespace words of each choice (0 on padding)
    items/choice_chars       (n, C)               int32, characters of each choice (0 on padding)

Only the sites the cache was written with are present under ``hidden/``. The two ``choice_*``
datasets (the choices' surface features, for the shortcut control of a sweep) are present when the
manifest says ``"choice_surface": true``; caches written before they existed lack them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT = "probekit-cache/1"
MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"

#: Token positions a cache can hold, and whether each has a choice axis.
SITES: dict[str, bool] = {"answer_end": True, "question_end": False}

#: Hidden-state dtypes a cache can hold (bfloat16 is stored as its uint16 bits: h5py has no bfloat16).
DTYPES = ("float16", "float32", "bfloat16")

#: How a bfloat16 cache stores its hidden states: the manifest's ``dtype_storage`` and each hidden dataset's
#: ``storage`` attribute.
BFLOAT16_STORAGE = ("uint16 bits of bfloat16 (the upper 16 bits of the float32 value, rounded to nearest even); "
                    "as float32: (bits.astype(uint32) << 16).view(float32)")

#: Item columns every shard holds besides the difficulty measures, with their dtypes.
ITEM_FIELDS: dict[str, Any] = {
    "id": h5py.string_dtype("utf-8"),
    "label": np.int64,
    "n_choices": np.int64,
    "pool": h5py.string_dtype("utf-8"),
    "source": h5py.string_dtype("utf-8"),
}

#: Per-choice surface features a shard holds when the layout has ``surface`` (name -> dtype).
SURFACE_FIELDS: dict[str, Any] = {"choice_words": np.int32, "choice_chars": np.int32}

#: HDF5 refuses chunks of 4 GiB or more.
MAX_CHUNK_BYTES = 2**32 - 1


def shard_name(k: int) -> str:
    """File name of shard ``k``: ``shard-00003.h5``."""
    return f"shard-{k:05d}.h5"


def temp_name(k: int) -> str:
    """Name shard ``k`` is written under until it is complete: ``.shard-00003.h5.tmp``."""
    return f".{shard_name(k)}.tmp"


def lock_name(rank: int) -> str:
    """Per-rank directory lock file: ``.lock-rank0``."""
    return f".lock-rank{rank}"


@dataclass(frozen=True)
class Layout:
    """The array shapes a cache was written with (everything a shard's layout depends on)."""

    layers: tuple[int, ...]
    sites: tuple[str, ...]
    hidden_size: int
    max_choices: int
    measures: tuple[str, ...]
    dtype: str = "float16"
    #: Whether shards hold the choices' surface features (``items/choice_words``, ``items/choice_chars``).
    surface: bool = False

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Layout:
        """The layout recorded in a manifest dict."""
        return cls(
            layers=tuple(manifest["layers"]),
            sites=tuple(manifest["sites"]),
            hidden_size=int(manifest["hidden_size"]),
            max_choices=int(manifest["max_choices"]),
            measures=tuple(manifest["measures"]),
            dtype=manifest.get("dtype", "float16"),
            surface=bool(manifest.get("choice_surface", False)),
        )

    def hidden_shape(self, site: str, n: int) -> tuple[int, ...]:
        """Shape of ``hidden/<site>`` for ``n`` items: layer-major, choice axis for answer_end."""
        if SITES[site]:
            return (len(self.layers), n, self.max_choices, self.hidden_size)
        return (len(self.layers), n, self.hidden_size)

    def datasets(self, n: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Every dataset of a shard of ``n`` items: ``{path: (shape, dtype)}``."""
        out: dict[str, tuple[tuple[int, ...], Any]] = {
            f"items/{name}": ((n,), dtype) for name, dtype in ITEM_FIELDS.items()
        }
        out.update({f"items/difficulty/{m}": ((n,), np.float64) for m in self.measures})
        if self.surface:
            out.update({f"items/{name}": ((n, self.max_choices), dtype) for name, dtype in SURFACE_FIELDS.items()})
        out.update({f"hidden/{s}": (self.hidden_shape(s, n), storage_dtype(self.dtype)) for s in self.sites})
        out["logprob/choice_sum"] = ((n, self.max_choices), np.float32)
        out["logprob/choice_tokens"] = ((n, self.max_choices), np.int32)
        return out

    @staticmethod
    def item_axis(name: str) -> int:
        """The item axis of dataset ``name``: 1 for the layer-major hidden states, 0 for every other."""
        return 1 if name.startswith("hidden/") else 0

    def parts(self) -> tuple[str, ...]:
        """Groups of datasets written together: each needs every row written before a shard is done."""
        return ("items", *(f"hidden/{s}" for s in self.sites), "logprob")


def storage_dtype(dtype: str) -> np.dtype:
    """The HDF5 dtype hidden states of a ``dtype`` cache are stored as: uint16 for bfloat16, else ``dtype``."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def value_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds a ``dtype`` cache's values exactly: float32 for bfloat16, else ``dtype``."""
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(dtype)


def dtype_max(dtype: str) -> float:
    """The largest finite value of a cache dtype (float16: 65504; bfloat16: about 3.39e38)."""
    return float(from_storage(np.array([0x7F7F], np.uint16), "bfloat16")[0]) if dtype == "bfloat16" \
        else float(np.finfo(dtype).max)


def to_storage(values: Any, dtype: str) -> np.ndarray:
    """Hidden states as a ``dtype`` cache stores them.

    bfloat16: each value rounded to bfloat16 (round to nearest even, from its float32 value, as
    ``torch.Tensor.to(torch.bfloat16)`` rounds) and kept as its uint16 bits; NaN becomes the quiet
    NaN 0x7FC0. Other dtypes: a plain cast.
    """
    if dtype != "bfloat16":
        return np.asarray(values).astype(dtype, copy=False)
    x = np.ascontiguousarray(values, dtype=np.float32)
    u = x.view(np.uint32)
    bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # no uint32 overflow below NaN's bits
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def from_storage(stored: Any, dtype: str) -> np.ndarray:
    """Stored hidden states as values: bfloat16 bits become float32 (exactly), others are returned as read."""
    if dtype != "bfloat16":
        return np.asarray(stored)
    return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_shard(path: Path, entry: Mapping[str, Any], layout: Layout, full: bool) -> str | None:
    """What is wrong with a recorded shard file, or None when it is fine.

    The quick check (``full=False``) looks at existence, byte size and dataset shapes; ``full=True``
    also compares the file's sha256 with the manifest entry.
    """
    if not path.is_file():
        return "file is missing"
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"size is {size} bytes, manifest says {entry['bytes']}"
    if full and sha256_file(path) != entry.get("sha256"):
        return f"sha256 differs from the manifest ({str(entry.get('sha256'))[:12]}...)"
    try:
        with h5py.File(path, "r") as f:
            for name, (shape, _) in layout.datasets(int(entry["n_items"])).items():
                if name not in f:
                    return f"dataset {name} is missing"
                if f[name].shape != shape:
                    return f"dataset {name} has shape {f[name].shape}, expected {shape}"
    except OSError as exc:
        return f"cannot be read as HDF5 ({str(exc).splitlines()[0]})"
    return None
