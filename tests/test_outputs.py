"""Output directories: one writer at a time, atomic commits, leftovers of killed runs removed.

Covers the results table (results.parquet + sweep.json), the report directory, ICL score folders
and hardness.json, all written through probekit.store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from probekit.errors import ProbekitError
from probekit.store.hardness import read_mdl, write_hardness
from probekit.store.icl_scores import IclScoresWriter, load_icl, read_manifest
from probekit.store.outdir import OutputDir
from probekit.store.results import (
    CACHE_HASH_KEY,
    COLUMNS,
    CONFIG,
    RESULTS,
    RESULTS_FILE_KEY,
    ResultRows,
    ResultsWriter,
    RunRecord,
    read_results,
)

LEVELS = ("easy", "medium", "hard")
IDS = [f"q{i}" for i in range(6)]


def rows_table(solver: str = "paper", draw: int = 0):
    """One head's rows over six items (levels easy, medium, hard, unknown, ...)."""
    rows = np.arange(6)
    return ResultRows("population", "answer_end", IDS, LEVELS).table(
        method="probe", layer="3", measure="grade", train_level="easy", draw=draw, n_train=10, noise=0.0, solver=solver,
        rows=rows, test_levels=np.array([0, 1, 2, -1, 0, 1]), correct=rows % 2, p_gold=np.full(6, 0.5))


def run_record(seed: int = 0) -> RunRecord:
    return RunRecord(kind="sweep", dataset="synthetic", model={"id": "m"}, prompt={}, config={}, seed=seed,
                     counts={}, cache_manifest_sha256="cd" * 32)


def write_results(out, seed: int = 0, draws: int = 2):
    with ResultsWriter(out, row_group=4) as w:
        for d in range(draws):
            w.append(rows_table(draw=d))
        return w.commit(run_record(seed))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def leftovers(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name)


# ----- the results table ------------------------------------------------------------------------
def test_results_round_trip_records_the_table(tmp_path):
    record = write_results(tmp_path / "res")
    res = read_results(tmp_path / "res")
    assert list(res.table.columns) == list(COLUMNS) and len(res.table) == 12
    assert res.table["test_level"].astype(str).tolist()[:4] == ["easy", "medium", "hard", ""]
    on_disk = json.loads((tmp_path / "res" / CONFIG).read_text())
    assert on_disk[RESULTS_FILE_KEY]["sha256"] == res.sha256 == record[RESULTS_FILE_KEY]["sha256"]
    assert on_disk[RESULTS_FILE_KEY]["bytes"] == (tmp_path / "res" / RESULTS).stat().st_size
    assert res.sweep == {"format": "probekit-sweep/1", "kind": "sweep", CACHE_HASH_KEY: "cd" * 32,
                         "dataset": "synthetic", "model": {"id": "m"}, "prompt": {}, "config": {}, "seed": 0,
                         "counts": {}}  # the results-file record left out
    assert res.record == run_record(0)
    assert leftovers(tmp_path / "res") == []


def test_results_read_without_optional_columns(tmp_path):
    write_results(tmp_path / "res")
    whole = read_results(tmp_path / "res")
    res = read_results(tmp_path / "res", columns=())
    assert list(res.table.columns) == [c for c in COLUMNS if c != "p_gold"] and res.sha256 == whole.sha256
    pd.testing.assert_frame_equal(res.table, whole.table.drop(columns="p_gold"))
    assert list(read_results(tmp_path / "res", columns=("p_gold",)).table.columns) == list(COLUMNS)
    write_results(tmp_path / "other", draws=3)  # the hash is still checked against sweep.json
    shutil.copy(tmp_path / "other" / RESULTS, tmp_path / "res" / RESULTS)
    with pytest.raises(ProbekitError, match="does not belong"):
        read_results(tmp_path / "res", columns=())


def test_second_writer_is_refused_and_the_first_stays_whole(tmp_path):
    out = tmp_path / "res"
    with ResultsWriter(out) as first:
        first.append(rows_table())
        with pytest.raises(ProbekitError, match="is being written by another process") as exc:
            with ResultsWriter(out) as second:
                second.append(rows_table(solver="converged"))
        assert f"results directory {out} " in one_line(exc) and f"pid {os.getpid()}" in one_line(exc)
        first.append(rows_table(draw=1))
        first.commit(run_record(1))
    res = read_results(out)
    assert len(res.table) == 12 and set(res.table["solver"].astype(str)) == {"paper"}
    assert res.record.seed == 1


