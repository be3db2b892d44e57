"""Caches that travel: ``probekit export`` to a Parquet folder that ``datasets`` reads without probekit,
and ``probekit import`` back into a verified cache, byte for byte, that sweeps to the same results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.errors import ProbekitError
from probekit.store import Cache, write_cache
from probekit.store.export import META, export_cache, import_cache
from tests.test_store import HEADER, LAYERS, MEASURES, SITES, C, D, make_data


def build(out: Path, dtype: str = "float16", world_size: int = 2) -> Cache:
    """test_store's 23 items in 5 shards, written by ``world_size`` ranks."""
    items, arrays = make_data()
    if dtype != "float16":
        arrays["answer_end"][1, 3, 0, 2] = 1e5  # beyond float16's range
    for rank in range(world_size):
        write_cache(out, {**HEADER, "note": {"written by": "test"}}, items, arrays, layers=LAYERS, sites=SITES,
                    hidden_size=D, max_choices=C, measures=MEASURES, shard_size=5, dtype=dtype, rank=rank,
                    world_size=world_size)
    return Cache(out)


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if not p.name.startswith(".")}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_gives_back_the_cache_byte_for_byte(tmp_path, dtype):
    cache = build(tmp_path / "cache", dtype)
    summary = export_cache(cache.path, tmp_path / "export")
    assert (summary.files, summary.n_items, summary.columns) == (5, 23, 7 + 2 * len(LAYERS) + 2)
    assert sorted(os.listdir(tmp_path / "export")) == [".lock", "README.md", "data", META]
    back = import_cache(tmp_path / "export", tmp_path / "back")
    assert back.same_bytes and back.shards_written == [0, 1, 2, 3, 4]
    assert files(tmp_path / "back") == files(tmp_path / "cache")  # the manifest and every shard
    imported = Cache(tmp_path / "back")
    assert imported.manifest["world_size"] == 2 and imported.manifest["note"] == {"written by": "test"}
    for site in SITES:
        for layer in LAYERS:
            np.testing.assert_array_equal(imported.read_layer(site, layer), cache.read_layer(site, layer))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "back"), "--verify"])
    assert res.exit_code == 0 and "verified: all 5 shards" in res.output
    again = import_cache(tmp_path / "export", tmp_path / "back")  # a finished import has nothing left to do
    assert again.shards_written == [] and again.same_bytes


READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from datasets import load_dataset

    folder, out = sys.argv[1], sys.argv[2]
    cols = ["id", "label", "difficulty.grade", "logprob.choice_sum", "hidden.answer_end.layer2",
            "hidden.question_end.layer5"]
    ds = load_dataset("parquet", data_files=folder + "/data/*.parquet", split="train", columns=cols)
    ds = ds.with_format("numpy")
    arrays = {c: np.asarray(ds[c]) for c in cols}
    dtype = json.load(open(folder + "/probekit.json"))["manifest"]["dtype"]
    if dtype == "bfloat16":  # as the dataset card says
        for c in cols[-2:]:
            arrays[c] = (arrays[c].astype(np.uint32) << 16).view(np.float32)
    by_card = load_dataset(folder, split="train")  # the README's configs
    assert by_card.num_rows == len(ds) and "hidden.answer_end.layer0" in by_card.column_names
    assert not [m for m in sys.modules if m.startswith("probekit")]
    np.savez(out, **{c.replace(".", "__"): a for c, a in arrays.items()})
