"""Comparison reports over several results directories (methods, datasets), on small real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from probekit.cli import app

REPO_CACHE = Path(__file__).resolve().parents[1] / "cache"
BOOT, BOOT_SGR = 200, 400
SMALL = dict(measures=["grade"], n_train=[8], levels=["easy", "hard"])
#: What a population record of the single-run report holds (the comparison adds model, dataset, run, ...).
STATS = ("measure", "site", "layer", "solver", "n_train", "accuracy", "sgr", "hard_minus_easy", "easy_minus_zero_shot")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_cache, demo_items, lm, one_torch_thread):
    """Real runs on the real cache: a probe sweep with ICL rows (k=1), a fine-tuning run (one update
    per head, hard test items only), and a probe sweep with another seed."""
    from probekit.extract.icl import extract_icl
    from probekit.finetune import finetune
    from probekit.llm import ModelSpec
    from probekit.probe import sweep

    d = tmp_path_factory.mktemp("runs")
    icl = []
    for level in ("easy", "hard"):
        extract_icl(demo_items, d / f"icl-{level}", ModelSpec(cache_root=REPO_CACHE), k=1, demos_from=level,
                    measure="grade", draws=2, limit=24, min_test=4, batch_size=8, progress=False)
        icl.append(d / f"icl-{level}")
    sweep(real_cache, d / "probe", layers="last", draws=2, icl=icl, **SMALL)
    finetune(real_cache, demo_items, d / "ft", lm, draws=1, max_updates=1, test_levels=["hard"], **SMALL)
    sweep(real_cache, d / "probe-seed1", layers="last", draws=2, seed=1, **SMALL)
    return d


@pytest.fixture(scope="module")
def strategyqa_run(tmp_path_factory, shared_data, lm, one_torch_thread):
    """A second dataset: the first 200 StrategyQA questions, last layer, probes on question length."""
    from probekit.data import load_dataset
    from probekit.extract.run import extract
    from probekit.probe import sweep

    d = tmp_path_factory.mktemp("sqa")
    items = load_dataset("strategyqa", data_dir=shared_data)
    extract(items, d / "cache", lm, layers="last", sites=["answer_end"], batch_size=16, limit=200, progress=False)
    sweep(d / "cache", d / "probe", layers="last", draws=2, measures=["question_num_words"], n_train=[8],
          levels=["easy", "hard"])
    return d


def _report(args: list[str]):
    out = CliRunner().invoke(app, ["report", *map(str, args), "--boot", str(BOOT), "--boot-sgr", str(BOOT_SGR)])
    return out


def _single(results: Path, out: Path, **kw) -> dict:
    from probekit.report import build_report

    return build_report(results, out, n_boot=BOOT, n_boot_sgr=BOOT_SGR, **kw)


def _headline_records(summary: dict) -> list[dict]:
    head = summary["settings"]["headline"]
    return [{k: r[k] for k in STATS} for r in summary["population"]
            if (r["site"], r["layer"], r["solver"]) == (head["site"], head["layer"], head["solver"])]


@pytest.mark.slow
def test_methods_of_one_model_and_dataset_share_zero_shot_and_equal_their_single_reports(runs, tmp_path):
    rep = tmp_path / "rep"
    out = _report([runs / "probe", runs / "ft", "--out", rep])
    assert out.exit_code == 0, out.output
    summary = json.loads((rep / "summary.json").read_text())
    assert {"sgr.png", "comparison.csv", "report.md", "spearman.csv"} <= set(summary["files"])
    assert all((rep / f).is_file() for f in summary["files"])
    recs = {r["method"]: r for r in summary["population"]}
    assert set(recs) == {"probe", "icl", "finetune"}
    assert recs["probe"]["run"] == recs["icl"]["run"] == str((runs / "probe").resolve())
    assert recs["finetune"]["run"] == str((runs / "ft").resolve())
    # one zero-shot baseline for every method
    zero = {json.dumps(r["accuracy"]["zero_shot"], sort_keys=True) for r in recs.values()}
    assert len(zero) == 1
    # each method's numbers are those of its run's own report, with that head as the headline
    expected = {
        "probe": _headline_records(_single(runs / "probe", tmp_path / "s-probe")),
        "icl": _headline_records(_single(runs / "probe", tmp_path / "s-icl", site="icl")),
        "finetune": _headline_records(_single(runs / "ft", tmp_path / "s-ft")),
    }
    for method, want in expected.items():
        assert [{k: recs[method][k] for k in STATS}] == want, method
    # the CLI table names every method
    for method in ("probe", "icl", "finetune"):
        assert method in out.output
    csv = pd.read_csv(rep / "comparison.csv")
    assert sorted(csv["method"]) == ["finetune", "icl", "probe"]
    np.testing.assert_allclose(csv.set_index("method").loc["finetune", "sgr"], recs["finetune"]["sgr"]["point"])


@pytest.mark.slow
def test_single_report_of_a_finetune_run_names_the_method_not_an_empty_layer(runs, tmp_path):
    out = _report([runs / "ft", "--out", tmp_path / "rep"])
    assert out.exit_code == 0, out.output
    printed = " ".join(out.output.split())  # the terminal table wraps its title
    assert "method finetune" in printed and "layer ``" not in printed and "layer ," not in printed
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["settings"]["headline_method"] == "finetune"
    assert "method `finetune`" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_two_datasets_give_sgr_per_dataset_and_spearman_matrices(runs, strategyqa_run, tmp_path):
    from probekit.store.reader import Cache

    rep = tmp_path / "rep"
    out = _report([runs / "probe", runs / "ft", strategyqa_run / "probe", "--out", rep])
    assert out.exit_code == 0, out.output
    summary = json.loads((rep / "summary.json").read_text())
    datasets = {(r["dataset"], r["method"]) for r in summary["population"]}
    sqa = next(r["dataset"] for r in summary["runs"] if r["dir"] == str((strategyqa_run / "probe").resolve()))
    assert (sqa, "probe") in datasets and len({d for d, _ in datasets}) == 2
    rec = [{k: r[k] for k in STATS} for r in summary["population"] if r["dataset"] == sqa]
    assert rec == _headline_records(_single(strategyqa_run / "probe", tmp_path / "s"))
    # Spearman: pandas' rank correlation over the same items as the reference
    entry = next(e for e in summary["spearman"] if e["dataset"] == sqa)
    items = Cache(strategyqa_run / "cache").items
    tested = set(pd.read_parquet(strategyqa_run / "probe" / "results.parquet")["item_id"].astype(str))
    items = items[items["id"].astype(str).isin(tested)]
    assert entry["n_items"] == len(items) > 0
    ref = items[entry["measures"]].apply(pd.to_numeric, errors="coerce").corr(method="spearman")
    got = pd.DataFrame(entry["rho"], index=entry["measures"], columns=entry["measures"]).astype(float)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=1e-9, equal_nan=True)
    assert len(summary["spearman"]) == 2 and (rep / "spearman.csv").is_file()


@pytest.mark.slow
def test_a_cloze_run_is_its_own_dataset_against_its_own_zero_shot(runs, demo_items, lm, tmp_path):
    from probekit.extract.run import extract
    from probekit.probe import sweep

    extract(demo_items, tmp_path / "cloze", lm, layers="last", sites=["answer_end"], template="cloze",
            batch_size=16, progress=False)
    sweep(tmp_path / "cloze", tmp_path / "cloze-probe", layers="last", draws=2, **SMALL)
    rep = tmp_path / "rep"
    out = _report([runs / "probe", tmp_path / "cloze-probe", "--out", rep])
    assert out.exit_code == 0, out.output
    summary = json.loads((rep / "summary.json").read_text())
    name = json.loads((runs / "probe" / "sweep.json").read_text())["dataset"]
    assert [(r["dataset"], r["prompt"]) for r in summary["runs"]] == [(name, "0040"), (f"{name} (cloze)", "cloze")]
    for results, dataset in ((runs / "probe", name), (tmp_path / "cloze-probe", f"{name} (cloze)")):
        rec = [{k: r[k] for k in STATS} for r in summary["population"]
               if r["dataset"] == dataset and r["method"] == "probe"]
        assert rec == _headline_records(_single(results, tmp_path / dataset)), dataset
    zero = {r["dataset"]: r["accuracy"]["zero_shot"]["point"] for r in summary["population"] if r["method"] == "probe"}
    assert zero[name] != zero[f"{name} (cloze)"]  # each against the zero-shot of its own prompt
    assert [e["dataset"] for e in summary["spearman"]] == [name]  # one set of items, one matrix


def test_dataset_label_names_a_prompt_other_than_the_sets_own():
    from probekit.report.compare import dataset_label, prompt_template

    assert dataset_label("arc", "0040") == "arc" and dataset_label("strategyqa", "0306") == "strategyqa"
    assert dataset_label("arc", "cloze") == "arc (cloze)" and dataset_label("mmlu", None) == "mmlu"
    assert prompt_template({"template": "cloze", "k_shot": 0}) == "cloze"
    assert prompt_template({"zero_shot": "0305"}) is None and prompt_template({}) is None


@pytest.mark.slow
def test_mismatched_runs_are_refused_and_nothing_is_written(runs, real_cache, tmp_path):
    from probekit.data.levels import Fixed
    from probekit.probe import sweep

    rep = tmp_path / "rep"
    cases = {
        "seeds": ([runs / "probe-seed1", runs / "ft"], "different seeds"),
        "twice": ([runs / "probe", runs / "probe"], "given twice"),
        "two probe runs": ([runs / "probe", runs / "probe-seed1"], "both hold probe rows"),
    }
    sweep(real_cache, tmp_path / "cut", layers="last", draws=2, cutoffs={"grade": Fixed(6, 8)}, **SMALL)
    cases["levels"] = ([tmp_path / "cut", runs / "ft"], "different levels")
    for name, (dirs, message) in cases.items():
        out = _report([*dirs, "--out", rep])
        assert out.exit_code != 0, name
        assert message in out.output and len(out.output.strip().splitlines()) == 1, (name, out.output)
        assert not rep.exists(), name


def test_model_size_from_the_record_or_the_name():
    from probekit.report.compare import model_size

    assert model_size({"id": "SmolLM2-135M-Instruct"})[0] == pytest.approx(1.35e8)
    assert model_size({"id": "google/gemma-3-270m-it"})[0] == pytest.approx(2.7e8)
    assert model_size({"id": "meta-llama/Llama-2-7b-hf"})[0] == pytest.approx(7e9)
    assert model_size({"id": "Llama-2-70b", "n_params": 68_976_648_192}) == (68_976_648_192.0, "recorded (n_params)")
    assert model_size({"id": "my-model"}) == (None, "unknown (ordered by name)")


def test_models_are_ordered_by_size_in_the_model_size_table_and_figure(tmp_path):
    from probekit.report.compare import _model_order, model_size_frame
    from probekit.report.compare_plots import plot_model_size

    def rec(model: str, sgr: float, estimable: bool = True) -> dict:
        stat = {"point": 0.3, "mean": 0.3, "lo": 0.28, "hi": 0.32, "error_bar": 0.02, "n_items": 50}
        return {"model": model, "dataset": "arc", "measure": "grade", "method": "probe",
                "accuracy": {"zero_shot": stat, "easy": stat, "hard": stat},
                "sgr": {"point": sgr, "lo": sgr - 0.1, "hi": sgr + 0.1, "error_bar": 0.1, "p_value": 0.01,
                        "n_items": 50, "estimable": estimable, "reason": None if estimable else "interval includes 0"}}

    class Run:  # what _model_order reads of a run
        def __init__(self, model, size):
            self.model, self.size, self.size_source = model, size, "test"

    models = [{"model": m, "size": s, "size_source": src}
              for m, s, src in _model_order([Run("Llama-2-7b", 7e9), Run("SmolLM2-135M", 1.35e8), Run("x", None)])]
    assert [m["model"] for m in models] == ["SmolLM2-135M", "Llama-2-7b", "x"]
    records = [rec("Llama-2-7b", 0.8), rec("SmolLM2-135M", 0.5, estimable=False)]
    frame = model_size_frame(records, models)
    sgr_cols = [c for c in frame.columns if c.endswith("SGR")]
    assert sgr_cols == ["SmolLM2-135M: SGR", "Llama-2-7b: SGR", "x: SGR"]
    assert list(frame.loc[0, sgr_cols]) == ["n/e", "0.80 [0.70, 0.90] p=0.010", "–"]
    assert plot_model_size(records, models, tmp_path / "size.png").is_file()
