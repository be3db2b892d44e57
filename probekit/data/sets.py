"""The question sets: ARC, MMLU STEM-5, StrategyQA, GSM8k, the bundled ARC sample, and a user's file.

Each built-in set is read from one of two sources, a local folder in the original file formats
(the layout of ``--data-dir``: ``arc/``, ``mmlu/``, ``strategyqa/``, ``gsm8k/``) or the Hugging
Face hub through ``datasets``. Both readers produce the hub's record layout, and one normaliser per
set turns those records into the item table (docs/protocol.md §1), so the two sources give identical tables.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from probekit.data.draws import holdout_rows
from probekit.data.schema import COMMON_MEASURES, ItemSet, build_table
from probekit.errors import ProbekitError

Records = list[dict]


# --------------------------------------------------------------------------------------- ARC
ARC_CONFIGS = ("ARC-Easy", "ARC-Challenge")
HF_SPLITS = ("train", "validation", "test")
GRADE_BLOOM = {"Remembering": 1, "Understanding": 2, "Applying": 3, "Analyzing": 4, "Evaluating": 5}
GRADE_DIFFICULTY = {"Low": 1, "Medium": 2, "High": 3}
GRADE_DOK = {"I": 1, "II": 2, "III": 3}


def _bundled(name: str) -> Path:
    return Path(str(resources.files("probekit.data") / "bundled" / name))


def _require(path: Path, data_dir: Path) -> Path:
    if not path.is_file():
        raise ProbekitError(f"data folder {data_dir} is missing {path.relative_to(data_dir)}")
    return path


#: The key under which a record read from a local file notes its file and line (for messages).
WHERE = "_where"


def read_jsonl(path: Path, where: bool = True) -> Records:
    """The JSON objects of a JSONL file, one per non-blank line, each noting its file and line under
    :data:`WHERE` (``where=False``: as they are); a line that is not one is refused, naming the file
    and the line."""
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProbekitError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise ProbekitError(f"{path} line {n}: not a JSON object ({type(rec).__name__})")
                records.append({**rec, WHERE: f"{path} line {n}"} if where else rec)
    except UnicodeDecodeError:
        raise ProbekitError(f"{path}: not UTF-8 text") from None
    return records


def _read_json(path: Path):
    """A JSON file's content; invalid JSON is refused, naming the file and the line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProbekitError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ProbekitError(f"{path}: not UTF-8 text") from None


def _fields(rec: dict, where: str, **kinds) -> None:
    """Refuse a record lacking one of ``kinds``' fields or holding a value of another type (one line
    naming the record's file and line, or ``where``)."""
    at = rec.get(WHERE, where)
    for key, kind in kinds.items():
        if key not in rec:
            raise ProbekitError(f"{at}: missing field {key!r}")
        value = rec[key]
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                    else (kind,)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ProbekitError(f"{at}: field {key!r} is {json.dumps(value)[:60]}, not a {names}")


def _texts(values, at: str, what: str) -> list[str]:
    """A list of non-empty strings (answer choices), else one line naming the record."""
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise ProbekitError(f"{at}: {what} must be a list of non-empty strings, got {json.dumps(values)[:80]}")
    return values


def _arc_local(data_dir: Path) -> tuple[Records, dict]:
    questions = read_jsonl(_require(data_dir / "arc" / "arc_all_splits.jsonl", data_dir))
    ann_path = _require(data_dir / "arc" / "arc-challenge-easy-annotations.json", data_dir)
    annotations = _read_json(ann_path)
    if not isinstance(annotations, dict):
        raise ProbekitError(f"{ann_path}: not a JSON object of annotations by ARC id")
    return questions, annotations


def _arc_hub() -> tuple[Records, dict]:
    records = []
    for config in ARC_CONFIGS:
        for split in HF_SPLITS:
            for row in _hub_rows("allenai/ai2_arc", config, split):
                records.append({**row, "arc_set": config, "split": split})
    annotations = json.loads(_bundled("arc-challenge-easy-annotations.json").read_text(encoding="utf-8"))
    return records, annotations


