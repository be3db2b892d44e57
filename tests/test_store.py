"""The HDF5 shard cache: round trip, layout, resume, atomicity, locks, refusal to mix, integrity."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from probekit.errors import ProbekitError
from probekit.store import Cache, CacheWriter, write_cache

N, SHARD, LAYERS, C, D = 23, 5, [0, 2, 5], 4, 8  # 5 shards, the last one of 3 items
SITES = ["answer_end", "question_end"]
MEASURES = ["grade", "difficulty"]
HEADER = {
    "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "file_sha256": "ab" * 32, "dtype": "float32",
              "quantization": None},
    "dataset": {"name": "arc", "fingerprint": "cd" * 32},
    "prompt": {"template": "0040", "text": "Question: {question}\nAnswer:"},
}


def make_data(n: int = N, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Items and arrays as the extract step produces them: padded choices, NaN difficulties."""
    rng = np.random.default_rng(seed)
    n_choices = rng.integers(2, C + 1, n)
    items = pd.DataFrame({
        "id": [f"Mercury_{i}" if i % 3 else f"item-é数-{i}" for i in range(n)],
        "label": [int(rng.integers(0, k)) for k in n_choices],
        "n_choices": n_choices,
        "pool": rng.choice(["probe", "holdout"], n),
        "source": rng.choice(["ARC-Easy/train", "ARC-Challenge/test"], n),
        "grade": np.where(rng.random(n) < 0.2, np.nan, rng.integers(3, 10, n).astype(float)),
        "difficulty": rng.random(n),
    })
    pad = np.arange(C)[None, :] >= n_choices[:, None]  # (n, C), True on padded choices
    answer_end = rng.standard_normal((len(LAYERS), n, C, D)).astype(np.float32) * 10
    answer_end[:, pad] = 0.0
    choice_sum = np.where(pad, -np.inf, -rng.random((n, C)) * 20).astype(np.float32)
    arrays = {
        "answer_end": answer_end,
        "question_end": rng.standard_normal((len(LAYERS), n, D)).astype(np.float32),
        "choice_sum": choice_sum,
        "choice_tokens": np.where(pad, 0, rng.integers(1, 9, (n, C))),
    }
    return items, arrays


def writer(out: Path, header: dict = HEADER, **overrides) -> CacheWriter:
    kw = dict(n_items=N, shard_size=SHARD, layers=LAYERS, sites=SITES, hidden_size=D, max_choices=C,
              measures=MEASURES)
    return CacheWriter(out, header, **{**kw, **overrides})


def write_all(out: Path, items: pd.DataFrame, arrays: dict, **overrides) -> list[int]:
    kw = dict(layers=LAYERS, sites=SITES, hidden_size=D, max_choices=C, measures=MEASURES, shard_size=SHARD)
    return write_cache(out, HEADER, items, arrays, **{**kw, **overrides})


def write_in_batches(w: CacheWriter, items: pd.DataFrame, arrays: dict, batch: int = 2) -> None:
    """The extract loop: every pending shard, written a few rows at a time."""
    with w:
        for k in w.pending_shards():
            lo, hi = w.shard_range(k)
            with w.open_shard(k) as sw:
                for start in range(lo, hi, batch):
                    stop, off = min(start + batch, hi), start - lo
                    rows = items.iloc[start:stop]
                    sw.write_items(off, ids=rows["id"].tolist(), labels=rows["label"],
                                   n_choices=rows["n_choices"], pool=rows["pool"].tolist(),
                                   source=rows["source"].tolist(),
                                   difficulty={m: rows[m] for m in MEASURES})
                    for site in SITES:
                        sw.write_hidden(off, site, arrays[site][:, start:stop])
                    sw.write_logprobs(off, choice_sum=arrays["choice_sum"][start:stop],
                                      choice_tokens=arrays["choice_tokens"][start:stop])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def data():
    return make_data()


@pytest.fixture()
def cache_dir(tmp_path, data) -> Path:
    out = tmp_path / "cache"
    write_all(out, *data)
    return out


