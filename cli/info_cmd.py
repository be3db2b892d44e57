"""`probekit info`: what a cache directory holds, and whether its shards are intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from probekit.cli import app
from probekit.cli.common import clean_errors, console
from probekit.store import Cache


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fields(d: Any) -> str:
    """A header dict as ``key=value`` pairs (long values such as prompt texts shortened)."""
    if not isinstance(d, dict):
        return str(d)
    parts = []
    for key, value in d.items():
        text = str(value).replace("\n", "\\n")
        parts.append(f"{key}={text if len(text) <= 40 else text[:37] + '...'}")
    return ", ".join(parts)


@app.command("info")
def info(
    cache_dir: Path = typer.Argument(..., help="Cache directory (holds manifest.json and shard-*.h5)."),
    verify: bool = typer.Option(False, "--verify", help="Check every shard's sha256 and dataset shapes."),
) -> None:
    """Show what a hidden-state cache holds: model, dataset, layers, sites, items, shards, size.

    With --verify every shard is checked against the manifest; bad ones are listed, exit code 1.

    \b
    Example:
      probekit info cache/smollm2-135m__arc
      probekit info cache/smollm2-135m__arc --verify
    """
    with clean_errors():
        cache = Cache(cache_dir, require_complete=False)
    m = cache.manifest
    rows = [
        ("cache", str(cache.path)),
        ("model", _fields(m["model"])),
        ("dataset", _fields(m["dataset"])),
        ("prompt", _fields(m["prompt"])),
        ("layers", ", ".join(map(str, cache.layers))),
        ("sites", ", ".join(cache.sites)),
        ("hidden size", f"{cache.hidden_size} ({m.get('dtype', 'float16')}"
                        + (f", stored as {m['dtype_storage']}" if "dtype_storage" in m else "")
                        + f"), max choices {cache.max_choices}"),
        ("measures", ", ".join(cache.measures) or "-"),
        ("items", str(cache.n_items)),
        ("shards", f"{len(cache.shards)} of {cache.n_shards} written "
                   f"({cache.shard_size} items each, {m.get('world_size', 1)} rank(s))"),
        ("size on disk", _human_bytes(cache.size_bytes)),
        ("complete", "yes" if cache.complete else "no"),
        ("manifest sha256", cache.manifest_sha256),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)
    if not verify:
        return
    with Progress(
        TextColumn("verifying"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        shard_bytes = {k: int(e.get("bytes", 0)) for k, e in cache.shards.items()}
        task = bar.add_task("verify", total=sum(shard_bytes.values()))
        problems = cache.verify(on_shard=lambda k: bar.advance(task, shard_bytes.get(k, 0)))
    for line in problems:
        console.print(f"bad: {line}", markup=False, highlight=False, soft_wrap=True)
    for name in cache.stray_shards():
        console.print(f"note: {name} is not listed in the manifest (left by another run, or copied in): it is never "
                      "read; delete it", markup=False, highlight=False, soft_wrap=True)
    if problems:
        console.print(f"{len(problems)} of {cache.n_shards} shards are bad", markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(f"verified: all {cache.n_shards} shards match the manifest", markup=False, highlight=False)
