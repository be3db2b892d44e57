"""``sweep``: fit every head of an experiment on every feature set of a cache, write the results table.

Reads one layer at a time (two for a concatenated pair), fits all heads of that feature set with
every requested solver (:mod:`probekit.probe.engine`; the solvers share each head's Gram matrix),
and appends one row per (head, test item) to ``RES/results.parquet``; ``RES/sweep.json`` records
the configuration, the cache's manifest hash, counts and timings. The directory's format, lock and
commit belong to :mod:`probekit.store.results`.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pyarrow as pa

from probekit.data.levels import LEVELS, Cutoff
from probekit.design import (
    ALL,
    FrameRows,
    Head,
    ItemFrame,
    head_seed,
    item_frame,
    layer_label,
    load_items,
    open_cache,
    plan,
    tested_rows,
    zero_shot_p,
    zero_shot_tables,
)
from probekit.errors import ProbekitError
from probekit.layers import feature_sets
from probekit.probe import cvpath
from probekit.probe.controls import SURFACE_FEATURES, control_tables
from probekit.probe.engine import ProbeConfig, compile_heads, fit_and_score_many, prepare
from probekit.probe.solvers import DEFAULT_TOL, SOLVERS, solver_names
from probekit.store import Cache
from probekit.store.icl_scores import demo_level, load_icl
from probekit.store.results import (
    EXPERIMENTS,
    MAJORITY_SITE,
    SURFACE_SITE,
    SURFACE_SOLVER,
    ResultsWriter,
    RunRecord,
    holding_results,
)

SITE_HEAD = {"answer_end": "mc", "question_end": "multinomial"}

Progress = Callable[[int, int, str], None]  # (fits done, fits in all, feature set being fitted)


def read_features(cache: Cache, site: str, layer: int, ids: np.ndarray) -> np.ndarray:
    """One layer as float32, refusing non-finite values (named by layer and item)."""
    X = cache.read_layer(site, layer)
    finite = np.concatenate([np.isfinite(X[i:i + 256]).reshape(len(X[i:i + 256]), -1).all(1)
                             for i in range(0, len(X), 256)])
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ProbekitError(
            f"layer {layer} ({site}) has non-finite features for {int((~finite).sum())} items, first {ids[bad]!r}"
        )
    return X


def probe_configs(solvers: Sequence[str], head: str, pad: str, tol: float, C: float | Sequence[float],
                  l2: float | Sequence[float], select: str | None) -> dict[str, ProbeConfig]:
    """Each solver's :class:`ProbeConfig`. ``C`` (the converged solver's) and ``l2`` (the paper
    recipe's) are one value each, or, with ``select`` (``"cvK"``), a grid from which each solver
    chooses its strength by K-fold cross-validation (:mod:`probekit.probe.cvpath`). A grid without
    ``select``, ``select`` without a grid for a solver of the sweep, and a grid no solver of the
    sweep chooses from are refused."""
    grids = {"C": [C] if isinstance(C, numbers.Real) else list(C),
             "l2": [l2] if isinstance(l2, numbers.Real) else list(l2)}
    folds = None if select is None else cvpath.parse_select(select)
    for option, values in grids.items():
        if not values:
            raise ProbekitError(f"{option} needs a value")
        if len(values) > 1 and folds is None:
            raise ProbekitError(f"{option} has {len(values)} values: a grid needs select cvK (K-fold cross-validation "
                                f"chooses from it), or give one value")
        if len(values) > 1 and not any(SOLVERS[s].strength == option for s in solvers):
            raise ProbekitError(f"{option} is a grid, but no solver of this sweep ({', '.join(solvers)}) chooses "
                                f"{option}")
    configs = {}
    for s in solvers:
        strength = SOLVERS[s].strength
        fixed = {o: v[0] for o, v in grids.items() if len(v) == 1}  # a grid is only ever another solver's
        sel = None
        if folds is not None:
            if len(grids[strength]) < 2:
                raise ProbekitError(f"select {select} chooses the {s} solver's {strength} from a grid: give {strength} "
                                    f"several values (e.g. {'0.01,0.1,1,10' if strength == 'C' else '0.1,0.3,1,3'})")
            sel = cvpath.Selection.for_solver(s, folds, grids[strength])
        configs[s] = ProbeConfig(head=head, solver=s, pad=pad, tol=tol, select=sel, **fixed)
    return configs


def _recorded(cfg: ProbeConfig) -> dict[str, Any]:
    """A configuration as ``sweep.json`` records it: a cross-validated one without the strength it
    chooses (its grid is under ``select``)."""
    out = dataclasses.asdict(cfg)
    if cfg.select is not None:
        out.pop(cfg.select.option)
    return out


def compile_first(cache: Cache, n_choices: np.ndarray, row_sets: Sequence[np.ndarray], cfgs: Sequence[ProbeConfig],
                  sets: Sequence[tuple[int, ...]], devices: Sequence[jax.Device] | None) -> float:
    """Compile ahead what fitting heads with these training rows (one (H, n) array per training
    size) on these feature sets runs, before any layer is read (see
    :func:`~probekit.probe.engine.compile_heads`). Returns the seconds it took."""
    t = time.perf_counter()
    for rows in row_sets:
        for width in sorted({cache.hidden_size * len(fs) for fs in sets}):
            compile_heads(n_choices, rows, cfgs, width, cache.max_choices, devices=devices)
    return time.perf_counter() - t


def icl_tables(cache: Cache, frame: ItemFrame, experiment: str, icl_dir: str | os.PathLike) -> list[pa.Table]:
    """Result rows of a k-shot score directory (``probekit extract --icl``), one table per draw
    (and measure).

    Each draw's prompts share demonstrations from one level; its rows have method "icl" (no site, layer
    or solver), ``train_level`` the demonstrations' level (:func:`~probekit.store.icl_scores.demo_level`:
    ``easy``, ``all``, or ``arc:grade:easy`` for demonstrations from another question set),
    ``n_train`` k, and cover the probe items scored in that draw (the demonstrations themselves
    are not scored), so the report treats them like a trained head of that level. Demonstrations
    from every probe item (``all``) scored on every probe item are reported under every measure of
    the sweep, as the probes' "all" heads are (under "all" in the all_to_all experiment); other
    folders under their own measure.
    """
    manifest, ids, choice_sum, _ = load_icl(icl_dir)
    if manifest["dataset"].get("name") != cache.manifest["dataset"].get("name"):
        raise ProbekitError(f"ICL scores {icl_dir} are for dataset {manifest['dataset'].get('name')!r}, "
                            f"the cache for {cache.manifest['dataset'].get('name')!r}")
    if manifest["model"] != cache.manifest["model"]:
        raise ProbekitError(f"ICL scores {icl_dir} come from another model than the cache "
                            f"({manifest['model'].get('id')!r} vs {cache.manifest['model'].get('id')!r})")
    icl = manifest["icl"]
    every = icl["demos_from"] == ALL and not icl.get("demos_dataset") and not icl.get("test_levels")
    if every:
        measures = [ALL] if experiment == "all_to_all" else list(frame.levels)
    elif icl["measure"] not in frame.levels:
        raise ProbekitError(f"ICL scores {icl_dir} use measure {icl['measure']!r}, which this sweep does not cut "
                            f"(add it to --measures)")
    else:
        measures = [icl["measure"]]
    position = {item: i for i, item in enumerate(frame.ids)}
    missing = [item for item in ids if item not in position]
    if missing:
        raise ProbekitError(f"ICL scores {icl_dir}: item {missing[0]!r} is not in the cache")
    rows_of = np.array([position[item] for item in ids])
    probe = np.isin(rows_of, frame.probe)
    builder = FrameRows(frame, experiment)
    tables = []
    for b in range(choice_sum.shape[0]):
        scored = probe & np.isfinite(choice_sum[b]).any(1)
        rows = rows_of[scored]
        p, c = zero_shot_p(choice_sum[b][scored], frame.n_choices[rows], frame.gold[rows])
        for m in measures:
            tables.append(builder.table(method="icl", layer="", measure=m, train_level=demo_level(icl), draw=b,
                                        n_train=int(icl["k"]), noise=0.0, solver="", rows=rows, correct=c,
                                        p_gold=p))
    return tables


def sweep(
    cache: str | os.PathLike | Cache,
    out: str | os.PathLike,
    *,
    experiment: str = "population",
    measures: Sequence[str] | None = None,
    layers: str | Sequence[int] = "all,middle_and_last",
    site: str = "answer_end",
    solver: str | Sequence[str] = "paper",
    n_train: Sequence[int] = (160,),
    label_noise: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    draws: int = 5,
    seed: int = 0,
    levels: Sequence[str] | None = None,
    pad: str = "mask",
    C: float | Sequence[float] = 1.0,
    l2: float | Sequence[float] = 1.0,
    select: str | None = None,
    tol: float = DEFAULT_TOL,
    cutoffs: Mapping[str, Cutoff] | None = None,
    zero_shot: bool = True,
    icl: Sequence[str | os.PathLike] = (),
    controls: bool = True,
    verify: bool = True,
    devices: Sequence[jax.Device] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run one experiment over a cache; write ``out/results.parquet`` and ``out/sweep.json``.

    ``icl``: k-shot score directories of ``probekit extract --icl`` for the same model and
    dataset; their rows join the table as heads of method "icl" (see :func:`icl_tables`).
    ``controls``: also fit the shortcut controls of every head on its draw (:mod:`probekit.probe.controls`:
    the probe recipe on the choices' surface features when the cache holds them, and the majority
    position), rows with site "surface" and "majority".

    ``experiment``: population | all_to_all | learning_curve | label_noise (see
    :func:`probekit.design.plan.plan`). ``layers``: a layer spec (:mod:`probekit.layers`): all | last |
    middle | middle_and_last | "15,30" | "15+30" | "-1". ``site``: answer_end (multiple-choice head)
    or question_end (multinomial head).
    ``solver``: a name in :data:`probekit.probe.solvers.SOLVERS` (paper, converged), several, or
    both. ``pad``: mask (default) or zero (the protocol's zero-padding). ``C``: converged
    solver's inverse regularisation (scikit-learn's C); ``tol``: its relative optimality (see
    :class:`~probekit.probe.engine.ProbeConfig`); ``l2``: the paper recipe's penalty weight.
    ``select``: ``"cvK"`` chooses each head's strength (``C`` or ``l2``, then a grid of values)
    by K-fold cross-validation inside its training draw and refits the draw at it (see
    :mod:`probekit.probe.cvpath`); ``sweep.json``'s ``cv`` records every fit's choice and curve.
    Bad options are refused before the cache is read.
    ``levels``: restrict the training levels (e.g. ``["easy", "hard"]``).
    ``cutoffs``: per-measure level rules overriding the defaults. ``progress(done, total, layer)``
    is called as heads complete. Returns the contents of ``sweep.json``.

    Example:
        >>> sweep("cache/llama-2-7b__arc", "results/pop", measures=["grade", "difficulty"],
        ...       layers="middle_and_last", solver="both")
    """
    t0 = time.perf_counter()
    if site not in SITE_HEAD:
        raise ProbekitError(f"site must be answer_end or question_end, got {site!r}")
    solvers = solver_names(solver)
    configs = probe_configs(solvers, SITE_HEAD[site], pad, tol, C, l2, select)
    settings = Settings(experiment, measures, layers, site, solvers, configs, n_train, label_noise, draws, seed,
                        levels, pad, cutoffs, zero_shot, list(icl), controls, select, devices)
    with holding_results(out, "sweep"):  # the lock before the cache is verified or anything compiles
        return _sweep_held(t0, cache, out, settings, verify, progress)


