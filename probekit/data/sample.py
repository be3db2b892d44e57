"""Building the ARC sample that ships inside the package (the offline demo's questions).

The sample is a reproducible selection from the annotated ARC pool: items are taken in a seeded
random order while some level of grade, difficulty or bloom is still short of its quota, then the
sample is topped up at random. Every level of the three measures therefore holds enough items for
the demo's training draws, while the questions remain a plain subset of ARC in its own format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from probekit.data.levels import cut_levels, cutoff_for
from probekit.data.sets import load_dataset

SAMPLE_MEASURES = ("grade", "difficulty", "bloom")


def select_arc_sample(data_dir: str | Path, n_items: int = 600, quota: int = 150, seed: int = 0) -> list[str]:
    """Ids of the sample: a quota per level of each sample measure, then random items up to ``n_items``."""
    table = load_dataset("arc", data_dir, holdout=False).table
    codes = np.stack([cut_levels(table[m].to_numpy(), cutoff_for("arc", m)) for m in SAMPLE_MEASURES], axis=1)
    order = np.random.default_rng(seed).permutation(len(table))
    need = np.full((len(SAMPLE_MEASURES), 3), quota)
    chosen: list[int] = []
    for row in order:
        cells = [(j, codes[row, j]) for j in range(len(SAMPLE_MEASURES))]
        if any(need[j, c] > 0 for j, c in cells):
            chosen.append(row)
            for j, c in cells:
                need[j, c] -= 1
        if (need <= 0).all():
            break
    taken = set(chosen)
    chosen += [row for row in order if row not in taken][: max(0, n_items - len(chosen))]
    return [table["id"].iloc[row] for row in sorted(chosen)]


def write_arc_sample(data_dir: str | Path, out: str | Path, **kwargs) -> int:
    """Write the sample's questions, in ARC's own JSONL layout, to ``out``; returns the item count."""
    ids = set(select_arc_sample(data_dir, **kwargs))
    source = Path(data_dir) / "arc" / "arc_all_splits.jsonl"
    lines = [line for line in source.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["id"] in ids]
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
