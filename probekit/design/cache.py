"""Opening a cache for a run on it: the cache verified, its item table and the measures to cut.

Every method that runs on a cache (the probe sweep, MDL hardness, fine-tuning) opens it here, so a
cache is checked the same way whichever command reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from probekit.errors import ProbekitError
from probekit.store import Cache
from probekit.store.hardness import HARDNESS_FILE, MDL, read_mdl


def open_cache(cache: str | os.PathLike | Cache, verify: bool = True) -> Cache:
    """The cache, with every shard's hash and shapes checked first when ``verify``.

    A shard unchanged (size, mtime, inode) since its last full hash is not hashed again (see
    :mod:`probekit.store.stamp`); ``probekit info CACHE --verify`` hashes every shard."""
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    if verify:
        problems = cache.verify(since_stamp=True)
        if problems:
            raise ProbekitError(f"cache {cache.path} fails verification: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return cache


def load_items(cache: Cache, measures: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """The cache's item table plus the ``mdl`` column when asked for; the measures to use."""
    items = cache.items.copy()
    known = list(cache.measures) + [MDL]
    chosen = list(measures) if measures else list(cache.measures)
    twice = sorted({m for m in chosen if chosen.count(m) > 1})
    if twice:
        raise ProbekitError(f"measures list {', '.join(repr(m) for m in twice)} more than once: name each once")
    for m in chosen:
        if m not in known:
            raise ProbekitError(f"unknown measure {m!r}: the cache has {', '.join(known)}")
    if MDL in chosen:
        path = cache.path / HARDNESS_FILE
        if not path.is_file():
            raise ProbekitError(f"measure 'mdl' needs {path}: run `probekit hardness {cache.path}` first")
        scores = read_mdl(path)
        items[MDL] = items["id"].astype(str).map(scores).astype(float)
    return items, chosen
