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

Several ranks (``world_size > 1``) write one folder with the parts of :mod:`probekit.store.parts`:
rank r holds ``.lock-rank{r}`` and writes its whole units as above, or its slice j of s of a unit
(when there are fewer units than ranks) as ``DIR/parts/gen-{condition}-{draw:03d}.{j}-of-{s}.parquet``
(and its training log as ``.json`` beside it); under the merge lock, a unit whose slices are all
there becomes its unit file (:meth:`GenerationsWriter.merge_unit`: the rows in the order of the
header's test ids, as one process writes them) and its slices are deleted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probekit.errors import ProbekitError
from probekit.store.outdir import OutputDir, is_temporary, read_json, remove_temporaries
from probekit.store.parts import PART, RankParts
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
_LOCKS = re.compile(r"^\.(lock|lock-rank\d+|results\.lock)$")


def unit_name(condition: str, draw: int) -> str:
    """File name of one unit: ``gen-easy-002.parquet``."""
    return f"gen-{condition}-{draw:03d}.parquet"


def log_name(condition: str, draw: int) -> str:
    """File name of one unit's training log: ``log-tuned_easy-000.json``."""
    return f"log-{condition}-{draw:03d}.json"


def is_generation_entry(name: str) -> bool:
    """Whether a directory entry can belong to a generation folder (files, locks, temporaries)."""
    if name in (HEADER, RESULTS, CONFIG, "parts") or _LOCKS.match(name) or _UNIT.match(name) or _LOG.match(name):
        return True
    if re.match(rf"^\.rank\d+\.{re.escape(PART)}\.", name):  # a rank's part in flight
        return ".tmp" in name
    return name.startswith((".gen-", ".log-", f".{HEADER}.", f".{RESULTS}.", f".{PART}.")) and ".tmp" in name


def slice_key(condition: str, draw: int, j: int, s: int) -> str:
    """The part key of slice ``j`` of ``s`` of one unit: ``gen-easy-002.0-of-2``."""
    return f"{unit_name(condition, draw)[:-len('.parquet')]}.{j}-of-{s}"


class GenerationsWriter:
    """``with GenerationsWriter(out, header) as w: w.has_unit(...); w.write_unit(...)``.

    Holds the folder's lock (shared with writers of this process, e.g. the results writer), and
    refuses a folder whose ``generate.json`` differs from ``header``. With ``world_size > 1`` it is
    rank ``rank``'s writer (the module docstring): its own lock, slices, the merge.
    """

    def __init__(self, out: str | os.PathLike, header: Mapping[str, Any], rank: int = 0, world_size: int = 1) -> None:
        self.out = Path(out)
        self.header = json.loads(json.dumps({"format": FORMAT, **header}, default=str))
        self.rank, self.world_size = rank, world_size
        self.parts: RankParts | None = None
        if world_size == 1:
            self._dir = OutputDir(self.out, (HEADER,), "generation folder", own=is_generation_entry, share=True)
        else:
            self.parts = RankParts(self.out, rank, world_size, "generation folder", own=is_generation_entry, share=True)
            self._dir = self.parts.dir

    def __enter__(self) -> GenerationsWriter:
        self._dir.__enter__()
        try:
            if self.parts is None:
                for entry in os.listdir(self.out):
                    if entry.startswith(".gen-") and is_temporary(entry, entry[1:].split(".parquet")[0] + ".parquet"):
                        (self.out / entry).unlink(missing_ok=True)  # a killed run's unit in flight
                    elif entry.startswith(".log-") and is_temporary(entry, entry[1:].split(".json")[0] + ".json"):
                        (self.out / entry).unlink(missing_ok=True)
                self._check_header()
            else:  # other ranks write beside us: only our own leftovers go (the rank's part temporaries)
                with self.parts.merging():
                    self._check_header()
                self.parts.start()
        except BaseException as exc:
            self._dir.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._dir.__exit__(exc_type, exc, tb)

    def _check_header(self) -> bool:
        """Whether ``generate.json`` is there; raise when it is another run's."""
        recorded = read_header(self.out)
        if recorded is not None and recorded != self.header:
            keys = sorted(k for k in set(recorded) | set(self.header) if recorded.get(k) != self.header.get(k))
            raise ProbekitError(f"generation folder {self.out} holds another run (it differs in {', '.join(keys)}); "
                                "choose another --out or delete it")
        return recorded is not None

    def _write_header(self, merging: bool = False) -> None:
        """``generate.json``, written with the first unit or slice (a run that fails earlier leaves
        nothing), and checked again before every later one. Several ranks read and write it under the
        merge lock (``merging``: already held)."""
        if self.parts is None or merging:
            if not self._check_header():
                self._dir.write_json(HEADER, self.header)
            return
        with self.parts.merging():
            self._write_header(merging=True)

    def has_unit(self, condition: str, draw: int) -> bool:
        return (self.out / unit_name(condition, draw)).is_file()

    def write_unit(self, condition: str, draw: int, rows: Mapping[str, Any], log: Mapping[str, Any] | None = None,
                   merging: bool = False) -> Path:
        """Write one unit's rows (columns of :data:`SCHEMA`) atomically, after its training ``log``
        (a fine-tuned unit's), so a unit file always has its log (``merging``: the merge lock is held)."""
        self._write_header(merging)
        name = unit_name(condition, draw)
        if self.parts is not None:  # only this rank writes this unit: its leftovers of a killed attempt go
            remove_temporaries(self.out, [name, log_name(condition, draw)])
        if log is not None:
            self._dir.write_json(log_name(condition, draw), json.loads(json.dumps(log, default=str)))
        table = pa.Table.from_pydict({f.name: rows[f.name] for f in SCHEMA}, schema=SCHEMA)
        tmp = self._dir.temp(name)
        pq.write_table(table, tmp, compression="zstd")
        return self._dir.commit(tmp, name)

    # ----- several ranks: slices of a unit, the merge -----------------------------------------------
    def has_slice(self, condition: str, draw: int, j: int, s: int) -> bool:
        return self.parts is not None and self.parts.has(slice_key(condition, draw, j, s))

    def write_slice(self, condition: str, draw: int, j: int, s: int, rows: Mapping[str, Any],
                    log: Mapping[str, Any] | None = None) -> None:
        """Write slice ``j`` of ``s`` of one unit (its rows, after its training ``log``) as a part."""
        self._write_header()
        key = slice_key(condition, draw, j, s)
        if log is not None:
            self.parts.write_json(key, log)
        self.parts.write(key, pa.Table.from_pydict({f.name: rows[f.name] for f in SCHEMA}, schema=SCHEMA))

    def merge_unit(self, condition: str, draw: int, s: int,
                   merge_logs: Callable[[list[dict]], dict] | None = None) -> bool:
        """Hold :meth:`merging` around this. When every slice of the unit is written, write the unit
        file (the rows in the order of the header's test ids; the log ``merge_logs`` makes of the
        slices' logs, when they have any) and delete the slices. Returns whether the unit file exists."""
        keys = [slice_key(condition, draw, j, s) for j in range(s)]
        if not self.has_unit(condition, draw):
            if not all(self.parts.has(k) for k in keys):
                return False
            table = pa.concat_tables([self.parts.read(k, SCHEMA) for k in keys])
            order = {i: n for n, i in enumerate(self.header["test_ids"])}
            ids = table.column("item_id").to_pylist()
            rows = table.take(sorted(range(table.num_rows), key=lambda r: order[ids[r]]))
            logs = [x for x in (self.parts.read_json(k) for k in keys) if x is not None]
            log = (merge_logs(logs) if merge_logs is not None else logs[0]) if logs else None
            self.write_unit(condition, draw, rows.to_pydict(), log, merging=True)
        self.parts.remove(keys)
        return True

    def merging(self):
        """The merge lock of several ranks (:meth:`probekit.store.parts.RankParts.merging`)."""
        return self.parts.merging()

    def remove_leftovers(self, units: Sequence[tuple[str, int]]) -> None:
        """Hold :meth:`merging` around this, once every unit is written: delete temporaries killed
        writers left of ``generate.json`` and of the units and their logs."""
        remove_temporaries(self.out, [HEADER, *(unit_name(c, b) for c, b in units), *(log_name(c, b) for c, b in units)])


def read_header(folder: str | os.PathLike) -> dict | None:
    """``generate.json`` of a folder, or None when there is none."""
    return read_json(Path(folder) / HEADER)


def read_logs(folder: str | os.PathLike) -> dict[str, dict]:
    """The training logs of a generation folder's finished units: ``{"tuned_easy/0": {...}}``."""
    root = Path(folder)
    out = {}
    for path in sorted(root.glob("log-*.json")):
        m = _LOG.match(path.name)
        if m and (root / unit_name(m.group(1), int(m.group(2)))).is_file():
            out[f"{m.group(1)}/{int(m.group(2))}"] = read_json(path)
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
