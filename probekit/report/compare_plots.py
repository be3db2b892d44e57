"""PNG plots of the comparison report (:mod:`probekit.report.compare`).

- :func:`plot_method_sgr`: the paper's headline figure: SGR per (dataset, measure) with a bar per
  method and its 95% interval, one panel per model; an SGR that is not estimable gets no bar: a
  hollow marker on 0 labelled ``n/e``.
- :func:`plot_model_size`: SGR (left) and easy-trained hard-test accuracy with the zero-shot
  baseline (right) against the models in size order, one row per (dataset, measure); an SGR that
  is not estimable is a hollow grey marker on 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from probekit.methods import METHODS, method_order
from probekit.report.plots import COLORS, EXTRA_COLORS, figure, save_figure
from probekit.report.tables import NOT_ESTIMABLE, ZERO_SHOT, sgr_flagged


def method_color(method: str, i: int = 0) -> str:
    """A method's colour (:data:`probekit.methods.METHODS`); a name outside the registry takes the ``i``-th
    spare colour."""
    return METHODS[method].colour if method in METHODS else EXTRA_COLORS[i % len(EXTRA_COLORS)]


def method_label(method: str) -> str:
    """A method's name in legends (:attr:`probekit.methods.Method.label`)."""
    return METHODS[method].label if method in METHODS else method


def _methods(records: list[dict]) -> list[str]:
    return method_order({r["method"] for r in records})


def plot_method_sgr(records: list[dict], models: list[str], path: Path) -> Path | None:
    """SGR per (dataset, measure), a bar per method, one panel per model (in ``models`` order)."""
    recs = [r for r in records if r["sgr"] and r["sgr"]["point"] is not None and np.isfinite(r["sgr"]["point"])]
    models = [m for m in models if any(r["model"] == m for r in recs)]
    if not models:
        return None
    methods = _methods(recs)
    groups = sorted({(r["dataset"], r["measure"]) for r in recs})
    fig, axes = figure(len(models), width=max(6.5, len(groups) * max(1.3, 0.45 * len(methods)) + 2.0), height=4.6,
                        ncols=1)
    width = min(0.8 / len(methods), 0.3)
    for ax, model in zip(axes, models):
        shown = set()
        for k, method in enumerate(methods):
            for g, (dataset, measure) in enumerate(groups):
                r = next((r for r in recs if (r["model"], r["dataset"], r["measure"], r["method"])
                          == (model, dataset, measure, method)), None)
                if r is None:
                    continue
                x = g + width * (k + 0.5 - len(methods) / 2)
                s = r["sgr"]
                p, lo, hi = s["point"], s["lo"], s["hi"]
                flagged = sgr_flagged(s)
                label = None
                if not flagged and method not in shown:
                    label, _ = method_label(method), shown.add(method)
                elif flagged and "n/e" not in shown:
                    label, _ = f"{NOT_ESTIMABLE}: hard − zero-shot interval not above 0 (no bar)", shown.add("n/e")
                color = method_color(method, k)
                if flagged:  # not a finding: no bar, a hollow marker (the method's colour) on 0 labelled n/e
                    ax.scatter([x], [0.0], s=40, marker="o", facecolors="none", edgecolors=color, label=label,
                               zorder=3)
                    ax.annotate(NOT_ESTIMABLE, (x, 0.0), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=7, color="#777777")
                    continue
                y = float(np.clip(p, -1.5, 3.0))
                ax.bar(x, y, width * 0.9, color=color, label=label)
                if lo is not None and hi is not None:
                    ax.errorbar(x, y, yerr=[[max(p - lo, 0)], [max(hi - p, 0)]], fmt="none", ecolor="black",
                                capsize=3, lw=1)
                ax.annotate(f"{p:.2f}", (x, y), textcoords="offset points", xytext=(4, 3), ha="left", fontsize=7)
        ax.axhline(1.0, color=COLORS["hard"], ls="--", lw=1.0, label="1 = as good as hard training")
        ax.axhline(0.0, color=COLORS[ZERO_SHOT], ls=":", lw=1.0)
        ax.set_ylim(-1.5, 3.0)
        ax.set_xticks(range(len(groups)), [f"{d}\n{m}" for d, m in groups], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("SGR (95% CI)")
        ax.set_title(model, fontsize=10)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("SGR = (easy − zero-shot) / (hard − zero-shot), hard test\nshared zero-shot; whiskers: 95% CI",
                 fontsize=10)
    return save_figure(fig, path)


def plot_model_size(records: list[dict], models: list[dict], path: Path) -> Path | None:
    """SGR and hard-test accuracy against model size (models in the given order)."""
    groups = sorted({(r["dataset"], r["measure"]) for r in records})
    if not groups or len(models) < 2:
        return None
    names = [m["model"] for m in models]
    methods = _methods(records)
    fig, axes = figure(2 * len(groups), width=max(4.4, 0.9 * len(names) + 2.0), height=3.2, ncols=2)
    x = np.arange(len(names))
    for g, (dataset, measure) in enumerate(groups):
        top, bottom = axes[2 * g], axes[2 * g + 1]  # a row per (dataset, measure): SGR | accuracy
        zero_drawn = False
        for k, method in enumerate(methods):
            by_model = {r["model"]: r for r in records
                        if (r["dataset"], r["measure"], r["method"]) == (dataset, measure, method)}
            if not by_model:
                continue
            c = method_color(method, k)
            sgr = [by_model.get(n, {}).get("sgr") for n in names]
            pts = np.array([s["point"] if s and s["point"] is not None else np.nan for s in sgr], float)
            ok = np.array([bool(s) and not sgr_flagged(s) for s in sgr])
            top.plot(x, np.where(ok, pts, np.nan), marker="o", color=c, label=method_label(method))
            if (~ok & np.isfinite(pts)).any():
                top.scatter(x[~ok & np.isfinite(pts)], np.zeros(int((~ok & np.isfinite(pts)).sum())),
                            facecolors="none", edgecolors="#999999",
                            label=f"{method_label(method)}: {NOT_ESTIMABLE} (drawn on 0)")
            acc = [by_model.get(n, {}).get("accuracy", {}) for n in names]
            easy = np.array([100 * a["easy"]["point"] if a.get("easy") else np.nan for a in acc])
            bottom.plot(x, easy, marker="o", color=c, label=f"{method_label(method)} easy → hard")
            if not zero_drawn:
                zero = np.array([100 * a[ZERO_SHOT]["point"] if a.get(ZERO_SHOT) else np.nan for a in acc])
                bottom.plot(x, zero, ls="--", marker="s", color=COLORS[ZERO_SHOT], label="zero-shot")
                zero_drawn = True
        top.axhline(1.0, color=COLORS["hard"], ls="--", lw=1.0)
        top.axhline(0.0, color=COLORS[ZERO_SHOT], ls=":", lw=1.0)
        top.set_ylim(-1.5, 3.0)
        top.set_title(f"{dataset} / {measure}: SGR", fontsize=10)
        bottom.set_title(f"{dataset} / {measure}: accuracy", fontsize=10)
        top.set_ylabel("SGR")
        bottom.set_ylabel("hard-test accuracy (%)")
        for ax in (top, bottom):
            ax.set_xticks(x, names, rotation=15, ha="right")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7, loc="best")
        bottom.legend(fontsize=7, loc="best")
    fig.suptitle("SGR and hard-test accuracy by model (smallest first)")
    return save_figure(fig, path)