def test_swapped_results_are_refused(tmp_path):
    write_results(tmp_path / "a", seed=0, draws=2)
    write_results(tmp_path / "b", seed=1, draws=3)
    shutil.copy(tmp_path / "b" / RESULTS, tmp_path / "a" / RESULTS)
    with pytest.raises(ProbekitError, match=f"does not belong to .*{CONFIG}") as exc:
        read_results(tmp_path / "a")
    one_line(exc)
    # an old configuration beside new results
    write_results(tmp_path / "a", seed=0, draws=2)
    old_config = (tmp_path / "a" / CONFIG).read_bytes()
    write_results(tmp_path / "a", seed=5, draws=3)
    (tmp_path / "a" / CONFIG).write_bytes(old_config)
    with pytest.raises(ProbekitError, match="does not belong"):
        read_results(tmp_path / "a")


def test_crash_between_table_and_config_never_pairs_new_results_with_old_config(tmp_path, monkeypatch):
    out = tmp_path / "res"
    write_results(out, seed=0, draws=2)

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(OutputDir, "write_json", crash)
    with pytest.raises(OSError, match="killed"):
        write_results(out, seed=1, draws=3)
    monkeypatch.undo()
    assert len(pd.read_parquet(out / RESULTS)) == 18 and not (out / CONFIG).exists()  # never the old configuration
    with pytest.raises(ProbekitError, match="has results.parquet but no sweep.json"):
        read_results(out)  # a table that cannot be checked against its run is not read
    assert leftovers(out) == []


def test_failed_writer_leaves_nothing_it_created(tmp_path):
    out = tmp_path / "new" / "res"
    with pytest.raises(RuntimeError):
        with ResultsWriter(out) as w:
            w.append(rows_table())
            raise RuntimeError("bad input")
    assert not out.exists()
    write_results(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if not p.name.startswith(".")}
    with pytest.raises(RuntimeError):
        with ResultsWriter(tmp_path / "old") as w:
            w.append(rows_table(solver="converged"))
            raise RuntimeError("bad input")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if not p.name.startswith(".")} == before
    assert leftovers(tmp_path / "old") == []


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_outputs import rows_table
    from probekit.store.results import ResultsWriter
    w = ResultsWriter({out!r}, row_group=1).__enter__()
    w.append(rows_table())
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_rerun_removes_a_killed_writers_temporaries(tmp_path):
    out = tmp_path / "res"
    write_results(out)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(tests=os.path.dirname(__file__), out=str(out))],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    (out / ".results.parquet.tmp").write_bytes(b"older scheme")
    (out / ".sweep.json.tmp").write_text("{")
    left = leftovers(out)
    assert len(left) == 3 and any(name.startswith(".results.parquet.") and name.endswith(".tmp") for name in left)
    assert read_results(out).sweep["seed"] == 0  # the committed pair is untouched
    write_results(out, seed=7)  # the lock died with the killed process
    assert leftovers(out) == [] and read_results(out).sweep["seed"] == 7


# ----- the method registry and the run record -----------------------------------------------------
def test_an_unregistered_method_is_refused_when_results_are_committed(tmp_path):
    import pyarrow as pa

    from probekit.methods import METHODS

    good = rows_table()
    weird = good.set_column(good.schema.get_field_index("method"), "method",
                            pa.DictionaryArray.from_arrays(pa.array(np.zeros(6, np.int32)), pa.array(["weird"])))
    out = tmp_path / "res"
    with pytest.raises(ProbekitError, match="unknown method 'weird': one of probe, icl") as exc:
        with ResultsWriter(out) as w:
            w.append(good)
            w.append(weird)
            w.commit(run_record())
    one_line(exc)
    assert not out.exists()  # nothing committed
    with pytest.raises(ProbekitError, match="unknown method 'weird'"):
        ResultRows("population", "", IDS, LEVELS).table(
            method="weird", layer="", measure="grade", train_level="easy", draw=0, n_train=1, noise=0.0, solver="",
            rows=np.arange(6), test_levels=np.zeros(6, int), correct=np.zeros(6), p_gold=np.full(6, 0.5))
    for name, m in METHODS.items():  # a method without a probe head takes no site, layer or solver
        if not m.probe_head:
            with pytest.raises(ProbekitError, match=f"rows of method '{name}' carry no site, layer or solver"):
                ResultRows("population", "", IDS, LEVELS).table(
                    method=name, layer="", measure="grade", train_level="easy", draw=0, n_train=1, noise=0.0,
                    solver=name, rows=np.arange(6), test_levels=np.zeros(6, int), correct=np.zeros(6),
                    p_gold=np.full(6, 0.5))


