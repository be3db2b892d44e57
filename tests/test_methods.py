"""The method registry and the design layer every method shares.

Every method a writer emits is registered and its rows follow the registry's rules (site, layer and
solver only on a probe head); the reports take order, colour, pairing and baselines from the registry;
fine-tuning and generation run without the probe engine (no JAX); a new method is one registry entry.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from test_sweep import build_cache

from probekit.methods import METHODS, Method, method, method_order
from probekit.store.results import read_results


def _icl_scores(cache_dir, out):
    """An ICL score folder over the cache's first 40 probe items (one draw, demonstrations from easy)."""
    from probekit.store import Cache
    from probekit.store.icl_scores import IclScoresWriter

    cache = Cache(cache_dir)
    items = cache.items
    ids = items["id"].astype(str).to_numpy()[:40]
    header = {"model": cache.manifest["model"], "dataset": cache.manifest["dataset"],
              "prompt": cache.manifest["prompt"], "n_items": 40, "max_choices": cache.max_choices,
              "icl": {"k": 1, "demos_from": "easy", "measure": "grade", "draws": 1, "key": "icl/grade/easy"}}
    choice_sum, _ = cache.logprobs()
    with IclScoresWriter(out, header) as w:
        w.write_draw(0, list(ids), choice_sum[:40] + 0.5, np.ones((40, cache.max_choices), np.int32),
                     {"demo_ids": [ids[0]], "k_used": 1})
    return out


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep with every kind of row it writes: probe heads, shortcut controls, zero-shot, ICL."""
    from probekit.probe import sweep

    root = tmp_path_factory.mktemp("methods")
    cache = build_cache(root / "cache")
    icl = _icl_scores(cache, root / "icl")
    sweep(cache, root / "res", measures=["grade"], layers="4", n_train=[40], draws=2, icl=[icl])
    return root / "res"


def test_every_method_a_writer_emits_is_registered(swept):
    from probekit.cot import tune
    from probekit.cot.run import CONDITIONS, condition_row
    from probekit.finetune.run import METHOD as FINETUNE

    table = pd.read_parquet(swept / "results.parquet")
    emitted = {"sweep": set(table["method"].astype(str))}
    assert emitted["sweep"] == {"probe", "zero_shot", "icl"}
    header = {"generate": {"finetune": {"n_train": 4}}}
    emitted["generate"] = {condition_row(c, 8, header)[1] for c in (*CONDITIONS, *map(tune.condition, tune.TUNE_LEVELS))}
    assert emitted["generate"] == {"zero_shot_cot", "icl_cot", "finetune_cot"}
    emitted["finetune"] = {FINETUNE}
    for writer, names in emitted.items():
        for name in names:
            assert method(name).name == name, writer
    assert set().union(*emitted.values()) == set(METHODS)  # and every entry has a writer


def test_rows_carry_a_site_layer_and_solver_only_on_a_probe_head(swept):
    table = pd.read_parquet(swept / "results.parquet").astype({c: str for c in ("site", "layer", "solver", "method")})
    heads = table[table["method"].map(lambda m: METHODS[m].probe_head)]
    others = table[~table["method"].map(lambda m: METHODS[m].probe_head)]
    assert set(others["method"]) == {"zero_shot", "icl"}
    assert set(others["site"]) == set(others["layer"]) == set(others["solver"]) == {""}
    assert set(heads["site"]) == {"answer_end", "majority"} and set(heads["solver"]) == {"paper", "majority"}
    assert set(heads[heads["site"] == "answer_end"]["layer"]) == {"4"}


def test_reports_key_a_method_without_a_probe_head_by_its_registered_head(swept, tmp_path):
    from probekit.report import build_report

    summary = build_report(swept, tmp_path / "rep", n_boot=50, n_boot_sgr=50, site="icl")
    assert (summary["settings"]["headline"], summary["settings"]["headline_method"]) == (
        {"site": "icl", "layer": "", "solver": "icl"}, "icl")
    heads = {(r["site"], r["layer"], r["solver"]) for r in summary["population"]}
    assert heads == {("answer_end", "4", "paper"), ("icl", "", "icl"), ("majority", "", "majority")}
    assert read_results(swept).table["site"].astype(str).isin(["answer_end", "majority", ""]).all()  # file unchanged


def test_the_registry_orders_colours_and_pairs_the_methods():
    assert method_order(["finetune", "zero_shot", "icl_cot", "probe", "x"]) == [
        "zero_shot", "probe", "finetune", "icl_cot", "x"]
    assert len({m.colour for m in METHODS.values()}) == len(METHODS)
    assert [m.name for m in METHODS.values() if m.paired] == ["probe", "finetune"]
    for m in METHODS.values():
        assert m.baseline is None or METHODS[m.baseline].baseline is None  # a baseline is no other's method
        assert (m.report_head is None) == (m.probe_head or m.baseline is None)
    with pytest.raises(Exception, match="unknown method 'weird': one of probe, icl, finetune"):
        method("weird")


def test_a_new_method_is_one_registry_entry(swept, tmp_path, monkeypatch):
    """A toy method ("knn", paired with the probe's draws, compared with zero-shot) written with the
    design's rows over the sweep's heads; the results writer takes it, the comparison sets it against
    its baseline and pairs it with the probe by the registry alone."""
    from probekit.design import FrameRows, item_frame, load_items, open_cache, plan, tested_rows
    from probekit.report.compare import build_comparison
    from probekit.store.results import ResultsWriter

    monkeypatch.setitem(METHODS, "knn", Method("knn", "nearest neighbours", "#F0E442", 7, baseline="zero_shot",
                                               paired=True, report_head=("knn", "")))
    probe = read_results(swept)
    cache = open_cache(probe.record.cache)
    items, measures = load_items(cache, ["grade"])
    frame = item_frame(items, probe.record.dataset, measures)
    heads = plan(frame, "population", measures, n_train=[40], draws=2, seed=probe.record.seed)
    rows = FrameRows(frame, "population")
    out = tmp_path / "knn"
    with ResultsWriter(out) as w:
        for h in heads:  # the toy: the majority label of the head's draw
            test = tested_rows(frame, h)
            guess = np.bincount(h.labels).argmax()
            for m in h.measures:
                w.append(rows.table(method="knn", layer="", measure=m, train_level=h.train_level, draw=h.draw,
                                    n_train=h.n_train, noise=0.0, solver="", rows=test,
                                    correct=(frame.gold[test] == guess).astype(np.int8),
                                    p_gold=np.full(len(test), 0.25, np.float32)))
        w.commit(replace(probe.record, kind="sweep", details={}))
    summary = build_comparison([swept, out], tmp_path / "cmp", n_boot=50, n_boot_sgr=50)
    recs = {r["method"]: r for r in summary["population"]}
    assert set(recs) == {"probe", "icl", "knn"} and recs["knn"]["baseline"] == "zero_shot"
    assert recs["knn"]["method_label"] == "nearest neighbours"
    other = tmp_path / "knn-seed"
    with ResultsWriter(other) as w:  # the same rows claiming another seed: paired methods must share it
        w.append(pd.read_parquet(out / "results.parquet").pipe(_arrow))
        w.commit(replace(probe.record, seed=probe.record.seed + 1, details={}))
    with pytest.raises(Exception, match="drew their training items with different seeds"):
        build_comparison([swept, other], tmp_path / "cmp2", n_boot=50, n_boot_sgr=50)


def _arrow(frame: pd.DataFrame):
    import pyarrow as pa

    from probekit.store.results import SCHEMA

    return pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)


def test_finetune_and_generation_import_no_probe_engine(tmp_path):
    """``import probekit.finetune`` (and generation) leaves JAX and the probe engine unloaded, and so does
    ``probekit finetune`` on a cache: it opens the cache, plans the heads and gets as far as checking the
    question set against it (the synthetic cache's fingerprint is not the bundled set's)."""
    cache = build_cache(tmp_path / "cache")
    code = ("import sys, probekit.finetune, probekit.cot.run, probekit.design; "
            "from typer.testing import CliRunner; from probekit.cli import app; "
            f"r = CliRunner().invoke(app, ['finetune', {str(cache)!r}, '--out', {str(tmp_path / 'ft')!r}, "
            "'--measures', 'grade', '--levels', 'easy', '--n-train', '4', '--draws', '1', '--quantize', 'none', "
            "'--device', 'cpu', '--dtype', 'float32']); "
            "assert r.exit_code != 0 and 'fingerprints differ' in r.output, r.output; "
            "assert 'probekit.design.plan' in sys.modules; "
            "found = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'probekit.probe'))); "
            "print(found)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
