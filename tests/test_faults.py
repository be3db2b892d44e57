"""Faults and bad inputs: nothing lost, nothing half-written, one clear line.

Damaged shards are rewritten by a rerun, locks are taken before a model loads, a failed command
leaves nothing it created, a full disk or an unwritable target gives one line naming the path,
and bad options or input files are refused (or explained) in one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.store import Cache, write_cache
from probekit.store.layout import lock_name, shard_name
from probekit.store.outdir import OutputDir

sys.path.insert(0, str(Path(__file__).parent))
from test_store import HEADER, make_data, write_all  # noqa: E402
from test_sweep import build_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--measures", "grade", "--layers", "4", "--n-train", "40", "--draws", "1", "--no-verify"]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def error_line(res) -> str:
    """The CLI's single error line (exit code 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def swept_cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("faults") / "c", n_holdout=150)


# ----- a rerun repairs damaged shards ----------------------------------------------------------------
def _flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2 if offset is None else offset
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_rerun_rewrites_damaged_shards_of_the_right_size_and_names_them(tmp_path):
    items, arrays = make_data()
    out = tmp_path / "c"
    write_all(out, items, arrays)
    n_shards = len(list(out.glob("shard-*.h5")))
    assert n_shards >= 3
    _flip_byte(out / shard_name(0))  # a flipped byte, same size
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # a wrong recorded hash
    (out / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "other"
    items2, arrays2 = make_data(seed=1)
    write_all(other, items2, arrays2)
    shutil.copy(other / shard_name(2), out / shard_name(2))  # a swapped-in shard of another cache
    assert Cache(out).verify()  # all three are damaged

    damaged = {}
    written = write_cache(out, HEADER, items, arrays, verify=True, on_damaged=damaged.__setitem__,
                          **_layout_of(out))
    assert written == [0, 1, 2]
    assert sorted(damaged) == [shard_name(0), shard_name(1), shard_name(2)]
    assert all("sha256" in why for why in damaged.values())
    assert Cache(out).verify() == []


def _layout_of(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return dict(layers=m["layers"], sites=m["sites"], hidden_size=m["hidden_size"], max_choices=m["max_choices"],
                measures=m["measures"], shard_size=m["shard_size"])


def test_unchanged_manifest_of_a_complete_cache_is_not_rewritten(tmp_path, monkeypatch):
    items, arrays = make_data()
    out = tmp_path / "c"
    write_all(out, items, arrays)
    before = (out / "manifest.json").stat()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "manifest.json"))

    monkeypatch.setattr("probekit.store.manifest.write_manifest", refuse)  # a read-only finished cache
    assert write_cache(out, HEADER, items, arrays, verify=True, **_layout_of(out)) == []
    after = (out / "manifest.json").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_extract_rerun_repairs_a_damaged_shard(tmp_path, demo_items):
    """The real pipeline: a byte flipped in a finished shard is found and rewritten by the rerun."""
    from probekit.extract.run import extract
    from probekit.llm import ModelSpec

    out = tmp_path / "c"
    kw = dict(model=ModelSpec(cache_root=REPO / "cache"), layers="last", sites="answer_end", batch_size=8, shard_size=4,
              limit=8, progress=False)
    extract(demo_items, out, **kw)
    reference = (out / shard_name(1)).read_bytes()
    _flip_byte(out / shard_name(1))
    summary = extract(demo_items, out, **kw)
    assert summary.shards_written == [1] and summary.complete
    assert f"rewrote damaged {shard_name(1)} (sha256 differs" in summary.line()
    assert Cache(out).verify() == []
    assert (out / shard_name(1)).read_bytes() == reference


# ----- locks before the model loads; a failed command leaves nothing it created -------------------------
class _Stop(Exception):
    pass


def _lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("kind", ["cache", "icl"])
def test_the_lock_is_taken_before_the_model_loads(tmp_path, demo_items, monkeypatch, kind):
    from probekit.extract import icl, run

    module = run if kind == "cache" else icl
    out = tmp_path / kind
    seen = []

    def load(*args, **kwargs):
        seen.append(_lock_is_held(out / lock_name(0)))
        raise _Stop

    monkeypatch.setattr(module, "prepare_model", load)
    with pytest.raises(_Stop):
        if kind == "cache":
            run.extract(demo_items, out, progress=False)
        else:
            icl.extract_icl(demo_items, out, k=2, draws=1, progress=False)
    assert seen == [True]
    assert not out.exists()  # the failed run leaves nothing it created


def test_a_directory_of_unrelated_files_is_refused(tmp_path, demo_items, monkeypatch):
    from probekit.extract import icl, run

    def load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(run, "prepare_model", load)
    monkeypatch.setattr(icl, "prepare_model", load)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ProbekitError, match=r"cache directory .*photos already holds files that are not part of "
                                            r"one \(holiday.jpg\); choose an empty or new --out") as exc:
        run.extract(demo_items, out, progress=False)
    one_line(exc)
    with pytest.raises(ProbekitError, match="ICL score folder .* already holds files"):
        icl.extract_icl(demo_items, out, k=2, draws=1, progress=False)
    items, arrays = make_data()
    with pytest.raises(ProbekitError, match="already holds files"):
        write_all(out, items, arrays)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    # an empty directory, and a cache's own leftovers, are fine
    fine = tmp_path / "fine"
    fine.mkdir()
    (fine / ".shard-00000.h5.tmp").write_bytes(b"left by a killed run")
    write_all(fine, items, arrays)
    assert Cache(fine).verify() == [] and temporaries(fine) == []


