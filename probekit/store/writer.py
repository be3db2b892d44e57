"""Writing a cache: atomic, resumable shards under a directory lock, recorded in the manifest.

Typical use (the extract step)::

    with CacheWriter(out, header, n_items=N, shard_size=256, layers=[0, 15, 30],
                     sites=["answer_end"], hidden_size=d, max_choices=C, measures=ms) as w:
        for k in w.pending_shards():
            lo, hi = w.shard_range(k)
            with w.open_shard(k) as sw:
                for start in range(lo, hi, batch):
                    ...  # run the model on items start:stop
                    sw.write_items(start - lo, ids=..., labels=..., n_choices=..., difficulty=...,
                                   pool=..., source=...)
                    sw.write_hidden(start - lo, "answer_end", h)   # (n_layers, b, C, d)
                    sw.write_logprobs(start - lo, choice_sum=s, choice_tokens=t)

Shard ``k`` belongs to rank ``k % world_size``. Each shard goes to ``.shard-NNNNN.h5.tmp`` first,
is checked (every row written), fsynced and renamed to ``shard-NNNNN.h5``; only then is it recorded
in the manifest with its sha256. An exception inside ``open_shard`` deletes the temp file and
records nothing, so a rerun with the same arguments picks up exactly the missing shards.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from probekit.errors import ProbekitError
from probekit.store.layout import (
    BFLOAT16_STORAGE,
    DTYPES,
    FORMAT,
    ITEM_FIELDS,
    MANIFEST,
    MANIFEST_LOCK,
    MAX_CHUNK_BYTES,
    SITES,
    SURFACE_FIELDS,
    Layout,
    check_shard,
    lock_name,
    sha256_file,
    shard_name,
    storage_dtype,
    temp_name,
    to_storage,
)
from probekit.store.manifest import (
    check_same_cache,
    manifest_bytes,
    manifest_lock,
    parse_manifest,
    read_manifest,
    sha256_bytes,
    update_manifest,
)
from probekit.store.outdir import (
    OutputDir,
    free_bytes,
    is_disk_full,
    is_temporary,
    mib,
    refuse_foreign,
    replace_file,
    take_dir_lock,
    write_error,
)
from probekit.store.stamp import VERIFIED, file_stat, read_stamp, write_stamp

#: Names a cache directory may hold besides the manifest (before its first manifest, too).
_CACHE_ENTRY = re.compile(
    r"^(shard-\d{5}\.h5|\.shard-\d{5}\.h5\.tmp|\.lock-rank\d+|hardness\.json|\.hardness\.json\.lock|\.verified\.json)$")
#: Headroom kept free beyond a shard's estimated size.
_SPACE_MARGIN = 1 << 20


def is_cache_entry(name: str) -> bool:
    """Whether a directory entry can be part of a cache (its files, locks and temporaries)."""
    return (name in (MANIFEST, MANIFEST_LOCK) or bool(_CACHE_ENTRY.match(name))
            or is_temporary(name, MANIFEST) or is_temporary(name, "hardness.json") or is_temporary(name, VERIFIED))


def refuse_non_cache(out_dir: Path) -> None:
    """Refuse an existing directory with files that are not a cache's, unless it is a cache
    (has a manifest; whether it is the same run is checked against the manifest)."""
    if not (Path(out_dir) / MANIFEST).is_file():
        refuse_foreign(Path(out_dir), is_cache_entry, "cache directory")


@contextmanager
def holding_cache(out_dir: str | os.PathLike, rank: int = 0):
    """Hold rank ``rank``'s lock of cache ``out_dir`` for the block (before a slow model load, say).

    Refuses a directory of unrelated files and a cache another process is writing; a
    :class:`CacheWriter` entered inside the block shares the lock. A directory created here is
    removed again if the block fails before a shard was written into it (a refused or failed first
    run leaves no folder behind).
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        refuse_non_cache(out_dir)
    with OutputDir(out_dir, (), "cache", lock_file=lock_name(rank), share=True, exclusive=True,
                   disposable=lambda e: e in (MANIFEST, VERIFIED) or is_temporary(e, MANIFEST)) as held:
        yield held


