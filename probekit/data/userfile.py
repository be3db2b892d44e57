"""A user's own question set: JSONL or CSV with named columns.

Columns:

* ``question`` (required), ``id`` (optional; row number otherwise);
* choices: a ``choices`` column (a JSON list in CSV, a list in JSONL), or one column per choice
  named ``choice_0``, ``choice_1``, ... or ``A``, ``B``, ... (empty cells end an item's choices);
* ``label``: the gold choice as an index (0-based), a letter (A, B, ...) or the gold choice's text;
* an item needs a question (a non-empty text) and at least two different choices; in JSON(L) every
  choice is a text (a number or null is refused, naming the row);
* every other numeric column is a difficulty measure (cut at the 30th/70th percentiles unless a
  cut-off is given). Empty cells and the markers in :data:`MISSING` (``NA``, ``n/a``, ``null``,
  ``-``, ...) are unknown values (NaN). A column mixing numbers with other text is not a measure:
  loading the file says which column and which row, and asking for it as a measure says why. So
  does a column holding an infinite value (``Infinity``, ``inf``, ``1e999``): a level needs a finite
  number.
* A line of a JSONL file that is not a JSON object is refused, naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from probekit.data.schema import COMMON_MEASURES, ItemSet, build_table
from probekit.data.sets import read_jsonl
from probekit.errors import ProbekitError

_CHOICE_COLUMN = re.compile(r"^(choice_?\d+|[A-J])$")
RESERVED = {"id", "question", "choices", "label", "answer", "source", "pool"}
#: Cell texts read as an unknown value (compared lower-case, stripped).
MISSING = frozenset({"", "na", "n/a", "nan", "none", "null", "-", "?", "#n/a", "missing", "unknown"})
log = logging.getLogger("probekit")


def _numeric(values: pd.Series) -> tuple[pd.Series, int | None]:
    """A column as floats (missing markers -> NaN), and the first row holding other text (or None)."""
    cleaned = values.map(lambda v: np.nan if v is None or (isinstance(v, str) and v.strip().lower() in MISSING) else v)
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float), None
    numbers = pd.to_numeric(cleaned, errors="coerce").astype(float)
    text = cleaned.notna() & numbers.isna()
    return numbers, (int(np.flatnonzero(text.to_numpy())[0]) if text.any() else None)


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ProbekitError(f"dataset file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, keep_default_na=True)
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ProbekitError(f"{path}: not a JSON list of objects (one per item)")
            return pd.DataFrame(rows)
        return pd.DataFrame(read_jsonl(path, where=False))
    except json.JSONDecodeError as exc:
        raise ProbekitError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ProbekitError(f"{path}: not UTF-8 text") from None
    except ValueError as exc:
        raise ProbekitError(f"{path}: cannot parse ({str(exc).splitlines()[0][:120]})") from None


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _choices(row: pd.Series, choice_cols: list[str], where: str) -> list[str]:
    if "choices" in row.index:
        value = row["choices"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ProbekitError(f"{where}: 'choices' is not a JSON list: {value[:60]!r}") from None
        if _is_missing(value):
            return []
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise ProbekitError(f"{where}: 'choices' must be a list of texts, got {json.dumps(value, default=str)[:60]}")
        for j, c in enumerate(value):
            if not isinstance(c, str):
                raise ProbekitError(f"{where}: choice {j} is {json.dumps(c, default=str)[:40]}, not a text (quote it)")
            if not c.strip():
                raise ProbekitError(f"{where}: choice {j} is blank")
        return [str(c) for c in value]
    out = []
    for col in choice_cols:
        cell = row[col]
        if cell is None or (isinstance(cell, float) and np.isnan(cell)) or str(cell) == "":
            break
        out.append(str(cell))
    return out


def _label(value, choices: list[str], where: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ProbekitError(f"{where}: label {value!r} is neither an index, a letter nor one of its choices")
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if len(text) == 1 and text.upper() in "ABCDEFGHIJ":
        return "ABCDEFGHIJ".index(text.upper())
    if text in choices:
        return choices.index(text)
    raise ProbekitError(f"{where}: label {value!r} is neither an index, a letter nor one of its choices")


def load_user_file(path: str | Path) -> ItemSet:
    """Read a user's JSONL/CSV question file into an :class:`ItemSet`."""
    path = Path(path)
    frame = _read(path)
    if frame.empty:
        raise ProbekitError(f"{path} is empty: no items" if len(frame.columns) == 0
                            else f"{path} has column names but no items")
    if "label" not in frame and "answer" in frame:
        frame = frame.rename(columns={"answer": "label"})
    for col in ("question", "label"):
        if col not in frame:
            raise ProbekitError(f"{path}: missing column {col!r} (have: {', '.join(map(str, frame.columns))})")
    choice_cols = [] if "choices" in frame else [c for c in frame.columns if _CHOICE_COLUMN.match(str(c))]
    if "choices" not in frame and not choice_cols:
        raise ProbekitError(f"{path}: no 'choices' column and no choice_0.. / A, B.. columns")
    measures: tuple[str, ...] = ()
    not_measures: dict[str, str] = {}
    for c in frame.columns:
        if c in RESERVED or c in choice_cols or c in COMMON_MEASURES:
            continue
        numbers, first_text = _numeric(frame[c])
        infinite = np.flatnonzero(np.isinf(numbers.to_numpy()))
        if first_text is None and len(infinite):  # a level needs a finite number
            row = int(infinite[0])
            cell = frame[c].iloc[row]
            cell = cell.item() if isinstance(cell, np.generic) else cell
            not_measures[c] = (f"column {c!r} of {path.name} is not a difficulty measure: row {row + 1} holds "
                               f"{cell!r}, not a finite number (write unknown values as empty, NA or null)")
            log.warning(f"warning: {not_measures[c]}")
        elif first_text is None:
            frame[c] = numbers
            measures += (c,)
        elif numbers.notna().any():  # numbers mixed with text: meant as a measure, most likely
            not_measures[c] = (f"column {c!r} of {path.name} is not a difficulty measure: row {first_text + 1} holds "
                               f"{frame[c].iloc[first_text]!r}, not a number (write unknown values as empty, NA or null)")
            log.warning(f"warning: {not_measures[c]}")
        else:
            not_measures[c] = f"column {c!r} of {path.name} holds text ({frame[c].iloc[first_text]!r}), not numbers"
    records = []
    for i, row in frame.iterrows():
        where = f"{path} row {i + 1}"
        choices = _choices(row, choice_cols, where)
        if not choices:
            raise ProbekitError(f"{where}: no choices")
        if len(choices) < 2:
            raise ProbekitError(f"{where}: one answer choice ({choices[0]!r}); an item needs at least two")
        twice = sorted({c for c in choices if choices.count(c) > 1})
        if twice:
            raise ProbekitError(f"{where}: choice {twice[0]!r} appears more than once")
        if not isinstance(row["question"], str) or not row["question"].strip():
            shown = "empty" if _is_missing(row["question"]) or isinstance(row["question"], str) else \
                f"{json.dumps(row['question'], default=str)[:40]}, not a text"
            raise ProbekitError(f"{where}: the question is {shown}")
        label = _label(row["label"], choices, where)
        rec = {
            "id": str(row["id"]) if "id" in row.index and pd.notna(row["id"]) else str(i),
            "question": str(row["question"]),
            "choices": choices,
            "label": label,
            "source": str(row["source"]) if "source" in row.index and pd.notna(row.get("source")) else path.name,
        }
        rec.update({m: row[m] for m in measures})
        rec.update({c: row[c] for c in frame.columns
                    if c not in RESERVED and c not in choice_cols and c not in measures})
        records.append(rec)
    table = build_table(records, measures + COMMON_MEASURES, str(path))
    return ItemSet(path.stem, table, measures + COMMON_MEASURES, "0040", False, f"file:{path.resolve()}",
                   not_measures=not_measures)
