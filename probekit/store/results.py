"""The results table of a run: ``RES/results.parquet`` plus ``RES/sweep.json``.

Every method that scores items (the probe sweep, and any later method) writes through
:class:`ResultsWriter`; the report reads through :func:`read_results`.

``results.parquet`` has one row per (head, test item), in :data:`SCHEMA` (text columns
dictionary-encoded). Build row batches with :class:`ResultRows`. ``zero_weights`` (bool) marks the
rows of heads whose exact optimum has zero weights; a reader fills it with False for tables
written without it. ``n_choices`` is the test item's number of answer choices (what a head that scores
every choice alike expects to get right: 1 / n_choices), 0 where it has none (free-text answers) or
for tables written without it. ``method`` names a method of the registry
(:data:`probekit.methods.METHODS`): a table naming another is refused when it is committed and when
it is read. Only the rows of a method with a probe head carry a ``site``, ``layer`` and ``solver``;
every other method's rows leave them empty (tables of earlier versions, whose rows of other methods
held the method's name there, are read with them emptied). ``sweep.json`` holds the run's
:class:`RunRecord` (one shape for every kind of run, checked when it is committed; an older
``sweep.json`` is read into the same shape); the writer adds :data:`RESULTS_FILE_KEY` =
``{"name", "bytes", "sha256"}`` of the results file it belongs to.

Writing is safe against a second writer and against crashes:

- The writer holds the directory's lock (:class:`probekit.store.outdir.OutputDir`, the mechanism
  the cache uses); a second writer into the same directory is refused with one line. Leftover
  temporaries of a killed writer are removed by the next one.
- Rows stream into a temporary file under a unique name. The commit then (1) deletes the old
  ``sweep.json``, (2) renames the finished table to ``results.parquet``, (3) writes the new
  ``sweep.json`` with the table's sha256 and size, each step fsynced. A crash at any point leaves
  either the old pair, a table without ``sweep.json``, or the new pair: never new results beside
  an old configuration.
- A resumable run (``run=`` given; ``probekit finetune``) writes each finished piece as a part
  (:meth:`ResultsWriter.write_part`) and may run as several ranks (processes) at once, with the
  parts, per-rank locks and merge lock of :mod:`probekit.store.parts`: :meth:`ResultsWriter.merge`
  builds ``results.parquet`` from the parts under the merge lock once every part is there, so
  whichever rank finishes last merges. Under several ranks, each records its counts in
  ``parts/rank-R-of-W.json`` first.
- A command holds its results directory from its start (:func:`holding_results`, before a cache
  is verified, a model loads or anything compiles); the writer inside shares that lock. A
  directory holding files that are not part of a results directory, or the results of another
  kind of run (a probe sweep, a fine-tuning run, a generation run: :func:`run_kind`), is refused
  in one line before anything is written.
- :func:`read_results` refuses a directory without ``sweep.json``, hashes the bytes it parses and
  refuses a table whose size or sha256 differs from the record in ``sweep.json`` (a swapped or
  rewritten file); a ``sweep.json`` without the record (written by hand or by an older version) is
  read without that check. Every table read is checked against the values the contract allows
  (:func:`check_values`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probekit.errors import ProbekitError
from probekit.methods import METHODS, method
from probekit.store.layout import lock_name, sha256_file
from probekit.store.outdir import LOCK, OutputDir, is_temporary, remove_temporaries, write_error
from probekit.store.parts import MERGE_LOCK, PARTS, RankParts
from probekit.store.parts import PART as _PART

FORMAT = "probekit-sweep/1"
RESULTS = "results.parquet"
CONFIG = "sweep.json"
#: The one key of ``sweep.json`` that holds the sha256 of the cache manifest the run read.
CACHE_HASH_KEY = "cache_manifest_sha256"
#: The key of ``sweep.json`` that records the results file it belongs to.
RESULTS_FILE_KEY = "results_file"

_STR = pa.dictionary(pa.int32(), pa.string())
SCHEMA = pa.schema([
    ("experiment", _STR), ("site", _STR), ("layer", _STR), ("measure", _STR), ("train_level", _STR),
    ("draw", pa.int32()), ("n_train", pa.int32()), ("label_noise", pa.float64()), ("solver", _STR),
    ("item_id", _STR), ("test_level", _STR), ("correct", pa.int8()), ("p_gold", pa.float32()),
    ("method", _STR),
    ("zero_weights", pa.bool_()),
    ("n_choices", pa.int16()),
])
COLUMNS = tuple(SCHEMA.names)
#: Columns a reader fills when a table lacks them (tables written before they existed): name -> value,
#: or a function of the table (``method``: :func:`method_of` its train level and site).
FILLED = {
    "method": lambda t: method_of(t["train_level"].astype(str), t["site"].astype(str)),
    "zero_weights": lambda t: False,
    "n_choices": lambda t: 0,
}
#: Columns a results table must have to be read (``p_gold`` is optional).
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c != "p_gold" and c not in FILLED)

#: The experiments a row can come from (the ``experiment`` column; :func:`probekit.design.plan.plan`).
EXPERIMENTS = ("population", "all_to_all", "learning_curve", "label_noise")
#: The kinds of run that write a results directory (:func:`run_kind`), in words.
RUN_KINDS = {"sweep": "a probe sweep", "finetune": "a fine-tuning run", "generate": "a generation run"}
#: Training levels a row can have besides the levels of a measure: every probe item, zero-shot.
TRAIN_LEVELS_EXTRA = ("all", "zero_shot")
#: The training level of ICL rows whose demonstrations come from another question set, ``arc:grade:easy``
#: or ``arc:all``, or were cut by another rule, ``easy@grade=3,8`` or ``arc:grade@3,8:easy``
#: (:func:`probekit.store.icl_scores.demo_level`).
_OTHER_SET_LEVEL = re.compile(r"^([^:\s]+:(all|[^:\s@]+(@[^:\s]+)?:(easy|medium|hard))"
                              r"|(easy|medium|hard)@[^=\s]+=[^\s]+)$")
#: The test levels a row can have ("" for an item whose level is unknown).
TEST_LEVELS = ("easy", "medium", "hard", "")


def method_of(train_level: Any, site: Any) -> Any:
    """The ``method`` of rows of tables written before the column existed: ``zero_shot`` for zero-shot
    rows, ``icl`` for rows of site "icl" (where those tables put ICL rows), else ``probe``. Works on
    scalars and on arrays/Series."""
    level, where = np.asarray(train_level, dtype=object), np.asarray(site, dtype=object)
    out = np.where(level == "zero_shot", "zero_shot", np.where(where == "icl", "icl", "probe"))
    return out.item() if out.ndim == 0 else out


def without_method_heads(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``site`` and ``solver`` emptied in the rows of methods without a probe head.

    Tables of earlier versions wrote the method's name there (ICL rows: site and solver "icl";
    fine-tuning rows: site "finetune", solver "lora"; chain-of-thought rows: site "cot", solver
    "cot" or "lora"; zero-shot rows: the sweep's site, solver "zero_shot"); a table written now
    has them empty already and is returned as it is."""
    headless = [name for name, m in METHODS.items() if not m.probe_head]
    rows = np.asarray(table["method"].astype(str).isin(headless), dtype=bool)
    if not rows.any():
        return table
    out = table.copy(deep=False)
    for column in ("site", "solver"):
        values = out[column]
        if not (values[rows].astype(str) != "").any():
            continue
        if isinstance(values.dtype, pd.CategoricalDtype):
            values = values.cat.add_categories([""]) if "" not in values.cat.categories else values.copy()
            values[rows] = ""
            out[column] = values.cat.remove_unused_categories()
        else:
            out[column] = values.where(~rows, "")
    return out