class Settings(NamedTuple):
    """A sweep's settings, checked (see :func:`sweep`); ``configs``: each solver's probe configuration."""

    experiment: str
    measures: Sequence[str] | None
    layers: str | Sequence[int]
    site: str
    solvers: list[str]
    configs: dict[str, ProbeConfig]
    n_train: Sequence[int]
    label_noise: Sequence[float]
    draws: int
    seed: int
    levels: Sequence[str] | None
    pad: str
    cutoffs: Mapping[str, Cutoff] | None
    zero_shot: bool
    icl: list[str | os.PathLike]
    controls: bool
    select: str | None
    devices: Sequence[jax.Device] | None


class Design(NamedTuple):
    """What a sweep fits on a cache: the item frame, the feature sets, the heads (grouped by training
    size: one batched fit per group), the result rows of every site and each head's folds."""

    cache: Cache
    dataset: str
    measures: list[str]
    frame: ItemFrame
    sets: list
    heads: list[Head]
    groups: list[list[Head]]
    rows: FrameRows
    controls: dict[str, FrameRows]
    folds: dict[str, np.ndarray]
    selections: dict[str, Any]


@dataclasses.dataclass
class Tally:
    """A sweep's running counts: fits done (for ``progress``), seconds fitting, fits not converged,
    zero-weight optima by feature set, every cross-validated fit's record."""

    fits: int
    progress: Progress | None
    done: int = 0
    fit_seconds: float = 0.0
    not_converged: int = 0
    cv_not_converged: int = 0
    surface_zero: int = 0
    zero_fits: dict[str, int] = dataclasses.field(default_factory=dict)
    cv_fits: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def tick(self, label: str) -> Callable[[int], None]:
        """A callback counting ``k`` more fits done of feature set ``label``."""
        def on_chunk(k: int) -> None:
            self.done += k
            if self.progress is not None:
                self.progress(self.done, self.fits, label)
        return on_chunk


