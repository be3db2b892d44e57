"""`probekit generate`: chain-of-thought generation and scoring (zero-shot and k-shot CoT)."""

from __future__ import annotations

from pathlib import Path

import typer

from probekit.cli import app
from probekit.cli.common import clean_errors, console


@app.command("generate")
def generate_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="gsm8k | strategyqa | a .jsonl/.csv file with a reasoning column."),
    out: Path = typer.Option(..., "--out", "-o", help="Generation folder (generations, results.parquet for `probekit report`)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder with the original files; default: $PROBEKIT_DATA_DIR, else the hub."),
    model: str | None = typer.Option(None, "--model", "-m", help="Hub id, local folder or FILE.gguf; default: the offline SmolLM2-135M-Instruct."),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | float16 | bfloat16 | auto."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | cuda:N | auto."),
    conditions: str = typer.Option("zero_shot,easy,hard", "--demos-from",
                                   help="Comma-separated conditions: zero_shot (zero-shot CoT) and/or the level k-shot demonstrations come from (easy, medium, hard)."),
    k: int = typer.Option(8, "--k", help="Demonstrations per k-shot prompt."),
    measure: str | None = typer.Option(None, "--measure", help="Difficulty measure of the levels (default: the set's first, num_steps for GSM8k and StrategyQA)."),
    draws: int = typer.Option(1, "--draws", help="Draws of demonstrations (zero-shot CoT runs once)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the test sample and the draws."),
    n_test: int | None = typer.Option(None, "--n-test", help="Stratified test sample: about N/3 items per level (default: every probe item)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default 300 for GSM8k, 100 otherwise."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together."),
    scoring: str = typer.Option("default", "--scoring", help="default (numbers compared as numbers) | reference (the paper's exact rule)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Generate a chain of thought for every test item (zero-shot CoT and k-shot CoT) and score its answer."""
    with clean_errors():
        from probekit.cot.run import generate_cot
        from probekit.data import load_dataset
        from probekit.extract.models import ModelSpec

        items = load_dataset(dataset, data_dir)
        spec = ModelSpec(model=model, dtype=dtype, device=device, threads=threads)  # "auto" is settled when it loads
        summary = generate_cot(items, out, spec, conditions=conditions, k=k, measure=measure, draws=draws, seed=seed,
                               n_test=n_test, max_new_tokens=max_new_tokens, batch_size=batch_size, scoring=scoring,
                               progress=not no_progress)
    console.print(summary.line())