def _arc_sample() -> tuple[Records, dict]:
    records = read_jsonl(_bundled("arc_sample.jsonl"))
    annotations = json.loads(_bundled("arc-challenge-easy-annotations.json").read_text(encoding="utf-8"))
    return records, annotations


def _grade(text: str) -> float:
    last = str(text).split()[-1] if str(text).split() else ""
    return float(last) if last.isdigit() else float("nan")


def normalise_arc(records: Records, annotations: dict) -> Records:
    """ARC questions inner-joined with the paper's annotations on the ARC id (docs/protocol.md §1.2).

    Items whose grade is not a number ("Biology", "Earth and Space Sciences") are dropped, as are
    repeated ids (first kept).
    """
    by_id = {key[6:]: value for key, value in annotations.items()}
    items, seen = [], set()
    for i, rec in enumerate(records):
        _fields(rec, f"ARC record {i + 1}", id=str, question=str, choices=dict, answerKey=str)
        ann = by_id.get(rec["id"])
        if ann is None or rec["id"] in seen:
            continue
        if not isinstance(ann, dict) or any(k not in ann for k in ("grade", "difficulty", "bloom",
                                                                    "depth_of_knowledge")):
            raise ProbekitError(f"ARC annotation of {rec['id']!r}: needs grade, difficulty, bloom and "
                                f"depth_of_knowledge, got {json.dumps(ann)[:80]}")
        if not np.isfinite(_grade(ann["grade"])):
            continue
        seen.add(rec["id"])
        at = rec.get(WHERE, f"ARC item {rec['id']!r}")
        _texts(rec["choices"].get("text"), at, "choices.text")
        if not isinstance(rec["choices"].get("label"), list) or len(rec["choices"]["label"]) != len(rec["choices"]["text"]):
            raise ProbekitError(f"{at}: choices.label must list one label per choice")
        labels = list(rec["choices"]["label"])
        if rec["answerKey"] not in labels:
            raise ProbekitError(f"ARC item {rec['id']!r}: answerKey {rec['answerKey']!r} not among its labels {labels}")
        items.append({
            "id": rec["id"],
            "question": rec["question"],
            "choices": list(rec["choices"]["text"]),
            "label": labels.index(rec["answerKey"]),
            "source": f"{rec['arc_set']}/{rec['split']}",
            "grade": _grade(ann["grade"]),
            "difficulty": GRADE_DIFFICULTY.get(ann["difficulty"], np.nan),
            "bloom": GRADE_BLOOM.get(ann["bloom"], np.nan),
            "depth_of_knowledge": GRADE_DOK.get(ann["depth_of_knowledge"], np.nan),
            "arc_set": rec["arc_set"],
            "split": rec["split"],
        })
    return items


# -------------------------------------------------------------------------------------- MMLU
MMLU_SUBJECTS = ("biology", "chemistry", "computer_science", "mathematics", "physics")
MMLU_LEVELS = ("high_school", "college")
MMLU_SPLITS = (("validation", "val"), ("test", "test"))


def _mmlu_names() -> list[str]:
    return [f"{level}_{subject}" for level in MMLU_LEVELS for subject in MMLU_SUBJECTS]


def _mmlu_local(data_dir: Path) -> Records:
    records = []
    for subject in _mmlu_names():
        for split, folder in MMLU_SPLITS:
            path = _require(data_dir / "mmlu" / folder / f"{subject}_{folder}.csv", data_dir)
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                for row in reader:
                    if len(row) != 6:
                        raise ProbekitError(f"{path} line {reader.line_num}: {len(row)} fields, expected 6 "
                                            "(question, four choices, answer letter)")
                    if row[5].strip() not in ("A", "B", "C", "D") or not all(c.strip() for c in row[:5]):
                        raise ProbekitError(f"{path} line {reader.line_num}: needs a question, four non-empty "
                                            f"choices and an answer letter A-D, got answer {row[5]!r}")
                    records.append({
                        "question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5].strip()),
                        "subject": subject, "split": split,
                    })
    return records


def _mmlu_hub() -> Records:
    records = []
    for subject in _mmlu_names():
        for split, _ in MMLU_SPLITS:
            for row in _hub_rows("tasksource/mmlu", subject, split):
                records.append({"question": row["question"], "choices": list(row["choices"]),
                                "answer": int(row["answer"]), "subject": subject, "split": split})
    return records


