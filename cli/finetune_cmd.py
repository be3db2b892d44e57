"""`probekit finetune`: LoRA fine-tuning on the sweep's training draws, scored like the probes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from probekit.cli import app
from probekit.cli.common import DEVICE_HELP, DTYPE_HELP, QUANTIZE_HELP, clean_errors, console, model_spec
from probekit.cli.sweep_cmd import parse_cutoffs, parse_floats, parse_ints, parse_list, parse_noise

#: Library settings named otherwise on this command (the others are --name-with-dashes).
OPTIONS = {"r": "--lora-r {value}", "alpha": "--lora-alpha {value}", "dropout": "--lora-dropout {value}"}


class _UpdateRate(ProgressColumn):
    """Optimizer updates per second and the last update's loss."""

    def render(self, task) -> Text:
        rate = f"{task.speed:.2f} updates/s" if task.speed else ""
        loss = task.fields.get("loss")
        return Text(f"{rate}  loss {loss:.4f}" if loss is not None else rate, style="progress.data.speed")


@app.command("finetune")
def finetune_cmd(
    cache_dir: Path = typer.Argument(..., help="Cache directory written by `probekit extract` (ids, levels, "
                                               "zero-shot scores, model and prompt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (results.parquet, sweep.json, parts/)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="The cache's question set (default: the "
                                          "name in its manifest)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder with the original files, as for extract."),
    experiment: str = typer.Option("population", "--experiment", "-e",
                                   help="population | all_to_all | learning_curve | label_noise."),
    measures: str | None = typer.Option(None, "--measures", "-m", help="Comma-separated measures (default: all)."),
    levels: str | None = typer.Option(None, "--levels", help="Training levels, e.g. easy,hard (default: all)."),
    test_levels: str | None = typer.Option(None, "--test-levels", help="Score only these levels, e.g. hard."),
    n_train: str = typer.Option("160", "--n-train", help="Training size(s)."),
    label_noise: str | None = typer.Option(None, "--label-noise", help="Noise rates for --experiment label_noise "
                                                                       "(default 0,0.05,0.1,0.2,0.3)."),
    draws: int = typer.Option(5, "--draws", help="Training draws per condition."),
    seed: int = typer.Option(0, "--seed", help="Seed of draws (as the sweep), adapters and data order."),
    cutoff: list[str] = typer.Option([], "--cutoff", help="Override a level rule, as for sweep (repeatable)."),
    model: str | None = typer.Option(None, "--model", help="Model to load (default: the cache's)."),
    quantize: str = typer.Option("auto", "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto' spreads a model larger than one GPU "
                                                                     "over all GPUs (as for extract)."),
    rank: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    alpha: int = typer.Option(32, "--lora-alpha", help="LoRA alpha."),
    dropout: float = typer.Option(0.1, "--lora-dropout", help="LoRA dropout."),
    target_modules: str = typer.Option("q_proj,v_proj", "--target-modules", help="Modules to adapt."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate (linear decay to --final-lr-fraction of it)."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="Weight decay (not on norms and biases)."),
    final_lr_fraction: float = typer.Option(0.1, "--final-lr-fraction", help="lr at the last update, as a fraction."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm."),
    max_batch: int = typer.Option(50, "--max-batch", help="Items per update: min(n_train, this)."),
    epochs: int = typer.Option(3, "--epochs", help="Epochs (raised to reach --min-updates)."),
    min_updates: int = typer.Option(10, "--min-updates", help="Least optimizer updates per fine-tune."),
    micro_batch: int = typer.Option(8, "--micro-batch", help="Items per forward (accumulated to an update)."),
    eval_batch: int = typer.Option(16, "--eval-batch", help="Items per scoring forward."),
    optimizer: str = typer.Option("auto", "--optimizer", help="auto (adam8bit on an 8-bit base, else adamw) | "
                                                              "adamw | adam8bit."),
    zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot", help="Add the cache's zero-shot rows."),
    save_adapters: Path | None = typer.Option(None, "--save-adapters", help="Keep each head's adapters (PEFT)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check shard hashes first."),
) -> None:
    """Fine-tune fresh LoRA adapters for every measure x train level x draw x n_train (the sweep's
    training items), score the other probe items, write per-item rows (method "finetune").

    A rerun into the same OUT skips the heads already finished (OUT/parts/). Under torchrun each rank
    fine-tunes its own heads into OUT; the last rank to finish merges them into one table.

    \b
    Example:
      probekit finetune cache/smollm2-135m__arc-sample --out results/ft --measures grade \\
          --levels easy,hard --n-train 32 --draws 1 --test-levels hard
      probekit finetune cache/llama-2-7b__arc --dataset arc --data-dir ../shared/data --out results/ft-7b \\
          --device cuda --quantize 8bit --n-train 160 --draws 5
      torchrun --nproc-per-node 4 -m probekit.cli finetune cache/llama-2-7b__arc --data-dir ../shared/data \\
          --out results/ft-7b --device cuda --n-train 160 --draws 5
    """
    from probekit.data import load_dataset
    from probekit.finetune import Recipe, finetune
    from probekit.store import Cache

    with clean_errors(OPTIONS):
        spec = model_spec(model, dtype=dtype, quantize=quantize, device=device, device_map=device_map)
        recipe = Recipe(r=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, lr=lr,
                        weight_decay=weight_decay, final_lr_fraction=final_lr_fraction, max_grad_norm=max_grad_norm,
                        max_batch=max_batch, epochs=epochs, min_updates=min_updates, micro_batch=micro_batch,
                        eval_batch=eval_batch, optimizer=optimizer)
        cache = Cache(cache_dir)
        name = dataset or str(cache.manifest.get("dataset", {}).get("name", ""))
        items = load_dataset(name, data_dir=data_dir)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _UpdateRate(),
                       TimeElapsedColumn(), console=console, transient=True)
        with bar:
            task = bar.add_task("finetune", total=None, loss=None)

            def progress(event: str, fields: dict) -> None:
                if event == "start":
                    bar.update(task, total=fields["updates"])
                elif event == "head":
                    bar.update(task, description=f"train {fields['name']}")
                elif event == "update":
                    bar.update(task, advance=1, loss=fields["loss"])
                elif event == "scored":
                    console.print(f"{fields['name']}: scored {fields['items']} items", highlight=False)

            record = finetune(
                cache, items, out, spec, experiment=experiment, measures=parse_list(measures, "--measures"),
                n_train=parse_ints(n_train, "--n-train"), label_noise=parse_noise(label_noise, experiment), draws=draws,
                seed=seed, levels=parse_list(levels, "--levels"), test_levels=parse_list(test_levels, "--test-levels"),
                cutoffs=parse_cutoffs(cutoff),
                recipe=recipe, zero_shot=zero_shot, save_adapters=save_adapters, verify=verify, progress=progress,
            )
    c = record["counts"]
    if record.get("merged") is False:  # torchrun: another rank is still training and merges when it finishes
        console.print(f"rank {record['rank']} of {record['world_size']}: {c['trained_now']} fine-tunes now, "
                      f"{c['resumed']} resumed, {c['updates_now']} updates; the last rank to finish merges -> {out}",
                      highlight=False)
        return
    console.print(
        f"{c['heads']} fine-tunes ({c['trained_now']} now, {c['resumed']} resumed), {c['updates_now']} updates "
        f"({record['updates_per_second']} updates/s), {c['rows']:,} rows, {record['wall_seconds']:.1f} s -> {out}",
        highlight=False,
    )


@app.command("finetune-select")
def finetune_select_cmd(
    cache_dir: Path = typer.Argument(..., help="Cache directory written by `probekit extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for selection.json (a rerun keeps finished runs)."),
    measure: str = typer.Option(..., "--measure", "-m", help="The head's measure, e.g. grade."),
    level: str = typer.Option("easy", "--level", help="The head's training level."),
    draw: int = typer.Option(0, "--draw", help="The head's draw (as in finetune and sweep)."),
    n_train: int = typer.Option(160, "--n-train", help="The head's training size; the validation split is "
                                                       "carved from these items."),
    validation: float = typer.Option(0.2, "--validation", help="Fraction of the draw held out for validation."),
    lrs: str = typer.Option("1e-4,3e-4,1e-3", "--lr", help="Learning rates to try."),
    updates: str = typer.Option("10,20,50,100", "--updates", help="Update counts to score the validation items at."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="The cache's question set (default: its "
                                                                      "manifest's)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder with the original files, as for extract."),
    seed: int = typer.Option(0, "--seed", help="Seed of draws, split, adapters and data order (as finetune)."),
    cutoff: list[str] = typer.Option([], "--cutoff", help="Override a level rule, as for sweep (repeatable)."),
    model: str | None = typer.Option(None, "--model", help="Model to load (default: the cache's)."),
    quantize: str = typer.Option("auto", "--quantize", help=QUANTIZE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    max_batch: int = typer.Option(16, "--max-batch", help="Items per update."),
    final_lr_fraction: float = typer.Option(1.0, "--final-lr-fraction", help="1 (constant lr): one run per lr, "
                                            "scored along the way; below 1, one run per (lr, updates)."),
    setting: list[str] = typer.Option([], "--set", help="Any other recipe setting, KEY=VALUE (e.g. r=8, "
                                                        "micro_batch=4; repeatable)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check shard hashes first."),
) -> None:
    """Choose a fine-tuning learning rate and length on a validation split of one training draw.

    The head's training items are split (seeded by the head) into training and validation parts;
    fresh adapters train on the first at each learning rate and are scored on the validation items
    after each update count (accuracy and the gold choice's NLL; 0 updates is zero-shot). The
    lowest validation NLL wins; OUT/selection.json holds every point and the finetune options of
    the choice. Test items are never scored.

    \b
    Example:
      probekit finetune-select cache/smollm2__arc --data-dir ../shared/data --measure grade \\
          --out results/ft-select --lr 1e-4,3e-4,1e-3 --updates 10,20,50,100
    """
    from probekit.data import load_dataset
    from probekit.finetune.recipe import recipe_with
    from probekit.finetune.select import check_search, select_recipe
    from probekit.store import Cache

    with clean_errors():
        lr_values, counts = check_search(parse_floats(lrs, "--lr"), parse_ints(updates, "--updates"), validation)
        spec = model_spec(model, dtype=dtype, quantize=quantize, device=device, device_map=None)
        recipe = recipe_with(setting, max_batch=max_batch, final_lr_fraction=final_lr_fraction)
        cache = Cache(cache_dir)
        items = load_dataset(dataset or str(cache.manifest.get("dataset", {}).get("name", "")), data_dir=data_dir)

        def progress(event: str, fields: dict) -> None:
            if event == "run":
                console.print(f"lr {fields['lr']:g}: training to {fields['updates']} updates", highlight=False)
            elif event == "point":
                console.print(f"  lr {fields['lr']:g}, {fields['updates']} updates: validation accuracy "
                              f"{fields['accuracy']:.3f}, NLL {fields['nll']:.4f} (train loss {fields['train_loss']:.4f})",
                              highlight=False)
            elif event == "skip":
                console.print(f"lr {fields['lr']:g}: done before, kept", highlight=False)

        record = select_recipe(cache, items, out, spec, measure=measure, level=level, draw=draw, n_train=n_train,
                               seed=seed, lrs=lr_values, updates=counts,
                               validation=validation, recipe=recipe, cutoffs=parse_cutoffs(cutoff), verify=verify,
                               progress=progress)
    zero, chosen = record["zero_shot"], record["chosen"]
    console.print(f"zero-shot on the {record['split']['validation']} validation items: accuracy {zero['accuracy']:.3f}, "
                  f"NLL {zero['nll']:.4f}", highlight=False)
    console.print(f"chosen: lr {chosen['lr']:g}, {chosen['updates']} updates: accuracy {chosen['accuracy']:.3f}, "
                  f"NLL {chosen['nll']:.4f} -> {out}/selection.json\n  probekit finetune options: "
                  f"{chosen['finetune_options']}", highlight=False)
