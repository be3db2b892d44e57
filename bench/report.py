"""Benchmark: the whole report on a full-ARC-shaped results table, and its statistics against the
one-condition-at-a-time bootstrap functions, side by side in one run.

1. Writes, through probekit's own writer (``ResultsWriter`` / ``ResultRows``), a synthetic results
   table of the full-ARC population run: 3521 items, 5 measures (each cut into easy/medium/hard
   thirds), 32 feature sets (31 layers and the middle+last pair), training levels easy, medium,
   hard and all, 5 draws of 160 training items, every head tested on every item it was not trained
   on (training items are the NaN cells of its item x draw matrix), and one zero-shot row per item
   and measure: about 11 million rows.
2. Times ``build_report`` with the defaults (10,000 resamples per accuracy and difference, 100,000
   for the headline SGR), split into reading, bootstrap (the shared-resample engine), tables and
   writing (plots, CSVs, Markdown).
3. Times the same statistics one condition at a time with ``crossed_bootstrap``, ``sgr_bootstrap``
   and ``paired_difference`` (the functions the report used before) on a sample of heads, and
   scales to every head (plus the headline SGRs at 100,000 resamples). The ratio is the speed-up of
   the statistics.

Run: python bench/report.py            (the full shape)
     python bench/report.py --layers 4 --sample 2   (a quick look)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import probekit.report.build as build
from probekit.report import build_report
from probekit.report.tables import HARD, ZERO_SHOT, choose_headline, item_draw_frame, load_results, population_table
from probekit.stats import crossed_bootstrap, paired_difference, sgr_bootstrap
from probekit.stats.shared import SharedBootstrap
from probekit.store.results import ResultRows, ResultsWriter, RunRecord

MEASURES = ["grade", "difficulty", "bloom", "question_num_words", "answer_num_words"]
LEVELS = ["easy", "medium", "hard"]
TRAIN_LEVELS = ["easy", "medium", "hard", "all"]


def write_results(out: Path, n_items: int, n_layers: int, draws: int, n_train: int, seed: int = 0) -> int:
    """The synthetic results directory; returns its row count."""
    rng = np.random.default_rng(seed)
    ids = [f"ARC_{i:05d}" for i in range(n_items)]
    ability = rng.uniform(0.15, 0.95, n_items)
    layers = [str(i) for i in range(n_layers - 1)] + [f"{(n_layers - 1) // 2}+{n_layers - 2}"]
    rows = ResultRows("population", "answer_end", ids, LEVELS)
    zero_rows = ResultRows("population", "", ids, LEVELS)
    with ResultsWriter(out, row_group=1 << 20) as w:
        for measure in MEASURES:
            levels = np.argsort(np.argsort(rng.random(n_items))) * 3 // n_items  # thirds: 0 easy .. 2 hard
            zero = (rng.random(n_items) < 0.25 + 0.1 * ability).astype(np.int8)
            w.append(zero_rows.table(method=ZERO_SHOT, layer="", measure=measure, train_level=ZERO_SHOT, draw=0,
                                     n_train=0, noise=0.0, solver="", rows=np.arange(n_items), test_levels=levels,
                                     correct=zero, p_gold=np.full(n_items, 0.25)))
            for k, layer in enumerate(layers):
                depth = min(k, n_layers - 1) / n_layers
                for t, level in enumerate(TRAIN_LEVELS):
                    pool = np.arange(n_items) if level == "all" else np.flatnonzero(levels == t)
                    for d in range(draws):
                        test = np.setdiff1d(np.arange(n_items), rng.choice(pool, n_train, replace=False))
                        p = np.clip(ability[test] * (0.6 + 0.4 * depth) + 0.02 * t, 0, 1)
                        correct = (rng.random(len(test)) < p).astype(np.int8)
                        w.append(rows.table(method="probe", layer=layer, measure=measure, train_level=level, draw=d,
                                            n_train=n_train, noise=0.0, solver="paper", rows=test,
                                            test_levels=levels[test], correct=correct,
                                            p_gold=p.astype(np.float32)))
        w.commit(RunRecord(kind="sweep", dataset="synthetic-arc", model={}, prompt={}, config={}, seed=seed, counts={},
                           cache="bench", cache_manifest_sha256="0" * 64))
    return rows.n_rows + zero_rows.n_rows


class Timer:
    """Wall time spent inside wrapped functions, by label."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)