#: The ``site`` of the shortcut controls' rows (:mod:`probekit.probe.controls`): a probe on the choices'
#: surface features, and the training draw's majority position. Never a headline head.
SURFACE_SITE = "surface"
MAJORITY_SITE = "majority"
CONTROL_SITES = (SURFACE_SITE, MAJORITY_SITE)
#: The ``solver`` of each control's rows: the surface probe is fitted by the ``converged`` solver.
SURFACE_SOLVER = "converged"
MAJORITY_SOLVER = "majority"
CONTROL_HEADS = ((SURFACE_SITE, SURFACE_SOLVER), (MAJORITY_SITE, MAJORITY_SOLVER))
#: The text (dictionary-encoded) columns.
TEXT_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_dictionary(f.type))


def is_results_entry(name: str) -> bool:
    """Whether a directory entry can be part of a results directory (files, parts, locks, temporaries)."""
    if name in (RESULTS, CONFIG, PARTS, LOCK, MERGE_LOCK) or re.fullmatch(r"\.lock-rank\d+", name):
        return True
    return is_temporary(name, RESULTS) or is_temporary(name, CONFIG) or (
        name.startswith(".") and f"{_PART}." in name and name.endswith(".tmp"))


def run_kind(config: Mapping[str, Any] | None) -> str | None:
    """What wrote a results directory, by its ``sweep.json``: ``"generate"``, ``"finetune"`` or
    ``"sweep"`` (:data:`RUN_KINDS`); None without a configuration. A ``sweep.json`` of an earlier
    version, without ``kind``, is told by what it holds: a generation run's ``format_of``, a
    fine-tuning run's ``method`` or ``run``."""
    if not isinstance(config, Mapping):
        return None
    if "kind" in config:
        return str(config["kind"])
    if config.get("format_of") == "probekit generate":
        return "generate"
    if config.get("method") == "finetune" or "run" in config:
        return "finetune"
    return "sweep"