""")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_datasets_reads_the_folder_without_probekit(tmp_path, dtype):
    cache = build(tmp_path / "cache", dtype, world_size=1)
    export_cache(cache.path, tmp_path / "export")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    script = tmp_path / "read.py"
    script.write_text(READER)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "export"), str(tmp_path / "got.npz")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "got.npz", allow_pickle=True)
    items = cache.items
    assert got["id"].tolist() == items["id"].tolist()
    np.testing.assert_array_equal(got["label"], items["label"])
    np.testing.assert_array_equal(got["difficulty__grade"], items["grade"])  # NaN where unknown
    np.testing.assert_array_equal(got["logprob__choice_sum"], cache.logprobs()[0])  # -inf on padding
    ans, q = got["hidden__answer_end__layer2"], got["hidden__question_end__layer5"]
    assert ans.shape == (23, C, D) and q.shape == (23, D)
    np.testing.assert_array_equal(ans.astype(np.float32), cache.read_layer("answer_end", 2))
    np.testing.assert_array_equal(q.astype(np.float32), cache.read_layer("question_end", 5))
    stored = pq.read_schema(tmp_path / "export" / "data" / "shard-00000.parquet").field("hidden.answer_end.layer2").type
    element = "uint16" if dtype == "bfloat16" else "halffloat"
    assert str(stored) == f"fixed_size_list<element: fixed_size_list<element: {element}>[{D}]>[{C}]"
    if dtype == "bfloat16":
        assert ans[3, 0, 2] == 99840.0  # 1e5 in bfloat16


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    cache = build(tmp_path / "cache", world_size=1)
    runner = CliRunner()

    res = runner.invoke(app, ["export", str(tmp_path / "nope"), "--to", str(tmp_path / "e")])
    assert res.exit_code == 2 and "cache directory" in res.output and "does not exist" in res.output
    assert not (tmp_path / "e").exists()

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["export", str(cache.path), "--to", str(tmp_path / "foreign")])
    assert res.exit_code == 2 and "already holds files that are not part of one (notes.txt)" in res.output

    res = runner.invoke(app, ["export", str(cache.path), "--to", str(tmp_path / "e")])
    assert res.exit_code == 0 and "5 Parquet files" in res.output, res.output
    res = runner.invoke(app, ["export", str(cache.path), "--to", str(tmp_path / "e")])  # the same cache again
    assert res.exit_code == 0, res.output
    other = build(tmp_path / "other", world_size=2)
    with pytest.raises(ProbekitError, match="holds an export of another cache"):
        export_cache(other.path, tmp_path / "e")

    with pytest.raises(ProbekitError, match="has no probekit.json: not a probekit export"):
        import_cache(tmp_path / "foreign", tmp_path / "c1")
    res = runner.invoke(app, ["import", str(tmp_path / "none"), "--out", str(tmp_path / "c1")])
    assert res.exit_code == 2 and "export folder" in res.output and "does not exist" in res.output

    damaged = tmp_path / "damaged"
    export_cache(cache.path, damaged)
    part = damaged / "data" / "shard-00003.parquet"
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 1
    part.write_bytes(bytes(raw))
    res = runner.invoke(app, ["import", str(damaged), "--out", str(tmp_path / "c1")])
    assert res.exit_code == 2 and "shard-00003.parquet differs from the export's record" in res.output
    assert not (tmp_path / "c1").exists()

    with pytest.raises(ProbekitError, match=r"was written with world_size=2, not 1"):
        import_cache(tmp_path / "e", other.path)  # another cache at --out

    meta = json.loads((tmp_path / "e" / META).read_text())
    meta["columns"][7]["shape"] = [C, D + 1]
    (tmp_path / "e" / META).write_text(json.dumps(meta))
    with pytest.raises(ProbekitError, match="its columns are not those of the cache it describes"):
        import_cache(tmp_path / "e", tmp_path / "c2")
    (tmp_path / "e" / META).unlink()
    with pytest.raises(ProbekitError, match="has no probekit.json: an unfinished export"):
        import_cache(tmp_path / "e", tmp_path / "c2")
    assert not (tmp_path / "c2").exists()


def test_an_export_that_fails_half_way_leaves_no_export(tmp_path, monkeypatch):
    """A full disk on the third file: no probekit.json, no Parquet files, one error line."""
    import errno

    from probekit.store import export as export_module

    cache = build(tmp_path / "cache", world_size=1)
    real, calls = pq.write_table, []

    def write_table(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(export_module.pq, "write_table", write_table)
    with pytest.raises(ProbekitError, match=r"no space left on the device writing .*data/shard-00002.parquet"):
        export_cache(cache.path, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_an_unfinished_cache_is_not_exported(tmp_path):
    items, arrays = make_data()
    write_cache(tmp_path / "half", HEADER, items, arrays, layers=LAYERS, sites=SITES, hidden_size=D, max_choices=C,
                measures=MEASURES, shard_size=5, rank=0, world_size=2)
    with pytest.raises(ProbekitError, match="is incomplete: 3 of 5 shards written"):
        export_cache(tmp_path / "half", tmp_path / "e")
    write_cache(tmp_path / "half", HEADER, items, arrays, layers=LAYERS, sites=SITES, hidden_size=D, max_choices=C,
                measures=MEASURES, shard_size=5, rank=1, world_size=2)
    with h5py.File(tmp_path / "half" / "shard-00002.h5", "r+") as f:  # a damaged cache is not exported either
        f["logprob/choice_sum"][0, 0] = 1.0
    with pytest.raises(ProbekitError, match="fails verification: shard-00002.h5: sha256 differs"):
        export_cache(tmp_path / "half", tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_real_cache_travels_and_sweeps_to_identical_results(real_cache, tmp_path):
    """The SmolLM2 cache of 180 real ARC items: exported, imported, swept with the same seed."""
    from probekit.probe import RESULTS, SWEEP_JSON, sweep

    export_cache(real_cache, tmp_path / "export")
    back = import_cache(tmp_path / "export", tmp_path / "back")
    assert back.same_bytes
    res = CliRunner().invoke(app, ["info", str(tmp_path / "back"), "--verify"])
    assert res.exit_code == 0 and "verified" in res.output
    table = pq.read_table(tmp_path / "export" / "data" / "shard-00000.parquet",
                          columns=["id", "hidden.answer_end.layer30"])
    x = np.asarray(table.column(1).combine_chunks().flatten().flatten()).reshape(table.num_rows, -1)
    np.testing.assert_array_equal(x, Cache(real_cache).read_layer("answer_end", 30, np.float16)[:64].reshape(64, -1))
    kw = dict(measures=["grade"], layers="last,middle_and_last", n_train=[10], draws=2, solver="both", seed=3)
    sweep(real_cache, tmp_path / "a", **kw)
    sweep(tmp_path / "back", tmp_path / "b", **kw)
    a, b = pd.read_parquet(tmp_path / "a" / RESULTS), pd.read_parquet(tmp_path / "b" / RESULTS)
    assert len(a) > 1000
    pd.testing.assert_frame_equal(a, b)
    ja, jb = (json.loads((tmp_path / d / SWEEP_JSON).read_text()) for d in "ab")
    assert ja["cache_manifest_sha256"] == jb["cache_manifest_sha256"] == Cache(real_cache).manifest_sha256
