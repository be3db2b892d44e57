"""Caches that hold any model's activations: bfloat16 storage (uint16 bits) and ``--store-dtype auto``.

bfloat16 values are checked bit for bit against torch's own rounding (``Tensor.to(torch.bfloat16)``)
of the same float32 activations, on constructed arrays and on real SmolLM2 extractions of real ARC
questions; a probe sweep on a bfloat16 cache is compared with the same sweep on the float32 cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from probekit.errors import ProbekitError
from probekit.store import Cache, write_cache
from probekit.store.layout import from_storage, to_storage
from tests.test_store import HEADER, LAYERS, MEASURES, SITES, C, D, make_data


def torch_bits(x: np.ndarray) -> np.ndarray:
    """torch's bfloat16 rounding of float32 values, as uint16 bits."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def torch_values(x: np.ndarray) -> np.ndarray:
    """torch's bfloat16 rounding of float32 values, back in float32."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_bfloat16_bits_are_torchs_rounding():
    rng = np.random.default_rng(0)
    ties = (rng.integers(0, 2**15, 4000, dtype=np.uint32) << 17 | np.uint32(0x8000)).view(np.float32)  # exact halfway
    odd_ties = (ties.view(np.uint32) | np.uint32(1 << 16)).view(np.float32)
    special = np.array([0.0, -0.0, 1e5, -7.1e4, 65504, 65520, 3.0e38, 3.39e38, 3.4e38, np.inf, -np.inf,
                        1e-40, -1e-45, np.finfo(np.float32).tiny], np.float32)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 20000),
                        ties[np.isfinite(ties)], odd_ties[np.isfinite(odd_ties)], special])
    bits = to_storage(x, "bfloat16")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, torch_bits(x))
    assert same_bits(from_storage(bits, "bfloat16"), torch_values(x))
    assert from_storage(to_storage(np.array([1e5], np.float32), "bfloat16"), "bfloat16")[0] == 99840.0
    assert np.isnan(from_storage(to_storage(np.array([np.nan, -np.nan], np.float32), "bfloat16"), "bfloat16")).all()
    assert to_storage(np.float32([1.5, -2.0]), "float16").dtype == np.float16  # the other dtypes: plain casts


@pytest.fixture()
def big_data():
    """test_store's items and arrays with values far beyond float16's range (65504) at known places."""
    items, arrays = make_data()
    arrays["answer_end"][1, 3, 0, 2] = 1e5
    arrays["answer_end"][2, 17, 1, 0] = -7.1e4
    arrays["question_end"][0, 22, 5] = 3.1e6
    return items, arrays


def write(out: Path, items: pd.DataFrame, arrays: dict, dtype: str) -> Cache:
    write_cache(out, HEADER, items, arrays, layers=LAYERS, sites=SITES, hidden_size=D, max_choices=C,
                measures=MEASURES, shard_size=5, dtype=dtype)
    return Cache(out)


def test_bfloat16_cache_reads_back_torchs_rounding(tmp_path, big_data):
    items, arrays = big_data
    cache = write(tmp_path / "bf16", items, arrays, "bfloat16")
    for site in SITES:
        for i, layer in enumerate(LAYERS):
            assert same_bits(cache.read_layer(site, layer), torch_values(arrays[site][i]))
    assert cache.read_layer("answer_end", LAYERS[1])[3, 0, 2] == 99840.0  # 1e5 in bfloat16, not inf
    assert cache.read_layer("answer_end", LAYERS[2])[17, 1, 0] == torch_values(np.float32([-7.1e4]))[0]
    assert cache.read_layer("question_end", LAYERS[0])[22, 5] == torch_values(np.float32([3.1e6]))[0]
    assert cache.read_layer("answer_end", LAYERS[0], dtype=np.float64).dtype == np.float64
    pd.testing.assert_frame_equal(cache.items, items, check_dtype=False)
    np.testing.assert_array_equal(cache.logprobs()[0], arrays["choice_sum"])

    m = cache.manifest
    assert m["dtype"] == "bfloat16" and m["dtype_storage"].startswith("uint16 bits of bfloat16")
    with h5py.File(tmp_path / "bf16" / "shard-00000.h5", "r") as f:  # plain h5py + numpy, as docs/formats.md shows
        ds = f["hidden/answer_end"]
        assert ds.dtype == np.uint16 and ds.attrs["dtype"] == "bfloat16" and "uint16" in ds.attrs["storage"]
        h = (ds[1].astype(np.uint32) << 16).view(np.float32)
        assert same_bits(h, torch_values(arrays["answer_end"][1, :5]))

    # two bytes a value, as float16
    f16 = write(tmp_path / "f16", *make_data(), "float16")
    assert "dtype_storage" not in f16.manifest
    with h5py.File(tmp_path / "f16" / "shard-00000.h5", "r") as f, \
            h5py.File(tmp_path / "bf16" / "shard-00000.h5", "r") as g:
        for site in SITES:
            assert f[f"hidden/{site}"].id.get_storage_size() == g[f"hidden/{site}"].id.get_storage_size() > 0
        assert "dtype" not in f["hidden/answer_end"].attrs

    from probekit.cli import app

    res = CliRunner().invoke(app, ["info", str(tmp_path / "bf16"), "--verify"])
    assert res.exit_code == 0, res.output
    assert "(bfloat16, stored as uint16 bits of bfloat16" in res.output and "verified: all 5 shards" in res.output


def test_a_bfloat16_cache_is_not_resumed_as_another_dtype(tmp_path, big_data):
    items, arrays = big_data
    write(tmp_path / "c", items, arrays, "bfloat16")
    with pytest.raises(ProbekitError, match="was written with dtype='bfloat16', not 'float16'"):
        write(tmp_path / "c", items, arrays, "float16")


# ----- real extractions ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arc6(arc):
    from probekit.extract.inputs import limit_items

    return limit_items(arc, 6)


@pytest.mark.slow
def test_real_bfloat16_extraction_is_torchs_rounding_of_the_float32_one(tmp_path, lm, arc6, one_torch_thread):
    from probekit.extract.run import extract

    kw = dict(layers="0,8,16,30", batch_size=3, shard_size=4, progress=False)
    f32 = extract(arc6, tmp_path / "f32", lm, store_dtype="float32", **kw)
    bf16 = extract(arc6, tmp_path / "bf16", lm, store_dtype="bfloat16", **kw)
    assert (f32.store_dtype, bf16.store_dtype) == ("float32", "bfloat16")
    a, b = Cache(tmp_path / "f32"), Cache(tmp_path / "bf16")
    assert b.manifest["dtype"] == "bfloat16" and "dtype_choice" not in b.manifest
    for site in a.sites:
        for layer in a.layers:
            x = a.read_layer(site, layer)
            assert np.abs(x).max() > 0
            assert same_bits(b.read_layer(site, layer), torch_values(x)), (site, layer)
    np.testing.assert_array_equal(a.logprobs()[0], b.logprobs()[0])  # log-probs stay float32
    assert b.verify() == []


@pytest.mark.slow
def test_auto_keeps_a_model_that_fits_at_float16_byte_for_byte(tmp_path, lm, arc6, one_torch_thread):
    """SmolLM2's hidden states stay far inside float16's range: auto writes exactly the float16 cache."""
    from probekit.extract.run import extract

    kw = dict(layers="middle_and_last", batch_size=3, shard_size=4, progress=False)
    f16 = extract(arc6, tmp_path / "f16", lm, store_dtype="float16", **kw)
    auto = extract(arc6, tmp_path / "auto", lm, **kw)  # the default
    assert auto.store_dtype == "float16" and auto.store_note.startswith("auto: |h| up to ")
    assert "first 3 items, float16 kept below 16376" in auto.line()
    assert f16.store_note == ""
    names = ["manifest.json", "shard-00000.h5", "shard-00001.h5"]
    for name in names:
        assert (tmp_path / "f16" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes(), name
    again = extract(arc6, tmp_path / "auto", lm, **kw)  # an existing cache keeps its dtype, nothing to do
    assert again.store_note == "auto: the cache's own dtype" and again.shards_written == []


@pytest.fixture(scope="module")
def f32_demo(demo_items, lm, tmp_path_factory):
    """The real SmolLM2 cache of the 180 demo items in float32 (the middle and last layers)."""
    from probekit.extract.run import extract

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("f32") / "smollm2__demo"
    extract(demo_items, out, lm, layers="middle_and_last", batch_size=16, shard_size=64, store_dtype="float32",
            progress=False)
    return out


@pytest.mark.slow
def test_sweep_on_bfloat16_equals_float32_to_the_rounding(f32_demo, tmp_path):
    """The same activations rounded to bfloat16 (relative error <= 2^-9) and probed with the same seed.

    Tolerance: the probe z-scores every feature, so a feature's rounding moves each score by a few
    1e-3 of a standard deviation, and a prediction flips only where two choices tie to within that.
    Measured here (8160 probe rows, both solvers, 10 training items): p(gold) moves by 0.026 at
    most and 0.001 on average, and 99.7% of the predictions are the same. Bound: every p(gold)
    within 0.05, the mean within 0.005, at least 98% of the predictions the same; the zero-shot
    rows (float32 log-probs) exactly equal."""
    from probekit.probe import RESULTS, sweep

    a = Cache(f32_demo)
    arrays = {site: np.stack([a.read_layer(site, layer) for layer in a.layers]) for site in a.sites}
    arrays["choice_sum"], arrays["choice_tokens"] = a.logprobs()
    surface = {name: [row[:k] for row, k in zip(counts, a.items.n_choices)]
               for name, counts in a.choice_surface().items()}
    write_cache(tmp_path / "bf16", {k: a.manifest[k] for k in ("model", "dataset", "prompt")},
                a.items.assign(**surface), arrays, layers=a.layers, sites=a.sites, hidden_size=a.hidden_size,
                max_choices=a.max_choices, measures=a.measures, shard_size=64, dtype="bfloat16",
                choice_surface=True)
    b = Cache(tmp_path / "bf16")
    for site in a.sites:
        assert same_bits(b.read_layer(site, a.layers[-1]), torch_values(arrays[site][-1]))
    kw = dict(measures=["grade"], layers="last,middle_and_last", n_train=[10], draws=3, solver="both", seed=7)
    sweep(f32_demo, tmp_path / "r32", **kw)
    sweep(tmp_path / "bf16", tmp_path / "rbf", **kw)
    r32, rbf = pd.read_parquet(tmp_path / "r32" / RESULTS), pd.read_parquet(tmp_path / "rbf" / RESULTS)
    keys = [c for c in r32.columns if c not in ("correct", "p_gold", "zero_weights")]
    pd.testing.assert_frame_equal(r32[keys], rbf[keys])
    probe = (r32["method"] == "probe").to_numpy()
    dp = np.abs(r32["p_gold"].to_numpy() - rbf["p_gold"].to_numpy())
    assert (dp[~probe] == 0).all()  # zero-shot rows come from the float32 log-probs
    agree = (r32["correct"].to_numpy() == rbf["correct"].to_numpy())[probe].mean()
    print(f"bfloat16 vs float32: {probe.sum()} probe rows, max |dp| {dp[probe].max():.4g}, "
          f"mean |dp| {dp[probe].mean():.3g}, same prediction {agree:.4f}")
    assert dp[probe].max() <= 0.05 and dp[probe].mean() <= 0.005 and agree >= 0.98
    assert json.loads((tmp_path / "rbf" / "sweep.json").read_text())["seed"] == 7