def test_round_trip_every_field(tmp_path, data):
    items, arrays = data
    out = tmp_path / "c"
    write_in_batches(writer(out), items, arrays)
    cache = Cache(out)

    pd.testing.assert_frame_equal(cache.items, items, check_dtype=False)
    assert cache.items["grade"].isna().sum() == items["grade"].isna().sum() > 0
    for site in SITES:
        for i, layer in enumerate(LAYERS):
            got = cache.read_layer(site, layer)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, arrays[site][i].astype(np.float16).astype(np.float32))
    choice_sum, choice_tokens = cache.logprobs()
    np.testing.assert_array_equal(choice_sum, arrays["choice_sum"])  # -inf on padding included
    np.testing.assert_array_equal(choice_tokens, arrays["choice_tokens"])

    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "probekit-cache/1" and m["complete"] is True
    assert {k: m[k] for k in HEADER} == HEADER
    layout = (m["layers"], m["sites"], m["hidden_size"], m["max_choices"], m["measures"])
    assert layout == (LAYERS, SITES, D, C, MEASURES)
    assert (m["n_items"], m["shard_size"], m["world_size"]) == (N, SHARD, 1)
    assert [e["index"] for e in m["shards"]] == [0, 1, 2, 3, 4]
    assert [e["n_items"] for e in m["shards"]] == [5, 5, 5, 5, 3]
    for e in m["shards"]:
        assert e["sha256"] == sha256(out / e["file"]) and e["rank"] == 0
    assert cache.manifest_sha256 == sha256(out / "manifest.json")
    on_disk = [out / "manifest.json", *(out / e["file"] for e in m["shards"])]
    assert cache.size_bytes == sum(p.stat().st_size for p in on_disk)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", *[f"shard-0000{k}.h5" for k in range(5)]]

    with h5py.File(out / "shard-00004.h5", "r") as f:  # plain h5py, no probekit
        assert (f.attrs["index"], f.attrs["item_start"], f.attrs["item_stop"]) == (4, 20, 23)
        assert [s.decode() for s in f["items/id"][:]] == items["id"].tolist()[20:]
        assert f["hidden/answer_end"].dtype == np.float16
        assert f["logprob/choice_tokens"].dtype == np.int32
        assert list(f["hidden/answer_end"].attrs["layers"]) == LAYERS


