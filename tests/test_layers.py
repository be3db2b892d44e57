"""One layer-spec rule for every command: `extract` (layers to cache) and `sweep`/`hardness` (feature sets).

The parser is checked on its own, then through each command: a spec one command refuses, the
other refuses with the same line; ``-1`` is the model's last layer everywhere.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from probekit.cli import app
from probekit.errors import ProbekitError

L = 30  # SmolLM2-135M: hidden_states 0..30, middle 16

ACCEPTED = [  # spec, layers extract caches, feature sets sweep fits (on a cache of every layer)
    ("all", list(range(31)), [(x,) for x in range(31)]),
    ("middle_and_last", [16, 30], [(16, 30)]),
    ("middle", [16], [(16,)]),
    ("last", [30], [(30,)]),
    ("-1", [30], [(30,)]),
    ("0,-1", [0, 30], [(0,), (30,)]),
    ("-2+-1", [29, 30], [(29, 30)]),
    (" 5 , 17 ", [5, 17], [(5,), (17,)]),
    ("15+30,30", [15, 30], [(15, 30), (30,)]),
    ("all,middle_and_last", list(range(31)), [(x,) for x in range(31)] + [(16, 30)]),
    ([-1, 0], [30, 0], [(30,), (0,)]),
    (7, [7], [(7,)]),
]

REFUSED = [  # spec, what the one line says
    ("3,,4", "empty item"),
    ("3,", "empty item"),
    (",3", "empty item"),
    ("", "names no layer"),
    ("3+", "empty term"),
    ("8,8", "names '8' twice"),
    ("8+8", "repeats a layer"),
    ("all,last", "names layer set 30 twice"),
    ("-1,30", "names layer set 30 twice"),
    ("-1+30", "repeats layer 30"),
    ("middle,16", "names layer set 16 twice"),
    ("mid", "expected all, last, middle, middle_and_last"),
    ("1.5", "expected all, last, middle, middle_and_last"),
    ("31", "layer 31 is out of range"),
    ("-32", "layer -32 is out of range"),
]


@pytest.mark.parametrize("spec,layers,sets", ACCEPTED)
def test_both_commands_read_a_spec_alike(spec, layers, sets):
    from probekit.layers import feature_sets, resolve_layers

    assert resolve_layers(spec, L) == layers
    assert feature_sets(spec, L, range(L + 1)) == sets
    assert feature_sets(spec, None, range(L + 1)) == sets  # L from the cache when the manifest lacks it


@pytest.mark.parametrize("spec,message", REFUSED)
def test_both_commands_refuse_a_spec_alike(spec, message):
    from probekit.layers import feature_sets, resolve_layers

    with pytest.raises(ProbekitError) as for_extract:
        resolve_layers(spec, L)
    if "out of range" in message:  # a cache names what it holds instead
        with pytest.raises(ProbekitError, match=rf"layers={spec!r}: layer {spec} is not in the cache"):
            feature_sets(spec, L, range(L + 1))
    else:
        with pytest.raises(ProbekitError) as for_sweep:
            feature_sets(spec, L, range(L + 1))
        assert str(for_sweep.value) == str(for_extract.value)
    line = str(for_extract.value)
    assert line.startswith(f"layers={spec!r}: ") and message in line and "\n" not in line


def test_negative_layers_count_from_the_models_last_layer():
    """-1 is the model's last layer, also when a cache holds only some layers."""
    from probekit.layers import feature_sets

    assert feature_sets("-1,-15", L, [16, 30]) == [(30,), (16,)]
    with pytest.raises(ProbekitError, match=r"layer -2 \(= 29\) is not in the cache \(it holds layers \[16, 30\]\)"):
        feature_sets("-2", L, [16, 30])


# ----- through the commands ---------------------------------------------------------------------------
def _one_line(res, spec, message):
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: layers={spec!r}: ") and message in lines[0], res.output


@pytest.mark.parametrize("spec,message", [("3,,4", "empty item"), ("8,8", "names '8' twice"),
                                          ("8+8", "repeats a layer"), ("mid", "expected all")])
def test_extract_refuses_a_bad_spec_before_the_model_loads(tmp_path, shared_data, spec, message):
    """The model named does not exist: the layer spec's line comes first, so nothing was loaded."""
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["extract", "--dataset", "arc", "--data-dir", str(shared_data), "--limit", "2",
                                   "--model", "no-such-org/no-such-model", f"--layers={spec}", "--out", str(out),
                                   "--no-progress"])
    _one_line(res, spec, message)
    assert not out.exists()


@pytest.mark.parametrize("spec", ["all,last", "-1,30", "31"])
def test_extract_resolves_a_spec_against_the_model(tmp_path, demo_items, spec):
    """Specs that need the model's depth are refused once it is known, before anything is written."""
    from probekit.extract.run import extract
    from probekit.llm.models import LoadedModel
    from probekit.llm.tokens import TokenRules

    stub = LoadedModel(model=None, tokenizer=None, name="stub", identity={"id": "stub"}, n_layers=L,
                       hidden_size=8, device="cpu", rules=TokenRules(bos_id=None, dummy_prefix=False, pad_id=0))
    with pytest.raises(ProbekitError, match=f"layers={spec!r}: "):
        extract(demo_items, tmp_path / "c", stub, layers=spec, progress=False)
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from tests.test_sweep import build_cache

    return build_cache(tmp_path_factory.mktemp("layers") / "c", n_holdout=150)  # layers 2, 3, 4 of a 4-layer model


@pytest.mark.parametrize("command", ["sweep", "hardness"])
@pytest.mark.parametrize("spec,message", [("3,,4", "empty item"), ("3,3", "names '3' twice"),
                                          ("all,last", "names layer set 4 twice"), ("-1,4", "names layer set 4 twice"),
                                          ("1", "layer 1 is not in the cache")])
def test_sweep_and_hardness_refuse_what_extract_refuses(small_cache, tmp_path, command, spec, message):
    args = [command, str(small_cache), f"--layers={spec}"]
    if command == "sweep":
        args += ["--out", str(tmp_path / "r"), "--measures", "grade", "--no-verify"]
    _one_line(CliRunner().invoke(app, args), spec, message)
    assert not (tmp_path / "r").exists()


def test_sweep_reads_minus_one_as_the_last_layer(small_cache, tmp_path):
    import pandas as pd

    from probekit.probe import RESULTS

    res = CliRunner().invoke(app, ["sweep", str(small_cache), "--out", str(tmp_path / "r"), "--measures", "grade",
                                   "--layers=-1", "--n-train", "40", "--draws", "1", "--no-verify"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "r" / RESULTS)
    assert set(df.layer) - {""} == {"4"}