def shard_bytes(layout: Layout, n: int) -> int:
    """About how many bytes a shard of ``n`` items takes on disk (strings at 64 bytes an item)."""
    total = 0
    for shape, dtype in layout.datasets(n).values():
        size = np.dtype(dtype).itemsize if np.dtype(dtype).kind != "O" else 64
        total += math.prod(shape) * size
    return total + 64 * 1024

#: Manifest keys the writer fills in itself; a header may not set them.
_RESERVED = frozenset(
    {"format", "sites", "layers", "hidden_size", "max_choices", "measures", "dtype", "choice_surface", "n_items",
     "shard_size", "n_shards", "world_size", "shards", "complete"}
)
_RESERVED |= {"dtype_storage"}  # how a bfloat16 cache stores its hidden states


def header_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The header a cache was written with: its manifest less the fields the writer fills in itself."""
    return {key: value for key, value in manifest.items() if key not in _RESERVED}


def _is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ProbekitError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _json_value(name: str, value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or a ProbekitError."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ProbekitError(f"cache header field {name} is not JSON-serialisable ({exc})") from None


class CacheWriter:
    """Writes one rank's shards of a cache directory (see the module docstring for the protocol).

    ``header`` holds ``model`` (id or path, revision or file hash, dtype, quantization),
    ``dataset`` (name, fingerprint) and ``prompt`` (template id and text); further keys are stored
    as given and not compared. ``layers`` are indices into the model's ``hidden_states`` tuple.
    ``choice_surface`` adds the choices' surface features to every shard (``items/choice_words``,
    ``items/choice_chars``; :meth:`ShardWriter.write_items` then needs them).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        header: Mapping[str, Any],
        *,
        n_items: int,
        shard_size: int,
        layers: Sequence[int],
        sites: Sequence[str],
        hidden_size: int,
        max_choices: int,
        measures: Sequence[str] = (),
        dtype: str = "float16",
        rank: int = 0,
        world_size: int = 1,
        choice_surface: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.n_items = _positive_int("n_items", n_items)
        self.shard_size = _positive_int("shard_size", shard_size)
        self.world_size = _positive_int("world_size", world_size)
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ProbekitError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        self.rank = int(rank)
        self.n_shards = math.ceil(self.n_items / self.shard_size)
        self.layout = _make_layout(layers, sites, hidden_size, max_choices, measures, dtype, choice_surface)
        self._check_chunk_size()
        self.header = self._make_header(header)
        self._lock_fd: int | None = None
        #: Shards this writer committed and hashed, for the verification stamp (file name -> entry).
        self._hashed: dict[str, dict[str, Any]] = {}
        #: Recorded shards found damaged by :meth:`pending_shards` (file name -> what is wrong).
        self.damaged: dict[str, str] = {}

    # ----- set-up -------------------------------------------------------------------------
    def _check_chunk_size(self) -> None:
        shape = self.layout.hidden_shape("answer_end", min(self.shard_size, self.n_items))
        nbytes = math.prod(shape[1:]) * storage_dtype(self.layout.dtype).itemsize
        if nbytes > MAX_CHUNK_BYTES:
            raise ProbekitError(
                f"shard_size {self.shard_size} is too large: one layer of a shard would take "
                f"{nbytes / 2**30:.1f} GiB and HDF5 chunks must stay under 4 GiB"
            )

    def _make_header(self, header: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest without its shard list: the given header plus this writer's layout."""
        if not isinstance(header, Mapping):
            raise ProbekitError(f"cache header must be a dict, got {type(header).__name__}")
        missing = [key for key in ("model", "dataset", "prompt") if key not in header]
        if missing:
            raise ProbekitError(f"cache header lacks {', '.join(missing)}")
        clash = sorted(_RESERVED & set(header))
        if clash:
            raise ProbekitError(f"cache header may not set {', '.join(clash)} (the writer sets them)")
        lay = self.layout
        return {
            "format": FORMAT,
            **{key: _json_value(key, value) for key, value in header.items()},
            "sites": list(lay.sites),
            "layers": list(lay.layers),
            "hidden_size": lay.hidden_size,
            "max_choices": lay.max_choices,
            "measures": list(lay.measures),
            "dtype": lay.dtype,
            "choice_surface": lay.surface,
            "n_items": self.n_items,
            "shard_size": self.shard_size,
            "n_shards": self.n_shards,
            "world_size": self.world_size,
            **({"dtype_storage": BFLOAT16_STORAGE} if lay.dtype == "bfloat16" else {}),
        }

    def _merged(self, manifest: dict[str, Any] | None) -> dict[str, Any]:
        """The existing manifest after checking it is this cache, or a fresh one."""
        if manifest is None:
            return {**self.header, "shards": [], "complete": False}
        check_same_cache(self.out_dir, manifest, self.header)
        return manifest

    # ----- the directory lock ----------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ProbekitError(f"cache directory {self.out_dir} exists and is not a directory")
        if self.out_dir.is_dir():
            refuse_non_cache(self.out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProbekitError(f"cannot create cache directory {self.out_dir} ({exc.strerror})") from None
        self._lock_fd = take_dir_lock(self.out_dir, lock_name(self.rank), "cache")
        try:
            update_manifest(self.out_dir, self._merged)
            for k in self.my_shards:
                (self.out_dir / temp_name(k)).unlink(missing_ok=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_fd is not None:
            try:
                self._stamp()
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _stamp(self) -> None:
        """Note the shards this writer hashed in the verification stamp, tied to today's manifest.

        Entries of the stamp that still match the manifest are kept; nothing here ever fails
        the write (the stamp only saves a later re-hash)."""
        if not self._hashed:
            return
        try:
            with manifest_lock(self.out_dir):
                raw = manifest_bytes(self.out_dir)
                if raw is None:
                    return
                recorded = {e["file"]: e.get("sha256") for e in parse_manifest(raw, self.out_dir).get("shards", [])}
                _, old = read_stamp(self.out_dir)
                shards = {name: e for name, e in {**old, **self._hashed}.items()
                          if name in recorded and e.get("sha256") == recorded[name]}
                write_stamp(self.out_dir, sha256_bytes(raw), shards)
        except (ProbekitError, OSError):
            pass
        self._hashed = {}

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise ProbekitError("CacheWriter must be used inside a `with` block")

    # ----- shards ---------------------------------------------------------------------------
    @property
    def my_shards(self) -> range:
        """Indices of the shards this rank writes: ``rank, rank + world_size, ...``."""
        return range(self.rank, self.n_shards, self.world_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Item rows ``lo:hi`` (into the whole dataset) of shard ``k``."""
        if not 0 <= k < self.n_shards:
            raise ProbekitError(f"shard {k} does not exist: the cache has shards 0..{self.n_shards - 1}")
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n_items)

    def pending_shards(self, verify: bool = False) -> list[int]:
        """This rank's shards still to write: not recorded, or recorded but failing the check.

        The check looks at the file's existence, size and dataset shapes (``verify=True`` also
        compares its sha256). Entries that fail are dropped from the manifest before returning.
        """
        self._require_lock()
        recorded = {e["index"]: e for e in (read_manifest(self.out_dir) or {}).get("shards", [])}
        problems = {
            k: check_shard(self.out_dir / shard_name(k), recorded[k], self.layout, full=verify)
            for k in self.my_shards if k in recorded
        }
        bad = {k for k, problem in problems.items() if problem}
        self.damaged = {shard_name(k): problems[k] for k in sorted(bad)}
        if bad:
            update_manifest(self.out_dir, lambda m: self._with_shards(m, drop=bad))
        return [k for k in self.my_shards if k not in recorded or k in bad]

    def bytes_needed(self, shards: Iterable[int]) -> int:
        """About how many bytes the given shards take on disk."""
        return sum(shard_bytes(self.layout, hi - lo) for lo, hi in map(self.shard_range, shards))

    def check_space(self, shards: Sequence[int]) -> None:
        """Refuse to start when the disk cannot hold the given shards (one line: path, need, free)."""
        if not shards:
            return
        need, free = self.bytes_needed(shards), free_bytes(self.out_dir)
        if free is not None and free < need + _SPACE_MARGIN:
            raise ProbekitError(
                f"not enough disk space for cache {self.out_dir}: {len(shards)} shard(s) still to write need "
                f"about {mib(need)}, {mib(free)} free; free some space and rerun the same command to resume"
            )

    def open_shard(self, k: int) -> ShardWriter:
        """A context manager writing shard ``k`` (one of :attr:`my_shards`); see :class:`ShardWriter`."""
        self._require_lock()
        if k not in self.my_shards:
            raise ProbekitError(
                f"shard {k} is not one of rank {self.rank}'s shards: those are the k in "
                f"0..{self.n_shards - 1} with k % {self.world_size} == {self.rank}"
            )
        lo, hi = self.shard_range(k)
        return ShardWriter(self, k, lo, hi)

    def _with_shards(
        self, manifest: dict[str, Any] | None, add: Mapping[str, Any] | None = None,
        drop: Iterable[int] = (),
    ) -> dict[str, Any]:
        """The manifest with shard entries dropped and/or one added; ``complete`` recomputed."""
        manifest = self._merged(manifest)
        gone = set(drop) | ({add["index"]} if add else set())
        shards = [e for e in manifest["shards"] if e["index"] not in gone]
        if add:
            shards.append(dict(add))
        shards.sort(key=lambda e: e["index"])
        return {**manifest, "shards": shards, "complete": len(shards) == self.n_shards}

    def _record(self, entry: Mapping[str, Any]) -> None:
        update_manifest(self.out_dir, lambda m: self._with_shards(m, add=entry))

    @property
    def complete(self) -> bool:
        """Whether the manifest records every shard of every rank."""
        manifest = read_manifest(self.out_dir)
        return bool(manifest and manifest.get("complete"))


def _make_layout(
    layers: Sequence[int], sites: Sequence[str], hidden_size: int, max_choices: int,
    measures: Sequence[str], dtype: str, surface: bool = False,
) -> Layout:
    """Validate the writer's layout arguments."""
    layers = list(layers)
    if not layers or any(not _is_int(x) or x < 0 for x in layers):
        raise ProbekitError(f"layers must be a non-empty list of hidden_states indices >= 0, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ProbekitError(f"layers has duplicates: {layers!r}")
    sites = list(sites)
    unknown = [s for s in sites if s not in SITES]
    if not sites or unknown or len(set(sites)) != len(sites):
        raise ProbekitError(f"sites must be distinct names from {list(SITES)}, got {sites!r}")
    measures = [str(m) for m in measures]
    bad = [m for m in measures if not m or "/" in m or m in ITEM_FIELDS]
    if bad or len(set(measures)) != len(measures):
        raise ProbekitError(f"measures must be distinct names without '/', got {measures!r}")
    if dtype not in DTYPES:
        raise ProbekitError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return Layout(
        layers=tuple(int(x) for x in layers),
        sites=tuple(sites),
        hidden_size=_positive_int("hidden_size", hidden_size),
        max_choices=_positive_int("max_choices", max_choices),
        measures=tuple(measures),
        dtype=dtype,
        surface=bool(surface),
    )


class ShardWriter:
    """Writes the rows of one shard into a preallocated temp file, batch by batch.

    ``offset`` arguments are row numbers inside the shard (``0 <= offset < hi - lo``). Every row
    of every part (items, each site, log-probs) must be written before the block ends.
    """

    def __init__(self, writer: CacheWriter, k: int, lo: int, hi: int) -> None:
        self.writer, self.k, self.lo, self.hi = writer, k, lo, hi
        self.n = hi - lo
        self.name = shard_name(k)
        self.path = writer.out_dir / self.name
        self.tmp = writer.out_dir / temp_name(k)
        self._file: h5py.File | None = None
        self._written = {part: np.zeros(self.n, bool) for part in writer.layout.parts()}

    def __enter__(self) -> ShardWriter:
        self.writer.check_space([self.k])
        try:
            self._file = _create_shard_file(self.tmp, self.writer.layout, self.n)
            self._file.attrs.update(
                {"format": FORMAT, "index": self.k, "item_start": self.lo, "item_stop": self.hi}
            )
            self._file.flush()
            _reserve(self.tmp)
        except (OSError, RuntimeError) as exc:
            self._discard()
            raise self._error(exc) from None
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._commit()
        except (OSError, RuntimeError) as err:  # a full disk or an unwritable directory
            self._discard()
            raise self._error(err) from None
        finally:
            self._discard()
        if exc is not None and isinstance(exc, (OSError, RuntimeError)) and is_disk_full(exc):
            raise self._error(exc) from None  # a write inside the block hit a full disk

    def _error(self, exc: BaseException) -> ProbekitError:
        """One line for a failed write: the file, and for a full disk the space the shard needs."""
        if is_disk_full(exc):
            return ProbekitError(
                f"no space left on the device writing cache shard {self.tmp}: the shard needs about "
                f"{mib(shard_bytes(self.writer.layout, self.n))}, {mib(free_bytes(self.writer.out_dir) or 0)} free; "
                "free some space and rerun the same command to resume (finished shards are kept)"
            )
        return write_error(exc, self.tmp)

    def _discard(self) -> None:
        """Close and delete the temporary file, whatever state the write left it in."""
        if self._file is not None:
            hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None  # h5py's noise on a failed close
            try:
                self._file.close()
            except Exception:
                pass
            finally:
                self._file = None
                sys.unraisablehook = hook
        self.tmp.unlink(missing_ok=True)

    # ----- writing rows ------------------------------------------------------------------------
    def write_items(
        self,
        offset: int,
        *,
        ids: Sequence[str],
        labels: Sequence[int],
        n_choices: Sequence[int],
        pool: Sequence[str],
        source: Sequence[str],
        difficulty: Mapping[str, Sequence[float]] | None = None,
        choice_words: Any = None,
        choice_chars: Any = None,
    ) -> None:
        """Item metadata for rows ``offset:offset+b``.

        ``difficulty`` maps every measure of the cache to ``b`` floats (NaN where unknown).
        ``choice_words`` and ``choice_chars`` are (b, C) counts (0 on padded choices), given exactly
        when the cache holds the choices' surface features.
        """
        b = len(ids)
        columns = {
            "id": self._strings("ids", ids, b),
            "label": self._column("labels", labels, b, np.int64),
            "n_choices": self._column("n_choices", n_choices, b, np.int64),
            "pool": self._strings("pool", pool, b),
            "source": self._strings("source", source, b),
        }
        self._check_choices(columns["id"], columns["label"], columns["n_choices"])
        difficulty = dict(difficulty or {})
        measures = self.writer.layout.measures
        if set(difficulty) != set(measures):
            raise ProbekitError(
                f"{self.name}: difficulty has measures {sorted(difficulty)}, the cache has {sorted(measures)}"
            )
        for m in measures:
            columns[f"difficulty/{m}"] = self._column(f"difficulty[{m!r}]", difficulty[m], b, np.float64)
        columns.update(self._surface(columns["n_choices"], b, choice_words=choice_words, choice_chars=choice_chars))
        rows = self._rows("items", offset, b)
        for name, values in columns.items():
            self._file[f"items/{name}"][rows] = values
        self._written["items"][rows] = True

    def write_hidden(self, offset: int, site: str, hidden: Any) -> None:
        """Hidden states of rows ``offset:offset+b`` at ``site``: (n_layers, b, C, d) or (n_layers, b, d)."""
        layout = self.writer.layout
        if site not in layout.sites:
            raise ProbekitError(f"{self.name}: site {site!r} is not in this cache ({list(layout.sites)})")
        arr = np.asarray(hidden)
        b = arr.shape[1] if arr.ndim > 1 else -1
        expected = layout.hidden_shape(site, b)
        if arr.shape != expected:
            raise ProbekitError(
                f"{self.name}: hidden {site} batch has shape {arr.shape}, expected {expected}"
            )
        rows = self._rows(f"hidden/{site}", offset, b)
        self._file[f"hidden/{site}"][:, rows] = to_storage(arr, layout.dtype)
        self._written[f"hidden/{site}"][rows] = True

    def write_logprobs(self, offset: int, *, choice_sum: Any, choice_tokens: Any) -> None:
        """Rows ``offset:offset+b`` of the per-choice summed log-probs (-inf on padded choices)
        and token counts, both (b, C)."""
        s = np.asarray(choice_sum, dtype=np.float32)
        t = np.asarray(choice_tokens)
        C = self.writer.layout.max_choices
        if s.ndim != 2 or s.shape[1] != C or t.shape != s.shape:
            raise ProbekitError(
                f"{self.name}: choice_sum {s.shape} and choice_tokens {t.shape} must both be (b, {C})"
            )
        rows = self._rows("logprob", offset, s.shape[0])
        self._file["logprob/choice_sum"][rows] = s
        self._file["logprob/choice_tokens"][rows] = t.astype(np.int32)
        self._written["logprob"][rows] = True

    def write_stored(self, offset: int, arrays: Mapping[str, Any]) -> None:
        """Rows ``offset:offset+b`` of every dataset of the shard at once, as another cache stores them.

        ``arrays`` maps each dataset path of :meth:`Layout.datasets` to its rows in the stored dtype
        (a bfloat16 cache's hidden states as uint16 bits; strings as str), item axis as in
        :meth:`Layout.item_axis`. Nothing is cast, so a shard read with :meth:`Cache.read_shard` is
        written back bit for bit; labels and choice counts are checked as by :meth:`write_items`.
        """
        expected = self.writer.layout.datasets(self.n)
        if set(arrays) != set(expected):
            missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
            raise ProbekitError(f"{self.name}: the datasets given lack {missing or 'nothing'} and have {extra or 'nothing'} "
                                "beyond the cache's")
        b = len(arrays["items/id"])
        values = {}
        for name, (shape, dtype) in expected.items():
            axis = Layout.item_axis(name)
            arr = arrays[name]
            arr = np.asarray([str(x) for x in arr], dtype=object) if np.dtype(dtype).kind == "O" else np.asarray(arr)
            want = (*shape[:axis], b, *shape[axis + 1:])
            if arr.shape != want or (np.dtype(dtype).kind != "O" and arr.dtype != np.dtype(dtype)):
                raise ProbekitError(f"{self.name}: {name} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {want}")
            values[name] = arr
        self._check_choices(values["items/id"], values["items/label"], values["items/n_choices"])
        rows = self._rows("every dataset", offset, b)
        for name, arr in values.items():
            self._file[name][(slice(None),) * Layout.item_axis(name) + (rows,)] = arr
        for done in self._written.values():
            done[rows] = True

    # ----- helpers -------------------------------------------------------------------------------
    def _rows(self, part: str, offset: int, b: int) -> slice:
        """Rows ``offset:offset+b`` of this shard, after checking they lie inside it."""
        if self._file is None:
            raise ProbekitError(f"{self.name}: write inside `with writer.open_shard(k) as sw:`")
        if not _is_int(offset) or offset < 0 or b < 1 or offset + b > self.n:
            raise ProbekitError(
                f"{self.name}: {part} rows {offset}..{offset + b - 1} lie outside "
                f"the shard's rows 0..{self.n - 1}"
            )
        return slice(int(offset), int(offset) + b)

    def _column(self, name: str, values: Any, b: int, dtype: Any) -> np.ndarray:
        arr = np.asarray(values, dtype=dtype)
        if arr.shape != (b,):
            raise ProbekitError(f"{self.name}: {name} has shape {arr.shape} for {b} items")
        return arr

    def _surface(self, n_choices: np.ndarray, b: int, **given: Any) -> dict[str, np.ndarray]:
        """The surface-feature columns to write: (b, C) non-negative counts, 0 beyond each item's choices."""
        if not self.writer.layout.surface:
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise ProbekitError(f"{self.name}: {', '.join(extra)} given, but the cache holds no surface features")
            return {}
        C = self.writer.layout.max_choices
        out = {}
        for name in SURFACE_FIELDS:
            if given[name] is None:
                raise ProbekitError(f"{self.name}: {name} is required (the cache holds the choices' surface features)")
            arr = np.asarray(given[name])
            if arr.shape != (b, C) or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
                raise ProbekitError(f"{self.name}: {name} must be ({b}, {C}) non-negative integers, got {arr.shape} "
                                    f"{arr.dtype}")
            if (arr[np.arange(C)[None, :] >= n_choices[:, None]] != 0).any():
                raise ProbekitError(f"{self.name}: {name} is not 0 on padded choices")
            out[name] = arr.astype(SURFACE_FIELDS[name])
        return out

    def _strings(self, name: str, values: Sequence[Any], b: int) -> np.ndarray:
        if len(values) != b:
            raise ProbekitError(f"{self.name}: {name} has {len(values)} values for {b} items")
        return np.asarray([str(x) for x in values], dtype=object)

    def _check_choices(self, ids: np.ndarray, labels: np.ndarray, n_choices: np.ndarray) -> None:
        """Every item has 1..C choices and a gold label among them."""
        C = self.writer.layout.max_choices
        bad = (n_choices < 1) | (n_choices > C) | (labels < 0) | (labels >= n_choices)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ProbekitError(
                f"{self.name}: item {ids[row]!r} has label {labels[row]} and {n_choices[row]} choices; "
                f"labels must lie in 0..n_choices-1 and n_choices in 1..{C}"
            )

    def _commit(self) -> None:
        """Check every row was written, make the file durable under its final name, record it."""
        for part, done in self._written.items():
            if not done.all():
                first = int(np.flatnonzero(~done)[0])
                raise ProbekitError(
                    f"{self.name}: {int((~done).sum())} of {self.n} rows of {part} were never written "
                    f"(first: row {first}, item {self.lo + first})"
                )
        self._file.flush()
        self._file.close()
        self._file = None
        replace_file(self.tmp, self.path)
        before = file_stat(self.path)
        digest = sha256_file(self.path)
        self.writer._record({
            "file": self.name,
            "index": self.k,
            "n_items": self.n,
            "item_start": self.lo,
            "item_stop": self.hi,
            "rank": self.writer.rank,
            "bytes": self.path.stat().st_size,
            "sha256": digest,
        })
        if before is not None and file_stat(self.path) == before:
            self.writer._hashed[self.name] = {**before, "sha256": digest}


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a preallocated shard file now, so a full disk fails here, before
    HDF5 writes into it (HDF5 cannot recover from a failed write). Skipped where unsupported."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if is_disk_full(exc):
            raise
    finally:
        os.close(fd)


def _create_shard_file(path: Path, layout: Layout, n: int) -> h5py.File:
    """A new HDF5 file at ``path`` with every dataset of an ``n``-item shard allocated.

    Hidden states are chunked one layer per chunk and allocated up front, so batches are written
    in place and a later one-layer read is one contiguous chunk.
    """
    f = h5py.File(path, "w")
    try:
        for name, (shape, dtype) in layout.datasets(n).items():
            if name.startswith("hidden/"):
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                ds = f.create_dataset(
                    name, shape, dtype, chunks=(1, *shape[1:]), dcpl=dcpl, fill_time="never"
                )
                ds.attrs["layers"] = np.asarray(layout.layers, dtype=np.int64)
                ds.attrs["dims"] = "layer,item,choice,hidden" if len(shape) == 4 else "layer,item,hidden"
                if layout.dtype == "bfloat16":
                    ds.attrs.update({"dtype": "bfloat16", "storage": BFLOAT16_STORAGE})
            else:
                f.create_dataset(name, shape, dtype)
    except BaseException:
        f.close()
        raise
    return f


# ----- whole caches from arrays ------------------------------------------------------------------
LOGPROB_KEYS = ("choice_sum", "choice_tokens")

ShardArrays = Mapping[str, Any]


def write_cache(
    out_dir: str | os.PathLike,
    header: Mapping[str, Any],
    items: pd.DataFrame,
    arrays: Mapping[str, Any] | Callable[[int, int], ShardArrays],
    *,
    layers: Sequence[int],
    sites: Sequence[str],
    hidden_size: int,
    max_choices: int,
    measures: Sequence[str] = (),
    shard_size: int = 256,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    choice_surface: bool = False,
    verify: bool = False,
    on_start: Callable[[list[tuple[int, int]]], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    on_damaged: Callable[[str, str], None] | None = None,
) -> list[int]:
    """Write (or finish) a cache from item rows and arrays; returns the shard indices written.

    ``items`` has one row per item with columns ``id, label, n_choices, pool, source`` and one per
    measure (with ``choice_surface``, also ``choice_words`` and ``choice_chars``: per item, one count per
    choice, padded with 0 here). ``arrays`` maps each site to its hidden states (``(n_layers, n_items, C, d)`` /
    ``(n_layers, n_items, d)``, anything sliceable along the item axis such as a memmap or an h5py
    dataset) and ``"choice_sum"``, ``"choice_tokens"`` to ``(n_items, C)`` arrays; or it is a
    callable ``(lo, hi) -> mapping`` returning those arrays for rows ``lo:hi`` only, so a cache
    larger than memory is produced one shard at a time (a shard's arrays are released before the next
    shard's are fetched). ``on_start(ranges)`` is called once, under the lock and before the first
    fetch, with the item rows ``(lo, hi)`` of every shard still to write; ``on_shard(k)`` after each
    shard; ``on_damaged(file, problem)`` for each recorded shard found damaged (it is rewritten;
    ``verify=True`` compares every recorded shard's sha256). Refuses to start when the disk cannot
    hold the shards still to write. Uses :class:`CacheWriter`, so the result is resumable and takes
    the directory lock.
    """
    items = items.reset_index(drop=True)
    needed = [*ITEM_FIELDS, *measures, *(SURFACE_FIELDS if choice_surface else ())]
    missing = [c for c in needed if c not in items.columns]
    if missing:
        raise ProbekitError(f"items table lacks columns {missing}")
    fetch = arrays if callable(arrays) else (lambda lo, hi: _slice_rows(arrays, sites, lo, hi))
    writer = CacheWriter(
        out_dir, header, n_items=len(items), shard_size=shard_size, layers=layers, sites=sites,
        hidden_size=hidden_size, max_choices=max_choices, measures=measures, dtype=dtype,
        rank=rank, world_size=world_size, choice_surface=choice_surface,
    )
    written = []
    with writer:
        pending = writer.pending_shards(verify=verify)
        if on_damaged is not None:
            for name, problem in writer.damaged.items():
                on_damaged(name, problem)
        writer.check_space(pending)
        if on_start is not None:
            on_start([writer.shard_range(k) for k in pending])
        for k in pending:
            lo, hi = writer.shard_range(k)
            data, rows = fetch(lo, hi), items.iloc[lo:hi]
            absent = [key for key in (*sites, *LOGPROB_KEYS) if key not in data]
            if absent:
                raise ProbekitError(f"arrays for rows {lo}:{hi} lack {absent}")
            with writer.open_shard(k) as sw:
                sw.write_items(
                    0, ids=rows["id"].tolist(), labels=rows["label"], n_choices=rows["n_choices"],
                    pool=rows["pool"].tolist(), source=rows["source"].tolist(),
                    difficulty={m: rows[m].to_numpy(np.float64) for m in measures},
                    **({name: _padded(rows[name], max_choices) for name in SURFACE_FIELDS} if choice_surface else {}),
                )
                for site in sites:
                    sw.write_hidden(0, site, data[site])
                sw.write_logprobs(0, choice_sum=data["choice_sum"], choice_tokens=data["choice_tokens"])
            del data  # before the next shard's arrays are fetched
            written.append(k)
            if on_shard is not None:
                on_shard(k)
    return written


def _padded(lists: pd.Series, width: int) -> np.ndarray:
    """Per-item lists of counts as a (n, width) int64 array, 0 beyond each list."""
    out = np.zeros((len(lists), width), dtype=np.int64)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out


def _slice_rows(arrays: Mapping[str, Any], sites: Sequence[str], lo: int, hi: int) -> dict[str, Any]:
    """Rows ``lo:hi`` of in-memory (or memory-mapped) cache arrays."""
    absent = [key for key in (*sites, *LOGPROB_KEYS) if key not in arrays]
    if absent:
        raise ProbekitError(f"arrays lack {absent} (have {sorted(arrays)})")
    out = {site: np.asarray(arrays[site][:, lo:hi]) for site in sites}
    out.update({key: np.asarray(arrays[key][lo:hi]) for key in LOGPROB_KEYS})
    return out