@dataclass(frozen=True)
class RunRecord:
    """``sweep.json``: what a run did, in one shape for every kind of run (:data:`RUN_KINDS`).

    ``kind``: what wrote the directory (``sweep``, ``finetune``, ``generate``). ``dataset``: the
    question set's name; ``dataset_fingerprint`` its fingerprint where the run checked one; ``model``
    and ``prompt``: the model's identity and the prompt as the run used them (the cache's for a run
    on a cache); ``cache`` and ``cache_manifest_sha256`` (:data:`CACHE_HASH_KEY`): the cache a run
    read, None for a run without one. ``config``: the kind's settings; ``seed``: the seed of its
    draws; ``counts``: what it did (``rows``: the results table's rows, and the kind's own counts).
    ``details``: the kind's further entries (timings, devices, ranks, losses, cross-validation
    paths), written after ``counts``.

    :meth:`to_json` is what ``sweep.json`` holds (the optional entries only when set);
    :meth:`from_json` reads one back, an earlier version's too (:func:`run_kind`; a generation
    run's settings were under ``generate``), into this shape. The record is checked
    (:meth:`check`) when it is committed.
    """

    kind: str
    dataset: str
    model: dict
    prompt: dict
    config: dict
    seed: int | None
    counts: dict
    cache: str | None = None
    cache_manifest_sha256: str | None = None
    dataset_fingerprint: str | None = None
    details: dict = field(default_factory=dict)
    format: str = FORMAT

    _ORDER = ("format", "kind", "cache", CACHE_HASH_KEY, "dataset", "dataset_fingerprint", "model", "prompt",
              "config", "seed", "counts")
    _OPTIONAL = ("cache", CACHE_HASH_KEY, "dataset_fingerprint")

    def check(self) -> None:
        """Refuse a record whose entries do not have their types, in one line naming the entry."""
        def refuse(name: str, rule: str) -> None:
            raise ProbekitError(f"{CONFIG}: {name} must be {rule}, got {getattr(self, name, None)!r}")

        if self.format != FORMAT:
            refuse("format", repr(FORMAT))
        if self.kind not in RUN_KINDS:
            refuse("kind", f"one of {', '.join(RUN_KINDS)}")
        if not isinstance(self.dataset, str):
            refuse("dataset", "a question set's name")
        for name in ("model", "prompt", "config", "counts", "details"):
            if not isinstance(getattr(self, name), dict):
                refuse(name, "a JSON object")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            refuse("seed", "a non-negative integer or None")
        for name in ("cache", "cache_manifest_sha256", "dataset_fingerprint"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                refuse(name, "a string or None")
        clash = sorted(set(self.details) & {*self._ORDER, "run", RESULTS_FILE_KEY})
        if clash:
            raise ProbekitError(f"{CONFIG}: details may not hold {clash[0]!r}, an entry of the record itself")

    def to_json(self) -> dict[str, Any]:
        """The record as ``sweep.json`` holds it (optional entries only when set), checked first."""
        self.check()
        out = {}
        for key in self._ORDER:
            value = getattr(self, "cache_manifest_sha256" if key == CACHE_HASH_KEY else key)
            if value is not None or key not in self._OPTIONAL:
                out[key] = value
        return {**out, **self.details}

    @classmethod
    def from_json(cls, config: Mapping[str, Any], path: str | os.PathLike = CONFIG) -> RunRecord:
        """The record of a ``sweep.json`` (without its results-file record), an earlier version's too;
        a record that does not hold is refused in one line naming ``path``."""
        raw = dict(config)
        kind = run_kind(raw)
        raw.pop("kind", None)
        raw.pop("run", None)
        raw.pop(RESULTS_FILE_KEY, None)
        if kind == "generate" and "format_of" in raw:  # earlier generation runs: settings under "generate"
            raw.pop("format_of")
            raw["config"] = raw.pop("generate", {})
            raw.setdefault("seed", raw["config"].get("seed"))
        if kind == "finetune" and raw.get("method") == "finetune":
            raw.pop("method")
        values = {f.name: raw.pop(f.name, None) for f in fields(cls) if f.name not in ("kind", "details")}
        record = cls(
            kind=kind, dataset=values["dataset"] or "", model=values["model"] or {}, prompt=values["prompt"] or {},
            config=values["config"] or {}, seed=values["seed"], counts=values["counts"] or {},
            cache=values["cache"], cache_manifest_sha256=values["cache_manifest_sha256"],
            dataset_fingerprint=values["dataset_fingerprint"], details=raw, format=values["format"] or FORMAT,
        )
        try:
            record.check()
        except ProbekitError as exc:
            raise ProbekitError(f"{path}: {str(exc).removeprefix(CONFIG + ': ')}") from None
        return record


def refuse_other_run(out: str | os.PathLike, kind: str, what: str = "results directory") -> None:
    """One line when ``out`` holds the results of another kind of run than ``kind``."""
    if not Path(out).is_dir():
        return
    found = run_kind(read_config(out))
    if found is not None and found != kind:
        raise ProbekitError(f"{what} {out} holds another run ({RUN_KINDS[found]}'s results); "
                            "choose another --out or delete it")


@contextmanager
def holding_results(out: str | os.PathLike, kind: str, rank: int | None = None) -> Iterator[OutputDir]:
    """Hold results directory ``out`` for the block, from the start of a command of ``kind``
    (:data:`RUN_KINDS`): refuses a directory of unrelated files, one another process is writing
    (``rank``: a resumable run's per-rank lock) and one holding another kind of run, in one line.
    A :class:`ResultsWriter` inside the block shares the lock; a directory created here is removed
    again when the block fails before anything was committed into it."""
    lock = LOCK if rank is None else lock_name(rank)
    refuse_other_run(out, kind)  # before a lock file is made in another run's directory
    with OutputDir(out, (), "results directory", lock_file=lock, own=is_results_entry, share=True,
                   exclusive=True) as held:
        refuse_other_run(out, kind)  # and again, now that no other writer can change it
        yield held


def check_head(name: str, site: str, layer: str, solver: str) -> None:
    """Refuse rows of an unregistered method, and a site, layer or solver on the rows of a method
    without a probe head (:attr:`probekit.methods.Method.probe_head`), in one line."""
    if not method(name).probe_head and (site or layer or solver):
        raise ProbekitError(f"rows of method {name!r} carry no site, layer or solver (it has no probe head); got "
                            f"site {site!r}, layer {layer!r}, solver {solver!r}")


def check_methods(table: pa.Table) -> None:
    """Refuse a :data:`SCHEMA` table naming a method the registry does not hold, in one line."""
    names = {name for chunk in table.column("method").chunks for name in chunk.dictionary.to_pylist()}
    for name in sorted(names):
        method(name)


class ResultRows:
    """Builds :data:`SCHEMA` batches of one experiment at one site; counts the rows built.

    ``item_ids`` are the items rows point into; ``level_names`` the names of test-level codes
    0, 1, ... (a negative code is an unknown level, written as ""); ``n_choices`` each item's number
    of answer choices (None: free-text items, 0).
    """

    def __init__(self, experiment: str, site: str, item_ids: Sequence[str], level_names: Sequence[str],
                 n_choices: Sequence[int] | None = None) -> None:
        self.experiment, self.site = experiment, site
        self.item_dict = pa.array(item_ids, pa.string())
        self.n_choices = (np.zeros(len(item_ids), np.int16) if n_choices is None
                          else np.asarray(n_choices).astype(np.int16))
        self.level_names = list(level_names) + [""]
        self.n_rows = 0

    @staticmethod
    def _const(value: str, n: int) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))

    def _levels(self, codes: np.ndarray) -> pa.DictionaryArray:
        idx = np.where(codes < 0, len(self.level_names) - 1, codes).astype(np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(idx), pa.array(self.level_names, pa.string()))

    def table(self, *, method: str, layer: str, measure: str, train_level: str, draw: int, n_train: int,
              noise: float, solver: str, rows: np.ndarray, test_levels: np.ndarray, correct: np.ndarray,
              p_gold: np.ndarray, zero_weights: bool = False) -> pa.Table:
        """Rows for test items ``rows`` (indices into ``item_ids``) of one head of ``method`` (a name of
        :data:`probekit.methods.METHODS`; a method without a probe head takes no site, layer or solver);
        ``zero_weights``: the head's exact optimum has zero weights
        (:func:`probekit.probe.solvers.zero_is_optimal`)."""
        check_head(method, self.site, layer, solver)
        n = len(rows)
        self.n_rows += n
        cols = [
            self._const(self.experiment, n), self._const(self.site, n), self._const(layer, n),
            self._const(measure, n), self._const(train_level, n),
            pa.array(np.full(n, draw, np.int32)), pa.array(np.full(n, n_train, np.int32)),
            pa.array(np.full(n, noise, np.float64)), self._const(solver, n),
            pa.DictionaryArray.from_arrays(pa.array(rows.astype(np.int32)), self.item_dict),
            self._levels(test_levels), pa.array(correct.astype(np.int8)), pa.array(p_gold.astype(np.float32)),
            self._const(method, n),
            pa.array(np.full(n, bool(zero_weights))),
            pa.array(self.n_choices[rows]),
        ]
        return pa.Table.from_arrays(cols, schema=SCHEMA)


