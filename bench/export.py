"""Cache sizes and read times: float16 vs bfloat16 vs float32 HDF5, and the Parquet export vs HDF5.

From one real float32 cache (built here when missing: SmolLM2 over the bundled ARC sample, every
layer, both sites, ``probekit extract --dataset arc-sample --layers all --store-dtype float32``) the
float16 and bfloat16 caches are written from the same activations (``write_cache``, as extract
writes them: a float16 cast; torch's round-to-nearest-even for bfloat16), then the float16 and the
bfloat16 cache are exported (``export_cache``). One run measures, side by side:

* size on disk: each HDF5 cache (manifest + shards) and each export folder (Parquet files, card,
  probekit.json);
* one layer of answer_end (the sweep's read) as float32: ``Cache.read_layer`` on each HDF5 cache,
  and from the export with pyarrow (``pq.read_table(columns=[...])``) and with ``datasets``
  (``load_dataset("parquet", columns=[...])`` into a fresh ``HF_DATASETS_CACHE``, which converts the
  Parquet column to its own Arrow file once, then reading it from there: "cold" and "warm");
* every layer of both sites: all ``read_layer`` calls vs reading every Parquet file whole;
* export and import wall time.

Reads are repeated ``--reps`` times in rotating order and the median is printed; every file was just
written or read, so all of them are served from the page cache alike (warm reads, not disk speed).

Example:
    python bench/export.py
    python bench/export.py --cache cache/SmolLM2-135M-Instruct__arc-sample-f32 --reps 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "cache" / "SmolLM2-135M-Instruct__arc-sample-f32"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def ensure_source(cache: Path, threads: int) -> None:
    if (cache / "manifest.json").is_file():
        return
    print(f"building {cache}: probekit extract --dataset arc-sample --layers all --store-dtype float32", flush=True)
    subprocess.run([sys.executable, "-m", "probekit.cli", "extract", "--dataset", "arc-sample", "--layers", "all",
                    "--store-dtype", "float32", "--threads", str(threads), "--no-progress", "--out", str(cache)],
                   check=True, cwd=REPO)


def derive(source, out: Path, dtype: str) -> None:
    """The source cache's activations written again in ``dtype`` (the same shard size and header)."""
    from probekit.store import write_cache
    from probekit.store.writer import header_of

    arrays = {s: np.stack([source.read_layer(s, layer) for layer in source.layers]) for s in source.sites}
    arrays["choice_sum"], arrays["choice_tokens"] = source.logprobs()
    write_cache(out, header_of(source.manifest), source.items, arrays, layers=source.layers, sites=source.sites,
                hidden_size=source.hidden_size, max_choices=source.max_choices, measures=source.measures,
                shard_size=source.shard_size, dtype=dtype)


def parquet_columns(folder: Path, columns: list[str], bf16: bool) -> dict[str, np.ndarray]:
    """Hidden-state columns of every Parquet file, each as one float32 (n_items, ...) array (pyarrow only)."""
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for f in sorted((folder / "data").glob("*.parquet")):
        table = pq.read_table(f, columns=columns)
        for c in columns:
            col = table.column(c).combine_chunks()
            flat, shape = col, []
            while hasattr(flat.type, "list_size"):
                shape.append(flat.type.list_size)
                flat = flat.flatten()
            parts[c].append(flat.to_numpy().reshape(len(col), *shape))
    out = {}
    for c, xs in parts.items():
        x = np.concatenate(xs)
        out[c] = (x.astype(np.uint32) << 16).view(np.float32) if bf16 else x.astype(np.float32)
    return out