def normalise_mmlu(records: Records) -> Records:
    """MMLU STEM-5: five subjects, high school = 0 and college = 1 (docs/protocol.md §1.3)."""
    counters: dict[tuple[str, str], int] = {}
    items = []
    for rec in records:
        key = (rec["subject"], rec["split"])
        counters[key] = counters.get(key, -1) + 1
        items.append({
            "id": f"{rec['subject']}/{rec['split']}/{counters[key]}",
            "question": rec["question"],
            "choices": list(rec["choices"]),
            "label": int(rec["answer"]),
            "source": f"mmlu/{rec['subject']}/{rec['split']}",
            "human_hardness": 0.0 if rec["subject"].startswith("high_school") else 1.0,
            "subject": rec["subject"],
        })
    return items


# -------------------------------------------------------------------------------- StrategyQA
def _strategyqa_local(data_dir: Path) -> Records:
    records = []
    for name in ("train.json", "dev.json"):
        path = _require(data_dir / "strategyqa" / name, data_dir)
        content = _read_json(path)
        if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
            raise ProbekitError(f"{path}: not a JSON list of question objects")
        records.extend({**r, WHERE: f"{path} question {i + 1}"} for i, r in enumerate(content))
    return records


def _strategyqa_hub() -> Records:
    # wics/strategy-qa's "test" split is the official 2290-question train set (docs/protocol.md §1.4).
    return list(_hub_rows("wics/strategy-qa", None, "test"))


def normalise_strategyqa(records: Records) -> Records:
    """StrategyQA as yes/no items, ordered by qid so every source gives the same rows (§1.4)."""
    items = []
    for i, rec in enumerate(records):
        _fields(rec, f"StrategyQA record {i + 1}", qid=str, question=str, answer=bool, facts=list, decomposition=list)
        if not rec["question"].strip() or not all(isinstance(f, str) for f in rec["facts"]):
            raise ProbekitError(f"{rec.get(WHERE, rec['qid'])}: needs a question and facts as texts")
    for rec in sorted(records, key=lambda r: r["qid"]):
        reasoning = " ".join(rec["facts"])
        items.append({
            "id": rec["qid"],
            "question": rec["question"],
            "choices": ["yes", "no"],
            "label": 0 if rec["answer"] else 1,
            "source": "strategyqa/train",
            "num_steps": float(len(rec["decomposition"])),
            "reasoning_num_words": float(len(reasoning.split())),
            "reasoning": reasoning,
            "term": rec.get("term", ""),
        })
    return items


# ------------------------------------------------------------------------------------- GSM8k
GSM8K_SPLITS = ("train", "test")
GSM8K_MAX_STEPS = 10


def _gsm8k_local(data_dir: Path) -> Records:
    records = []
    for split in GSM8K_SPLITS:
        path = _require(data_dir / "gsm8k" / f"{split}.jsonl", data_dir)
        records.extend({**row, "split": split} for row in read_jsonl(path))
    return records


def _gsm8k_hub() -> Records:
    return [{**row, "split": split} for split in GSM8K_SPLITS for row in _hub_rows("openai/gsm8k", "main", split)]


def normalise_gsm8k(records: Records) -> Records:
    """GSM8k with the gold answer as its single choice (docs/protocol.md §1.5)."""
    counters: dict[str, int] = {}
    items = []
    for i, rec in enumerate(records):
        _fields(rec, f"GSM8k record {i + 1}", question=str, answer=str)
        if not rec["question"].strip():
            raise ProbekitError(f"{rec.get(WHERE, f'GSM8k record {i + 1}')}: empty question")
        if "####" not in rec["answer"]:
            raise ProbekitError(f"{rec.get(WHERE, 'GSM8k ' + rec['split'] + ' item')}: answer has no '####' final "
                                f"answer: {rec['answer'][:60]!r}")
        counters[rec["split"]] = counters.get(rec["split"], -1) + 1
        reasoning, answer = rec["answer"].split("####", 1)
        reasoning, answer = reasoning.strip("\n"), answer.strip()
        items.append({
            "id": f"gsm8k/{rec['split']}/{counters[rec['split']]}",
            "question": rec["question"],
            "choices": [answer],
            "label": 0,
            "source": f"gsm8k/{rec['split']}",
            "num_steps": float(min(len(reasoning.split("\n")), GSM8K_MAX_STEPS)),
            "reasoning_num_words": float(len(reasoning.split())),
            "reasoning": reasoning,
        })
    return items


