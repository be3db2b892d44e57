"""`probekit generate`: chain-of-thought generation and scoring (zero-shot and k-shot CoT)."""

from __future__ import annotations

from pathlib import Path

import typer

from probekit.cli import app
from probekit.cli.common import DEVICE_HELP, DTYPE_HELP, QUANTIZE_HELP, clean_errors, console, model_spec


@app.command("generate")
def generate_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="gsm8k | strategyqa | a .jsonl/.csv file with a reasoning column."),
    out: Path = typer.Option(..., "--out", "-o", help="Generation folder (generations, results.parquet for `probekit report`)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder with the original files; default: $PROBEKIT_DATA_DIR, else the hub."),
    model: str | None = typer.Option(None, "--model", "-m", help="Hub id, local folder or FILE.gguf; default: the offline SmolLM2-135M-Instruct."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto' spreads a model larger than one GPU over all GPUs."),
    conditions: str | None = typer.Option(None, "--demos-from",
                                          help="Comma-separated conditions: zero_shot (zero-shot CoT) and/or the level k-shot demonstrations come from (easy, medium, hard); default zero_shot,easy,hard, none with --finetune."),
    k: int = typer.Option(8, "--k", help="Demonstrations per k-shot prompt."),
    measure: str | None = typer.Option(None, "--measure", help="Difficulty measure of the levels (default: the set's first, num_steps for GSM8k and StrategyQA)."),
    draws: int = typer.Option(1, "--draws", help="Draws of demonstrations (zero-shot CoT runs once)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the test sample and the draws."),
    n_test: int | None = typer.Option(None, "--n-test", help="Stratified test sample: about N/3 items per level (default: every probe item)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default 300 for GSM8k, 100 otherwise."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together."),
    scoring: str = typer.Option("default", "--scoring", help="default (numbers compared as numbers) | reference (the paper's exact rule)."),
    finetune: str | None = typer.Option(None, "--finetune", help="Comma-separated levels (easy, medium, hard, all) to fine-tune LoRA adapters on chains of thought, per draw, then generate with them (method finetune_cot)."),
    n_train: int = typer.Option(160, "--n-train", help="Fine-tuning items per draw (--finetune; the study uses 160)."),
    min_updates: int = typer.Option(150, "--min-updates", help="Least optimizer updates per fine-tune (epochs raised to reach it)."),
    recipe: list[str] = typer.Option([], "--recipe", help="Another fine-tuning setting KEY=VALUE (lr, r, alpha, dropout, target_modules, weight_decay, final_lr_fraction, max_grad_norm, max_batch, epochs, micro_batch, optimizer); repeatable."),
    quantize: str = typer.Option("auto", "--quantize", help=QUANTIZE_HELP),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Generate a chain of thought for every test item (zero-shot CoT, k-shot CoT, or after fine-tuning
    on chains of thought) and score its answer.

    \b
    Example:
      probekit generate -d gsm8k --data-dir ../shared/data --n-test 150 --out results/gsm8k-cot
      probekit generate -d gsm8k --data-dir ../shared/data --n-test 150 --finetune easy,hard --n-train 8 \\
          --out results/gsm8k-qlora-cot
      torchrun --nproc-per-node 8 -m probekit.cli generate -d gsm8k --data-dir ../shared/data --n-test 500 \\
          --draws 5 --device cuda --out results/gsm8k-cot

    Under torchrun each rank generates its own units (or slices of units, when there are fewer units
    than ranks) into OUT; the last rank to finish merges them into the files one process writes.
    """
    import dataclasses

    from probekit.finetune.recipe import Recipe

    # fine-tuning settings come as --recipe KEY=VALUE, but for --min-updates
    options = {f.name: f"--recipe {f.name}={{value}}" for f in dataclasses.fields(Recipe) if f.name != "min_updates"}
    with clean_errors(options):
        from probekit.cot.run import generate_cot, parse_levels
        from probekit.data import load_dataset
        from probekit.finetune.recipe import recipe_with

        spec = model_spec(model, dtype=dtype, quantize=quantize, device=device, device_map=device_map, threads=threads)
        tuned = parse_levels(finetune)
        settings = recipe_with(recipe, min_updates=min_updates)
        if conditions is None:
            conditions = "" if tuned else "zero_shot,easy,hard"
        items = load_dataset(dataset, data_dir)
        summary = generate_cot(items, out, spec, conditions=conditions, k=k, measure=measure, draws=draws, seed=seed,
                               n_test=n_test, max_new_tokens=max_new_tokens, batch_size=batch_size, scoring=scoring,
                               finetune=tuned, n_train=n_train, recipe=settings, progress=not no_progress)
    console.print(summary.line())