def datasets_layer(folder: Path, column: str, bf16: bool, hf_cache: Path) -> np.ndarray:
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(folder / "data" / "*.parquet"), split="train", columns=[column],
                      cache_dir=str(hf_cache)).with_format("numpy")
    x = np.asarray(ds[column])
    return (x.astype(np.uint16).astype(np.uint32) << 16).view(np.float32) if bf16 else x.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="a float32 cache (built when missing)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads when the source cache is built")
    ap.add_argument("--workdir", type=Path, default=None, help="where the derived caches go (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from probekit.store import Cache
    from probekit.store.export import export_cache, import_cache

    ensure_source(args.cache, args.threads)
    source = Cache(args.cache)
    if source.layout.dtype != "float32":
        sys.exit(f"{args.cache} holds {source.layout.dtype}: give a float32 cache (--store-dtype float32)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="probekit-bench-export-"))
    caches = {"float32": args.cache, "float16": work / "f16", "bfloat16": work / "bf16"}
    for dtype in ("float16", "bfloat16"):
        shutil.rmtree(caches[dtype], ignore_errors=True)
        derive(source, caches[dtype], dtype)
    opened = {dtype: Cache(path) for dtype, path in caches.items()}
    layer = source.layers[len(source.layers) // 2]
    column = f"hidden.answer_end.layer{layer}"
    print(f"source: {args.cache}: {source.n_items} items, layers {source.layers[0]}..{source.layers[-1]} "
          f"({len(source.layers)}), sites {', '.join(source.sites)}, hidden size {source.hidden_size}, "
          f"max choices {source.max_choices}; one layer = answer_end layer {layer}")

    exports, export_s, import_s = {}, {}, {}
    for dtype in ("float16", "bfloat16"):
        exports[dtype] = work / f"export-{dtype}"
        shutil.rmtree(exports[dtype], ignore_errors=True)
        t = time.perf_counter()
        export_cache(caches[dtype], exports[dtype])
        export_s[dtype] = time.perf_counter() - t
        back = work / f"back-{dtype}"
        shutil.rmtree(back, ignore_errors=True)
        t = time.perf_counter()
        summary = import_cache(exports[dtype], back)
        import_s[dtype] = time.perf_counter() - t
        assert summary.same_bytes, f"the {dtype} import is not byte-identical"

    # the values each path returns are the same
    ref = {dtype: opened[dtype].read_layer("answer_end", layer) for dtype in ("float16", "bfloat16")}
    for dtype in ("float16", "bfloat16"):
        assert np.array_equal(parquet_columns(exports[dtype], [column], dtype == "bfloat16")[column], ref[dtype])

    import datasets  # noqa: F401  (imported before the cold loads are timed)

    hf = work / "hf-datasets"
    cold = {}
    for dtype in ("float16", "bfloat16"):
        shutil.rmtree(hf / dtype, ignore_errors=True)
        t = time.perf_counter()
        x = datasets_layer(exports[dtype], column, dtype == "bfloat16", hf / dtype)
        cold[dtype] = time.perf_counter() - t
        assert np.array_equal(x, ref[dtype])

    hidden = [f"hidden.{s}.layer{la}" for s in source.sites for la in source.layers]
    jobs = {}
    for dtype, cache in opened.items():
        jobs[f"hdf5 {dtype} one layer"] = lambda c=cache: c.read_layer("answer_end", layer)
        jobs[f"hdf5 {dtype} all layers"] = lambda c=cache: [c.read_layer(s, la) for s in c.sites for la in c.layers]
    for dtype in ("float16", "bfloat16"):
        bf = dtype == "bfloat16"
        jobs[f"parquet {dtype} one layer (pyarrow)"] = lambda d=dtype, b=bf: parquet_columns(exports[d], [column], b)
        jobs[f"parquet {dtype} one layer (datasets, warm)"] = \
            lambda d=dtype, b=bf: datasets_layer(exports[d], column, b, hf / d)
        jobs[f"parquet {dtype} all layers (pyarrow)"] = lambda d=dtype, b=bf: parquet_columns(exports[d], hidden, b)
    times = {name: [] for name in jobs}
    for rep in range(args.reps):
        names = list(jobs)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotating order
        for name in names:
            t = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    size = {f"hdf5 {d}": Cache(p).size_bytes for d, p in caches.items()}
    size.update({f"export {d}": folder_bytes(p) for d, p in exports.items()})
    print("\nsize on disk")
    for name, n in size.items():
        print(f"  {name:<22} {mib(n)}   {n / size['hdf5 float16']:.3f}x hdf5 float16")
    print(f"\nreads (median of {args.reps}, warm page cache), seconds")
    for name, s in med.items():
        print(f"  {name:<44} {s:8.3f}")
    for dtype in ("float16", "bfloat16"):
        print(f"  {'parquet ' + dtype + ' one layer (datasets, cold)':<44} {cold[dtype]:8.3f}   (once: converts to Arrow)")
    print("\nratios")
    print(f"  bfloat16 / float16 hdf5 size            {size['hdf5 bfloat16'] / size['hdf5 float16']:.3f}")
    print(f"  bfloat16 / float16 hdf5 one-layer read  {med['hdf5 bfloat16 one layer'] / med['hdf5 float16 one layer']:.2f}")
    print(f"  bfloat16 / float16 hdf5 all-layer read  {med['hdf5 bfloat16 all layers'] / med['hdf5 float16 all layers']:.2f}")
    for dtype in ("float16", "bfloat16"):
        h1, ha = med[f"hdf5 {dtype} one layer"], med[f"hdf5 {dtype} all layers"]
        print(f"  {dtype} export / hdf5 size              {size[f'export {dtype}'] / size[f'hdf5 {dtype}']:.3f}")
        print(f"  {dtype} pyarrow / hdf5 one-layer read   {med[f'parquet {dtype} one layer (pyarrow)'] / h1:.2f}")
        print(f"  {dtype} datasets warm / hdf5 one layer  {med[f'parquet {dtype} one layer (datasets, warm)'] / h1:.2f}")
        print(f"  {dtype} pyarrow / hdf5 all-layer read   {med[f'parquet {dtype} all layers (pyarrow)'] / ha:.2f}")
        print(f"  {dtype} export {export_s[dtype]:.1f} s, import {import_s[dtype]:.1f} s (byte-identical cache)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