# ----- a full disk -----------------------------------------------------------------------------------
def test_too_little_space_is_refused_before_writing_and_the_cache_resumes(tmp_path, monkeypatch):
    items, arrays = make_data()
    out = tmp_path / "c"
    calls = {"n": 0}
    from probekit.store import writer

    def free(directory):
        calls["n"] += 1
        return 10_000 if calls["n"] > 2 else 1 << 40  # the disk fills after the first shard

    monkeypatch.setattr(writer, "free_bytes", free)
    with pytest.raises(ProbekitError, match=r"not enough disk space for cache .*c: \d+ shard\(s\) still to write "
                                            r"need about [\d.]+ MiB|no space left on the device writing cache shard") as exc:
        write_all(out, items, arrays)
    one_line(exc)
    assert temporaries(out) == []
    done = [e["index"] for e in json.loads((out / "manifest.json").read_text())["shards"]]
    assert done == [0]
    monkeypatch.setattr(writer, "free_bytes", lambda directory: 1 << 40)
    assert write_all(out, items, arrays)[0] == 1  # resumes where it stopped
    assert Cache(out).verify() == []


def test_disk_full_during_a_shard_write_names_the_shard_and_leaves_no_temporary(tmp_path, monkeypatch):
    items, arrays = make_data()
    out = tmp_path / "c"
    from probekit.store.writer import ShardWriter

    real = ShardWriter.write_hidden

    def write_hidden(self, offset, site, hidden):
        if self.k == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, offset, site, hidden)

    monkeypatch.setattr(ShardWriter, "write_hidden", write_hidden)
    with pytest.raises(ProbekitError, match=r"no space left on the device writing cache shard .*\.shard-00001\.h5\.tmp: "
                                            r"the shard needs about [\d.]+ MiB, .* free; free some space and rerun") as exc:
        write_all(out, items, arrays)
    one_line(exc)
    assert temporaries(out) == []
    monkeypatch.setattr(ShardWriter, "write_hidden", real)
    write_all(out, items, arrays)
    assert Cache(out).verify() == []


def _tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")


@pytest.mark.parametrize("precheck", [True, False], ids=["refused-up-front", "fills-during-a-write"])
def test_a_real_full_disk_gives_one_line_and_no_traceback(tmp_path, precheck):
    disk = tmp_path / "disk"
    _tmpfs(disk, "400k")
    try:
        code = "\n".join([
            "import sys",
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
            "from probekit.errors import ProbekitError",
            "from probekit.store import writer",
            "from test_sweep import build_cache",
            "" if precheck else "writer.free_bytes = lambda directory: 1 << 40  # the disk fills during a write",
            "try:",
            f"    build_cache({str(disk / 'c')!r})",
            "except ProbekitError as exc:",
            "    print(f'error: {exc}', file=sys.stderr)",
            "    sys.exit(2)",
        ])
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and "Slist" not in res.stderr, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "need" in lines[0] and str(disk / "c") in lines[0], res.stderr
        assert temporaries(disk / "c") == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_sweep_on_a_full_disk_gives_one_line_and_leaves_no_folder(swept_cache, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def full(self, table, *args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["sweep", str(swept_cache), "--out", str(out), *SMALL])
    assert "no space left on the device writing " in error_line(res) and ".results.parquet." in res.output
    assert not out.exists()


def test_report_on_a_full_disk_keeps_the_old_report_whole(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_results

    from probekit.report import build

    make_results(tmp_path / "res", n_items=150, draws=2)
    rep = tmp_path / "rep"
    args = ["report", str(tmp_path / "res"), "--out", str(rep), "--boot", "10", "--boot-sgr", "10"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = (rep / "summary.json").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(rep / "population.csv"))

    monkeypatch.setattr(build, "_write_files", full)
    res = CliRunner().invoke(app, args)
    assert "no space left on the device writing" in error_line(res) and "population.csv" in res.output
    assert (rep / "summary.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep.")]


# ----- unwritable targets ----------------------------------------------------------------------------
def _deny(monkeypatch, where: str):
    real = os.replace

    def replace(src, dst, *a, **k):
        if where in str(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_unwritable_targets_give_one_line(swept_cache, tmp_path, monkeypatch):
    runner = CliRunner()
    _deny(monkeypatch, "results.parquet")
    res = runner.invoke(app, ["sweep", str(swept_cache), "--out", str(tmp_path / "r"), *SMALL])
    assert "results.parquet (Permission denied)" in error_line(res)
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    cache = tmp_path / "c"
    shutil.copytree(swept_cache, cache)
    _deny(monkeypatch, "hardness.json")
    res = runner.invoke(app, ["hardness", str(cache), "--layers", "4", "--sizes", "5,20", "--draws", "1",
                              "--no-verify"])
    assert "hardness.json (Permission denied)" in error_line(res)
    assert not (cache / "hardness.json").exists() and temporaries(cache) == []


def test_unwritable_cache_and_report_folders_give_one_line(tmp_path, monkeypatch):
    import tempfile

    from probekit.store import writer

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    items, arrays = make_data()
    monkeypatch.setattr(writer, "_create_shard_file", denied)
    with pytest.raises(ProbekitError, match=r"cannot write .*\.shard-00000\.h5\.tmp \(Permission denied\)") as exc:
        write_all(tmp_path / "c", items, arrays)
    one_line(exc)
    monkeypatch.undo()
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_results

    make_results(tmp_path / "res", n_items=150, draws=2)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: denied(tmp_path))
    res = CliRunner().invoke(app, ["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep"),
                                   "--boot", "10", "--boot-sgr", "10"])
    assert "(Permission denied)" in error_line(res)
    assert not (tmp_path / "rep").exists()


