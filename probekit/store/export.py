"""A cache as a Hugging Face ``datasets`` folder of Parquet files, and back: the export format.

``export_cache(CACHE, DIR)`` writes::

    DIR/data/shard-NNNNN.parquet   one per cache shard, one row per item
    DIR/README.md                  dataset card: how to load it, its columns, the manifest, how to push it
    DIR/probekit.json              "probekit-export/1": the cache's manifest, the column map, each file's sha256

Every dataset a shard holds (:meth:`Layout.datasets`) is a column, named by its path: item fields
without the ``items/`` prefix (``id``, ``label``, ``difficulty.grade``, ...), ``logprob.choice_sum``,
and the layer-major hidden states split into one column per layer, ``hidden.answer_end.layer16``.
A column with more than one value per item is a fixed-size list (``hidden.answer_end.layerL``:
(max_choices, hidden_size); ``logprob.choice_sum``: (max_choices,)), so ``datasets`` with the
numpy format returns it as an (n_items, ...) array. Hidden states keep the cache's stored dtype:
float16 (or float32), and for a bfloat16 cache its uint16 bits, turned into float32 with
``(bits.astype(np.uint32) << 16).view(np.float32)``. Parquet is columnar, so one layer is read
without the others (``columns=[...]``).

``import_cache(DIR, CACHE)`` checks each file against its sha256, writes the shards back through
:class:`~probekit.store.writer.CacheWriter` with the same header, layout, shard size and ranks,
and checks that the new manifest is the exported one (with h5py and HDF5 as here, byte for byte)
and that the cache verifies. A folder is written under its lock (``DIR/.lock``), each file under
a temporary name; ``probekit.json`` is removed first and written last, so a folder without it is
an unfinished export that ``import`` refuses.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probekit.errors import ProbekitError
from probekit.store.layout import BFLOAT16_STORAGE, Layout, fsync_path, sha256_file
from probekit.store.layout import FORMAT as CACHE_FORMAT
from probekit.store.manifest import first_difference, parse_json
from probekit.store.outdir import LOCK, OutputDir, is_temporary, replace_file, write_error
from probekit.store.reader import Cache
from probekit.store.writer import CacheWriter, header_of

FORMAT = "probekit-export/1"
META = "probekit.json"
CARD = "README.md"
DATA = "data"
#: Parquet compression of every column (zstd at its default level): float16 columns shrink by about 9%
#: (snappy and lz4: 1-2%), and Parquet keeps uint16 (a bfloat16 cache's bits) as INT32, whose zero upper
#: halves zstd removes (2.0x the bits uncompressed, 1.4x with snappy, 0.95x with zstd on SmolLM2's states).
COMPRESSION = "zstd"

_DATA_FILE = re.compile(r"^shard-\d{5}\.parquet$")


def data_name(k: int) -> str:
    """The Parquet file of cache shard ``k``: ``data/shard-00003.parquet``."""
    return f"{DATA}/shard-{k:05d}.parquet"


def column_name(dataset: str, layer: int | None = None) -> str:
    """The column of a shard dataset (of one layer of a hidden-state dataset): ``items/label`` ->
    ``label``, ``items/difficulty/grade`` -> ``difficulty.grade``, ``hidden/answer_end`` at layer 16 ->
    ``hidden.answer_end.layer16``."""
    name = dataset.removeprefix("items/").replace("/", ".")
    return name if layer is None else f"{name}.layer{layer}"


def columns_of(layout: Layout) -> list[dict[str, Any]]:
    """Every column of an export of a cache with this layout, in order: name, dataset, layer, dtype, shape."""
    out = []
    for name, (shape, dtype) in layout.datasets(1).items():
        kind = "string" if np.dtype(dtype).kind == "O" else np.dtype(dtype).name
        axis = Layout.item_axis(name)
        per_item = list(shape[axis + 1:])
        if axis == 0:
            out.append({"name": column_name(name), "dataset": name, "layer": None, "dtype": kind, "shape": per_item})
        else:
            out.extend({"name": column_name(name, layer), "dataset": name, "layer": layer, "dtype": kind,
                        "shape": per_item} for layer in layout.layers)
    return out


def _arrow(values: np.ndarray, shape: list[int]) -> pa.Array:
    """``values`` (n, *shape) as an Arrow column: strings, scalars, or nested fixed-size lists."""
    if values.dtype.kind == "O":
        return pa.array(values.tolist(), type=pa.string())
    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(shape):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _numpy(column: pa.ChunkedArray, spec: Mapping[str, Any], n: int, where: str) -> np.ndarray:
    """An exported column back as the (n, *shape) array the shard stores, checking its type."""
    col = column.combine_chunks()
    if col.null_count:
        raise ProbekitError(f"{where}: column {spec['name']} has {col.null_count} missing values")
    if spec["dtype"] == "string":
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise ProbekitError(f"{where}: column {spec['name']} is {col.type}, expected strings")
        return np.asarray(col.to_pylist(), dtype=object)
    flat, sizes = col, []
    while pa.types.is_fixed_size_list(flat.type):
        sizes.append(flat.type.list_size)
        flat = flat.flatten()
    if sizes != list(spec["shape"]) or flat.type != pa.from_numpy_dtype(np.dtype(spec["dtype"])):
        raise ProbekitError(f"{where}: column {spec['name']} is {col.type}, expected {spec['dtype']} "
                            f"with shape {tuple(spec['shape'])} per item")
    return flat.to_numpy(zero_copy_only=False).reshape(n, *spec["shape"])


def _is_export_entry(name: str) -> bool:
    """Whether a folder entry can be part of an export (its files, lock and temporaries)."""
    return (name in (META, CARD, DATA, LOCK) or is_temporary(name, META) or is_temporary(name, CARD)
            or bool(re.match(r"^\.shard-\d{5}\.parquet\..*\.tmp$", name)))


@dataclasses.dataclass
class ExportSummary:
    source: Path
    folder: Path
    n_items: int
    files: int
    columns: int
    bytes: int  # the Parquet files
    cache_bytes: int  # the cache's manifest and shards
    seconds: float

    def line(self) -> str:
        return (f"exported {self.source} ({self.n_items} items, {self.cache_bytes / 2**20:.1f} MiB) to {self.folder}: "
                f"{self.files} Parquet files, {self.columns} columns, {self.bytes / 2**20:.1f} MiB, "
                f"in {self.seconds:.1f} s")


def export_cache(cache: str | os.PathLike | Cache, folder: str | os.PathLike,
                 on_file: Callable[[int], None] | None = None) -> ExportSummary:
    """Write a complete, verified cache as a ``datasets``-loadable Parquet folder (module docstring).

    The cache is verified first, as ``sweep`` does (a shard changed since its last full hash is
    hashed again; a damaged cache is refused, not exported). A folder
    already holding an export of another cache, or files that are not an export's, is refused;
    one holding an export of this cache is written again. ``on_file(k)`` after each file.
    """
    t0 = time.perf_counter()
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    problems = cache.verify(since_stamp=True)
    if problems:
        raise ProbekitError(f"cache {cache.path} fails verification: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    folder = Path(folder)
    old = _read_meta(folder) if (folder / META).is_file() else None
    if old is not None and old.get("manifest_sha256") != cache.manifest_sha256:
        raise ProbekitError(f"export folder {folder} holds an export of another cache ({old['manifest'].get('model', {})}, "
                            "manifest differs); choose another --to or delete it")
    columns = columns_of(cache.layout)
    files: list[dict[str, Any]] = []
    names = (META, CARD, *(Path(data_name(k)).name for k in range(cache.n_shards)))
    with OutputDir(folder, names, "export folder", own=_is_export_entry) as out:
        data = folder / DATA
        try:
            for name in (META, CARD):  # a rewrite that stops half-way must not pass for an export
                (folder / name).unlink(missing_ok=True)
            data.mkdir(exist_ok=True)
            for entry in os.listdir(data):
                if _DATA_FILE.match(entry):
                    (data / entry).unlink()
            fsync_path(folder)
            for k in range(cache.n_shards):
                files.append(_write_file(cache, k, columns, folder, out.temp(Path(data_name(k)).name)))
                if on_file is not None:
                    on_file(k)
            meta = {"format": FORMAT, "cache_format": CACHE_FORMAT, "manifest_sha256": cache.manifest_sha256,
                    "manifest": cache.manifest, "columns": columns, "files": files}
            tmp = out.temp(CARD)
            try:
                tmp.write_text(card(meta), encoding="utf-8")
            except OSError as exc:
                raise write_error(exc, folder / CARD) from None
            out.commit(tmp, CARD)
            out.write_json(META, meta)
        except BaseException:
            for f in files:
                (folder / f["file"]).unlink(missing_ok=True)
            if data.is_dir() and not os.listdir(data):
                data.rmdir()
            raise
    return ExportSummary(cache.path, folder, cache.n_items, len(files), len(columns),
                         sum(f["bytes"] for f in files), cache.size_bytes, time.perf_counter() - t0)


def _write_file(cache: Cache, k: int, columns: list[dict[str, Any]], folder: Path, tmp: Path) -> dict[str, Any]:
    """Shard ``k`` of the cache as ``DIR/data/shard-k.parquet`` (through ``tmp``); its record for ``probekit.json``."""
    stored = cache.read_shard(k)
    n = int(cache.shards[k]["n_items"])
    index = {layer: i for i, layer in enumerate(cache.layout.layers)}
    table = pa.table({c["name"]: _arrow(stored[c["dataset"]] if c["layer"] is None else
                                        stored[c["dataset"]][index[c["layer"]]], c["shape"]) for c in columns})
    del stored
    name = data_name(k)
    try:
        pq.write_table(table, tmp, compression=COMPRESSION, use_dictionary=_string_columns(columns),
                       row_group_size=max(n, 1))
        replace_file(tmp, folder / name)
    except (OSError, pa.ArrowException) as exc:
        raise write_error(exc, folder / name) from None
    return {"file": name, "shard": k, "n_items": n, "bytes": (folder / name).stat().st_size,
            "sha256": sha256_file(folder / name)}


def _string_columns(columns: list[dict[str, Any]]) -> list[str]:
    """Dictionary encoding for the string columns only (it only costs time on the floats)."""
    return [c["name"] for c in columns if c["dtype"] == "string"]


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        what = "an unfinished export (rerun `probekit export`)" if (folder / DATA).is_dir() else "not a probekit export"
        raise ProbekitError(f"{folder} has no {META}: {what}") from None
    except OSError as exc:
        raise ProbekitError(f"cannot read {path} ({exc.strerror})") from None
    meta = parse_json(raw, path, FORMAT)
    missing = [key for key in ("manifest", "manifest_sha256", "columns", "files") if key not in meta]
    if missing:
        raise ProbekitError(f"{path} lacks {', '.join(missing)}")
    if meta["manifest"].get("format") != CACHE_FORMAT or not meta["manifest"].get("complete"):
        raise ProbekitError(f"{path} does not hold the manifest of a complete {CACHE_FORMAT} cache")
    return meta


@dataclasses.dataclass
class ImportSummary:
    folder: Path
    cache: Path
    n_items: int
    shards_written: list[int]
    same_bytes: bool  # the manifest (so every shard) is byte-identical to the exported cache's
    seconds: float

    def line(self) -> str:
        same = ("byte-identical to the exported cache" if self.same_bytes else
                "same manifest content; shard files differ in bytes from the exported cache's (another HDF5 build)")
        return (f"imported {self.folder} into {self.cache}: {self.n_items} items, {len(self.shards_written)} shards "
                f"written, verified, {same} (in {self.seconds:.1f} s)")


def import_cache(folder: str | os.PathLike, out: str | os.PathLike,
                 on_shard: Callable[[int], None] | None = None) -> ImportSummary:
    """Read an export folder back into a verified cache at ``out`` (module docstring).

    Every Parquet file is checked against the sha256 in ``probekit.json`` before anything is
    written; a rerun finishes an interrupted import, and an ``out`` holding another cache is refused.
    """
    t0 = time.perf_counter()
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ProbekitError(f"export folder {folder} does not exist")
    meta = _read_meta(folder)
    manifest = meta["manifest"]
    layout = Layout.from_manifest(manifest)
    columns = columns_of(layout)
    if meta["columns"] != columns:
        first = next((i for i, (a, b) in enumerate(zip(meta["columns"], columns)) if a != b), min(len(meta["columns"]),
                                                                                                len(columns)))
        raise ProbekitError(f"{folder / META}: its columns are not those of the cache it describes (column {first}: "
                            f"{str(meta['columns'][first:first + 1])[:80]}, expected {str(columns[first:first + 1])[:80]})")
    files = {int(f["shard"]): f for f in meta["files"]}
    n_shards = int(manifest["n_shards"])
    if sorted(files) != list(range(n_shards)):
        raise ProbekitError(f"{folder / META} lists files for shards {sorted(files)}, the cache has 0..{n_shards - 1}")
    for k, f in sorted(files.items()):
        if f.get("file") != data_name(k):
            raise ProbekitError(f"{folder / META} names {f.get('file')!r} for shard {k}, not {data_name(k)}")
        path = folder / f["file"]
        if not path.is_file():
            raise ProbekitError(f"{path} is missing from the export")
        if path.stat().st_size != f["bytes"] or sha256_file(path) != f["sha256"]:
            raise ProbekitError(f"{path} differs from the export's record (size or sha256): a damaged or partial copy")

    def shard_arrays(k: int, n: int) -> dict[str, np.ndarray]:
        path = folder / files[k]["file"]
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise ProbekitError(f"{path} cannot be read as Parquet ({str(exc).splitlines()[0]})") from None
        if table.num_rows != n or table.column_names != [c["name"] for c in columns]:
            raise ProbekitError(f"{path} has {table.num_rows} rows and columns {table.column_names[:3]}...; "
                                f"expected {n} rows and the {len(columns)} columns of {META}")
        got = {c["name"]: _numpy(table.column(c["name"]), c, n, str(path)) for c in columns}
        stored: dict[str, np.ndarray] = {}
        for name in layout.datasets(n):
            parts = [got[column_name(name, layer)] for layer in layout.layers] if Layout.item_axis(name) else None
            stored[name] = np.stack(parts) if parts is not None else got[column_name(name)]
        return stored

    args = writer_args(manifest)
    written: list[int] = []
    world = int(manifest.get("world_size", 1))
    for rank in range(world):  # the exported cache's ranks, so its manifest comes back whole
        writer = CacheWriter(out, header_of(manifest), **{**args, "world_size": world}, rank=rank)
        with writer:
            for k in writer.pending_shards(verify=True):
                lo, hi = writer.shard_range(k)
                arrays = shard_arrays(k, hi - lo)
                with writer.open_shard(k) as sw:
                    sw.write_stored(0, arrays)
                del arrays
                written.append(k)
                if on_shard is not None:
                    on_shard(k)
    cache = Cache(out)
    new = {k: v for k, v in cache.manifest.items() if k != "shards"}
    diff = first_difference({k: v for k, v in manifest.items() if k != "shards"}, new, "manifest")
    ignore = ("sha256", "bytes")
    shards = [[{k: v for k, v in e.items() if k not in ignore} for e in m["shards"]] for m in (manifest, cache.manifest)]
    if diff is None and shards[0] != shards[1]:
        diff = ("manifest.shards", shards[0], shards[1])
    if diff is not None:
        raise ProbekitError(f"cache {out} was written with {diff[0]}={str(diff[1])[:60]!r}, the export says "
                            f"{str(diff[2])[:60]!r}; choose another --out")
    problems = cache.verify()
    if problems:
        raise ProbekitError(f"imported cache {out} fails verification: {problems[0]}")
    return ImportSummary(folder, out, cache.n_items, sorted(written), cache.manifest_sha256 == meta["manifest_sha256"],
                         time.perf_counter() - t0)


def writer_args(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`CacheWriter` arguments a manifest records: the writer stores each layout and size
    argument under its own name (layers, sites, hidden_size, max_choices, measures, dtype, n_items,
    shard_size, world_size, and any it gains), so a cache is rewritten with exactly its own."""
    return {name: manifest[name] for name in inspect.signature(CacheWriter).parameters
            if name in manifest and name not in ("out_dir", "header", "rank")}