def _sweep_held(t0: float, cache, out, s: Settings, verify: bool, progress: Progress | None) -> dict[str, Any]:
    """The sweep, with its results directory held (see :func:`sweep`)."""
    d = _design(cache, s, verify)
    n_fits = len(d.heads) * len(d.sets) * len(s.solvers) + len(d.heads) * (SURFACE_SITE in d.controls)
    tally = Tally(n_fits, progress)
    tally.fit_seconds = compile_first(d.cache, d.frame.n_choices, [np.stack([h.rows for h in g]) for g in d.groups],
                                      list(s.configs.values()), d.sets, s.devices)
    with ResultsWriter(out) as batch:  # refuses a directory another writer holds
        zero_rows = 0
        if s.zero_shot:
            for t in zero_shot_tables(d.cache, d.frame, d.measures, s.experiment):
                zero_rows += t.num_rows
                batch.append(t)
        for icl_dir in s.icl:
            for t in icl_tables(d.cache, d.frame, s.experiment, icl_dir):
                batch.append(t)
        t1 = time.perf_counter()
        tables, tally.surface_zero = control_tables(d.cache, d.frame, d.controls, d.groups,
                                                    next(iter(s.configs.values())), s.seed, s.devices,
                                                    tally.tick(SURFACE_SITE))
        tally.fit_seconds += time.perf_counter() - t1
        for t in tables:
            batch.append(t)
        for fs in d.sets:
            _fit_feature_set(batch, d, s, fs, tally)
        return batch.commit(_sweep_record(d, s, tally, zero_rows, time.perf_counter() - t0))