def test_choice_surface_round_trip_and_refusals(tmp_path, data):
    items, arrays = data
    rng = np.random.default_rng(1)
    words = [rng.integers(1, 9, k).tolist() for k in items["n_choices"]]
    chars = [rng.integers(1, 60, k).tolist() for k in items["n_choices"]]
    with_surface = items.assign(choice_words=words, choice_chars=chars)
    out = tmp_path / "s"
    write_all(out, with_surface, arrays, choice_surface=True)
    cache = Cache(out)
    assert cache.has_surface and cache.manifest["choice_surface"] is True
    got = cache.choice_surface()
    for name, lists in (("choice_words", words), ("choice_chars", chars)):
        assert got[name].shape == (N, C) and got[name].dtype == np.int32
        assert got[name].tolist() == [v + [0] * (C - len(v)) for v in lists]
    assert Cache(out).verify() == []
    # a cache without them says so in one line; the writer refuses counts it would not store
    plain = tmp_path / "p"
    write_all(plain, items, arrays)
    assert not Cache(plain).has_surface and Cache(plain).manifest["choice_surface"] is False
    with pytest.raises(ProbekitError, match="holds no choice surface features"):
        Cache(plain).choice_surface()
    with pytest.raises(ProbekitError, match="lacks columns"):
        write_all(tmp_path / "m", items, arrays, choice_surface=True)
    bad = with_surface.assign(choice_words=[[-1] * k for k in items["n_choices"]])
    with pytest.raises(ProbekitError, match="non-negative"):
        write_all(tmp_path / "n", bad, arrays, choice_surface=True)
    # a cache written before the field existed is resumed as one without surface features
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["choice_surface"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert write_all(plain, items, arrays) == []
    with pytest.raises(ProbekitError, match="choice_surface"):
        write_all(plain, with_surface, arrays, choice_surface=True)


def test_write_cache_from_callable_equals_from_arrays(tmp_path, data):
    items, arrays = data
    calls = []

    def per_shard(lo, hi):
        calls.append((lo, hi))
        return {key: (a[:, lo:hi] if key in SITES else a[lo:hi]) for key, a in arrays.items()}

    assert write_all(tmp_path / "a", items, arrays) == [0, 1, 2, 3, 4]
    assert write_all(tmp_path / "b", items, per_shard) == [0, 1, 2, 3, 4]
    assert calls == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    assert [e["sha256"] for e in a.manifest["shards"]] == [e["sha256"] for e in b.manifest["shards"]]
    pd.testing.assert_frame_equal(b.items, items, check_dtype=False)


def test_layer_major_chunks_one_layer_one_read(cache_dir, data):
    _, arrays = data
    with h5py.File(cache_dir / "shard-00001.h5", "r") as f:
        ans, q = f["hidden/answer_end"], f["hidden/question_end"]
        assert ans.shape == (3, 5, C, D) and ans.chunks == (1, 5, C, D)
        assert q.shape == (3, 5, D) and q.chunks == (1, 5, D)
        info = ans.id.get_chunk_info_by_coord((1, 0, 0, 0))  # layer 2 of this shard: one chunk
        assert info.size == 5 * C * D * 2
    cache = Cache(cache_dir)
    np.testing.assert_array_equal(cache.read_layer("question_end", 5),
                                  arrays["question_end"][2].astype(np.float16).astype(np.float32))
    assert cache.read_layer("answer_end", 0, dtype=np.float16).dtype == np.float16
    with pytest.raises(ProbekitError, match=r"layer 3 is not in cache .* holds layers \[0, 2, 5\]"):
        cache.read_layer("answer_end", 3)
    with pytest.raises(ProbekitError, match="site 'mean' is not in cache"):
        cache.read_layer("mean", 0)


def test_resume_skips_finished_and_rewrites_missing(tmp_path, data):
    items, arrays = data
    out = tmp_path / "c"
    assert write_all(out, items, arrays) == [0, 1, 2, 3, 4]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    assert write_all(out, items, arrays) == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == before

    (out / "shard-00002.h5").unlink()
    (out / ".shard-00003.h5.tmp").write_bytes(b"left over from a killed run")
    with writer(out) as w:
        assert w.pending_shards() == [2]
        assert not (out / ".shard-00003.h5.tmp").exists()
        assert [e["index"] for e in json.loads((out / "manifest.json").read_text())["shards"]] == [0, 1, 3, 4]
        assert not w.complete
    assert write_all(out, items, arrays) == [2]
    cache = Cache(out)
    assert cache.complete and cache.verify() == []
    pd.testing.assert_frame_equal(cache.items, items, check_dtype=False)


def test_failure_inside_open_shard_leaves_nothing(tmp_path, data):
    items, arrays = data
    out = tmp_path / "c"
    with writer(out) as w:
        with pytest.raises(RuntimeError, match="model crashed"):
            with w.open_shard(0) as sw:
                sw.write_hidden(0, "answer_end", arrays["answer_end"][:, :2])
                assert (out / ".shard-00000.h5.tmp").exists()
                raise RuntimeError("model crashed")
        with pytest.raises(ProbekitError, match=r"shard-00001.h5: 5 of 5 rows of items were never written"):
            with w.open_shard(1) as sw:
                sw.write_hidden(0, "answer_end", arrays["answer_end"][:, 5:10])
        with pytest.raises(ProbekitError, match=r"rows 4..5 lie outside the shard's rows 0..4"):
            with w.open_shard(2) as sw:
                sw.write_hidden(4, "question_end", arrays["question_end"][:, :2])
        with pytest.raises(ProbekitError, match=r"hidden answer_end batch has shape \(3, 2, 8\)"):
            with w.open_shard(3) as sw:
                sw.write_hidden(0, "answer_end", arrays["question_end"][:, :2])
        assert w.pending_shards() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir() if "shard" in p.name) == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["shards"] == [] and m["complete"] is False
    with pytest.raises(ProbekitError, match=r"cache .* is incomplete: 0 of 5 shards written"):
        Cache(out)