# ----- the dataset card ------------------------------------------------------------------------------
def card(meta: Mapping[str, Any]) -> str:
    """README.md of an export: YAML header for the Hub and ``datasets``, how to load, columns, manifest."""
    m = meta["manifest"]
    model = m.get("model", {}).get("id") or m.get("model", {}).get("path") or "?"
    dataset = m.get("dataset", {}).get("name", "?")
    layers = m["layers"]
    example = column_name(f"hidden/{m['sites'][0]}", layers[len(layers) // 2])
    shape = next(("n_items, " + ", ".join(map(str, c["shape"]))) for c in meta["columns"] if c["name"] == example)
    bf16 = m.get("dtype") == "bfloat16"
    decode = ("\n# a bfloat16 cache: the column holds uint16 bits; as float32:\n"
              "X = (X.astype(np.uint32) << 16).view(np.float32)") if bf16 else ""
    rows = "\n".join(f"| `{c['name']}` | `{c['dataset']}`" + (f" layer {c['layer']}" if c["layer"] is not None else "")
                     + f" | {c['dtype']} | {tuple(c['shape']) if c['shape'] else 'scalar'} |" for c in meta["columns"])
    storage = (f"\nHidden states are bfloat16, stored as {BFLOAT16_STORAGE}.\n" if bf16 else
               f"\nHidden states are {m.get('dtype', 'float16')}.\n")
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA}/*.parquet
tags:
- probekit
- hidden-states
---

# Hidden states of {model} on {dataset}

A probekit cache ({CACHE_FORMAT}) as Parquet: {m['n_items']} items, one row each, in
{len(meta['files'])} files under `{DATA}/`. Sites {', '.join(m['sites'])}; layers {', '.join(map(str, layers))}
(indices into the model's `hidden_states`, 0 = the embeddings); hidden size {m['hidden_size']};
up to {m['max_choices']} choices an item, padded choices hold zeros (hidden states) and -inf (log-probs).
{storage}
## Load it

```python
import numpy as np
from datasets import load_dataset

ds = load_dataset("parquet", data_files="{DATA}/*.parquet", split="train",
                  columns=["id", "label", "n_choices", "{example}"]).with_format("numpy")
X = np.asarray(ds["{example}"])  # ({shape}): one layer, read alone{decode}
```

`probekit import FOLDER --out CACHE` turns the folder back into the cache (checked against the
sha256 of every file in `{META}`, which also holds the cache's manifest).

## Push it to the Hub

```python
from huggingface_hub import HfApi

HfApi().upload_folder(folder_path="FOLDER", repo_id="USER/NAME", repo_type="dataset", ignore_patterns=[".lock"])
```

or `hf upload USER/NAME FOLDER . --repo-type dataset --exclude .lock`.

## Columns

| column | cache dataset | dtype | per item |
|---|---|---|---|
{rows}

## Manifest

```json
{json.dumps(m, indent=2)}
```
"""


__all__ = ["FORMAT", "META", "ExportSummary", "ImportSummary", "card", "column_name", "columns_of", "export_cache",
           "import_cache"]
