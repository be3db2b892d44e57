"""`probekit export` and `probekit import`: a cache as a Hugging Face `datasets` Parquet folder, and back."""

from __future__ import annotations

from pathlib import Path

import typer

from probekit.cli import app
from probekit.cli.common import clean_errors, console


@app.command("export")
def export_cmd(
    cache_dir: Path = typer.Argument(..., help="Cache directory (holds manifest.json and shard-*.h5)."),
    to: Path = typer.Option(..., "--to", help="Folder to write: data/shard-NNNNN.parquet, README.md (dataset card), probekit.json."),
) -> None:
    """Write a cache as a folder that `datasets.load_dataset("parquet", ...)` reads without probekit.

    One Parquet row per item: the item columns (id, label, n_choices, pool, source, difficulty.<measure>), logprob.choice_sum and logprob.choice_tokens, and one column per site and layer (hidden.answer_end.layer16: max_choices x hidden_size per item) in the cache's dtype (a bfloat16 cache's uint16 bits, see docs/formats.md). The folder's README.md is a dataset card with the manifest, the columns and how to push it to the Hub (HfApi().upload_folder, or `hf upload USER/NAME DIR . --repo-type dataset --exclude .lock`); probekit.json holds the manifest and each file's sha256 for `probekit import`.

    \b
    Example:
      probekit export cache/SmolLM2-135M-Instruct__arc-sample --to exports/smollm2-arc-sample
    """
    with clean_errors():
        from probekit.store.export import export_cache

        summary = export_cache(cache_dir, to)
    console.print(summary.line(), markup=False, highlight=False, soft_wrap=True)


@app.command("import")
def import_cmd(
    folder: Path = typer.Argument(..., help="Folder written by `probekit export` (holds probekit.json and data/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache directory to write (new, or an unfinished import of the same folder)."),
) -> None:
    """Read an exported folder back into a verified cache that sweeps to the same numbers.

    Every Parquet file is checked against its sha256 first; the shards are written with the exported cache's manifest (header, layout, shard size, ranks), and the result is verified. A rerun finishes an interrupted import.

    \b
    Example:
      probekit import exports/smollm2-arc-sample --out cache/smollm2-arc-sample
    """
    with clean_errors():
        from probekit.store.export import import_cache

        summary = import_cache(folder, out)
    console.print(summary.line(), markup=False, highlight=False, soft_wrap=True)