def test_second_writer_on_same_directory_is_refused(tmp_path):
    out = tmp_path / "c"
    with writer(out) as first:
        busy = rf"is being written by another process \(pid {os.getpid()}\); wait"
        with pytest.raises(ProbekitError, match=busy):
            with writer(out):
                pass
        with pytest.raises(ProbekitError, match="not one of rank 0's shards"):
            first.open_shard(5)
    with pytest.raises(ProbekitError, match="inside a `with` block"):
        first.pending_shards()
    with writer(out) as w:  # released when the first block ended
        assert w.pending_shards() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("change", "field", "old", "new"),
    [
        (lambda h, kw: h["model"].update(dtype="bfloat16"), "model.dtype", "'float32'", "'bfloat16'"),
        (lambda h, kw: h["model"].update(file_sha256="ef" * 32), "model.file_sha256", "'abab", "'efef"),
        (lambda h, kw: h["dataset"].update(fingerprint="00" * 32), "dataset.fingerprint", "'cdcd", "'0000"),
        (lambda h, kw: h["prompt"].update(template="0306"), "prompt.template", "'0040'", "'0306'"),
        (lambda h, kw: kw.update(layers=[0, 2, 6]), "layers", "[0, 2, 5]", "[0, 2, 6]"),
        (lambda h, kw: kw.update(sites=["answer_end"]), "sites", str(SITES), "['answer_end']"),
        (lambda h, kw: kw.update(hidden_size=16), "hidden_size", "8", "16"),
        (lambda h, kw: kw.update(shard_size=4), "shard_size", "5", "4"),
        (lambda h, kw: kw.update(world_size=2), "world_size", "1", "2"),
    ],
)
def test_refuses_to_mix_caches(cache_dir, change, field, old, new):
    header, kw = json.loads(json.dumps(HEADER)), {}
    change(header, kw)
    with pytest.raises(ProbekitError) as err:
        with writer(cache_dir, header, **kw):
            pass
    msg = str(err.value)
    assert "\n" not in msg and f"written with {field}={old}" in msg and f"not {new}" in msg
    assert Cache(cache_dir).verify() == []  # untouched


def test_corrupt_byte_is_named_by_verify_and_info(cache_dir):
    from probekit.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["info", str(cache_dir), "--verify"])
    assert ok.exit_code == 0, ok.output
    for text in ("SmolLM2-135M-Instruct", "arc", "0, 2, 5", "answer_end, question_end", "23",
                 "5 of 5 written", "complete", "yes", "all 5 shards match"):
        assert text in ok.output

    path = cache_dir / "shard-00003.h5"
    with h5py.File(path, "r") as f:  # flip one byte inside layer 5's hidden states
        offset = f["hidden/answer_end"].id.get_chunk_info_by_coord((2, 0, 0, 0)).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 7] ^= 0xFF
    path.write_bytes(bytes(raw))

    problems = Cache(cache_dir).verify()
    assert len(problems) == 1 and problems[0].startswith("shard-00003.h5: sha256 differs")
    bad = runner.invoke(app, ["info", str(cache_dir), "--verify"])
    assert bad.exit_code == 1
    assert "bad: shard-00003.h5: sha256 differs" in bad.output and "1 of 5 shards are bad" in bad.output

    with writer(cache_dir) as w:  # the quick check trusts size and shapes; the full one rewrites it
        assert w.pending_shards() == []
        assert w.pending_shards(verify=True) == [3]


