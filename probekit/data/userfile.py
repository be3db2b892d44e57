"""A user's own question set: JSONL or CSV with named columns.

Columns:

* ``question`` (required), ``id`` (optional; row number otherwise);
* choices: a ``choices`` column (a JSON list in CSV, a list in JSONL), or one column per choice
  named ``choice_0``, ``choice_1``, ... or ``A``, ``B``, ... (empty cells end an item's choices);
* ``label``: the gold choice as an index (0-based), a letter (A, B, ...) or the gold choice's text;
* every other numeric column is a difficulty measure (cut at the 30th/70th percentiles unless a
  cut-off is given).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from probekit.data.schema import COMMON_MEASURES, ItemSet, build_table
from probekit.errors import ProbekitError

_CHOICE_COLUMN = re.compile(r"^(choice_?\d+|[A-J])$")
RESERVED = {"id", "question", "choices", "label", "answer", "source", "pool"}


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ProbekitError(f"dataset file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, keep_default_na=True)
        if path.suffix.lower() == ".json":
            return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ProbekitError(f"{path}: cannot parse ({str(exc).splitlines()[0][:120]})") from None


def _choices(row: pd.Series, choice_cols: list[str], where: str) -> list[str]:
    if "choices" in row.index:
        value = row["choices"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ProbekitError(f"{where}: 'choices' is not a JSON list: {value[:60]!r}") from None
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return []
        return [str(c) for c in value]
    out = []
    for col in choice_cols:
        cell = row[col]
        if cell is None or (isinstance(cell, float) and np.isnan(cell)) or str(cell) == "":
            break
        out.append(str(cell))
    return out


def _label(value, choices: list[str], where: str) -> int:
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
    if "label" not in frame and "answer" in frame:
        frame = frame.rename(columns={"answer": "label"})
    for col in ("question", "label"):
        if col not in frame:
            raise ProbekitError(f"{path}: missing column {col!r} (have: {', '.join(map(str, frame.columns))})")
    choice_cols = [] if "choices" in frame else [c for c in frame.columns if _CHOICE_COLUMN.match(str(c))]
    if "choices" not in frame and not choice_cols:
        raise ProbekitError(f"{path}: no 'choices' column and no choice_0.. / A, B.. columns")
    measures = tuple(
        c for c in frame.columns
        if c not in RESERVED and c not in choice_cols and pd.api.types.is_numeric_dtype(frame[c])
        and c not in COMMON_MEASURES
    )
    records = []
    for i, row in frame.iterrows():
        where = f"{path} row {i + 1}"
        choices = _choices(row, choice_cols, where)
        if not choices:
            raise ProbekitError(f"{where}: no choices")
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
    return ItemSet(path.stem, table, measures + COMMON_MEASURES, "0040", False, f"file:{path.resolve()}")
