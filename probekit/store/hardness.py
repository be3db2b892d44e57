"""Model-based hardness scores: ``hardness.json`` (by default in the cache directory).

``{"format": "probekit-hardness/1", "cache_manifest_sha256": ..., "config": {...}, "seconds": ...,
"mdl": {item_id: hardness}}``, written by ``probekit hardness`` (:func:`write_hardness`) and read
by ``sweep --measures mdl`` (:func:`read_mdl`). The file is written under a unique temporary
name and renamed, while holding a lock on ``.hardness.json.lock`` beside it, taken when the
command starts (:func:`holding_hardness`; a second writer of the same file is refused with one line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from probekit.errors import ProbekitError
from probekit.store.outdir import OutputDir

FORMAT = "probekit-hardness/1"
HARDNESS_FILE = "hardness.json"
MDL = "mdl"


def check_hardness_target(path: Path) -> None:
    """Refuse a hardness output path that is a directory, or whose parent is a file."""
    if path.is_dir():
        raise ProbekitError(f"hardness output {path} is a directory; give a file path such as {path / HARDNESS_FILE}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ProbekitError(f"hardness output {path}: {parent} is a file, not a folder")


@contextmanager
def holding_hardness(path: str | os.PathLike, exclusive: bool = True) -> Iterator[OutputDir]:
    """Hold the lock of hardness file ``path`` for the block, from the start of a command (folders
    created as needed, and removed again if the block fails before the file is written); a second
    writer of the same file is refused with one line, and :func:`write_hardness` inside shares it
    (``exclusive=False``: a writer inside a holder of this process)."""
    path = Path(path)
    check_hardness_target(path)
    with OutputDir(path.parent, (path.name,), f"hardness scores {path.name} in", lock_file=f".{path.name}.lock",
                   share=True, exclusive=exclusive) as d:
        yield d


def write_hardness(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to ``path`` atomically under the file's lock (folders created as needed);
    returns the path."""
    path = Path(path)
    with holding_hardness(path, exclusive=False) as d:
        d.write_json(path.name, dict(record), indent=1, allow_nan=True)
    return path


def read_mdl(path: str | os.PathLike) -> dict[str, float]:
    """The ``mdl`` scores (item id -> hardness) of a hardness file, or one line saying what is wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"cannot read {path} ({exc}); rerun `probekit hardness`") from None
    scores = record.get(MDL) if isinstance(record, dict) else None
    if not isinstance(scores, dict):
        raise ProbekitError(f"{path} holds no '{MDL}' scores; rerun `probekit hardness`")
    return scores