def test_cli_turns_a_stray_os_error_into_one_line(tmp_path, monkeypatch):
    from probekit.report import compare

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/locked")

    monkeypatch.setattr(compare, "build_report", denied)  # what `probekit report` calls for one run
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert error_line(res) == "error: Permission denied: /somewhere/locked"


# ----- one clear line for bad options ------------------------------------------------------------------
def test_negative_seeds_are_refused(swept_cache, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(swept_cache), "--out", str(tmp_path / "r"), *SMALL, "--seed", "-1"])
    assert "seed must be a non-negative integer, got -1" in error_line(res)
    assert not (tmp_path / "r").exists()
    res = runner.invoke(app, ["extract", "--icl", "2", "--seed", "-1", "--out", str(tmp_path / "icl"), "--no-progress"])
    assert "seed must be a non-negative integer, got -1" in error_line(res)
    assert not (tmp_path / "icl").exists()


def test_icl_limit_names_k(tmp_path):
    res = CliRunner().invoke(app, ["extract", "--icl", "100000", "--out", str(tmp_path / "icl"), "--no-progress"])
    assert "fewer than n_train + 50 = 100050 (here n_train is the number of demonstrations k = 100000)" \
        in error_line(res)


def test_repeated_measures_and_cutoffs_of_unknown_measures_are_refused(swept_cache, tmp_path):
    runner = CliRunner()
    base = ["sweep", str(swept_cache), "--out", str(tmp_path / "r"), "--layers", "4", "--n-train", "40",
            "--draws", "1", "--no-verify"]
    res = runner.invoke(app, [*base, "--measures", "grade,grade"])
    assert "measures list 'grade' more than once" in error_line(res)
    res = runner.invoke(app, [*base, "--measures", "grade", "--cutoff", "nosuch=1,2"])
    assert "cut-off given for 'nosuch', which is not a measure of this sweep (grade)" in error_line(res)
    assert not (tmp_path / "r").exists()


def test_hardness_refuses_zero_draws_and_a_directory_before_fitting(swept_cache, tmp_path):
    runner = CliRunner()
    base = ["hardness", str(swept_cache), "--layers", "4", "--sizes", "5,20", "--no-verify"]
    res = runner.invoke(app, [*base, "--draws", "0"])
    assert "hardness draws must be a positive integer, got 0" in error_line(res)
    (tmp_path / "d").mkdir()
    res = runner.invoke(app, [*base, "--draws", "1", "--out", str(tmp_path / "d")])
    assert "is a directory; give a file path" in error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary beside it
    res = runner.invoke(app, [*base, "--draws", "1", "--out", str(tmp_path / "new" / "h.json")])
    assert res.exit_code == 0, res.output
    assert "mdl" in json.loads((tmp_path / "new" / "h.json").read_text())


def test_mdl_with_a_damaged_hardness_file(swept_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(swept_cache, cache)
    runner = CliRunner()
    args = ["sweep", str(cache), "--out", str(tmp_path / "r"), "--measures", "mdl", "--layers", "4",
            "--n-train", "40", "--draws", "1", "--no-verify"]
    (cache / "hardness.json").write_text("{bad")
    assert "cannot read" in error_line(runner.invoke(app, args))
    (cache / "hardness.json").write_text('{"format": "probekit-hardness/1"}')
    assert "holds no 'mdl' scores" in error_line(runner.invoke(app, args))


def test_a_file_where_a_folder_is_expected(swept_cache, tmp_path):
    runner = CliRunner()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "afile is a file, not a cache directory" in error_line(runner.invoke(app, ["info", str(afile)]))
    res = runner.invoke(app, ["sweep", str(afile), "--out", str(tmp_path / "r"), *SMALL])
    assert "afile is a file, not a cache directory" in error_line(res)
    res = runner.invoke(app, ["datasets", "show", "arc", "--data-dir", str(afile)])
    assert "--data-dir" in error_line(res) and "is a file, not a folder" in res.output
    res = runner.invoke(app, ["report", str(afile), "--out", str(tmp_path / "rep")])
    assert "afile is a file, not a results directory" in error_line(res)
    res = runner.invoke(app, ["sweep", str(swept_cache), "--out", str(afile), *SMALL])
    assert "exists and is not a directory" in error_line(res)


# ----- a user's question file --------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_markers_are_nan_and_dropped_columns_are_named(tmp_path, caplog):
    from probekit.data import load_dataset

    rows = [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2, "steps": s, "hard": h, "subject": "bio"}
            for i, (s, h) in enumerate([(3, 1), ("n/a", 2), ("NA", "many"), ("", 4), (None, 5), (5, "-")])]
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="probekit"):
        items = load_dataset(str(path))
    assert "steps" in items.measures
    assert np.isnan(items.table["steps"].to_numpy()[1:5]).all() and items.table["steps"][5] == 5
    assert "hard" not in items.measures and "subject" not in items.measures
    assert any("column 'hard' of mine.jsonl is not a difficulty measure: row 3 holds 'many', not a number"
               in r.getMessage() for r in caplog.records)
    assert not any("subject" in r.getMessage() for r in caplog.records)  # a text field is not a measure, quietly
    res = CliRunner().invoke(app, ["datasets", "show", str(path), "--measure", "hard"])
    assert "unknown measure 'hard' for dataset mine: column 'hard' of mine.jsonl is not a difficulty measure: row 3" \
        in error_line(res)


