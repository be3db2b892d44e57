"""`probekit report`: bootstrap statistics, tables and plots from a sweep's results."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from probekit.cli import app
from probekit.cli.common import clean_errors, console
from probekit.report.compare import comparison_order
from probekit.report.compare import report as build
from probekit.report.tables import (
    NOT_ESTIMABLE,
    control_verdict,
    fmt_acc,
    fmt_p,
    fmt_q,
    fmt_test,
    head_label,
    level_order,
    sgr_flagged,
)


class _RateColumn(ProgressColumn):
    """Finished tables per second (blank until the rate is known)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} tables/s" if task.speed else "", style="progress.data.speed")


@app.command("report")
def report(
    results_dirs: list[Path] = typer.Argument(..., help="Results directory (holds results.parquet and sweep.json); "
                                                        "several: a comparison of methods, models and datasets."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory to write (created if missing)."),
    boot: int = typer.Option(10_000, "--boot", help="Bootstrap resamples per accuracy and paired difference."),
    boot_sgr: int = typer.Option(100_000, "--boot-sgr", help="Bootstrap resamples for the headline SGR (other layers' SGR use --boot)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every bootstrap."),
    site: str | None = typer.Option(None, "--site", help="Headline site (default: answer_end when present)."),
    layer: str | None = typer.Option(None, "--layer", help='Headline layer or layer set, e.g. "30" or "15+30" '
                                                              "(default: the middle+last concatenation, else the last single layer)."),
    solver: str | None = typer.Option(None, "--solver", help="Headline solver (default: paper when present)."),
    zero_weights: str = typer.Option("chance", "--zero-weights",
                                     help="Heads whose exact optimum has zero weights (column zero_weights): chance "
                                          "(kept, each counts 1/number of choices on an item: what they are at their "
                                          "optimum) | exclude (left out) | include (their SGD predictions). "
                                          "summary.json has the headline under all three."),
    p_value: str = typer.Option("percentile", "--p-value",
                                help="percentile (read off the interval's own resamples: p < 0.05 exactly when the "
                                     "95% interval excludes 0) | centred (the reference code's centred bootstrap test)."),
    baseline: str | None = typer.Option(None, "--baseline",
                                        help="Comparisons: the method whose rows are the shared zero-shot baseline "
                                             "of every method (default: zero_shot_cot for chain-of-thought methods "
                                             "when present, zero_shot otherwise)."),
) -> None:
    """Accuracies with bootstrap CIs, SGR with CIs and p-values, tables and plots.

    Writes REP/summary.json (every number), REP/report.md (tables and plots), CSVs and PNGs.

    Prints the headline table: hard-test accuracy per difficulty measure, one layer.

    Several results directories (methods, models, datasets) give a comparison report: SGR per
    (dataset, measure) with a bar per method and a shared zero-shot baseline, the same across model
    sizes, the all-to-all table and the Spearman correlations of each dataset's measures.

    \b
    Example:
      probekit report results/smollm2-135m__arc --out reports/smollm2-135m__arc
      probekit report results/run1 --out reports/run1 --layer 15+30 --seed 1
      probekit report res/probe res/finetune --out reports/methods
    """
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with clean_errors(), Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("bootstrapping", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what[:48])

        summary = build(results_dirs, out, n_boot=boot, n_boot_sgr=boot_sgr, seed=seed, site=site, layer=layer,
                        solver=solver, baseline=baseline, zero_weights=zero_weights, p_value=p_value,
                        progress=progress)
    if len(results_dirs) > 1:
        _print_comparison(summary)
    else:
        _print_headline(summary)
    console.print(f"Report: {out / 'report.md'}  (numbers: {out / 'summary.json'}, {len(summary['files'])} files)")


def _print_headline(summary: dict) -> None:
    head = summary["settings"]["headline"]
    rows = [r for r in summary["population"]
            if head and (r["site"], r["layer"], r["solver"]) == (head["site"], head["layer"], head["solver"])]
    if not rows:
        console.print(f"No population experiment in the results (have: {', '.join(summary['results']['experiments'])}).")
        return
    levels = level_order({lv for r in rows for lv in r["accuracy"]} - {"zero_shot"})
    # Compact enough for a terminal: point estimates only; report.md has their intervals.
    label = head_label(head, summary["settings"].get("headline_method"))
    table = Table(title=f"Hard-test accuracy (%) by training level ({label})",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("measure", style="bold", no_wrap=True)
    table.add_column("0-shot", justify="right", no_wrap=True)
    for lv in levels:
        table.add_column(lv, justify="right", no_wrap=True)
    table.add_column("SGR", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True, min_width=6)
    for r in rows:
        cells = [fmt_acc(r["accuracy"].get(lv), interval=False) for lv in ("zero_shot", *levels)]
        sgr = r["sgr"]
        if sgr_flagged(sgr):
            table.add_row(r["measure"], *cells, NOT_ESTIMABLE, "", "")
        elif fmt_test(sgr) == "–":
            table.add_row(r["measure"], *cells, "–", "", "")
        else:
            table.add_row(r["measure"], *cells, f"{sgr['point']:.2f}", f"[{sgr['lo']:.2f}, {sgr['hi']:.2f}]",
                          fmt_p(sgr["p_value"]))
    console.print(table)
    checks = Table(title="Hard test: multiplicity and shortcut controls (hard-trained heads)", box=box.SIMPLE_HEAD,
                   show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name in ("measure", "SGR q", "probe", "surface", "majority", "probe vs controls"):
        checks.add_column(name, justify="left" if name in ("measure", "probe vs controls") else "right",
                          no_wrap=True)
    for r in rows:
        controls = r.get("controls") or {}
        checks.add_row(r["measure"], fmt_q(r["sgr"]).removeprefix("q=").removeprefix("q"),
                       fmt_acc(r["accuracy"].get("hard"), interval=False),
                       *[fmt_acc((controls.get(site) or {}).get("accuracy", {}).get("hard"), interval=False)
                         for site in ("surface", "majority")], control_verdict(r))
    console.print(checks)
    console.print(f"Accuracies: point estimates (intervals in report.md); p: from the SGR's own resamples "
                  f"({summary['settings']['p_value']}); q: Benjamini-Hochberg over these SGRs; controls: a probe on "
                  "the choices' surface features and the training draw's majority position, on the same draws.",
                  soft_wrap=True)
    for r in rows:
        if sgr_flagged(r["sgr"]):
            console.print(f"{NOT_ESTIMABLE} ({r['measure']}): SGR not estimable, {r['sgr']['reason']}", soft_wrap=True)
    for w in summary.get("warnings", []):
        console.print(f"warning: {w}", soft_wrap=True)


def _print_comparison(summary: dict) -> None:
    rows = summary["population"]
    if not rows:
        console.print("No population experiment among the results: see report.md for the all-to-all table.")
    levels = [lv for lv in ("easy", "hard") if any(lv in r["accuracy"] for r in rows)]
    table = Table(title="Hard-test accuracy (%) and SGR by method (shared zero-shot)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    keys = [k for k in ("model", "dataset") if len({r[k] for r in rows}) > 1] + ["measure", "method"]
    for name in (*keys, "0-shot", *levels, "SGR", "95% CI"):
        table.add_column(name, justify="left" if name in keys else "right", no_wrap=True)
    for r in comparison_order(rows):
        cells = [fmt_acc(r["accuracy"].get(lv), interval=False) for lv in ("zero_shot", *levels)]
        sgr = r["sgr"]
        if sgr_flagged(sgr):
            tail = [NOT_ESTIMABLE, ""]
        elif fmt_test(sgr) == "–":
            tail = ["–", ""]
        else:
            tail = [f"{sgr['point']:.2f}", f"[{sgr['lo']:.2f}, {sgr['hi']:.2f}]"]
        table.add_row(*(str(r[k]) for k in keys), *cells, *tail)
    if rows:
        console.print(table)
    for note in summary["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