# ------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class SetSpec:
    """How one built-in set is read, normalised and described."""

    name: str
    description: str
    measures: tuple[str, ...]          # set-specific measures; the common three are added
    paper_measures: tuple[str, ...]    # the measures the paper's population table uses
    prompt_template: str
    generative: bool
    holdout: int                       # items held out for MDL hardness (0: none)
    local_files: str                   # what --data-dir must hold, for messages and listings
    hub: str
    read_local: Callable[[Path], object]
    read_hub: Callable[[], object]
    normalise: Callable[..., Records]

    @property
    def all_measures(self) -> tuple[str, ...]:
        return self.measures + COMMON_MEASURES


def _apply(normalise: Callable[..., Records], raw: object) -> Records:
    return normalise(*raw) if isinstance(raw, tuple) else normalise(raw)


SETS: dict[str, SetSpec] = {
    "arc": SetSpec(
        "arc", "ARC Easy + Challenge (all splits) joined with grade/difficulty/bloom/DoK annotations",
        ("grade", "difficulty", "bloom", "depth_of_knowledge"),
        ("grade", "difficulty", "bloom", "question_num_words", "answer_num_words"),
        "0040", False, 1000,
        "arc/arc_all_splits.jsonl, arc/arc-challenge-easy-annotations.json", "allenai/ai2_arc",
        _arc_local, _arc_hub, normalise_arc),
    "mmlu": SetSpec(
        "mmlu", "MMLU STEM-5 (5 subjects, high school = easy, college = hard; validation + test)",
        ("human_hardness",), ("human_hardness", "question_num_words", "answer_num_chars"),
        "0040", False, 0, "mmlu/{val,test}/<subject>_<split>.csv", "tasksource/mmlu",
        _mmlu_local, _mmlu_hub, normalise_mmlu),
    "strategyqa": SetSpec(
        "strategyqa", "StrategyQA yes/no questions (2290), hardness = decomposition steps",
        ("num_steps", "reasoning_num_words"), ("num_steps", "question_num_words", "reasoning_num_words"),
        "0306", False, 0, "strategyqa/train.json, strategyqa/dev.json", "wics/strategy-qa",
        _strategyqa_local, _strategyqa_hub, normalise_strategyqa),
    "gsm8k": SetSpec(
        "gsm8k", "GSM8k math word problems (train + test), generative: the gold answer is the one choice",
        ("num_steps", "reasoning_num_words"),
        ("num_steps", "question_num_words", "reasoning_num_words", "answer_num_chars"),
        "0306", True, 1000, "gsm8k/train.jsonl, gsm8k/test.jsonl", "openai/gsm8k",
        _gsm8k_local, _gsm8k_hub, normalise_gsm8k),
    "arc-sample": SetSpec(
        "arc-sample", "bundled sample of annotated ARC questions (offline demo; CC BY-SA 4.0 / Apache-2.0)",
        ("grade", "difficulty", "bloom", "depth_of_knowledge"),
        ("grade", "difficulty", "bloom"),
        "0040", False, 0, "(inside the package)", "",
        lambda _dir: _arc_sample(), _arc_sample, normalise_arc),
}
ALIASES = {"bundled": "arc-sample", "ai2_arc": "arc", "mmlu_stem-5": "mmlu", "strategy-qa": "strategyqa",
           "gsm8k_main": "gsm8k"}


class HubUnreachable(ProbekitError):
    """The Hugging Face hub cannot be reached and the set is not in the local hub cache."""


