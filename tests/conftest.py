"""Shared fixtures: where the real question sets live, and a temporary cache root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROBEKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real question sets in their original formats (../shared/data)."""
    if not (SHARED_DATA / "arc" / "arc_all_splits.jsonl").exists():
        pytest.skip(f"real question sets not found at {SHARED_DATA} (set PROBEKIT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def arc(shared_data):
    from probekit.data import load_dataset

    return load_dataset("arc", data_dir=shared_data)


@pytest.fixture(scope="session")
def raw_arc(shared_data):
    import json

    return {r["id"]: r for r in map(json.loads, (shared_data / "arc" / "arc_all_splits.jsonl").open())}


@pytest.fixture(scope="session")
def mixed_items(raw_arc):
    """Real ARC items with 4, 5 and 3 choices and prompts of different lengths."""
    four = [r for r in raw_arc.values() if len(r["choices"]["text"]) == 4][:4]
    five = [r for r in raw_arc.values() if len(r["choices"]["text"]) == 5][:1]
    three = [r for r in raw_arc.values() if len(r["choices"]["text"]) == 3][:1]
    return four + five + three


@pytest.fixture(scope="session")
def demo_items():
    """A small real question set: 60 bundled ARC items per grade level (easy, medium, hard)."""
    import numpy as np

    from probekit.data import ItemSet, cut_levels, cutoff_for, load_dataset

    sample = load_dataset("bundled")
    codes = cut_levels(sample.table["grade"].to_numpy(), cutoff_for("arc", "grade"))
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(codes == k))[:60] for k in range(3)]))
    table = sample.table.iloc[rows].reset_index(drop=True)
    return ItemSet(sample.name, table, sample.measures, sample.prompt_template, sample.generative, sample.origin)


@pytest.fixture(scope="session")
def real_cache(demo_items, tmp_path_factory):
    """A real cache: the offline SmolLM2 model run over ``demo_items`` (middle and last layers)."""
    from probekit.extract.run import extract
    from probekit.llm import ModelSpec

    out = tmp_path_factory.mktemp("cache") / "smollm2__demo"
    extract(demo_items, out, ModelSpec(cache_root=REPO / "cache"), layers="middle_and_last", batch_size=16,
            shard_size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a small machine shared with other jobs, two OpenMP threads wait on each
    other at every op and run several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lm():
    """The real model, loaded once (converted from the GGUF into cache/models on first use)."""
    from probekit.llm.models import ModelSpec, load_model

    return load_model(ModelSpec(dtype="float32", device="cpu", cache_root=REPO / "cache"))