def test_info_reports_clean_errors(tmp_path):
    from probekit.cli import app

    result = CliRunner().invoke(app, ["info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "error: cache directory" in result.output and "does not exist" in result.output


def test_reader_refuses_bad_directories(tmp_path, cache_dir):
    with pytest.raises(ProbekitError, match="does not exist"):
        Cache(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbekitError, match="has no manifest.json"):
        Cache(tmp_path / "empty")
    m = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**m, "format": "other/2"}))
    with pytest.raises(ProbekitError, match="has format 'other/2', expected 'probekit-cache/1'"):
        Cache(cache_dir)
    (cache_dir / "manifest.json").write_text(json.dumps({**m, "shards": m["shards"][:2], "complete": False}))
    with pytest.raises(ProbekitError, match="is incomplete: 2 of 5 shards written"):
        Cache(cache_dir)
    partial = Cache(cache_dir, require_complete=False)
    assert not partial.complete
    assert [p.split(":")[0] for p in partial.verify()] == ["shard-00002.h5", "shard-00003.h5", "shard-00004.h5"]
    with pytest.raises(ProbekitError, match="incomplete"):
        partial.read_layer("answer_end", 0)


def test_bad_writer_arguments(tmp_path, data):
    items, arrays = data
    for kw, msg in [
        (dict(rank=2, world_size=2), "rank must be in 0..1"),
        (dict(layers=[]), "layers must be a non-empty list"),
        (dict(sites=["middle"]), "sites must be distinct names"),
        (dict(dtype="float8"), r"dtype must be one of \[.float16., .float32., .bfloat16.\]"),
        (dict(shard_size=0), "shard_size must be a positive integer"),
    ]:
        with pytest.raises(ProbekitError, match=msg):
            writer(tmp_path / "c", **kw)
    with pytest.raises(ProbekitError, match="cache header lacks prompt"):
        writer(tmp_path / "c", {"model": {}, "dataset": {}})
    bad = items.assign(label=items["n_choices"])
    with pytest.raises(ProbekitError, match=r"item 'item-é数-0' has label (\d) and \1 choices"):
        write_all(tmp_path / "c", bad, arrays)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"] == []


@given(n_items=st.integers(1, 500), shard_size=st.integers(1, 64), world_size=st.integers(1, 5))
def test_ranks_partition_shards_and_shards_partition_items(tmp_path_factory, n_items, shard_size, world_size):
    out = tmp_path_factory.getbasetemp() / "unused"  # nothing is written: constructors do no I/O
    ws = [writer(out, n_items=n_items, shard_size=shard_size, world_size=world_size, rank=r)
          for r in range(world_size)]
    shards = sorted(k for w in ws for k in w.my_shards)
    assert shards == list(range(ws[0].n_shards))
    ranges = [ws[0].shard_range(k) for k in shards]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_items
    assert all(hi - lo == shard_size for lo, hi in ranges[:-1])
    assert 0 < ranges[-1][1] - ranges[-1][0] <= shard_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert not out.exists()


def _write_rank(out: str, rank: int) -> None:
    items, arrays = make_data()
    write_all(Path(out), items, arrays, world_size=2, rank=rank, shard_size=2)


def test_two_ranks_share_one_directory(tmp_path, data):
    out = tmp_path / "c"
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX threads exist in this process
    procs = [ctx.Process(target=_write_rank, args=(str(out), r)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True and m["world_size"] == 2
    assert [(e["index"], e["rank"]) for e in m["shards"]] == [(k, k % 2) for k in range(12)]
    cache = Cache(out)
    assert cache.verify() == []
    items, arrays = data
    pd.testing.assert_frame_equal(cache.items, items, check_dtype=False)
    np.testing.assert_array_equal(cache.read_layer("answer_end", 5),
                                  arrays["answer_end"][2].astype(np.float16).astype(np.float32))


def test_rerun_removes_manifest_temporaries_of_a_killed_writer(tmp_path, data):
    items, arrays = data
    out = tmp_path / "c"
    write_all(out, items, arrays)
    for name in (".manifest.json.tmp-4242", ".manifest.json.4242-0badcafe.tmp"):
        (out / name).write_text("{")  # a kill during a manifest write leaves one of these
    write_all(out, items, arrays)
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]