_HUB_ONLINE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (checked once per process).

    ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` in the environment count as unreachable.
    """
    global _HUB_ONLINE
    if _HUB_ONLINE is None:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
            _HUB_ONLINE = False
        else:
            import socket
            from urllib.parse import urlparse

            url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=timeout).close()
                _HUB_ONLINE = True
            except OSError:
                _HUB_ONLINE = False
    return _HUB_ONLINE


def _go_offline() -> None:
    """Make ``datasets`` read its local cache only (no retries against an unreachable hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            setattr(sys.modules[module], name, True)


def _hub_rows(path: str, config: str | None, split: str):
    online = hub_reachable()
    if not online:
        _go_offline()  # before `datasets` is imported: it reads the setting once
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise ProbekitError("loading from the Hugging Face hub needs the 'datasets' package") from exc
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # network, missing config, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not online:
            raise HubUnreachable(f"the Hugging Face hub cannot be reached and {path} is not in its local cache") from None
        raise ProbekitError(
            f"could not load {path}{'/' + config if config else ''} split {split} from the Hugging Face hub "
            f"({first[:160]}); pass --data-dir with the original files instead"
        ) from None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    holdout: bool | None = None,
) -> ItemSet:
    """Load a question set as an :class:`ItemSet`.

    ``name`` is a built-in set (``arc``, ``mmlu``, ``strategyqa``, ``gsm8k``, ``arc-sample``) or the
    path of a user's JSONL/CSV file. ``source`` is ``"local"`` (read ``data_dir``), ``"hub"`` (the
    Hugging Face hub) or ``"auto"``: ``data_dir`` if given, else ``$PROBEKIT_DATA_DIR`` if set, else
    the hub. ``holdout`` keeps aside the set's hardness hold-out (ARC and GSM8k, 1000 items) as
    ``pool == "holdout"``; it defaults to the set's own setting.
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SETS:
        path = Path(name)
        if path.suffix.lower() in {".jsonl", ".json", ".csv"}:
            from probekit.data.userfile import load_user_file

            return load_user_file(path)
        raise ProbekitError(
            f"unknown dataset {name!r}: choose one of {', '.join(SETS)} or give a .jsonl/.csv file"
        )
    spec = SETS[key]
    if data_dir is None and source == "auto":
        data_dir = os.environ.get("PROBEKIT_DATA_DIR") or None
    if source not in {"auto", "local", "hub"}:
        raise ProbekitError(f"unknown source {source!r}: choose auto, local or hub")
    use_local = key == "arc-sample" or source == "local" or (source == "auto" and data_dir is not None)
    if use_local:
        if key != "arc-sample":
            if data_dir is None:
                raise ProbekitError(f"source 'local' needs a data folder for {key} (--data-dir)")
            data_dir = Path(data_dir).expanduser()
            if data_dir.exists() and not data_dir.is_dir():
                raise ProbekitError(f"--data-dir {data_dir} is a file, not a folder (give the folder holding "
                                    f"{spec.local_files.split(',')[0].split('/')[0]}/)")
            if not data_dir.is_dir():
                raise ProbekitError(f"data folder {data_dir} does not exist")
        raw = spec.read_local(Path(data_dir) if data_dir else Path("."))
        origin = "bundled" if key == "arc-sample" else f"local:{Path(data_dir).resolve()}"
    else:
        try:
            raw = spec.read_hub()
        except HubUnreachable as exc:
            raise ProbekitError(
                f"cannot load {key}: {exc}; point at local files with --data-dir FOLDER "
                f"(or $PROBEKIT_DATA_DIR) holding {spec.local_files}"
            ) from None
        origin = f"hub:{spec.hub}"
    records = _apply(spec.normalise, raw)
    n_holdout = spec.holdout if holdout is None or holdout else 0
    if holdout and not spec.holdout:
        raise ProbekitError(f"dataset {key} has no hardness hold-out")
    if n_holdout:
        for row in holdout_rows(len(records), n_holdout, seed=0):
            records[row]["pool"] = "holdout"
    where = f"dataset {key} ({origin})"
    table = build_table(records, spec.all_measures, where)
    return ItemSet(key, table, spec.all_measures, spec.prompt_template, spec.generative, origin)


def dataset_names() -> list[str]:
    return list(SETS)
