"""PNG plots of the report tables (matplotlib, Agg canvas; pyplot's global state is not used).

- :func:`plot_layer_curves`: hard-test accuracy per layer for each training level, bootstrap
  bands, dashed zero-shot line; one panel per measure.
- :func:`plot_sgr`: SGR per measure with its interval and reference lines at 0 and 1; a measure
  whose SGR is not estimable (hard - zero-shot interval not above 0) is drawn grey and hollow,
  labelled ``n/e`` with the reason, not as a finding.
- :func:`plot_transfer`: training level x test level accuracy heatmaps, one panel per measure.
- :func:`plot_curves`: hard-test accuracy against ``n_train`` or ``label_noise``.

Each function writes one PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from probekit.report.tables import NOT_ESTIMABLE, ZERO_SHOT, Headline, layer_key, level_order, p_label, sgr_flagged

COLORS = {"zero_shot": "#555555", "easy": "#009E73", "medium": "#0072B2", "hard": "#D55E00", "all": "#CC79A7"}
EXTRA_COLORS = ["#E69F00", "#56B4E9", "#3E3938", "#999999"]
LABELS = {"zero_shot": "zero-shot", "easy": "easy", "medium": "medium", "hard": "hard", "all": "all"}
DPI = 130


def _color(level: str, i: int = 0) -> str:
    return COLORS.get(level, EXTRA_COLORS[i % len(EXTRA_COLORS)])


def figure(n_panels: int, width: float = 4.6, height: float = 3.4, ncols: int = 3):
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _percent(stat: dict | None, key: str) -> float:
    return 100.0 * stat[key] if stat and stat[key] is not None else math.nan


def plot_layer_curves(records: list[dict], headline: Headline, path: Path, zero_left_out: bool = True) -> Path | None:
    """Hard-test accuracy per layer and training level at the headline site and solver. Points where
    some of the level's heads have zero weights as their exact optimum (a record's
    ``zero_weight_heads``) are ringed: those heads are left out of the point (``zero_left_out``) or
    in it."""
    recs = [r for r in records if r["site"] == headline.site and r["solver"] == headline.solver and r["layer"]]
    measures = sorted({r["measure"] for r in recs})
    if not measures:
        return None
    fig, axes = figure(len(measures))
    for ax, measure in zip(axes, measures):
        rm = sorted((r for r in recs if r["measure"] == measure), key=lambda r: layer_key(r["layer"]))
        # single layers form the curve at their own index; layer sets ("16+30") stand to its right
        singles = [r for r in rm if "+" not in r["layer"]]
        sets = [r for r in rm if "+" in r["layer"]]
        x_single = np.array([int(r["layer"]) for r in singles], dtype=float)
        right = (x_single.max() if len(x_single) else -1) + 2
        x_sets = right + np.arange(len(sets), dtype=float)
        levels = level_order({lv for r in rm for lv in r["accuracy"]} - {ZERO_SHOT})
        for i, level in enumerate(levels):
            c = _color(level, i)
            label = f"{LABELS.get(level, level)} → hard"
            for group, x, curve in ((singles, x_single, True), (sets, x_sets, False)):
                if not group:
                    continue
                stats = [r["accuracy"].get(level) for r in group]
                y = np.array([_percent(s, "point") for s in stats])
                lo = np.array([_percent(s, "lo") for s in stats])
                hi = np.array([_percent(s, "hi") for s in stats])
                if curve:
                    ax.plot(x, y, marker="o", ms=3, color=c, label=label)
                    ax.fill_between(x, lo, hi, color=c, alpha=0.18, linewidth=0)
                else:
                    ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="D", ms=4, color=c, capsize=3,
                                label=None if singles else label)
                ringed = np.array([r.get("zero_weight_heads", {}).get(level, 0) > 0 for r in group])
                if ringed.any():
                    what = "heads with zero weights " + ("left out" if zero_left_out else "included")
                    seen = what in ax.get_legend_handles_labels()[1]
                    ax.scatter(x[ringed], y[ringed], s=60, facecolors="none", edgecolors="black", linewidths=1.0,
                               zorder=5, label=None if seen else what)
        zero = next((r["accuracy"][ZERO_SHOT] for r in rm if ZERO_SHOT in r["accuracy"]), None)
        if zero:
            ax.axhline(100 * zero["point"], color=COLORS[ZERO_SHOT], ls="--", lw=1.2, label="zero-shot")
        step = max(1, len(singles) // 12)
        ticks = list(x_single[::step]) + list(x_sets)
        names = [r["layer"] for r in singles][::step] + [r["layer"] for r in sets]
        ax.set_xticks(ticks, names, rotation=45 if sets else 0)
        ax.set_title(f"{measure}")
        ax.set_xlabel("layer (hidden_states index)")
        ax.set_ylabel("hard-test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Hard-test accuracy by layer ({headline.site}, solver {headline.solver}; bands: 95% bootstrap CI)")
    return save_figure(fig, path)


def plot_sgr(records: list[dict], headline: Headline, path: Path) -> Path | None:
    """SGR per measure at the headline site, layer and solver, with 95% intervals."""
    recs = [r for r in records if (r["site"], r["layer"], r["solver"]) == (headline.site, headline.layer, headline.solver)
            and r["sgr"] and np.isfinite(r["sgr"]["point"])]
    if not recs:
        return None
    recs = sorted(recs, key=lambda r: r["measure"])
    fig, (ax,) = figure(1, width=max(5.5, 1.2 * len(recs) + 2.5), height=4.2)
    x = np.arange(len(recs))
    point = np.array([r["sgr"]["point"] for r in recs])
    lo = np.array([r["sgr"]["lo"] for r in recs])
    hi = np.array([r["sgr"]["hi"] for r in recs])
    flagged = np.array([sgr_flagged(r["sgr"]) for r in recs])
    yerr = np.array([np.maximum(point - lo, 0), np.maximum(hi - point, 0)])
    if (~flagged).any():
        ax.errorbar(x[~flagged], point[~flagged], yerr=yerr[:, ~flagged], fmt="o",
                    color=COLORS["easy"], ecolor="black", capsize=4, label="SGR (95% CI)")
    if flagged.any():  # not findings: grey, hollow, dotted whiskers
        bars = ax.errorbar(x[flagged], point[flagged], yerr=yerr[:, flagged], fmt="o", mfc="none",
                           color="#999999", ecolor="#999999", capsize=4,
                           label=f"{NOT_ESTIMABLE}: hard − zero-shot interval not above 0")
        bars[2][0].set_linestyle(":")
    ax.axhline(1.0, color=COLORS["hard"], ls="--", lw=1.2, label="1 = as good as hard training")
    ax.axhline(0.0, color=COLORS[ZERO_SHOT], ls=":", lw=1.2, label="0 = zero-shot")
    # keep the axis readable when one measure's interval is huge (its numbers are printed)
    ylim = (max(-1.5, min(-0.2, lo.min() - 0.1)), min(3.0, max(1.5, hi.max() + 0.1)))
    ax.set_ylim(*ylim)
    for xi, p, r in zip(x, point, recs):
        if sgr_flagged(r["sgr"]):
            reason = r["sgr"]["reason"].replace(" pts ", " pts\n")
            text, color = f"{NOT_ESTIMABLE} ({p:.2f})\n{reason}", "#777777"
        else:
            sgr = r["sgr"]
            text, color = f"{p:.2f} [{sgr['lo']:.2f}, {sgr['hi']:.2f}]\n{p_label(sgr['p_value'])}", "black"
        ax.annotate(text, (xi, float(np.clip(p, *ylim))), textcoords="offset points",
                    xytext=(8, -4), fontsize=7, color=color)
    ax.set_xticks(x, [r["measure"] for r in recs], rotation=15, ha="right")
    ax.set_xlim(-0.6, len(recs) - 0.4)
    ax.set_xlabel("difficulty measure")
    ax.set_ylabel("SGR")
    ax.set_title(f"Supervision gap recovered = (easy − zero-shot) / (hard − zero-shot)\n"
                 f"hard test, {headline.site}, layer {headline.layer}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_transfer(frame: pd.DataFrame, headline: Headline, path: Path) -> Path | None:
    """Heatmaps of accuracy by training level (rows) x test level (columns), one per measure."""
    if frame.empty:
        return None
    measures = sorted(frame["measure"].unique())
    fig, axes = figure(len(measures), width=4.2, height=3.4)
    vmin, vmax = 100 * frame["accuracy"].min(), 100 * frame["accuracy"].max()
    image = None
    for ax, measure in zip(axes, measures):
        fm = frame[frame["measure"] == measure]
        trains = level_order(fm["train_level"].unique())
        tests = [t for t in ("easy", "medium", "hard") if t in set(fm["test_level"])] + ["all"]
        grid = np.full((len(trains), len(tests)), np.nan)
        for row in fm.itertuples(index=False):
            if row.test_level in tests:
                grid[trains.index(row.train_level), tests.index(row.test_level)] = 100 * row.accuracy
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):  # white text on the dark end of viridis
                dark = (v - vmin) / max(vmax - vmin, 1e-9) < 0.5
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(tests)), tests)
        ax.set_yticks(range(len(trains)), [LABELS.get(t, t) for t in trains])
        ax.set_xlabel("test level")
        ax.set_ylabel("training level")
        ax.set_title("random split (all_to_all)" if measure == "all" else measure)
    fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.8)
    fig.suptitle(f"Accuracy by training and test level ({headline.site}, layer {headline.layer})")
    return save_figure(fig, path)


def plot_curves(records: list[dict], x: str, path: Path, title: str, xlabel: str,
                headline: Headline | None = None) -> Path | None:
    """Hard-test accuracy against ``x`` per training level (bands: 95% CI), one panel per measure.

    When the records hold several heads per measure, the headline site, layer and solver are
    drawn if present, otherwise the first head.
    """
    trained = [r for r in records if r["train_level"] != ZERO_SHOT]
    measures = sorted({r["measure"] for r in trained})
    if not measures:
        return None
    fig, axes = figure(len(measures))
    for ax, measure in zip(axes, measures):
        rm = [r for r in trained if r["measure"] == measure]
        heads = sorted({(r["site"], r["layer"], r["solver"]) for r in rm}, key=lambda h: (h[0], layer_key(h[1]), h[2]))
        head = (headline.site, headline.layer, headline.solver) if headline else None
        head = head if head in heads else heads[0]
        rm = [r for r in rm if (r["site"], r["layer"], r["solver"]) == head]
        for i, level in enumerate(level_order({r["train_level"] for r in rm})):
            pts = sorted((r for r in rm if r["train_level"] == level), key=lambda r: r[x])
            xs = np.array([r[x] for r in pts], dtype=float)
            c = _color(level, i)
            ax.plot(xs, [_percent(r["accuracy"], "point") for r in pts], marker="o", ms=3, color=c,
                    label=f"{LABELS.get(level, level)} → hard")
            ax.fill_between(xs, [_percent(r["accuracy"], "lo") for r in pts],
                            [_percent(r["accuracy"], "hi") for r in pts], color=c, alpha=0.18, linewidth=0)
        zero = next((r for r in records if r["train_level"] == ZERO_SHOT and r["measure"] == measure), None)
        if zero:
            ax.axhline(100 * zero["accuracy"]["point"], color=COLORS[ZERO_SHOT], ls="--", lw=1.2, label="zero-shot")
        if x == "n_train":
            ns = sorted({int(r[x]) for r in rm})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
        ax.set_title(f"{measure} ({head[0]}, layer {head[1]})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("hard-test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return save_figure(fig, path)
