"""Resumable runs written by one or several processes (ranks) into one directory: their parts.

``probekit finetune`` and ``probekit generate`` split their work into pieces. Under ``torchrun``
(``RANK``/``WORLD_SIZE`` in the environment) rank r takes the pieces ``i % world_size == r``
(:func:`probekit.llm.batches.rank_share`); no process group is needed, each piece is independent.
Every finished piece is written atomically as a part, ``DIR/parts/<key>.parquet`` (or as a file of
its own that only that rank writes), so a rerun (a killed rank's, or the whole command's) skips it;
whichever rank finishes last merges the parts into the files one process writes.

- **Locks.** Rank r holds ``DIR/.lock-rank{r}`` for its whole run (a second writer of the same rank
  is refused with one line); its part temporaries carry its rank (``DIR/.rank{r}.part.parquet.*.tmp``),
  so it removes only its own leftovers. What the ranks share (the run's identity, the merge) is read
  and written under the blocking lock ``DIR/.results.lock``, one rank at a time
  (:meth:`RankParts.merging`).
- **Identity.** ``DIR/parts/run.json`` records the run's settings (when the writer gives them); a
  directory holding another run is refused before any work, and the record is written with the first part.
- **Counts.** With several ranks, each records its counts in ``DIR/parts/rank-R-of-W.json`` before it
  merges, for the merged record (:meth:`RankParts.write_counts`, :meth:`RankParts.counts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from probekit.errors import ProbekitError
from probekit.store.layout import lock_name
from probekit.store.manifest import manifest_lock
from probekit.store.outdir import OutputDir, read_json

PARTS = "parts"
RUN_FILE = "run.json"
#: The blocking lock of what ranks share: the run's identity and the merge.
MERGE_LOCK = ".results.lock"
PART = "part.parquet"  # temporaries of part files: .rank{r}.part.parquet.<pid>-<random>.tmp
#: Parquet metadata key of a part file's record (a fine-tune's final loss, say).
INFO_KEY = b"probekit.part"


class RankParts:
    """One rank's parts of a resumable run in ``out`` (see the module docstring).

    ``with RankParts(out, rank, world_size, what) as parts:`` takes the rank's lock and removes its
    leftover part temporaries; :meth:`start` refuses another run; :meth:`write` / :meth:`has` /
    :meth:`read` the parts; :meth:`merging` holds the merge lock. ``own`` and ``share`` are those of
    :class:`~probekit.store.outdir.OutputDir` (``share=True``: writers of this process may take the
    same lock); ``dir`` is that OutputDir, for the merged files.
    """

    def __init__(self, out: str | os.PathLike, rank: int = 0, world_size: int = 1, what: str = "results directory",
                 own: Callable[[str], bool] | None = None, share: bool = False) -> None:
        self.out = Path(out)
        self.rank, self.world_size = rank, world_size
        self.what = what
        self.temp_name = f"rank{rank}.{PART}"
        self.dir = OutputDir(self.out, (self.temp_name,), what, lock_file=lock_name(rank), own=own, share=share)
        self.run: dict | None = None

    def __enter__(self) -> RankParts:
        self.dir.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.dir.__exit__(exc_type, exc, tb)

    @contextmanager
    def merging(self) -> Iterator[None]:
        """Hold the blocking merge lock (one rank at a time) for the ``with`` block."""
        with manifest_lock(self.out, MERGE_LOCK):
            yield

    def start(self, run: Mapping[str, Any] | None = None, recorded: Callable[[], dict | None] | None = None) -> None:
        """Refuse a directory that holds another run (``parts/run.json``, else ``recorded()``, differs
        from ``run``), and forget this rank's counts of an earlier attempt. ``run`` is recorded with the
        first part."""
        self.run = None if run is None else json.loads(json.dumps(run, default=str))
        if self.run is not None:
            with self.merging():
                self._check_run(recorded)
        self.counts_path(self.rank).unlink(missing_ok=True)

    def _check_run(self, recorded: Callable[[], dict | None] | None) -> bool:
        """Whether ``parts/run.json`` is there; raise when it, or ``recorded()``, is another run's."""
        path = self.out / PARTS / RUN_FILE
        there = path.is_file()
        if there:
            try:
                found = json.loads(path.read_text())
            except ValueError:
                found = {"unreadable": str(path)}
        else:
            found = recorded() if recorded is not None else None
        if found is not None and found != self.run:
            keys = sorted(k for k in set(found) | set(self.run) if found.get(k) != self.run.get(k))
            raise ProbekitError(f"{self.what} {self.out} holds another run (it differs in {', '.join(keys[:6])}); "
                                "choose another --out or delete it")
        return there

    def _record_run(self) -> None:
        if self.run is not None and not (self.out / PARTS / RUN_FILE).is_file():
            with self.merging():
                if not self._check_run(None):
                    (self.out / PARTS).mkdir(exist_ok=True)
                    self.dir.write_json(f"{PARTS}/{RUN_FILE}", self.run)

    def path(self, key: str) -> Path:
        return self.out / PARTS / f"{key}.parquet"

    def has(self, key: str) -> bool:
        """Whether the piece ``key`` is finished (its part file exists)."""
        return self.path(key).is_file()

    def write(self, key: str, table: pa.Table, info: Mapping[str, Any] | None = None) -> None:
        """Write the rows of one finished piece atomically (``parts/<key>.parquet``), with ``info`` (JSON)
        in its metadata (read back by :meth:`info`)."""
        self._record_run()
        if info is not None:
            table = table.replace_schema_metadata({INFO_KEY: json.dumps(info, default=str).encode()})
        tmp = self.dir.temp(self.temp_name)
        pq.write_table(table, tmp, compression="zstd")
        (self.out / PARTS).mkdir(exist_ok=True)
        self.dir.commit(tmp, f"{PARTS}/{key}.parquet")

    def read(self, key: str, schema: pa.Schema) -> pa.Table:
        """The rows of a finished piece, in ``schema``."""
        path = self.path(key)
        try:
            return pq.read_table(path, schema=schema)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise ProbekitError(f"cannot read {path} ({str(exc).splitlines()[0]}); delete it and rerun") from None

    def info(self, key: str) -> dict:
        """The ``info`` a finished piece was written with (empty when it had none)."""
        path = self.path(key)
        try:
            return json.loads((pq.read_schema(path).metadata or {}).get(INFO_KEY, b"{}"))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise ProbekitError(f"cannot read {path} ({str(exc).splitlines()[0]}); delete it and rerun") from None

    def write_json(self, key: str, obj: Any) -> None:
        """Write a finished piece's record atomically (``parts/<key>.json``)."""
        self._record_run()
        (self.out / PARTS).mkdir(exist_ok=True)
        self.dir.write_json(f"{PARTS}/{key}.json", json.loads(json.dumps(obj, default=str)), allow_nan=True)

    def read_json(self, key: str) -> dict | None:
        """A piece's record (``parts/<key>.json``), or None when there is none."""
        return read_json(self.out / PARTS / f"{key}.json")

    def remove(self, keys: Sequence[str]) -> None:
        """Delete the parts (and records) ``keys`` once merged (call it holding the merge lock)."""
        for key in keys:
            self.path(key).unlink(missing_ok=True)
            (self.out / PARTS / f"{key}.json").unlink(missing_ok=True)

    def counts_path(self, rank: int) -> Path:
        return self.out / PARTS / f"rank-{rank}-of-{self.world_size}.json"

    def write_counts(self, counts: Mapping[str, Any]) -> None:
        """Record this rank's counts (``parts/rank-R-of-W.json``) for the merge's record."""
        (self.out / PARTS).mkdir(exist_ok=True)
        self.dir.write_json(f"{PARTS}/{self.counts_path(self.rank).name}", json.loads(json.dumps(counts, default=str)))

    def counts(self) -> list[dict | None]:
        """Every rank's recorded counts (None for a rank that has not recorded them)."""
        out = []
        for r in range(self.world_size):
            try:
                out.append(json.loads(self.counts_path(r).read_text()))
            except (OSError, ValueError):
                out.append(None)
        return out