def test_an_empty_file_says_so(tmp_path):
    from probekit.data import load_dataset

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ProbekitError, match="empty.jsonl is empty: no items") as exc:
        load_dataset(str(tmp_path / "empty.jsonl"))
    one_line(exc)
    (tmp_path / "header.csv").write_text("question,choices,label\n")
    with pytest.raises(ProbekitError, match="header.csv has column names but no items"):
        load_dataset(str(tmp_path / "header.csv"))


# ----- the hub, offline ----------------------------------------------------------------------------------
def test_a_hub_set_offline_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PROBEKIT_DATA_DIR": ""}
    res = subprocess.run([sys.executable, "-m", "probekit.cli", "datasets", "show", "mmlu"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "cannot load mmlu" in lines[0] and "--data-dir" in lines[0] and "mmlu/{val,test}" in lines[0]


def test_hub_reachability_is_checked_once(monkeypatch):
    import socket

    from probekit.data import sets

    calls = []

    def connect(*a, **k):
        calls.append(a)
        raise OSError("unreachable")

    monkeypatch.setattr(sets, "_HUB_ONLINE", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    assert sets.hub_reachable() is False and sets.hub_reachable() is False
    assert len(calls) == 1


# ----- every output held from the start of its command; no run overwrites another ----------------------
@pytest.fixture()
def no_model(monkeypatch):
    """transformers' model and tokenizer loaders refuse to run: a command that reaches them (reads model
    weights) fails with "model weights were read" instead of the refusal the test expects."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def swept_results(swept_cache, tmp_path_factory):
    """A probe sweep's results directory: a real sweep of the synthetic cache."""
    out = tmp_path_factory.mktemp("swept") / "res"
    res = CliRunner().invoke(app, ["sweep", str(swept_cache), "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def model_cache(swept_cache, tmp_path_factory):
    """The synthetic cache with a manifest naming the offline model and the bundled set's fingerprint: a
    finetune of it gets as far as loading the model."""
    from probekit.data import load_dataset
    from probekit.llm.weights import DEFAULT_NAME

    out = tmp_path_factory.mktemp("model-cache") / "c"
    shutil.copytree(swept_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["dataset"]["fingerprint"] = load_dataset("bundled").fingerprint
    manifest["model"] = {"id": DEFAULT_NAME, "n_layers": 4}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (but lock files, which a refused writer may open) by name."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".lock" not in p.name}


def test_generate_refuses_a_folder_holding_a_sweeps_results(swept_results, tmp_path, shared_data, no_model):
    res = tmp_path / "res"
    shutil.copytree(swept_results, res)
    before = snapshot(res)
    out = CliRunner().invoke(app, ["generate", "--dataset", "gsm8k", "--data-dir", str(shared_data), "--n-test", "3",
                                   "--demos-from", "zero_shot", "--max-new-tokens", "5", "--no-progress",
                                   "--out", str(res)])
    assert f"generation folder {res} holds another run (a probe sweep's results)" in error_line(out)
    assert snapshot(res) == before


def test_report_and_sweep_refuse_each_others_directories(swept_results, swept_cache, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(swept_results, res)
    before = snapshot(res)
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(swept_results), "--out", str(res), "--boot", "10", "--boot-sgr", "10"])
    assert f"report output {res} already holds files that are not part of one (results.parquet, sweep.json)" \
        in error_line(out)
    assert snapshot(res) == before
    rep = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(swept_results), "--out", str(rep), "--boot", "10",
                               "--boot-sgr", "10"]).exit_code == 0
    out = runner.invoke(app, ["sweep", str(swept_cache), "--out", str(rep), *SMALL])
    assert f"results directory {rep} already holds files that are not part of one" in error_line(out)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8")
    out = runner.invoke(app, ["sweep", str(swept_cache), "--out", str(photos), *SMALL])
    assert "already holds files that are not part of one (holiday.jpg)" in error_line(out)
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"]


def _audited(args: list[str], watched: Path) -> list[str]:
    """``python -m probekit.cli ARGS`` that reports on stderr ("read PATH") any file but a lock file it opens
    under ``watched``."""
    return [sys.executable, "-c", "\n".join([
        "import sys",
        f"WATCHED = {str(watched)!r}",
        "def hook(event, args):",
        "    if event == 'open' and isinstance(args[0], str) and args[0].startswith(WATCHED) \\",
        "            and not args[0].endswith('.lock'):",
        "        sys.stderr.write(f'read {args[0]}\\n')",
        "sys.addaudithook(hook)",
        f"sys.argv = ['probekit', *{args!r}]",
        "from probekit.cli import main",
        "main()",
    ])]


def test_a_second_sweep_into_one_out_is_refused_before_it_reads_the_cache(swept_cache, tmp_path):
    """The first sweep holds its --out from its start: a second one is refused at once, before it reads
    the cache or compiles anything (it opens no file of the cache), and the first finishes whole."""
    import signal
    import time

    out = tmp_path / "r"
    args = ["sweep", str(swept_cache), "--out", str(out), "--measures", "grade", "--layers", "4", "--n-train", "40",
            "--draws", "2", "--no-verify"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "probekit.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ((out / ".lock").exists() and _lock_is_held(out / ".lock")):
            assert first.poll() is None, "the first sweep ended without ever holding its results directory"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # paused while it holds its --out, as a sweep compiling for minutes
        try:
            second = subprocess.run(_audited(args, swept_cache), capture_output=True, text=True, timeout=300, env=env)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
        assert lines == [f"error: results directory {out} is being written by another process (pid {first.pid}); "
                         "wait for it or choose another --out"]
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    record = json.loads((out / "sweep.json").read_text())
    assert record["config"]["draws"] == 2 and Cache(swept_cache).manifest_sha256 == record["cache_manifest_sha256"]


def test_a_second_hardness_run_is_refused_before_it_reads_the_cache(swept_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(swept_cache, cache)
    args = ["hardness", str(cache), "--layers", "4", "--sizes", "5,20", "--draws", "1"]
    with OutputDir(cache, (), "held", lock_file=".hardness.json.lock"):  # a first hardness run, still fitting
        run = subprocess.run(_audited(args, cache), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert lines == [f"error: hardness scores hardness.json in {cache} is being written by another process "
                     f"(pid {os.getpid()}); wait for it or choose another --out"]
    assert not (cache / "hardness.json").exists()


def _report_files(rep: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in rep.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("kill_at", ["second-file-into-the-report", "removing-the-old-report"])
def test_a_killed_report_leaves_the_old_report_or_the_new_one(tmp_path, kill_at):
    """A report SIGKILLed while it puts its files in place (after its first file lands, or once the new
    report is in and the old is being removed) leaves one whole report, old or new, never a mix."""
    import signal

    from test_report import make_results

    from probekit.report import build_report

    res = tmp_path / "res"
    make_results(res, experiments=("population",), n_items=60, draws=2)
    reference = {}
    for seed in (0, 1):  # each report whole, for comparison
        build_report(res, tmp_path / f"ref{seed}", n_boot=20, n_boot_sgr=20, seed=seed)
        reference[seed] = _report_files(tmp_path / f"ref{seed}")
    rep = tmp_path / "rep"
    build_report(res, rep, n_boot=20, n_boot_sgr=20, seed=0)
    code = "\n".join([
        "import os, signal, sys",
        f"REP, KILL_AT = {str(rep)!r}, {kill_at!r}",
        "landed = []",
        "def hook(event, args):",
        "    if KILL_AT.startswith('second') and event == 'os.rename' and os.path.dirname(str(args[1])) == REP:",
        "        landed.append(args[1])",
        "        if len(landed) == 2:",
        "            os.kill(os.getpid(), signal.SIGKILL)  # after the first file is in place",
        "    if KILL_AT.startswith('removing') and event == 'shutil.rmtree' and "
        "os.path.basename(str(args[0])).startswith('.rep.tmp-'):",
        "        os.kill(os.getpid(), signal.SIGKILL)",
        "sys.addaudithook(hook)",
        f"sys.path.insert(0, {str(REPO)!r})",
        "from probekit.report import build_report",
        f"build_report({str(res)!r}, REP, n_boot=20, n_boot_sgr=20, seed=1)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    assert kill_at == "second-file-into-the-report" or proc.returncode == -signal.SIGKILL  # the kill did happen
    files = _report_files(rep)
    seed = json.loads(files["summary.json"])["settings"]["seed"]
    assert sorted(files) == sorted(reference[seed])  # every file of one report, none of the other
    for name, data in files.items():
        if not name.endswith(".png"):
            assert data == reference[seed][name], name
    build_report(res, rep, n_boot=20, n_boot_sgr=20, seed=1)  # the next report removes what a kill left beside it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".rep.")]


# ----- the values of the results contract, checked when read ------------------------------------------
def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of a results directory with its table edited and sweep.json's record of it updated."""
    import hashlib

    import pandas as pd

    shutil.copytree(src, dst)
    frame = pd.read_parquet(dst / "results.parquet")
    edit(frame).to_parquet(dst / "results.parquet")
    raw = (dst / "results.parquet").read_bytes()
    config = json.loads((dst / "sweep.json").read_text())
    config["results_file"] = {"name": "results.parquet", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (dst / "sweep.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.assign(train_level=f["train_level"].astype(str).replace("easy", "weird")),
     "train_level is 'weird' for item"),
    (lambda f: f.assign(draw=np.int32(-100)), "draw is -100 for item"),
    (lambda f: f.assign(p_gold=np.float32("nan")), "p_gold is nan for item"),
    (lambda f: f.assign(p_gold=np.float32(1.5)), "p_gold is 1.5 for item"),
    (lambda f: f.assign(correct=np.int8(2)), "correct is 2 for item"),
    (lambda f: f.assign(method="weird"), "method is 'weird' for item"),
    (lambda f: f.assign(test_level="weird"), "test_level is 'weird' for item"),
    (lambda f: f.assign(n_train=np.int32(-1)), "n_train is -1 for item"),
    (lambda f: f.assign(label_noise=2.0), "label_noise is 2.0 for item"),
    (lambda f: f.assign(experiment="weird"), "experiment is 'weird' for item"),
], ids=["train_level", "draw", "p_gold-nan", "p_gold-1.5", "correct", "method", "test_level", "n_train",
        "label_noise", "experiment"])
def test_a_results_table_edited_with_its_hash_updated_is_refused(swept_results, tmp_path, edit, message):
    res = _edited(swept_results, tmp_path / "res", edit)
    out = CliRunner().invoke(app, ["report", str(res), "--out", str(tmp_path / "rep"), "--boot", "10",
                                   "--boot-sgr", "10"])
    line = error_line(out)
    assert message in line and str(res / "results.parquet") in line and "changed after its run" in line
    assert not (tmp_path / "rep").exists()


def test_results_without_their_sweep_json_are_refused(swept_results, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(swept_results, res)
    (res / "sweep.json").unlink()
    out = CliRunner().invoke(app, ["report", str(res), "--out", str(tmp_path / "rep"), "--boot", "10",
                                   "--boot-sgr", "10"])
    assert f"{res} has results.parquet but no sweep.json" in error_line(out)
    assert not (tmp_path / "rep").exists()


# ----- meaningless runs: one line each, nothing created, no model loaded ------------------------------
def _user_file(path: Path, change=None) -> Path:
    rows = [{"id": f"u{i}", "question": f"Which number is {i}?", "choices": [str(i), str(i + 1), str(i + 2)],
             "label": 0, "steps": i % 4} for i in range(8)]
    return _jsonl(path, [change(r) if change and i == 2 else r for i, r in enumerate(rows)])


MEANINGLESS = {
    "generate-max-new-tokens-0": (["generate", "--dataset", "gsm8k", "--data-dir", "{data}", "--n-test", "3",
                                   "--demos-from", "zero_shot", "--max-new-tokens", "0", "--out", "{out}"],
                                  "--max-new-tokens 0: must be a positive integer"),
    "generate-arc": (["generate", "--dataset", "arc-sample", "--demos-from", "zero_shot", "--n-test", "3",
                      "--out", "{out}"],
                     "dataset arc-sample has no reasoning text: chain-of-thought generation is for sets with worked "
                     "reasoning"),
    "generate-file-without-reasoning": (["generate", "--dataset", "{file}", "--demos-from", "zero_shot",
                                         "--measure", "steps", "--out", "{out}"],
                                        "score multiple-choice items with `probekit extract`"),
    "extract-gsm8k": (["extract", "--dataset", "gsm8k", "--data-dir", "{data}", "--limit", "4", "--out", "{out}"],
                      "dataset gsm8k has no answer choices to score (its answer is generated): use `probekit "
                      "generate`"),
    "extract-icl-gsm8k": (["extract", "--dataset", "gsm8k", "--data-dir", "{data}", "--icl", "2", "--draws", "1",
                           "--measure", "num_steps", "--out", "{out}"], "use `probekit generate`"),
    "extract-seed-without-icl": (["extract", "--dataset", "arc-sample", "--limit", "4", "--seed", "-1",
                                  "--out", "{out}"], "--seed -1: applies to --icl K only"),
    "report-baseline-one-run": (["report", "{res}", "--baseline", "foo", "--out", "{out}"],
                                "--baseline foo: a baseline is shared by the methods of a comparison"),
    "report-baseline-unknown": (["report", "{res}", "{res2}", "--baseline", "foo", "--out", "{out}"],
                                "--baseline foo: must be one of the methods probe"),
    "sweep-measures-empty": (["sweep", "{cache}", "--out", "{out}", "--layers", "4", "--n-train", "40", "--draws", "1",
                              "--no-verify", "--measures", ""], "--measures '': name at least one item"),
    "sweep-n-train-empty-item": (["sweep", "{cache}", "--out", "{out}", "--measures", "grade", "--layers", "4",
                                  "--draws", "1", "--no-verify", "--n-train", "40,,16"],
                                 "--n-train '40,,16': item 2 of 3 is empty"),
    "sweep-label-noise-empty-item": (["sweep", "{cache}", "--out", "{out}", *SMALL, "--experiment", "label_noise",
                                      "--label-noise", "0.1,,0.2"], "--label-noise '0.1,,0.2': item 2 of 3 is empty"),
    "sweep-label-noise-without-its-experiment": (["sweep", "{cache}", "--out", "{out}", *SMALL, "--label-noise", "0.3"],
                                                 "--label-noise 0.3: applies to --experiment label_noise only"),
}


@pytest.fixture(scope="module")
def swept_all_to_all(swept_cache, tmp_path_factory):
    """A second run of the synthetic cache: the all-to-all experiment."""
    out = tmp_path_factory.mktemp("swept") / "a2a"
    res = CliRunner().invoke(app, ["sweep", str(swept_cache), "--out", str(out), *SMALL, "--experiment", "all_to_all"])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("name", list(MEANINGLESS))
def test_a_meaningless_run_is_refused_in_one_line(name, swept_cache, swept_results, swept_all_to_all, shared_data,
                                                  tmp_path, no_model):
    """Each would run (or has run, before these checks) and give a result that means nothing."""
    args, message = MEANINGLESS[name]
    values = {"data": str(shared_data), "out": str(tmp_path / "out"), "res": str(swept_results),
              "res2": str(swept_all_to_all), "cache": str(swept_cache),
              "file": str(_user_file(tmp_path / "mine.jsonl"))}
    out = CliRunner().invoke(app, [a.format(**values) for a in args])
    assert message in error_line(out)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda r: {**r, "choices": ["only"]}, "row 3: one answer choice ('only'); an item needs at least two"),
    (lambda r: {**r, "question": None}, "row 3: the question is empty"),
    (lambda r: {**r, "question": 42}, "row 3: the question is 42, not a text"),
    (lambda r: {**r, "choices": ["a", 2, "c"]}, "row 3: choice 1 is 2, not a text (quote it)"),
    (lambda r: {**r, "choices": ["a", None, "c"]}, "row 3: choice 1 is null, not a text"),
    (lambda r: {**r, "choices": ["a", "a", "c"]}, "row 3: choice 'a' appears more than once"),
    (lambda r: {**r, "choices": ["a", "  ", "c"]}, "row 3: choice 1 is blank"),
    (lambda r: {**r, "label": True}, "row 3: label True is neither"),
], ids=["one-choice", "null-question", "number-question", "number-choice", "null-choice", "repeated-choice",
        "blank-choice", "bool-label"])
def test_a_users_item_without_two_text_choices_and_a_question_is_refused(tmp_path, change, message):
    path = _user_file(tmp_path / "mine.jsonl", change)
    for args in (["datasets", "show", str(path)],
                 ["extract", "--dataset", str(path), "--out", str(tmp_path / "c"), "--no-progress"]):
        assert f"{path} {message}" in error_line(CliRunner().invoke(app, args))
    assert not (tmp_path / "c").exists()


def test_an_infinite_measure_is_reported_and_refused_when_used(tmp_path, caplog):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r).replace('"steps": 2', '"steps": Infinity') + "\n"
                            for r in json.loads("[" + ",".join(_user_file(tmp_path / "x.jsonl").read_text()
                                                              .splitlines()) + "]")))
    from probekit.data import load_dataset

    with caplog.at_level(logging.WARNING, logger="probekit"):
        items = load_dataset(str(path))
    assert "steps" not in items.measures
    note = "column 'steps' of mine.jsonl is not a difficulty measure: row 3 holds inf, not a finite number"
    assert any(note in r.getMessage() for r in caplog.records)
    out = CliRunner().invoke(app, ["datasets", "show", str(path), "--measure", "steps"])
    assert f"unknown measure 'steps' for dataset mine: {note}" in error_line(out)


# ----- malformed files in --data-dir: the file and the line, no traceback ------------------------------
def _data_dir(tmp_path: Path, shared_data: Path, sub: str, name: str, lines) -> Path:
    """A copy of the data folder (links) whose ``sub/name`` has its lines changed by ``lines(list)``."""
    root = tmp_path / "data"
    root.mkdir()
    for entry in shared_data.iterdir():
        if entry.name != sub:
            (root / entry.name).symlink_to(entry)
    (root / sub).mkdir()
    for f in (shared_data / sub).iterdir():
        if f.name != name:
            (root / sub / f.name).symlink_to(f)
    original = (shared_data / sub / name).read_text(encoding="utf-8").splitlines()
    (root / sub / name).write_text("\n".join(lines(original)) + "\n", encoding="utf-8")
    return root


def _without_answer(line: str) -> str:
    rec = json.loads(line)
    del rec["answer"]
    return json.dumps(rec)


@pytest.mark.parametrize("sets, sub, name, lines, message", [
    ("arc", "arc", "arc_all_splits.jsonl", lambda ls: ls[:2] + ["{not json"] + ls[3:],
     "arc_all_splits.jsonl line 3: not valid JSON"),
    ("gsm8k", "gsm8k", "train.jsonl", lambda ls: [_without_answer(ls[0])] + ls[1:],
     "train.jsonl line 1: missing field 'answer'"),
    ("gsm8k", "gsm8k", "train.jsonl", lambda ls: ls[:4] + ["[1, 2]"] + ls[5:],
     "train.jsonl line 5: not a JSON object (list)"),
], ids=["arc-not-json", "gsm8k-without-answer", "gsm8k-not-an-object"])
def test_a_malformed_data_file_is_named_with_its_line(tmp_path, shared_data, sets, sub, name, lines, message,
                                                       no_model):
    data = _data_dir(tmp_path, shared_data, sub, name, lines)
    runner = CliRunner()
    for args in (["datasets", "show", sets, "--data-dir", str(data)],
                 ["extract", "--dataset", sets, "--data-dir", str(data), "--limit", "4", "--out",
                  str(tmp_path / "c"), "--no-progress"]):
        assert f"{data / sub / name} {message.split(' ', 1)[1]}" in error_line(runner.invoke(app, args))
    assert not (tmp_path / "c").exists()


# ----- refusals that need no model come before it loads -------------------------------------------------
def test_finetune_refuses_bad_settings_before_reading_anything(model_cache, tmp_path, no_model):
    runner = CliRunner()
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["finetune", str(model_cache), "--out", str(tmp_path / "ft"), "--measures", "grade", "--levels", "easy",
            "--n-train", "4", "--draws", "1", "--quantize", "none", "--device", "cpu", "--no-verify"]
    out = runner.invoke(app, [*base, "--save-adapters", str(afile)])
    assert error_line(out) == f"error: --save-adapters {afile}: must be a folder (it is a file)"
    out = runner.invoke(app, [*base, "--save-adapters", str(afile / "adapters")])
    assert f"--save-adapters {afile / 'adapters'}: must be a folder ({afile} is a file)" in error_line(out)
    out = runner.invoke(app, [*base, "--final-lr-fraction", "2"])
    assert error_line(out) == "error: --final-lr-fraction 2.0: must be in [0, 1]"
    out = runner.invoke(app, [*base, "--lora-r", "0"])
    assert error_line(out) == "error: --lora-r 0: must be a positive integer"
    out = runner.invoke(app, [*base, "--quantize", "4bit"])
    assert "4-bit base cannot be fine-tuned on the CPU" in error_line(out)
    assert not (tmp_path / "ft").exists()


def _model_command(command: str, model_cache, shared_data) -> list[str]:
    return {"extract": ["extract", "--dataset", "arc-sample", "--limit", "4"],
            "finetune": ["finetune", str(model_cache), "--no-verify", "--measures", "grade", "--levels", "easy",
                         "--n-train", "4", "--draws", "1"],
            "generate": ["generate", "--dataset", "gsm8k", "--data-dir", str(shared_data), "--n-test", "3"]}[command]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["extract", "finetune", "generate"])
def test_a_missing_gpu_is_refused_before_the_model_loads(command, model_cache, shared_data, tmp_path, no_model):
    args = _model_command(command, model_cache, shared_data)
    out = CliRunner().invoke(app, [*args, "--device", "cuda", "--out", str(tmp_path / "out")])
    assert "device='cuda': no CUDA device is available on this machine (use cpu)" in error_line(out)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["extract", "finetune", "generate"])
def test_every_command_reads_quantize_in_one_vocabulary(command, model_cache, shared_data, tmp_path, no_model):
    out = CliRunner().invoke(app, [*_model_command(command, model_cache, shared_data), "--quantize", "2bit",
                                   "--out", str(tmp_path / "out")])
    assert error_line(out) == "error: quantize='2bit' is not one of none, 8bit, 4bit, auto"
    assert not (tmp_path / "out").exists()


def test_generate_refuses_a_base_it_cannot_fine_tune_before_anything_is_read(model_cache, shared_data, tmp_path,
                                                                             no_model):
    out = CliRunner().invoke(app, [*_model_command("generate", model_cache, shared_data), "--finetune", "easy",
                                   "--n-train", "4", "--quantize", "4bit", "--device", "cpu",
                                   "--out", str(tmp_path / "out")])
    assert "4-bit base cannot be fine-tuned on the CPU" in error_line(out)
    assert not (tmp_path / "out").exists()


def test_a_second_writer_of_a_finetune_or_generation_folder_is_refused_before_the_model_loads(
        model_cache, shared_data, tmp_path, no_model):
    runner = CliRunner()
    for name, lock, args in (
        ("ft", ".lock-rank0", ["finetune", str(model_cache), "--no-verify", "--quantize", "none", "--device", "cpu",
                               "--measures", "grade", "--levels", "easy", "--n-train", "4", "--draws", "1"]),
        ("gen", ".lock", ["generate", "--dataset", "gsm8k", "--data-dir", str(shared_data), "--n-test", "3"]),
    ):
        out = tmp_path / name
        with OutputDir(out, (), "held", lock_file=lock):  # another process's lock, as far as the command can tell
            res = runner.invoke(app, [*args, "--out", str(out)])
        assert f"{out} is being written by another process" in error_line(res)


def test_an_extraction_of_items_the_template_cannot_show_leaves_no_folder(tmp_path, no_model):
    path = _user_file(tmp_path / "forty.jsonl", lambda r: {**r, "choices": [f"c{j}" for j in range(40)]})
    out = CliRunner().invoke(app, ["extract", "--dataset", str(path), "--out", str(tmp_path / "c"), "--no-progress"])
    assert "dataset forty: item 'u2': 40 answer choices; at most 26 can be lettered" in error_line(out)
    assert not (tmp_path / "c").exists()


def test_info_verify_names_a_stray_shard(swept_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(swept_cache, cache)
    shutil.copy(cache / shard_name(0), cache / "shard-00099.h5")
    out = CliRunner().invoke(app, ["info", str(cache), "--verify"])
    assert out.exit_code == 0, out.output
    assert "note: shard-00099.h5 is not listed in the manifest (left by another run, or copied in)" in out.output


@pytest.mark.slow
def test_a_refused_extraction_leaves_no_folder(tmp_path, demo_items, lm, monkeypatch):
    """Too little disk space, or a prompt longer than the model's context: refused before the first shard,
    naming what is wrong, and the folder the run created is gone."""
    from probekit.data import load_dataset
    from probekit.extract.run import extract
    from probekit.store import writer

    monkeypatch.setattr(writer, "free_bytes", lambda directory: 1000)
    with pytest.raises(ProbekitError, match="not enough disk space for cache") as exc:
        extract(demo_items, tmp_path / "full", lm, progress=False)
    one_line(exc)
    assert not (tmp_path / "full").exists()
    monkeypatch.undo()
    path = _user_file(tmp_path / "long.jsonl", lambda r: {**r, "question": " ".join(["word"] * 8500)})
    with pytest.raises(ProbekitError, match=r"item 'u2': its prompt and longest choice are \d+ tokens, more than the "
                                            r"model's context of 8192 tokens") as exc:
        extract(load_dataset(str(path)), tmp_path / "long", lm, layers="last", progress=False)
    one_line(exc)
    assert not (tmp_path / "long").exists()


@pytest.mark.slow
def test_a_resumed_finetune_records_the_final_loss_of_every_head(real_cache, demo_items, lm, tmp_path):
    from probekit.finetune import finetune

    kw = dict(measures=["grade"], n_train=[4], levels=["easy"], test_levels=["hard"], max_updates=1)
    finetune(real_cache, demo_items, tmp_path / "ft", lm, draws=1, **kw)
    (tmp_path / "ft" / "results.parquet").unlink()  # as if killed after its first head
    (tmp_path / "ft" / "sweep.json").unlink()
    record = finetune(real_cache, demo_items, tmp_path / "ft", lm, draws=2, **kw)
    assert (record["counts"]["trained_now"], record["counts"]["resumed"]) == (1, 1)
    names = ["population/grade/easy/0/4/0", "population/grade/easy/1/4/0"]
    assert sorted(record["final_loss"]) == names
    assert all(isinstance(record["final_loss"][n], float) and np.isfinite(record["final_loss"][n]) for n in names)