def _design(cache, s: Settings, verify: bool) -> Design:
    """The cache verified and the sweep's heads planned on it; a bad experiment, site or cut-off refused."""
    selections = {name: c.select for name, c in s.configs.items() if c.select is not None}
    n_folds = next(iter(selections.values())).folds if selections else None
    cache = open_cache(cache, verify)
    if s.experiment not in EXPERIMENTS:
        raise ProbekitError(f"unknown experiment {s.experiment!r}: choose from {', '.join(EXPERIMENTS)}")
    if s.site not in cache.sites:
        raise ProbekitError(f"site {s.site!r} is not in cache {cache.path}; it holds {cache.sites}")
    dataset = str(cache.manifest.get("dataset", {}).get("name", ""))
    items, measures = load_items(cache, s.measures)
    stray = [m for m in (s.cutoffs or {}) if m not in measures]
    if stray:
        raise ProbekitError(f"cut-off given for {stray[0]!r}, which is not a measure of this sweep "
                            f"({', '.join(measures)}); check its name or add it to the measures")
    frame = item_frame(items, dataset, measures, s.cutoffs)
    sets = feature_sets(s.layers, cache.manifest.get("model", {}).get("n_layers"), cache.layers)
    heads = plan(frame, s.experiment, measures, n_train=s.n_train, label_noise=s.label_noise, draws=s.draws,
                 seed=s.seed, levels=s.levels)
    groups: dict[int, list[Head]] = {}
    for h in heads:
        groups.setdefault(h.n_train, []).append(h)
    controls = {}
    if s.controls:
        controls = {MAJORITY_SITE: FrameRows(frame, s.experiment, MAJORITY_SITE)}
        if cache.has_surface:
            controls[SURFACE_SITE] = FrameRows(frame, s.experiment, SURFACE_SITE)
    return Design(cache, dataset, measures, frame, sets, heads, list(groups.values()),
                  FrameRows(frame, s.experiment, s.site), controls,
                  cvpath.head_folds(heads, n_folds, s.seed) if n_folds else {}, selections)