class ResultsWriter:
    """Writes a results directory: ``with ResultsWriter(out) as w: w.append(t); ...; w.commit(cfg)``.

    Tables are gathered into row groups of about ``row_group`` rows (few row groups for readers,
    bounded memory for the writer). Nothing is committed unless :meth:`commit` is called; an
    exception in the block leaves the directory as it was (and removes it if this writer
    created it). See the module docstring for the lock and the commit order.
    """

    def __init__(self, out: str | os.PathLike, row_group: int = 1 << 16,
                 run: Mapping[str, Any] | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.out = Path(out)
        self.row_group = row_group
        self.run = None if run is None else json.loads(json.dumps(run, default=str))
        self.rank, self.world_size = rank, world_size
        self._parts: RankParts | None = None
        if self.run is None:
            self._dir = OutputDir(self.out, (RESULTS, CONFIG, _PART), "results directory")
        else:  # resumable, maybe one of several ranks: this rank's lock and temporaries only
            self._parts = RankParts(self.out, rank, world_size, "results directory")
            self._dir = self._parts.dir
        self._writer: pq.ParquetWriter | None = None
        self._tables: list[pa.Table] = []
        self._n = 0

    def __enter__(self) -> ResultsWriter:
        self._dir.__enter__()
        try:
            if self._parts is not None:
                self._parts.start(self.run, self._recorded_run)
            else:
                self._open()
        except BaseException as exc:
            self._dir.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _open(self) -> None:
        self._tmp = self._dir.temp(RESULTS)
        try:
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        except OSError as err:
            raise write_error(err, self._tmp) from None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                try:
                    writer.close()
                except OSError:
                    if exc_type is None:
                        raise
                    # already failing (a full disk, say): the temporary is deleted below
        finally:
            self._dir.__exit__(exc_type, exc, tb)

    # ----- resumable runs: finished pieces as part files (probekit.store.parts) -----------------------
    def _recorded_run(self) -> dict | None:
        """The run a directory without ``parts/run.json`` holds: the ``run`` of its ``sweep.json``."""
        if not (self.out / CONFIG).is_file():
            return None
        return (read_config(self.out) or {}).get("run", {"written_by": "another command"})

    def has_part(self, key: str) -> bool:
        """Whether the piece ``key`` of this run is finished (its part file exists)."""
        return self._parts.has(key)

    def write_part(self, key: str, tables: Sequence[pa.Table], info: Mapping[str, Any] | None = None) -> None:
        """Write the rows of one finished piece atomically (``RES/parts/<key>.parquet``), with
        ``info`` (JSON) in its metadata (read back by :meth:`part_info`). A table naming an
        unregistered method is refused."""
        for table in tables:
            check_methods(table)
        self._parts.write(key, pa.concat_tables(tables) if tables else SCHEMA.empty_table(), info)

    def read_part(self, key: str) -> pa.Table:
        """The rows of a finished piece, in :data:`SCHEMA`."""
        return self._parts.read(key, SCHEMA)

    def part_info(self, key: str) -> dict:
        """The ``info`` a finished piece was written with (empty when it had none)."""
        return self._parts.info(key)

    def write_rank_counts(self, counts: Mapping[str, Any]) -> None:
        """Record this rank's counts (``parts/rank-R-of-W.json``) for the merge's record."""
        self._parts.write_counts(counts)

    def rank_counts(self) -> list[dict | None]:
        """Every rank's recorded counts (None for a rank that has not recorded them)."""
        return self._parts.counts()

    def merge(self, keys: Sequence[str], config: Callable[[int], RunRecord]) -> dict[str, Any] | None:
        """Resumable runs: once every part in ``keys`` is written, concatenate them (in that order)
        into ``results.parquet`` and commit ``config(n_rows)`` as ``sweep.json``; returns the record
        written, or None while parts are missing (another rank is still at work and merges when it
        finishes). Runs under the blocking merge lock, so ranks merge one at a time."""
        with self._parts.merging():
            if not all(self.has_part(k) for k in keys):
                return None
            remove_temporaries(self.out, [RESULTS, CONFIG])  # of a merge that was killed
            self._open()
            n = 0
            for key in keys:
                part = self.read_part(key)
                n += part.num_rows
                self.append(part)
            return self.commit(config(n))

    def append(self, table: pa.Table) -> None:
        """Add rows (a :data:`SCHEMA` table); a table naming an unregistered method is refused."""
        check_methods(table)
        self._tables.append(table)
        self._n += table.num_rows
        if self._n >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self._tables:
            try:
                self._writer.write_table(pa.concat_tables(self._tables))
            except OSError as exc:  # a full disk: one line; the block's exit removes the temporary
                raise write_error(exc, self._tmp) from None
        self._tables, self._n = [], 0

    def commit(self, record: RunRecord) -> dict[str, Any]:
        """Finish the table and commit it with ``record`` as ``sweep.json`` (checked first: nothing is
        committed for a record that does not hold); returns what was written."""
        if not isinstance(record, RunRecord):
            raise TypeError(f"commit takes a RunRecord, not {type(record).__name__}")
        config = record.to_json()
        self._flush()
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except OSError as exc:
            raise write_error(exc, self._tmp) from None
        size, digest = self._tmp.stat().st_size, sha256_file(self._tmp)
        run = {"run": self.run} if self.run is not None else {}
        record = {**config, **run, RESULTS_FILE_KEY: {"name": RESULTS, "bytes": size, "sha256": digest}}
        (self.out / CONFIG).unlink(missing_ok=True)  # never leave an old configuration beside new results
        self._dir.commit(self._tmp, RESULTS)
        self._dir.write_json(CONFIG, record, default=str, allow_nan=True)
        return record


@dataclass(frozen=True)
class Results:
    """A results directory as read: the per-item table, the configuration (``sweep.json`` as
    written, without its results-file record), its :class:`RunRecord` and the table file's sha256."""

    path: Path
    table: pd.DataFrame
    sweep: dict
    record: RunRecord
    sha256: str | None = None


def read_results(results_dir: str | os.PathLike, columns: Sequence[str] | None = None) -> Results:
    """Read ``results.parquet`` and ``sweep.json``; refuse a table that does not belong to its
    ``sweep.json`` and one that lacks a :data:`REQUIRED_COLUMNS` column.

    ``columns``: read only these optional columns (e.g. ``()``: leave ``p_gold`` out), besides the
    required and :data:`FILLED` ones, which are always read; None reads every column. The whole
    file is still hashed against ``sweep.json``."""
    root = Path(results_dir)
    path = root / RESULTS
    if root.exists() and not root.is_dir():
        raise ProbekitError(f"{root} is a file, not a results directory (give the --out folder of `probekit sweep`)")
    if not root.is_dir():
        raise ProbekitError(f"results directory not found: {root}")
    if not path.is_file():
        raise ProbekitError(f"no {RESULTS} in {root} (run `probekit sweep ... --out {root}` first)")
    sweep = read_config(root)
    if sweep is None:
        raise ProbekitError(f"{root} has {RESULTS} but no {CONFIG}: the table cannot be checked against the run "
                            "that wrote it (its run did not finish, or the file was removed); rerun that command "
                            "into this directory")
    try:
        raw = path.read_bytes()
        if columns is None:
            table = pd.read_parquet(io.BytesIO(raw))
        else:
            wanted = {*REQUIRED_COLUMNS, *FILLED, *columns}
            names = pq.ParquetFile(io.BytesIO(raw)).schema_arrow.names
            table = pd.read_parquet(io.BytesIO(raw), columns=[c for c in names if c in wanted])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ProbekitError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    found = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    recorded = (sweep or {}).pop(RESULTS_FILE_KEY, None)
    if isinstance(recorded, dict):
        for field in ("bytes", "sha256"):
            if recorded.get(field) != found[field]:
                raise ProbekitError(
                    f"{path} does not belong to {root / CONFIG}: its {field} is {str(found[field])[:16]}, "
                    f"{CONFIG} records {str(recorded.get(field))[:16]} (changed after the run, or the run did "
                    "not finish); rerun the sweep into this directory"
                )
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ProbekitError(f"{path} lacks column(s) {', '.join(missing)}")
    for column, fill in FILLED.items():
        if column not in table.columns:
            table[column] = fill(table)
    p_gold = table["p_gold"] if "p_gold" in table.columns else _column(raw, "p_gold", path)
    check_values(table, path, p_gold)
    record = RunRecord.from_json(sweep, root / CONFIG)
    return Results(root, without_method_heads(table), sweep, record, found["sha256"])


def _column(raw: bytes, name: str, path: Path) -> np.ndarray | None:
    """One column of a parquet file's bytes as an array (None when the file lacks it)."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(raw))
        if name not in parquet.schema_arrow.names:
            return None
        return parquet.read(columns=[name]).column(0).to_numpy(zero_copy_only=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise ProbekitError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def is_train_level(level: str) -> bool:
    """Whether ``level`` is a training level of the contract: easy, medium, hard, all, zero_shot, or
    the level of ICL demonstrations from another set or cut by another rule (``arc:grade:easy``,
    ``arc:all``, ``easy@grade=3,8``, ``arc:grade@3,8:easy``)."""
    return level in ("easy", "medium", "hard", *TRAIN_LEVELS_EXTRA) or bool(_OTHER_SET_LEVEL.match(level))


def check_values(table: pd.DataFrame, path: str | os.PathLike, p_gold: Any = None) -> None:
    """Refuse a results table holding a value the contract does not allow, naming the column, the
    value and the first row's item: an unknown experiment, method, training or test level; a
    negative draw or n_train; label noise outside [0, 1]; correct other than 0 or 1; p_gold (the
    table's column, or ``p_gold`` given apart) outside [0, 1], or NaN for a method that has a
    probability of the gold answer (every method whose :attr:`~probekit.methods.Method.p_gold` is set)."""
    def refuse(bad: np.ndarray, column: str, rule: str) -> None:
        row = int(np.flatnonzero(bad)[0])
        value = table[column].iloc[row] if column in table.columns else p_gold[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise ProbekitError(f"{path}: {column} is {value!r} for item {str(table['item_id'].iloc[row])!r} (row "
                            f"{row + 1}); {column} must be {rule} (the table was changed after its run, or written "
                            "by hand)")

    def text(column: str, allowed: Callable[[str], bool], rule: str) -> None:
        values = table[column]
        found = values.unique()
        wrong = {str(v) for v in found if not allowed(str(v))}
        if wrong:
            refuse(values.astype(str).isin(wrong).to_numpy(), column, rule)

    text("experiment", lambda v: v in EXPERIMENTS, f"one of {', '.join(EXPERIMENTS)}")
    text("method", lambda v: v in METHODS, f"one of {', '.join(METHODS)}")
    text("train_level", is_train_level, "easy, medium, hard, all, zero_shot, or SET:MEASURE:LEVEL (ICL "
                                        "demonstrations of another set)")
    text("test_level", lambda v: v in TEST_LEVELS, "easy, medium, hard, or empty for an unknown level")
    for column in ("draw", "n_train"):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        bad = ~(values >= 0)
        if bad.any():
            refuse(bad, column, "a non-negative integer")
    noise = pd.to_numeric(table["label_noise"], errors="coerce").to_numpy(float)
    bad = ~((noise >= 0) & (noise <= 1))
    if bad.any():
        refuse(bad, "label_noise", "a rate in [0, 1]")
    correct = pd.to_numeric(table["correct"], errors="coerce").to_numpy(float)
    bad = ~np.isin(correct, (0.0, 1.0))
    if bad.any():
        refuse(bad, "correct", "0 or 1")
    if p_gold is not None:
        p = pd.to_numeric(pd.Series(np.asarray(p_gold)), errors="coerce").to_numpy(float)
        no_p_gold = [name for name, m in METHODS.items() if not m.p_gold]
        free = np.asarray(table["method"].isin(no_p_gold), dtype=bool)
        bad = np.where(np.isnan(p), ~free, ~((p >= 0) & (p <= 1)))
        if bad.any():
            refuse(bad, "p_gold", f"a probability in [0, 1] (NaN only for {', '.join(no_p_gold)} rows, which "
                                  "score generated text)")


def read_config(results_dir: str | os.PathLike) -> dict | None:
    """``sweep.json`` of a results directory as a dict (with its results-file record), or None."""
    path = Path(results_dir) / CONFIG
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProbekitError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ProbekitError(f"{path} must hold a JSON object")
    return config


#: Columns of :func:`cv_table`: the results table's keys of a head, then its cross-validation curve.
CV_COLUMNS = ("experiment", "site", "layer", "measure", "train_level", "draw", "n_train", "label_noise", "solver",
              "option", "strength", "chosen", "cv_log_loss_mean", "cv_log_loss_sd", "cv_accuracy_mean",
              "folds", "folds_converged")


def cv_table(config: Mapping[str, Any] | None) -> pd.DataFrame:
    """The cross-validation paths a run recorded (``sweep.json``'s ``cv``, written by ``sweep
    --select``), one row per fit, measure and strength (:data:`CV_COLUMNS`; empty without one).

    ``option`` is the strength's name (``C`` or ``l2``) and ``strength`` its value; ``chosen``
    marks the value the head was refitted at (the one its rows in ``results.parquet`` come from);
    ``cv_log_loss_mean`` is the mean over the folds of each fold's mean held-out log-loss (the
    selection criterion), ``cv_log_loss_sd`` its standard deviation across the folds (ddof 1),
    ``cv_accuracy_mean`` the mean over the folds of the held-out accuracy, ``folds_converged`` how
    many of the ``folds`` fold fits converged. A head that serves several measures (train level
    "all") has rows under each, as in the results table.
    """
    cv = (config or {}).get("cv")
    if not cv:
        return pd.DataFrame(columns=list(CV_COLUMNS))
    site = (config.get("config") or {}).get("site", "")
    rows = []
    for fit in cv["fits"]:
        option = cv["grids"][fit["solver"]]["option"]
        values = cv["grids"][fit["solver"]]["values"]
        loss = np.asarray(fit["log_loss"], float)
        acc = np.asarray(fit["accuracy"], float)
        for measure in fit["measures"]:
            for j, value in enumerate(values):
                rows.append((fit["experiment"], site, fit["layer"], measure, fit["train_level"], fit["draw"],
                             fit["n_train"], fit["label_noise"], fit["solver"], option, value,
                             value == fit[option], loss[:, j].mean(), loss[:, j].std(ddof=1), acc[:, j].mean(),
                             len(loss), int(fit["folds_converged"][j])))
    return pd.DataFrame(rows, columns=list(CV_COLUMNS))