def one_at_a_time(results_dir: Path, sample: int, seed: int = 0) -> tuple[float, float, int, int]:
    """Seconds of the old per-condition statistics for ``sample`` heads (scaled to all heads) and for
    one headline SGR at 100,000 resamples (scaled to one per measure); returns (heads time, headline
    time, number of heads, number of measures)."""
    table = load_results(results_dir).table
    pop = table[(table["experiment"] == "population") & (table["test_level"] == HARD)]
    heads = pop[pop["train_level"] != ZERO_SHOT][["measure", "site", "layer", "solver"]].drop_duplicates()
    heads = heads.sort_values(["measure", "layer"]).reset_index(drop=True)
    pick = heads.iloc[np.linspace(0, len(heads) - 1, sample).round().astype(int)]
    hl = choose_headline(table)
    spent = 0.0
    for h in pick.itertuples():
        zero = pop[(pop["train_level"] == ZERO_SHOT) & (pop["measure"] == h.measure)].drop_duplicates(["item_id", "draw"])
        sel = pop[(pop["measure"] == h.measure) & (pop["layer"] == h.layer) & (pop["solver"] == h.solver)]
        frames = {ZERO_SHOT: item_draw_frame(zero)}
        frames.update({lv: item_draw_frame(sel[sel["train_level"] == lv]) for lv in TRAIN_LEVELS})
        index = sorted(set().union(*[f.index for f in frames.values()]))
        M = {lv: f.reindex(index).to_numpy(np.float64) for lv, f in frames.items()}
        t = time.perf_counter()
        for lv in frames:
            crossed_bootstrap(frames[lv].to_numpy(np.float64), 10_000, seed)
        sgr_bootstrap(M[ZERO_SHOT], M["easy"], M[HARD], 10_000, seed)
        paired_difference(M["easy"], M[HARD], 10_000, seed)
        paired_difference(M[ZERO_SHOT], M["easy"], 10_000, seed)
        spent += time.perf_counter() - t
    t = time.perf_counter()
    sgr_bootstrap(M[ZERO_SHOT], M["easy"], M[HARD], 100_000, seed)  # the last sampled head, as a headline
    headline = time.perf_counter() - t
    assert hl is not None
    return spent / len(pick), headline, len(heads), heads["measure"].nunique()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=3521)
    ap.add_argument("--layers", type=int, default=32, help="feature sets (the last is the middle+last pair)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--sample", type=int, default=4, help="heads timed one condition at a time")
    ap.add_argument("--work", type=Path, default=None, help="where to write the results and report (a temporary folder)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="probekit-bench-report-"))
    res, rep = work / "results", work / "report"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} (timings are noisy on a busy machine)")
    try:
        t = time.perf_counter()
        n_rows = write_results(res, args.items, args.layers, args.draws, args.n_train)
        print(f"results: {args.items} items, {len(MEASURES)} measures, {args.layers} feature sets, "
              f"{len(TRAIN_LEVELS)} training levels x {args.draws} draws of {args.n_train}: {n_rows:,} rows "
              f"(written in {time.perf_counter() - t:.1f} s)")

        timer = Timer()
        timer.wrap(build, "load_results", "reading")
        timer.wrap(SharedBootstrap, "_register", "bootstrap")
        timer.wrap(SharedBootstrap, "run", "bootstrap")
        timer.wrap(build, "_write", "writing (plots, CSVs, Markdown)")
        timer.wrap(build.plots, "plot_sgr", "plots")
        timer.wrap(build.plots, "plot_layer_curves", "plots")
        timer.wrap(build.plots, "plot_transfer", "plots")
        timer.wrap(build.plots, "plot_curves", "plots")
        t, cpu = time.perf_counter(), time.process_time()
        build_report(res, rep)
        total, cpu = time.perf_counter() - t, time.process_time() - cpu
        spent = timer.spent
        boot = spent.get("bootstrap", 0.0)
        tables = total - sum(spent.get(k, 0.0) for k in ("reading", "bootstrap", "writing (plots, CSVs, Markdown)"))
        print(f"\nwhole report (10,000 resamples per accuracy and difference, 100,000 for the headline SGR): "
              f"{total:.1f} s wall, {cpu:.1f} s CPU (all threads)")
        print(f"  reading      {spent.get('reading', 0.0):6.1f} s")
        print(f"  bootstrap    {boot:6.1f} s   (shared resamples, every statistic of every table)")
        print(f"  tables       {tables:6.1f} s   (selecting rows, item x draw frames, records)")
        print(f"  writing      {spent.get('writing (plots, CSVs, Markdown)', 0.0):6.1f} s   "
              f"(of which plots {spent.get('plots', 0.0):.1f} s)")

        # the same statistics with every SGR at 10,000 resamples: the part the headline's extra resamples
        # (a fixed cost of both paths: 100,000 x items index draws per measure) do not dominate
        table = load_results(res).table
        before = timer.spent.get("bootstrap", 0.0)
        population_table(table, 10_000, 10_000, 0, headline=choose_headline(table))
        boot10 = timer.spent["bootstrap"] - before

        per_head, headline, n_heads, n_measures = one_at_a_time(res, args.sample)
        old10 = per_head * n_heads
        old = old10 + headline * n_measures
        print(f"\none condition at a time (crossed_bootstrap x5, sgr_bootstrap, paired_difference x2 per head, "
              f"10,000 resamples): {per_head:.2f} s per head, {args.sample} heads timed, x {n_heads} heads; "
              f"headline SGR at 100,000: {headline:.2f} s x {n_measures} measures")
        print(f"  the report's statistics: {old:.1f} s scaled vs shared resamples {boot:.1f} s "
              f"-> {old / boot:.1f}x (floor 20x)")
        print(f"  every SGR at 10,000:     {old10:.1f} s scaled vs shared resamples {boot10:.1f} s "
              f"-> {old10 / boot10:.1f}x")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
