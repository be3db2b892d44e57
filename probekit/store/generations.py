"""Generation folders (``probekit generate``): every generated chain of thought, kept per unit.

Folder layout::

    DIR/generate.json                 header: format, model, dataset, prompts, configuration
    DIR/gen-{condition}-{draw:03d}.parquet
                                      one file per unit (a condition, ``zero_shot`` or the level the
                                      demonstrations come from, and a draw), one row per test item:
                                      :data:`SCHEMA`
    DIR/log-{condition}-{draw:03d}.json
                                      a fine-tuned unit's training log (updates, the loss of every
                                      update, seconds), written just before its unit file
    DIR/results.parquet, DIR/sweep.json
                                      the scores in the common results contract
                                      (:mod:`probekit.store.results`), rebuilt from the unit files

A unit file is written to a temporary name, fsynced and renamed (:class:`OutputDir`), so a kill
loses at most the unit being generated; a rerun with the same header skips the units that have a
file, and refuses a folder whose header differs. The folder is locked while written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probekit.errors import ProbekitError
from probekit.store.outdir import OutputDir, is_temporary
from probekit.store.results import CONFIG, RESULTS

FORMAT = "probekit-generations/1"
HEADER = "generate.json"
SCHEMA = pa.schema([
    ("item_id", pa.string()), ("condition", pa.string()), ("draw", pa.int32()), ("prompt_sha256", pa.string()),
    ("prompt_tokens", pa.int32()), ("text", pa.string()), ("new_tokens", pa.int32()), ("stopped", pa.string()),
    ("answer", pa.string()), ("gold", pa.string()), ("correct", pa.int8()),
])
_UNIT = re.compile(r"^gen-([a-z_]+)-(\d{3,})\.parquet$")
_LOG = re.compile(r"^log-([a-z_]+)-(\d{3,})\.json$")


def unit_name(condition: str, draw: int) -> str:
    """File name of one unit: ``gen-easy-002.parquet``."""
    return f"gen-{condition}-{draw:03d}.parquet"


def log_name(condition: str, draw: int) -> str:
    """File name of one unit's training log: ``log-tuned_easy-000.json``."""
    return f"log-{condition}-{draw:03d}.json"


def is_generation_entry(name: str) -> bool:
    """Whether a directory entry can belong to a generation folder (files, locks, temporaries)."""
    if name in (HEADER, RESULTS, CONFIG, ".lock", "parts") or _UNIT.match(name) or _LOG.match(name):
        return True
    return name.startswith((".gen-", ".log-", f".{HEADER}.", f".{RESULTS}.", ".part.parquet.")) and ".tmp" in name


class GenerationsWriter:
    """``with GenerationsWriter(out, header) as w: w.pending(units); w.write_unit(...)``.

    Holds the folder's lock (shared with writers of this process, e.g. the results writer), and
    refuses a folder whose ``generate.json`` differs from ``header``.
    """

    def __init__(self, out: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self.out = Path(out)
        self.header = json.loads(json.dumps({"format": FORMAT, **header}, default=str))
        self._dir = OutputDir(self.out, (HEADER,), "generation folder", own=is_generation_entry, share=True)

    def __enter__(self) -> GenerationsWriter:
        self._dir.__enter__()
        try:
            for entry in os.listdir(self.out):
                if entry.startswith(".gen-") and is_temporary(entry, entry[1:].split(".parquet")[0] + ".parquet"):
                    (self.out / entry).unlink(missing_ok=True)  # a killed run's unit in flight
                elif entry.startswith(".log-") and is_temporary(entry, entry[1:].split(".json")[0] + ".json"):
                    (self.out / entry).unlink(missing_ok=True)
            recorded = read_header(self.out)
            if recorded is not None and recorded != self.header:
                keys = sorted(k for k in set(recorded) | set(self.header) if recorded.get(k) != self.header.get(k))
                raise ProbekitError(f"generation folder {self.out} holds another run (it differs in {', '.join(keys)}); "
                                    "choose another --out or delete it")
        except BaseException as exc:
            self._dir.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._dir.__exit__(exc_type, exc, tb)

    def has_unit(self, condition: str, draw: int) -> bool:
        return (self.out / unit_name(condition, draw)).is_file()

    def write_unit(self, condition: str, draw: int, rows: Mapping[str, Any], log: Mapping[str, Any] | None = None) -> Path:
        """Write one unit's rows (columns of :data:`SCHEMA`) atomically, after its training ``log``
        (a fine-tuned unit's), so a unit file always has its log."""
        if read_header(self.out) is None:  # written with the first unit: a run that fails earlier leaves nothing
            self._dir.write_json(HEADER, self.header)
        if log is not None:
            self._dir.write_json(log_name(condition, draw), json.loads(json.dumps(log, default=str)))
        name = unit_name(condition, draw)
        table = pa.Table.from_pydict({f.name: rows[f.name] for f in SCHEMA}, schema=SCHEMA)
        tmp = self._dir.temp(name)
        pq.write_table(table, tmp, compression="zstd")
        return self._dir.commit(tmp, name)


def read_header(folder: str | os.PathLike) -> dict | None:
    """``generate.json`` of a folder, or None when there is none."""
    path = Path(folder) / HEADER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"cannot read {path}: {exc}") from None


def read_logs(folder: str | os.PathLike) -> dict[str, dict]:
    """The training logs of a generation folder's finished units: ``{"tuned_easy/0": {...}}``."""
    root = Path(folder)
    out = {}
    for path in sorted(root.glob("log-*.json")):
        m = _LOG.match(path.name)
        if m and (root / unit_name(m.group(1), int(m.group(2)))).is_file():
            try:
                out[f"{m.group(1)}/{int(m.group(2))}"] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ProbekitError(f"cannot read {path}: {exc}") from None
    return out


def read_generations(folder: str | os.PathLike) -> pd.DataFrame:
    """Every finished unit of a generation folder as one frame (:data:`SCHEMA` columns), in file order."""
    root = Path(folder)
    if not root.is_dir():
        raise ProbekitError(f"generation folder not found: {root}")
    files = sorted(p for p in root.iterdir() if _UNIT.match(p.name))
    frames = []
    for path in files:
        try:
            frames.append(pq.read_table(path, schema=SCHEMA).to_pandas())
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise ProbekitError(f"cannot read {path} ({str(exc).splitlines()[0]}); delete it and rerun") from None
    if not frames:
        return SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)