def _fit_feature_set(batch: ResultsWriter, d: Design, s: Settings, fs, tally: Tally) -> None:
    """Fit every head with every solver on one feature set (a layer, or layers concatenated); append
    their rows."""
    label = layer_label(fs)
    Xs = prepare((read_features(d.cache, s.site, layer, d.frame.ids) for layer in fs), s.devices)
    frame = d.frame
    for group in d.groups:  # every solver on the same heads: rows and Gram shared
        t1 = time.perf_counter()
        results = fit_and_score_many(
            Xs, frame.n_choices, frame.gold,
            np.stack([h.rows for h in group]), np.stack([h.labels for h in group]),
            np.array([head_seed(s.seed, f"{h.name}/{label}") for h in group]), list(s.configs.values()),
            devices=s.devices,
            on_chunk=tally.tick(label),
            folds=np.stack([d.folds[h.name] for h in group]) if d.folds else None,
        )
        tally.fit_seconds += time.perf_counter() - t1
        for name, res in zip(s.configs, results):
            tally.not_converged += int((~res.converged).sum())
            if res.chosen is not None:
                tally.cv_not_converged += int((~res.cv_converged).sum())
                tally.cv_fits += [cvpath.fit_record(h, label, name, d.selections[name], res.cv_loss[i],
                                                    res.cv_accuracy[i], res.cv_converged[i], res.chosen[i])
                                  for i, h in enumerate(group)]
            if res.zero_weights.any():
                tally.zero_fits[label] = tally.zero_fits.get(label, 0) + int(res.zero_weights.sum())
            for i, h in enumerate(group):
                test = tested_rows(frame, h)
                for m in h.measures:
                    batch.append(d.rows.table(
                        method="probe", layer=label, measure=m, train_level=h.train_level, draw=h.draw,
                        n_train=h.n_train, noise=h.label_noise, solver=name, rows=test,
                        correct=res.correct[i, test], p_gold=res.p_gold[i, test],
                        zero_weights=bool(res.zero_weights[i])))
    del Xs


def _sweep_record(d: Design, s: Settings, tally: Tally, zero_rows: int, wall: float) -> RunRecord:
    """``sweep.json`` of a sweep: its settings, counts and timings."""
    frame, experiment, controls = d.frame, s.experiment, d.controls
    return RunRecord(
        kind="sweep",
        cache=str(d.cache.path.resolve()),
        cache_manifest_sha256=d.cache.manifest_sha256,
        dataset=d.dataset,
        model=d.cache.manifest.get("model", {}),
        prompt=d.cache.manifest.get("prompt", {}),
        config={
            "experiment": experiment, "measures": d.measures, "layers": [layer_label(fs) for fs in d.sets],
            "layers_spec": s.layers if isinstance(s.layers, str) else list(s.layers), "site": s.site,
            "head": SITE_HEAD[s.site], "solvers": s.solvers, "n_train": sorted({int(x) for x in s.n_train}),
            "label_noise": [float(x) for x in s.label_noise] if experiment == "label_noise" else [0.0],
            "draws": s.draws, "train_levels": sorted({h.train_level for h in d.heads}), "pad": s.pad,
            "probe": {name: _recorded(c) for name, c in s.configs.items()}, "select": s.select,
            "objectives": {name: spec.objective for name, spec in SOLVERS.items()},
            "cutoffs": {m: repr(r) for m, r in (s.cutoffs or {}).items()}, "zero_shot": s.zero_shot,
            "icl": [str(Path(i).resolve()) for i in s.icl],
            "controls": {"sites": list(controls),
                         "surface_features": [*SURFACE_FEATURES, "position"] if SURFACE_SITE in controls else None,
                         "surface_solver": SURFACE_SOLVER,
                         "surface_skipped": (None if not s.controls or SURFACE_SITE in controls else
                                             "the cache holds no choice surface features (extract it again)")},
            "normalisation": "z-score with training statistics (unbiased std)",
        },
        seed=s.seed,
        counts={
            "heads": len(d.heads), "feature_sets": len(d.sets), "fits": tally.fits,
            "rows": zero_rows + d.rows.n_rows + sum(b.n_rows for b in controls.values()),
            "probe_items": int(len(frame.probe)), "not_converged": tally.not_converged,
            "zero_weight_fits": sum(tally.zero_fits.values()), "zero_weight_fits_by_layer": tally.zero_fits,
            "surface_zero_weight_fits": tally.surface_zero,
            **({"cv_fold_fits_not_converged": tally.cv_not_converged} if d.selections else {}),
            "levels": {m: {lv: int((frame.levels[m][frame.probe] == k).sum()) for k, lv in enumerate(LEVELS)}
                       for m in d.measures},
        },
        details={
            "devices": [str(dev) for dev in (s.devices or jax.devices())],
            "wall_seconds": round(wall, 3),
            "fit_seconds": round(tally.fit_seconds, 3),
            "heads_per_second": round(tally.fits / tally.fit_seconds, 3) if tally.fit_seconds > 0 else None,
            **({"cv": cvpath.record(d.selections, tally.cv_fits)} if d.selections else {}),
        },
    )
