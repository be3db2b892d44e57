"""Model-based (MDL) hardness, docs/protocol.md §7: learning-curve probes on the hold-out pool score the probe items.

For each draw, nested training sets of sizes 5, 20, 80, 340, 900 are drawn from the hold-out items;
a probe is fitted at each size and every probe item is scored. An item's hardness is
``1 - mean p(gold)`` over draws x sizes (x feature sets), an average over the learning curve
that approximates a prequential code length. The result, ``DIR/hardness.json``, is what
``sweep(..., measures=["mdl"])`` cuts at its 30/70 percentiles.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from probekit.data.draws import rng_for, train_draw
from probekit.design import head_seed, item_frame, layer_label, open_cache
from probekit.errors import ProbekitError
from probekit.layers import feature_sets
from probekit.layers import parse as parse_layers
from probekit.probe.engine import ProbeConfig, fit_and_score, prepare
from probekit.probe.sweep import SITE_HEAD, Progress, compile_first, read_features
from probekit.store import Cache
from probekit.store.hardness import FORMAT, HARDNESS_FILE, check_hardness_target, holding_hardness, write_hardness

MDL_SIZES = (5, 20, 80, 340, 900)


def hardness(
    cache: str | os.PathLike | Cache,
    *,
    layers: str | Sequence[int] = "middle_and_last",
    site: str = "answer_end",
    sizes: Sequence[int] = MDL_SIZES,
    draws: int = 5,
    seed: int = 0,
    solver: str = "paper",
    pad: str = "mask",
    out: str | os.PathLike | None = None,
    verify: bool = True,
    devices: Sequence[jax.Device] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score every probe item's MDL hardness and write ``out`` (default ``DIR/hardness.json``).

    Returns the written record: ``{"config": ..., "mdl": {item_id: hardness}}``. Needs hold-out
    items (``pool == "holdout"``) numbering at least ``max(sizes) + 50``.

    Example:
        >>> hardness("cache/llama-2-7b__arc", layers="middle_and_last", draws=5)
    """
    t0 = time.perf_counter()
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise ProbekitError(f"hardness draws must be a positive integer, got {draws!r}")
    if out is not None:
        check_hardness_target(Path(out))  # before the fits, not after
    if site not in SITE_HEAD:
        raise ProbekitError(f"site must be answer_end or question_end, got {site!r}")
    cfg = ProbeConfig(head=SITE_HEAD[site], solver=solver, pad=pad)  # bad settings refused before the cache is read
    parse_layers(layers)
    rng_for(seed, 0, "mdl/holdout")
    root = cache.path if isinstance(cache, Cache) else Path(cache)
    if out is None and not root.is_dir():
        cache = Cache(cache)  # its one line: no such cache, or a file
    target = Path(out) if out is not None else root / HARDNESS_FILE
    with holding_hardness(target):  # the lock before the cache is verified or anything compiles
        cache = open_cache(cache, verify)
        if site not in SITE_HEAD or site not in cache.sites:
            raise ProbekitError(f"site {site!r} is not in cache {cache.path}; it holds {cache.sites}")
        dataset = str(cache.manifest.get("dataset", {}).get("name", ""))
        frame = item_frame(cache.items, dataset, [])
        sizes = sorted({int(n) for n in sizes})
        if not sizes or sizes[0] < 2:
            raise ProbekitError(f"hardness sizes must be at least 2, got {sizes}")
        if len(frame.holdout) == 0:
            raise ProbekitError(f"cache {cache.path} has no hold-out items (pool == 'holdout') to fit hardness probes on")
        sets = feature_sets(layers, cache.manifest.get("model", {}).get("n_layers"), cache.layers)
        pools = [train_draw(frame.holdout, sizes[-1], seed=seed, draw=b, key="mdl/holdout") for b in range(draws)]
        compile_first(cache, frame.n_choices, [np.stack([pool[:n] for pool in pools]) for n in sizes], [cfg], sets, devices)
        total = len(sets) * len(sizes) * draws
        done = 0
        p_sum = np.zeros(len(frame.ids))
        for fs in sets:
            label = layer_label(fs)
            Xs = prepare((read_features(cache, site, layer, frame.ids) for layer in fs), devices)
            for n in sizes:
                rows = np.stack([pool[:n] for pool in pools])
                seeds = np.array([head_seed(seed, f"mdl/{b}/{n}/{label}") for b in range(draws)])
                res = fit_and_score(Xs, frame.n_choices, frame.gold, rows, frame.gold[rows], seeds, cfg, devices=devices)
                p_sum += res.p_gold.sum(0)
                done += draws
                if progress is not None:
                    progress(done, total, label)
            del Xs
        mdl = 1.0 - p_sum / total
        record = {
            "format": FORMAT,
            "cache_manifest_sha256": cache.manifest_sha256,
            "config": {"layers": [layer_label(s) for s in sets], "site": site, "sizes": sizes, "draws": draws,
                       "seed": seed, "solver": solver, "pad": pad, "holdout_items": int(len(frame.holdout))},
            "seconds": round(time.perf_counter() - t0, 3),
            "mdl": {str(frame.ids[i]): float(mdl[i]) for i in frame.probe},
        }
        write_hardness(target, record)
        return record
