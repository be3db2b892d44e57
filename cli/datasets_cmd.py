"""`probekit datasets`: the question sets, where each loads from, and items per difficulty level."""

from __future__ import annotations

import typer
from rich.table import Table

from probekit.cli import app
from probekit.cli.common import clean_errors, console

datasets_app = typer.Typer(no_args_is_help=False, invoke_without_command=True)
app.add_typer(datasets_app, name="datasets")

DATA_DIR = typer.Option(None, "--data-dir", help="Folder with the original files (arc/, mmlu/, ...). "
                        "Default: $PROBEKIT_DATA_DIR, else the Hugging Face hub.")


@datasets_app.callback()
def datasets(ctx: typer.Context) -> None:
    """List the question sets and where each can be loaded from; show items per level.

    \b
    Example:
      probekit datasets
      probekit datasets show arc --measure grade --data-dir ../shared/data
    """
    if ctx.invoked_subcommand is not None:
        return
    from probekit.data.sets import SETS

    table = Table(title="question sets")
    for col in ("name", "description", "measures", "--data-dir needs", "hub"):
        table.add_column(col, overflow="fold")
    for spec in SETS.values():
        table.add_row(spec.name, spec.description, ", ".join(spec.all_measures), spec.local_files, spec.hub or "-")
    table.add_row("FILE.jsonl|.csv", "your own set: question, choices, label, numeric difficulty columns",
                  "every numeric column", "-", "-")
    console.print(table)


@datasets_app.command("show")
def show(
    name: str = typer.Argument(..., help="arc, mmlu, strategyqa, gsm8k, arc-sample, or a .jsonl/.csv file"),
    measure: list[str] | None = typer.Option(None, "--measure", "-m", help="Measure(s) to cut; default: all."),
    data_dir: str | None = DATA_DIR,
    cutoff: str | None = typer.Option(None, "--cutoff", help="Override the cut-off: 'EASY_MAX,HARD_MIN' or 'q30,q70'."),
) -> None:
    """Print items per easy / medium / hard level for each difficulty measure.

    \b
    Example:
      probekit datasets show arc --measure grade --data-dir ../shared/data
      probekit datasets show my_questions.csv --measure steps --cutoff 2,5
    """
    from probekit.data import load_dataset
    from probekit.data.levels import level_counts, parse_cutoff

    with clean_errors():
        items = load_dataset(name, data_dir)
        overrides = {m: parse_cutoff(cutoff) for m in (measure or [])} if cutoff else None
        rows = level_counts(items, measure or None, overrides)
    pools = items.table["pool"].value_counts().to_dict()
    console.print(f"[bold]{items.name}[/bold]: {len(items)} items ({items.origin}); "
                  + ", ".join(f"{k}: {v}" for k, v in pools.items()))
    table = Table()
    for col in ("measure", "cut-off", "easy", "medium", "hard", "unknown"):
        table.add_column(col, justify="right" if col not in ("measure", "cut-off") else "left")
    for row in rows:
        table.add_row(row["measure"], row["cutoff"], *(str(row[k]) for k in ("easy", "medium", "hard", "unknown")))
    console.print(table)
