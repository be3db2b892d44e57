"""`probekit sweep` and `probekit hardness`: fit thousands of linear heads on a cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from probekit.cli import app
from probekit.cli.common import clean_errors, console
from probekit.errors import ProbekitError
from probekit.store.hardness import HARDNESS_FILE


class _HeadRate(ProgressColumn):
    """Heads fitted per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} heads/s" if task.speed else "", style="progress.data.speed")


def _bar() -> Progress:
    return Progress(
        TextColumn("layer {task.fields[layer]:>7}"), BarColumn(), MofNCompleteColumn(), _HeadRate(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


def parse_list(text: str | None, name: str) -> list[str] | None:
    """A comma-separated option as its items (None when not given); an empty item (``100,,16``, a
    comma at either end, an empty option) is refused, as the layer grammar refuses it."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",")]
    if not any(parts):
        raise ProbekitError(f"{name} {text!r}: name at least one item (comma-separated)")
    if not all(parts):
        where = 1 + parts.index("")
        raise ProbekitError(f"{name} {text!r}: item {where} of {len(parts)} is empty; separate items by single commas")
    return parts


def parse_ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(text, name)]
    except ValueError:
        raise ProbekitError(f"{name} must be comma-separated integers, got {text!r}") from None


def parse_floats(text: str, name: str) -> list[float]:
    """A comma-separated option of finite numbers; one error line naming ``name`` otherwise."""
    try:
        values = [float(x) for x in parse_list(text, name)]
    except ValueError:
        raise ProbekitError(f"{name} must be comma-separated numbers, got {text!r}") from None
    bad = [x for x in values if x != x or x in (float("inf"), float("-inf"))]
    if bad:
        raise ProbekitError(f"{name} must be finite numbers, got {text!r}")
    return values


#: The label-noise rates of the label_noise experiment when --label-noise is not given.
DEFAULT_NOISE = "0,0.05,0.1,0.2,0.3"


def parse_noise(text: str | None, experiment: str) -> list[float]:
    """--label-noise: the rates of the label_noise experiment (default :data:`DEFAULT_NOISE`); refused with
    another experiment, which draws no noisy labels."""
    if text is not None and experiment != "label_noise":
        raise ProbekitError(f"--label-noise {text}: applies to --experiment label_noise only")
    return parse_floats(DEFAULT_NOISE if text is None else text, "--label-noise")


def parse_cutoffs(items: list[str]) -> dict:
    from probekit.data.levels import parse_cutoff

    out = {}
    for item in items:
        measure, sep, rule = item.partition("=")
        if not sep:
            raise ProbekitError(f"--cutoff {item!r}: expected MEASURE=EASY_MAX,HARD_MIN or MEASURE=qLO,qHI")
        out[measure.strip()] = parse_cutoff(rule)
    return out


# the registry's names and objectives (probekit.probe.solvers.SOLVERS), written out so that the
# command line does not import jax to print its help
_SOLVER_HELP = ("paper: mean NLL + l2 * |w| (unsquared), SGD as the protocol | converged: mean NLL + "
                "|w|^2 / (2 C n_train), bias unregularised, to tolerance | both (every solver).")


@app.command("sweep")
def sweep_cmd(
    cache_dir: Path = typer.Argument(..., help="Cache directory written by `probekit extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (results.parquet, sweep.json)."),
    experiment: str = typer.Option("population", "--experiment", "-e",
                                   help="population | all_to_all | learning_curve | label_noise."),
    measures: str | None = typer.Option(None, "--measures", "-m",
                                           help="Comma-separated difficulty measures (default: all in the cache; "
                                                "'mdl' after `probekit hardness`)."),
    layers: str = typer.Option("all,middle_and_last", "--layers", "-l",
                               help="all | middle_and_last | middle | last | 15,30 (15+30 concatenates; -1 = the last layer)."),
    site: str = typer.Option("answer_end", "--site", help="answer_end (multiple-choice head) | question_end "
                                                          "(multinomial head)."),
    solver: str = typer.Option("paper", "--solver", help=_SOLVER_HELP),
    n_train: str = typer.Option("160", "--n-train", help="Training size, or sizes for learning curves (10,20,40)."),
    label_noise: str | None = typer.Option(None, "--label-noise",
                                           help="Noise rates p for --experiment label_noise (hard items get 2p); "
                                                "default 0,0.05,0.1,0.2,0.3."),
    draws: int = typer.Option(5, "--draws", help="Training draws per condition."),
    seed: int = typer.Option(0, "--seed", help="Seed of draws, label noise and initialisations."),
    pad: str = typer.Option("mask", "--pad", help="mask padded choices, or zero: the protocol's zero-padding."),
    C: str = typer.Option("1", "--C", help="Converged solver's inverse regularisation (scikit-learn's C); with --select, a grid "
                                           "to choose from (0.01,0.1,1,10)."),
    l2: str = typer.Option("1", "--l2", help="Paper recipe's penalty weight (unsquared; the paper's 1); with --select, a grid "
                                             "to choose from (0.1,0.3,1,3)."),
    select: str | None = typer.Option(None, "--select", help="cvK: each head chooses its strength (--C for converged, --l2 for "
                                                             "paper) from the grid by K-fold cross-validation inside its "
                                                             "training draw, then refits the draw at it; sweep.json's "
                                                             "'cv' records every choice and curve."),
    tol: float = typer.Option(1e-7, "--tol", help="Converged solver's relative optimality: stop once the loss is "
                                                 "provably within tol x loss of its minimum."),
    cutoff: list[str] = typer.Option([], "--cutoff", help="Override a level rule: grade=5,8 or mdl=q30,q70 "
                                                          "(repeatable)."),
    zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot", help="Add zero-shot rows from log-probs."),
    icl: list[Path] | None = typer.Option(None, "--icl", help="k-shot scores of `probekit extract --icl` "
                                             "(repeat for easy and hard demonstrations): added as 'icl' heads."),
    controls: bool = typer.Option(True, "--controls/--no-controls",
                                  help="Also fit the shortcut controls on every head's draw: a probe on the choices' "
                                       "surface features (length, position) and the draw's majority position."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check shard hashes before fitting."),
) -> None:
    """Fit linear probes for every measure x train level x draw x layer; write per-item results.

    One row per (head, test item) goes to OUT/results.parquet; OUT/sweep.json records the
    configuration, the cache's manifest hash, counts and heads/s.

    \b
    Example:
      probekit sweep cache/llama-2-7b__arc --out results/arc-pop
      probekit sweep cache/llama-2-7b__arc --out results/arc-lc --experiment learning_curve \\
          --n-train 10,20,40,80,160,320 --measures grade --layers last --solver both
      probekit sweep cache/llama-2-7b__mmlu --out results/mmlu-noise --experiment label_noise
      probekit sweep cache/llama-2-7b__arc --out results/arc-cv --solver converged --C 0.01,0.1,1,10 --select cv5
    """
    from probekit.probe import sweep

    with clean_errors():
        sizes = parse_ints(n_train, "--n-train")
        noise = parse_noise(label_noise, experiment)
        grid_C, grid_l2 = parse_floats(C, "--C"), parse_floats(l2, "--l2")
        chosen = parse_list(measures, "--measures")
        with _bar() as bar:
            task = bar.add_task("fit", total=None, layer="")

            def progress(done: int, total: int, layer: str) -> None:
                bar.update(task, completed=done, total=total, layer=layer)

            record = sweep(
                cache_dir, out, experiment=experiment, measures=chosen, layers=layers, site=site, solver=solver,
                n_train=sizes, label_noise=noise, draws=draws, seed=seed, pad=pad, C=grid_C, l2=grid_l2,
                select=select, tol=tol,
                cutoffs=parse_cutoffs(cutoff), zero_shot=zero_shot, icl=icl or (), controls=controls, verify=verify,
                progress=progress,
            )
    counts = record["counts"]
    console.print(
        f"{counts['fits']} fits ({counts['heads']} heads x {counts['feature_sets']} feature sets x "
        f"{len(record['config']['solvers'])} solvers), {counts['rows']:,} rows, "
        f"{record['heads_per_second']} heads/s, {record['wall_seconds']:.1f} s -> {out}",
        highlight=False,
    )
    if counts.get("zero_weight_fits"):
        console.print(f"note: {counts['zero_weight_fits']} fits have zero weights as their exact optimum (the penalty "
                      f"outweighs the data; column zero_weights): the report scores each as chance, 1 / number of "
                      f"choices per item (probekit report --zero-weights)", style="yellow")
    if counts["not_converged"]:
        console.print(f"warning: {counts['not_converged']} converged-solver fits missed the tolerance", style="yellow")
    cv = record.get("cv")
    if cv:
        for name, grid in cv["grids"].items():
            picks = [f[grid["option"]] for f in cv["fits"] if f["solver"] == name]
            tally = ", ".join(f"{v:g}: {picks.count(v)}" for v in grid["values"])
            console.print(f"{name}: {grid['option']} chosen by {cv['folds']}-fold cross-validation (fits per value) "
                          f"{tally}; sweep.json 'cv' has every curve", highlight=False)
        if counts.get("cv_fold_fits_not_converged"):
            console.print(f"warning: {counts['cv_fold_fits_not_converged']} cross-validation fold fits did not converge "
                          f"(sweep.json 'cv': folds_converged)", style="yellow")


@app.command("hardness")
def hardness_cmd(
    cache_dir: Path = typer.Argument(..., help="Cache directory with hold-out items (pool == holdout)."),
    layers: str = typer.Option("middle_and_last", "--layers", "-l", help="Feature sets, as for `probekit sweep`."),
    site: str = typer.Option("answer_end", "--site", help="answer_end | question_end."),
    sizes: str = typer.Option("5,20,80,340,900", "--sizes", help="Nested training sizes of the learning curve."),
    draws: int = typer.Option(5, "--draws", help="Draws of the hold-out training pool."),
    seed: int = typer.Option(0, "--seed", help="Seed of draws and initialisations."),
    pad: str = typer.Option("mask", "--pad", help="mask | zero."),
    out: Path | None = typer.Option(None, "--out", help="Where to write (default CACHE/hardness.json)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check shard hashes before fitting."),
) -> None:
    """Model-based (MDL) hardness: 1 - mean p(gold) of hold-out-trained probes over a learning curve.

    Writes CACHE/hardness.json (item id -> hardness); `probekit sweep --measures mdl` then cuts it
    at its 30/70 percentiles.

    \b
    Example:
      probekit hardness cache/llama-2-7b__arc
      probekit sweep cache/llama-2-7b__arc --out results/arc-mdl --measures mdl
    """
    from probekit.probe import hardness

    with clean_errors():
        with _bar() as bar:
            task = bar.add_task("fit", total=None, layer="")

            def progress(done: int, total: int, layer: str) -> None:
                bar.update(task, completed=done, total=total, layer=layer)

            record = hardness(cache_dir, layers=layers, site=site, sizes=parse_ints(sizes, "--sizes"), draws=draws,
                              seed=seed, pad=pad, out=out, verify=verify, progress=progress)
    values = list(record["mdl"].values())
    console.print(f"MDL hardness of {len(values)} probe items (mean {sum(values) / max(len(values), 1):.3f}) -> "
                  f"{out or Path(cache_dir) / HARDNESS_FILE}", highlight=False)
