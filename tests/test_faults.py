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

    out = tmp_path / "c"
    kw = dict(layers="last", sites="answer_end", batch_size=8, shard_size=4, limit=8, cache_root=REPO / "cache",
              progress=False)
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
    from probekit.report import build

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/locked")

    monkeypatch.setattr(build, "build_report", denied)
    monkeypatch.setattr("probekit.cli.report_cmd.build_report", denied)
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
