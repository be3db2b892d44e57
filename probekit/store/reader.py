"""Reading a cache: item table, one layer of one site at a time, log-probs, integrity checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.store.layout import ITEM_FIELDS, MANIFEST, SURFACE_FIELDS, Layout, check_shard, shard_name
from probekit.store.manifest import manifest_bytes, parse_manifest, sha256_bytes
from probekit.store.stamp import file_stat, read_stamp, stamped, write_stamp

_REQUIRED = ("model", "dataset", "prompt", "sites", "layers", "hidden_size", "max_choices",
             "measures", "n_items", "shard_size", "shards")


class Cache:
    """A cache directory written by :class:`~probekit.store.CacheWriter`.

    ``Cache(path)`` refuses a missing directory, a missing or malformed manifest and an
    incomplete cache; ``Cache(path, require_complete=False)`` opens an incomplete one for
    inspection (``info``, ``verify``), but reading arrays from it still raises.
    """

    def __init__(self, path: str | os.PathLike, *, require_complete: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ProbekitError(f"{self.path} is a file, not a cache directory (give the folder `probekit extract` wrote)")
        if not self.path.is_dir():
            raise ProbekitError(f"cache directory {self.path} does not exist")
        raw = manifest_bytes(self.path)
        if raw is None:
            raise ProbekitError(f"{self.path} has no {MANIFEST}: not a probekit cache")
        self.manifest: dict[str, Any] = parse_manifest(raw, self.path)
        self.manifest_sha256 = sha256_bytes(raw)
        missing = [key for key in _REQUIRED if key not in self.manifest]
        if missing:
            raise ProbekitError(f"{self.path / MANIFEST} lacks {', '.join(missing)}")
        self.layout = Layout.from_manifest(self.manifest)
        self.n_items = int(self.manifest["n_items"])
        self.shard_size = int(self.manifest["shard_size"])
        self.n_shards = -(-self.n_items // self.shard_size)
        self.shards = {int(e["index"]): e for e in self.manifest["shards"]}
        if require_complete:
            self._require_complete()

    # ----- what the cache holds ----------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Indices into the model's ``hidden_states`` tuple (0 = embeddings), in storage order."""
        return list(self.layout.layers)

    @property
    def sites(self) -> list[str]:
        return list(self.layout.sites)

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def max_choices(self) -> int:
        return self.layout.max_choices

    @property
    def measures(self) -> list[str]:
        return list(self.layout.measures)

    @property
    def complete(self) -> bool:
        """Every shard is recorded in the manifest."""
        return set(self.shards) == set(range(self.n_shards))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the manifest and every recorded shard file that exists."""
        files = [self.path / MANIFEST, *(self.path / e["file"] for e in self.shards.values())]
        return sum(p.stat().st_size for p in files if p.is_file())

    def __repr__(self) -> str:
        return (f"Cache({str(self.path)!r}: {self.n_items} items, layers {self.layers}, "
                f"sites {self.sites}, {len(self.shards)}/{self.n_shards} shards)")

    # ----- reading -------------------------------------------------------------------------------
    def _require_complete(self) -> None:
        if not self.complete:
            raise ProbekitError(
                f"cache {self.path} is incomplete: {len(self.shards)} of {self.n_shards} shards written; "
                "rerun the extraction with the same arguments to finish it"
            )

    def _each_shard(self, read: Callable[[h5py.File, slice], Any]) -> list[Any]:
        """``read(file, rows)`` for every shard in index order; ``rows`` are its item rows."""
        self._require_complete()
        out = []
        for k in range(self.n_shards):
            rows = slice(k * self.shard_size, min((k + 1) * self.shard_size, self.n_items))
            out.append(self._read_shard_file(k, lambda f: read(f, rows)))
        return out

    def _read_shard_file(self, k: int, read: Callable[[h5py.File], Any]) -> Any:
        """``read(file)`` on recorded shard ``k``; a file that cannot be read is one error line."""
        path = self.path / self.shards[k]["file"]
        try:
            with h5py.File(path, "r") as f:
                return read(f)
        except (OSError, KeyError, ValueError) as exc:
            raise ProbekitError(
                f"{path.name} in {self.path} cannot be read ({str(exc).splitlines()[0]}); "
                f"check it with `probekit info {self.path} --verify`"
            ) from None

    @cached_property
    def items(self) -> pd.DataFrame:
        """One row per item: id, label, n_choices, pool, source, then one float column per measure."""
        def read(f: h5py.File, rows: slice) -> dict[str, np.ndarray]:
            cols = {}
            for name in ITEM_FIELDS:
                ds = f[f"items/{name}"]
                cols[name] = ds.asstr()[:] if h5py.check_string_dtype(ds.dtype) else ds[:]
            cols.update({m: f[f"items/difficulty/{m}"][:] for m in self.layout.measures})
            return cols

        parts = self._each_shard(read)
        return pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})

    def read_layer(self, site: str, layer: int, dtype: Any = np.float32) -> np.ndarray:
        """Hidden states of one site at one layer for every item: (n_items, C, d) or (n_items, d).

        ``layer`` is the model's ``hidden_states`` index as listed in :attr:`layers`; only that
        layer's chunk of each shard is read. A bfloat16 cache's stored bits are turned into their
        exact float32 values (:func:`~probekit.store.layout.from_storage`) before any cast to ``dtype``.
        """
        from probekit.store.layout import from_storage

        if site not in self.layout.sites:
            raise ProbekitError(f"site {site!r} is not in cache {self.path}; it holds {self.sites}")
        if layer not in self.layout.layers:
            raise ProbekitError(f"layer {layer!r} is not in cache {self.path}; it holds layers {self.layers}")
        index = self.layout.layers.index(layer)
        out = np.empty(self.layout.hidden_shape(site, self.n_items)[1:], dtype=dtype)

        def read(f: h5py.File, rows: slice) -> None:
            out[rows] = from_storage(f[f"hidden/{site}"][index], self.layout.dtype)

        self._each_shard(read)
        return out

    @property
    def has_surface(self) -> bool:
        """Whether the cache holds the choices' surface features (:meth:`choice_surface`)."""
        return self.layout.surface

    def choice_surface(self) -> dict[str, np.ndarray]:
        """The choices' surface features: ``{"choice_words": (n_items, C), "choice_chars": (n_items, C)}``
        int32 counts, 0 on padded choices. Refused for a cache written before they existed."""
        if not self.layout.surface:
            raise ProbekitError(f"cache {self.path} holds no choice surface features (written by an older probekit); "
                                "extract it again to get them")
        parts = self._each_shard(lambda f, rows: {name: f[f"items/{name}"][:] for name in SURFACE_FIELDS})
        return {name: np.concatenate([p[name] for p in parts]) for name in SURFACE_FIELDS}

    def logprobs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(choice_sum, choice_tokens)``: (n_items, C) float32 (-inf on padding) and int32."""
        parts = self._each_shard(lambda f, rows: (f["logprob/choice_sum"][:], f["logprob/choice_tokens"][:]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def read_shard(self, k: int) -> dict[str, np.ndarray]:
        """Every dataset of shard ``k`` as stored, keyed by path (:meth:`Layout.datasets`): strings as str
        objects, a bfloat16 cache's hidden states as their uint16 bits, nothing cast."""
        if k not in self.shards:
            raise ProbekitError(f"shard {k} is not recorded in cache {self.path} ({len(self.shards)} of "
                                f"{self.n_shards} shards are)")
        names = self.layout.datasets(int(self.shards[k]["n_items"]))
        return self._read_shard_file(k, lambda f: {
            name: f[name].asstr()[()] if h5py.check_string_dtype(f[name].dtype) else f[name][()] for name in names})

    # ----- integrity ------------------------------------------------------------------------------
    def stray_shards(self) -> list[str]:
        """Shard files in the directory that the manifest does not list (never read; left by another
        run, or copied in)."""
        listed = {e["file"] for e in self.shards.values()}
        return sorted(p.name for p in self.path.glob("shard-*.h5") if p.name not in listed)

    def verify(self, on_shard: Callable[[int], None] | None = None, *, since_stamp: bool = False) -> list[str]:
        """One line per problem (``"shard-00003.h5: sha256 differs ..."``); empty when all is well.

        Checks that every shard is recorded, has the manifest's item count, size and sha256, and
        holds every dataset with the expected shape. ``on_shard(k)`` is called after each shard.

        Every shard that passes is noted in the verification stamp (:mod:`probekit.store.stamp`).
        With ``since_stamp=True`` a shard whose size, mtime and inode are what the stamp recorded
        for this manifest is not opened at all (the stamp was written after the file passed every
        check, hash, size and shapes, for these manifest bytes); without it, every shard is hashed.
        """
        stamp_sha, stamp = read_stamp(self.path)
        if stamp_sha != self.manifest_sha256:
            stamp = {}
        trusted = stamp if since_stamp else {}
        fresh: dict[str, dict[str, Any]] = {}
        problems = []
        for k in range(self.n_shards):
            entry = self.shards.get(k)
            expected_n = min(self.shard_size, self.n_items - k * self.shard_size)
            if entry is None:
                problem = "not written (missing from the manifest)"
            elif int(entry["n_items"]) != expected_n:
                problem = f"manifest says {entry['n_items']} items, expected {expected_n}"
            else:
                path = self.path / entry["file"]
                before = file_stat(path)
                known = stamped(trusted.get(entry["file"]), before, entry.get("sha256"))
                # a stamped shard passed every check (hash, size, shapes) for this manifest, as this file
                problem = None if known else check_shard(path, entry, self.layout, full=True)
                if problem is None and before is not None and file_stat(path) == before:
                    fresh[entry["file"]] = {**before, "sha256": entry["sha256"]}
            if problem:
                problems.append(f"{entry['file'] if entry else shard_name(k)}: {problem}")
            if on_shard is not None:
                on_shard(k)
        if fresh != stamp:
            write_stamp(self.path, self.manifest_sha256, fresh)
        return problems
