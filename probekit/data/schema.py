"""The normalised item table every question set is turned into."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from probekit.errors import ProbekitError

# Columns every table has, in this order; difficulty measures and extra fields follow.
CORE_COLUMNS = ("id", "question", "choices", "label", "source", "pool")
# Measures every set gets (docs/protocol.md §1.1), computed from the question and the gold answer text.
COMMON_MEASURES = ("question_num_words", "answer_num_words", "answer_num_chars")
POOLS = ("probe", "holdout")


@dataclass(frozen=True)
class ItemSet:
    """A question set as one table: one row per item.

    ``table`` holds ``id``, ``question``, ``choices`` (list of str), ``label`` (gold index),
    ``source`` (set/split provenance), ``pool`` ("probe", or "holdout" for the items kept aside
    for model-based hardness), one float column per difficulty measure (NaN where unknown), and the
    set's extra fields.
    """

    name: str
    table: pd.DataFrame
    measures: tuple[str, ...]
    prompt_template: str = "0040"
    generative: bool = False
    origin: str = ""
    #: Columns of a user's file that are not measures, and why (text, or numbers mixed with text).
    not_measures: Mapping[str, str] = field(default_factory=dict, compare=False)

    def unknown_measure(self, measure: str) -> str:
        """The one-line error for a measure the set does not have, saying why where known."""
        why = self.not_measures.get(measure)
        if why:
            return f"unknown measure {measure!r} for dataset {self.name}: {why}"
        return f"unknown measure {measure!r} for dataset {self.name}: choose from {', '.join(self.measures)}"

    def __len__(self) -> int:
        return len(self.table)

    @property
    def max_choices(self) -> int:
        return int(self.table["choices"].map(len).max()) if len(self.table) else 0

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the normalised content (ids, questions, choices, labels, pools, measures)."""
        digest = hashlib.sha256()
        cols = list(CORE_COLUMNS) + list(self.measures)
        for row in self.table[cols].itertuples(index=False):
            record = [row[0], row[1], list(row[2]), int(row[3]), row[4], row[5]]
            record += [None if not np.isfinite(v) else float(v) for v in row[6:]]
            digest.update(json.dumps(record, ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def probe_items(self) -> pd.DataFrame:
        return self.table[self.table["pool"] == "probe"]


def word_count(text: str) -> int:
    return len(str(text).split())


def choice_surface(choices: pd.Series) -> dict[str, list[list[int]]]:
    """Each item's choices' surface features: whitespace words and characters per choice, the
    counts the answer-length measures take of the gold choice (``answer_num_words``, ``answer_num_chars``)."""
    return {
        "choice_words": [[word_count(c) for c in cs] for cs in choices],
        "choice_chars": [[len(str(c)) for c in cs] for cs in choices],
    }


def build_table(records: list[dict], measures: tuple[str, ...], where: str) -> pd.DataFrame:
    """Validate normalised records and add the common measures.

    Each record has the core columns (``pool`` optional), the named measures, and any extras.
    ``where`` names the input in error messages.
    """
    for i, rec in enumerate(records):
        choices = rec.get("choices")
        if not choices or any(c is None or str(c) == "" for c in choices):
            raise ProbekitError(f"{where}: item {rec.get('id', i)!r} (row {i}) has no choices or an empty choice")
        label = rec.get("label")
        if label is None or not (0 <= int(label) < len(choices)):
            raise ProbekitError(
                f"{where}: item {rec.get('id', i)!r} (row {i}) has label {label!r} outside its {len(choices)} choices"
            )
        if not str(rec.get("question", "")).strip():
            raise ProbekitError(f"{where}: item {rec.get('id', i)!r} (row {i}) has an empty question")
    table = pd.DataFrame.from_records(records)
    if table.empty:
        raise ProbekitError(f"{where}: no items")
    if table["id"].duplicated().any():
        dup = table.loc[table["id"].duplicated(), "id"].iloc[0]
        raise ProbekitError(f"{where}: item id {dup!r} appears more than once")
    table["id"] = table["id"].astype(str)
    table["label"] = table["label"].astype(np.int64)
    table["choices"] = table["choices"].map(lambda cs: [str(c) for c in cs])
    table["pool"] = table["pool"].fillna("probe") if "pool" in table else "probe"
    gold = [cs[lab] for cs, lab in zip(table["choices"], table["label"])]
    table["question_num_words"] = table["question"].map(word_count).astype(float)
    table["answer_num_words"] = np.array([word_count(g) for g in gold], dtype=float)
    table["answer_num_chars"] = np.array([len(g) for g in gold], dtype=float)
    for m in measures:
        table[m] = pd.to_numeric(table[m], errors="coerce").astype(float)
    rest = [c for c in table.columns if c not in CORE_COLUMNS and c not in measures]
    return table[list(CORE_COLUMNS) + list(measures) + rest].reset_index(drop=True)