def test_a_run_record_that_does_not_hold_is_refused_when_committed(tmp_path):
    from dataclasses import replace

    out = tmp_path / "res"
    for bad, message in [(replace(run_record(), kind="probe"), "kind must be one of sweep, finetune, generate"),
                         (replace(run_record(), seed=-1), "seed must be a non-negative integer"),
                         (replace(run_record(), model=None), "model must be a JSON object"),
                         (replace(run_record(), details={"seed": 3}), "details may not hold 'seed'")]:
        with pytest.raises(ProbekitError, match=message):
            with ResultsWriter(out) as w:
                w.append(rows_table())
                w.commit(bad)
        assert not out.exists()
    with pytest.raises(TypeError, match="RunRecord"):
        with ResultsWriter(out) as w:
            w.commit({"seed": 0})


def test_older_tables_and_sweep_json_read_in_the_current_shape(tmp_path):
    """A table of an earlier version (method names in site and solver, no method column) and the three
    earlier shapes of sweep.json read as the current ones."""
    import hashlib

    import pyarrow.parquet as pq

    out = tmp_path / "old"
    out.mkdir()
    frame = pd.DataFrame({
        "experiment": "population", "site": ["answer_end", "answer_end", "icl", "answer_end"],
        "layer": ["3", "", "", ""], "measure": "grade", "train_level": ["easy", "zero_shot", "easy", "easy"],
        "draw": 0, "n_train": [10, 0, 2, 10], "label_noise": 0.0, "solver": ["paper", "zero_shot", "icl", "paper"],
        "item_id": IDS[:4], "test_level": "hard", "correct": np.int8(1), "p_gold": np.float32(0.5)})
    frame.loc[3, ["site", "layer"]] = ["majority", ""]
    frame.to_parquet(out / RESULTS)
    raw = (out / RESULTS).read_bytes()
    done = {"name": RESULTS, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (out / CONFIG).write_text(json.dumps({"format": "probekit-sweep/1", "cache": "c", CACHE_HASH_KEY: "ab",
                                          "dataset": "arc", "model": {"id": "m"}, "seed": 2, RESULTS_FILE_KEY: done}))
    res = read_results(out)
    t = res.table.astype({c: str for c in ("site", "solver", "method")})
    assert t[["method", "site", "solver"]].values.tolist() == [
        ["probe", "answer_end", "paper"], ["zero_shot", "", ""], ["icl", "", ""], ["probe", "majority", "paper"]]
    assert pq.read_schema(out / RESULTS).names == list(frame.columns)  # the file itself is left as it was
    assert (res.record.kind, res.record.dataset, res.record.seed, res.record.prompt) == ("sweep", "arc", 2, {})
    finetune = {"format": "probekit-sweep/1", "method": "finetune", "dataset": "arc", "model": {}, "prompt": {},
                "finetune_model": {"dtype": "float32"}, "config": {"quantize": "none"}, "seed": 0, "counts": {},
                "run": {"seed": 0}}
    rec = RunRecord.from_json(finetune)
    assert rec.kind == "finetune" and rec.details == {"finetune_model": {"dtype": "float32"}}
    generate = {"format_of": "probekit generate", "generate": {"seed": 4, "k": 1}, "model": {"id": "m"},
                "dataset": "gsm8k", "dataset_fingerprint": "f", "prompt": {"zero_shot": "5305"}, "training": {}}
    rec = RunRecord.from_json(generate)
    assert (rec.kind, rec.config, rec.seed, rec.dataset_fingerprint) == ("generate", {"seed": 4, "k": 1}, 4, "f")
    assert rec.to_json() == {"format": "probekit-sweep/1", "kind": "generate", "dataset": "gsm8k",
                             "dataset_fingerprint": "f", "model": {"id": "m"}, "prompt": {"zero_shot": "5305"},
                             "config": {"seed": 4, "k": 1}, "seed": 4, "counts": {}, "training": {}}
    with pytest.raises(ProbekitError, match=r"x/sweep.json: seed must be a non-negative integer"):
        RunRecord.from_json({"seed": "zero"}, "x/sweep.json")


# ----- the report directory ---------------------------------------------------------------------
def test_report_directory_is_locked_and_cleaned(tmp_path):
    from test_report import make_results

    from probekit.report import build_report

    make_results(tmp_path / "res", experiments=("population",), n_items=60, draws=2)
    rep = tmp_path / "rep"
    (tmp_path / ".rep.tmp-killed").mkdir()
    (tmp_path / ".rep.tmp-killed" / "sgr.png").write_bytes(b"half")
    with OutputDir(rep, (), "report output"):
        with pytest.raises(ProbekitError, match=f"report output {rep} is being written by another process") as exc:
            build_report(tmp_path / "res", rep, n_boot=20, n_boot_sgr=20)
        one_line(exc)
    assert not (rep / "summary.json").exists()
    summary = build_report(tmp_path / "res", rep, n_boot=20, n_boot_sgr=20)
    assert json.loads((rep / "summary.json").read_text()) == summary
    assert not list(tmp_path.glob(".rep.tmp-*"))


# ----- ICL score folders -------------------------------------------------------------------------
def icl_header(k: int = 1, draws: int = 2) -> dict:
    return {"model": {"id": "m"}, "dataset": {"name": "d"}, "prompt": {"template": "t"},
            "icl": {"k": k, "demos_from": "easy", "measure": "grade", "draws": draws}, "n_items": 3,
            "max_choices": 2}


def write_draw(w: IclScoresWriter, b: int) -> None:
    csum = np.full((3, 2), -1.0 - b, np.float32)
    w.write_draw(b, ["a", "b", "c"], csum, np.ones((3, 2), np.int32),
                 {"demo_ids": ["a"], "k_used": 1})


def test_icl_folder_round_trip_and_second_writer_refused(tmp_path):
    out = tmp_path / "icl"
    with IclScoresWriter(out, icl_header()) as w:
        assert w.pending() == [0, 1]
        with pytest.raises(ProbekitError, match=f"ICL score folder {out} is being written by another process") as exc:
            with IclScoresWriter(out, icl_header()):
                pass
        one_line(exc)
        write_draw(w, 0)
        write_draw(w, 1)
        assert w.complete
    manifest, ids, csum, ctok = load_icl(out)
    assert ids.tolist() == ["a", "b", "c"] and csum.shape == (2, 3, 2) and csum[1, 0, 0] == -2.0
    assert manifest["draw_info"]["1"] == {"file": "draw-001.h5", "demo_ids": ["a"], "k_used": 1}
    assert (out / "icl.json").read_text().endswith("\n") and leftovers(out) == []
    with pytest.raises(ProbekitError, match="another icl"):
        with IclScoresWriter(out, icl_header(k=2)):
            pass


def test_icl_ranks_share_a_folder_and_a_rerun_cleans_leftovers(tmp_path):
    out = tmp_path / "icl"
    with IclScoresWriter(out, icl_header(), rank=0, world_size=2) as w0, \
            IclScoresWriter(out, icl_header(), rank=1, world_size=2) as w1:
        write_draw(w0, 0)
        (out / ".draw-001.h5.tmp").write_bytes(b"killed mid-write")
        (out / ".icl.json.999-dead.tmp").write_text("{")
    assert not read_manifest(out)["complete"]
    with IclScoresWriter(out, icl_header(), rank=1, world_size=2) as w1:
        assert w1.pending() == [1] and leftovers(out) == []
        write_draw(w1, 1)
    assert load_icl(out)[2].shape == (2, 3, 2)


# ----- hardness.json -----------------------------------------------------------------------------
def test_hardness_file_reader_and_writer(tmp_path):
    path = tmp_path / "cache" / "hardness.json"
    write_hardness(path, {"format": "probekit-hardness/1", "mdl": {"q1": 0.25}})
    assert read_mdl(path) == {"q1": 0.25} and leftovers(path.parent) == []
    with OutputDir(path.parent, (path.name,), "hardness", lock_file=".hardness.json.lock"):
        with pytest.raises(ProbekitError, match="is being written by another process"):
            write_hardness(path, {"mdl": {}})
    with pytest.raises(ProbekitError, match="is a directory"):
        write_hardness(tmp_path, {"mdl": {}})
    path.write_text("{not json")
    with pytest.raises(ProbekitError, match="cannot read") as exc:
        read_mdl(path)
    one_line(exc)
    path.write_text(json.dumps({"format": "probekit-hardness/1"}))
    with pytest.raises(ProbekitError, match="holds no 'mdl' scores"):
        read_mdl(path)
