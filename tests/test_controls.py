"""Shortcut controls: a probe on the choices' surface features and the majority position, fitted on the
probe's own training draws (probekit.probe.controls), and the report's verdict beside the hidden-state probe."""

from __future__ import annotations

import numpy as np
import pandas as pd

from probekit.data.schema import choice_surface
from probekit.probe import RESULTS, sweep
from probekit.probe.controls import surface_features
from probekit.report import build_report
from probekit.store import Cache, write_cache

C, D, LAYERS = 4, 16, [1, 2]


def surface_cache(path, *, seed: int = 0, gold_longest: bool = False, signal: float = 0.0, n: int = 400):
    """A cache of ``n`` four-choice items with real-looking choice texts (1-12 words), surface features
    and random hidden states (plus ``signal`` along a planted direction at the gold choice). With
    ``gold_longest`` the gold answer is always the longest choice; else it is a random one."""
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 13, (n, C))
    gold = words.argmax(1) if gold_longest else rng.integers(0, C, n)
    if gold_longest:  # a unique longest choice
        words[np.arange(n), gold] = words.max(1) + 4
    choices = [[" ".join(["word"] * int(k)) for k in row] for row in words]
    surface = choice_surface(pd.Series(choices))
    level = rng.integers(0, 3, n).astype(float)
    items = pd.DataFrame({"id": [f"q{i:04d}" for i in range(n)], "label": gold, "n_choices": C, "pool": "probe",
                          "source": "constructed", "level": level, **surface})
    hid = np.random.default_rng(seed + 100).normal(size=(len(LAYERS), n, C, D)).astype(np.float32)
    hid[:, np.arange(n), gold, 0] += signal
    write_cache(path, {"model": {"id": "constructed", "n_layers": 2}, "dataset": {"name": "constructed",
                                                                                   "fingerprint": "x"},
                       "prompt": {"template": "0040"}},
                items, {"answer_end": hid, "choice_sum": rng.normal(size=(n, C)).astype(np.float32),
                        "choice_tokens": np.full((n, C), 3)},
                layers=LAYERS, sites=["answer_end"], hidden_size=D, max_choices=C, measures=["level"],
                choice_surface=True, shard_size=128)
    return path


def rows_of(df: pd.DataFrame, site: str) -> pd.DataFrame:
    return df[df.site == site].sort_values(["measure", "train_level", "draw", "item_id"]).reset_index(drop=True)


def test_surface_features_of_a_real_cache_are_the_choices_surface(real_cache, demo_items):
    """On a real extraction: words, characters and one-hot position of each choice, 0 on padding."""
    X = surface_features(Cache(real_cache))
    table = demo_items.table.reset_index(drop=True)
    C_ = X.shape[1]
    assert X.shape == (len(table), C_, 2 + C_) and X.dtype == np.float32
    for i, choices in enumerate(table["choices"]):
        k = len(choices)
        np.testing.assert_array_equal(X[i, :k, 0], [len(c.split()) for c in choices])
        np.testing.assert_array_equal(X[i, :k, 1], [len(c) for c in choices])
        np.testing.assert_array_equal(X[i, :k, 2:], np.eye(C_)[:k])
        assert not X[i, k:].any()


def test_hidden_states_never_reach_the_controls(tmp_path):
    """Two caches with the same items and surface but different hidden states: identical control rows,
    different probe rows."""
    a, b = surface_cache(tmp_path / "a", signal=3.0), surface_cache(tmp_path / "b", seed=0, signal=0.0)
    common = dict(measures=["level"], layers="1,2", n_train=[40], draws=2, seed=5, cutoffs=None)
    sweep(a, tmp_path / "ra", **common)
    sweep(b, tmp_path / "rb", **common)
    da, db = pd.read_parquet(tmp_path / "ra" / RESULTS), pd.read_parquet(tmp_path / "rb" / RESULTS)
    for site in ("surface", "majority"):
        ra, rb = rows_of(da, site), rows_of(db, site)
        assert len(ra) > 0
        pd.testing.assert_frame_equal(ra, rb)
    assert set(rows_of(da, "surface").solver) == {"converged"} and set(rows_of(da, "majority").solver) == {"majority"}
    assert not rows_of(da, "answer_end").correct.equals(rows_of(db, "answer_end").correct)


def test_control_reaches_every_item_when_the_longest_choice_is_correct(tmp_path):
    """Gold = the longest choice: the surface control gets every test item right, the hidden-state probe
    (random states) does not, and the report marks the row as not beating its control."""
    cache = surface_cache(tmp_path / "c", gold_longest=True)
    sweep(cache, tmp_path / "res", measures=["level"], layers="2", n_train=[40], draws=3, seed=1)
    df = pd.read_parquet(tmp_path / "res" / RESULTS)
    surface = df[df.site == "surface"]
    assert len(surface) and surface.correct.mean() == 1.0
    assert df[df.site == "answer_end"].correct.mean() < 0.5
    summary = build_report(tmp_path / "res", tmp_path / "rep", n_boot=300, n_boot_sgr=300, seed=0)
    (rec,) = [r for r in summary["population"] if r["site"] == "answer_end"]
    assert rec["controls"]["surface"]["accuracy"]["hard"]["point"] == 1.0
    assert rec["beats_controls"] is False
    assert rec["controls"]["surface"]["hard_minus_control"]["hi"] < 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| not above surface" in md and "surface control hard→hard" in md


def test_majority_control_is_the_training_draws_most_frequent_position(tmp_path):
    """The majority rows equal a plain count over each head's training labels."""
    cache = surface_cache(tmp_path / "c", seed=3)
    sweep(cache, tmp_path / "res", measures=["level"], layers="2", n_train=[30], draws=2, seed=2)
    df = pd.read_parquet(tmp_path / "res" / RESULTS)
    items = Cache(cache).items.set_index("id")
    for (level, draw), rows in df[df.site == "majority"].groupby(["train_level", "draw"], observed=True):
        head = df[(df.site == "answer_end") & (df.train_level == level) & (df.draw == draw)]
        trained = sorted(set(items.index) - set(head.item_id.astype(str)))
        counts = np.bincount(items.loc[trained, "label"], minlength=C)
        guess = int(np.argmax(counts))  # ties to the first position
        gold = items.loc[rows.item_id.astype(str), "label"].to_numpy()
        np.testing.assert_array_equal(rows.correct.to_numpy(), (gold == guess).astype(np.int8))
        np.testing.assert_allclose(rows.p_gold.to_numpy(), counts[gold] / counts.sum(), rtol=1e-6)


def test_a_cache_without_surface_features_gets_the_majority_control_only(tmp_path):
    """Older caches hold no surface features: the sweep fits the majority control and says why not the other."""
    from test_sweep import build_cache

    cache = build_cache(tmp_path / "c")
    rec = sweep(cache, tmp_path / "res", measures=["grade"], layers="4", n_train=[40], draws=1, seed=0)
    df = pd.read_parquet(tmp_path / "res" / RESULTS)
    assert set(df.site) == {"answer_end", "majority", ""}  # "": the zero-shot rows (no probe head)
    assert rec["config"]["controls"]["sites"] == ["majority"]
    assert "no choice surface features" in rec["config"]["controls"]["surface_skipped"]
    none = sweep(cache, tmp_path / "none", measures=["grade"], layers="4", n_train=[40], draws=1, controls=False)
    assert set(pd.read_parquet(tmp_path / "none" / RESULTS).site) == {"answer_end", ""}
    assert none["config"]["controls"]["sites"] == []
