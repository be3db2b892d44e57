"""In-context-learning score folders (``probekit extract --icl``): format, writer and reader.

Folder layout::

    DIR/icl.json        manifest: format, model, dataset, prompt, "icl" block (k, demos_from,
                        measure, seed, draws, key, max_seq_len; demos_dataset {name,
                        fingerprint} and demos_measure when the demonstrations come from
                        another question set; test_levels when only those levels of
                        measure were scored), n_items (items scored), max_choices,
                        draw_info (per draw: file, demo rows and ids, k used, shared prefix
                        length), complete
    DIR/draw-NNN.h5     per draw: items/id, logprob/choice_sum (n, C) float32 (-inf padded
                        choices, NaN for the draw's demonstrations), logprob/choice_tokens (n, C)

Written by :class:`IclScoresWriter`, read by :func:`load_icl`. Draw ``b`` belongs to rank
``b % world_size``; each rank holds the folder's per-rank lock (``.lock-rank{r}``, the cache's
mechanism), so a second writer of the same folder (and rank) is refused with one line. A draw
file is written under a unique temporary name, fsynced and renamed; only then is it recorded in
``icl.json``, which is replaced whole (temp file, fsync, rename, fsync of the folder) under the
blocking lock ``.icl.lock`` shared by the ranks. A rerun skips recorded draws and removes the
temporaries a killed run left.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from probekit.errors import ProbekitError
from probekit.store.layout import lock_name
from probekit.store.manifest import manifest_lock
from probekit.store.outdir import OutputDir, is_temporary, remove_temporaries, write_error, write_json

FORMAT = "probekit-icl/1"
MANIFEST = "icl.json"
MANIFEST_LOCK = ".icl.lock"
#: Manifest fields that must agree before a writer may add draws to an existing folder.
IDENTITY_FIELDS = ("format", "model", "dataset", "prompt", "icl", "n_items")


_ICL_ENTRY = re.compile(r"^(icl\.json|\.icl\.lock|draw-\d{3,}\.h5|\.lock-rank\d+)$")


def is_icl_entry(name: str) -> bool:
    """Whether a directory entry can be part of an ICL score folder (files, locks, temporaries)."""
    return bool(_ICL_ENTRY.match(name)) or is_temporary(name, MANIFEST) or (
        name.startswith(".draw-") and name.endswith(".tmp"))


def demo_level(icl: Mapping[str, Any]) -> str:
    """The training level an ICL folder's rows are labelled with in a results table: the level
    the demonstrations came from (``easy``, ``all``), prefixed by their question set and measure
    when they come from another set (``arc:grade:easy``, ``arc:all``), with a cut-off that is not the
    measure's default after ``@`` (``easy@grade=3,8``, ``arc:grade@3,8:easy``): rows cut by another rule
    are never reported as the default level."""
    other = icl.get("demos_dataset")
    cut = icl.get("demos_cutoff")
    measure = icl.get("demos_measure", icl["measure"])
    if not other:
        return str(icl["demos_from"]) + (f"@{measure}={cut}" if cut else "")
    if icl["demos_from"] == "all":
        return f"{other['name']}:all"
    return f"{other['name']}:{measure}" + (f"@{cut}" if cut else "") + f":{icl['demos_from']}"


def draw_name(b: int) -> str:
    """File name of draw ``b``: ``draw-003.h5``."""
    return f"draw-{b:03d}.h5"


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """``icl.json`` of a folder as a dict, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ProbekitError(f"{path} is not valid JSON") from None


class IclScoresWriter:
    """Writes one rank's draws of an ICL score folder (see the module docstring).

    ``header`` is the manifest without ``draw_info`` and ``complete``; it must hold the
    :data:`IDENTITY_FIELDS`, and ``header["icl"]["draws"]`` the number of draws. Entering takes
    the lock and refuses a folder holding scores of another configuration.
    """

    def __init__(self, out: str | os.PathLike, header: Mapping[str, Any], *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.out = Path(out)
        self.header = {**header, "format": FORMAT}
        self.draws = int(self.header["icl"]["draws"])
        self.my_draws = [b for b in range(self.draws) if b % world_size == rank]
        self._dir = OutputDir(self.out, [draw_name(b) for b in self.my_draws], "ICL score folder",
                              lock_file=lock_name(rank), own=is_icl_entry)

    def __enter__(self) -> IclScoresWriter:
        self._dir.__enter__()
        try:
            with manifest_lock(self.out, MANIFEST_LOCK):
                remove_temporaries(self.out, [MANIFEST])
                self._merged(read_manifest(self.out))
        except BaseException as exc:
            self._dir.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._dir.__exit__(exc_type, exc, tb)

    def _merged(self, manifest: dict | None) -> dict:
        """The existing manifest after checking it is this configuration, or a fresh one."""
        if manifest is None:
            return {**self.header, "draw_info": {}, "complete": False}
        for key in IDENTITY_FIELDS:
            if manifest.get(key) != self.header[key]:
                raise ProbekitError(f"{self.out} holds ICL scores with another {key}; choose another --out")
        return manifest

    def pending(self) -> list[int]:
        """This rank's draws not yet recorded with their file present."""
        info = self._merged(read_manifest(self.out))["draw_info"]
        done = {int(b) for b, entry in info.items() if (self.out / entry["file"]).is_file()}
        return [b for b in self.my_draws if b not in done]

    def write_draw(self, b: int, ids: Sequence[str], choice_sum: np.ndarray, choice_tokens: np.ndarray,
                   info: Mapping[str, Any]) -> None:
        """Write draw ``b``'s file durably, then record it (with ``info``) in the manifest."""
        tmp = self._dir.temp(draw_name(b))
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("items/id", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
                f.create_dataset("logprob/choice_sum", data=np.asarray(choice_sum, np.float32))
                f.create_dataset("logprob/choice_tokens", data=np.asarray(choice_tokens, np.int32))
                f.attrs["draw"] = b
        except (OSError, RuntimeError) as exc:  # a full disk or an unwritable folder
            tmp.unlink(missing_ok=True)
            raise write_error(exc, tmp, np.asarray(choice_sum).nbytes * 2) from None
        self._dir.commit(tmp, draw_name(b))
        with manifest_lock(self.out, MANIFEST_LOCK):
            m = self._merged(read_manifest(self.out))
            draw_info = {**m["draw_info"], str(b): {"file": draw_name(b), **info}}
            write_json(self.out / MANIFEST, {**m, "draw_info": draw_info, "complete": len(draw_info) == self.draws},
                       indent=1)

    @property
    def complete(self) -> bool:
        """Every draw of the folder (all ranks) is recorded."""
        return bool((read_manifest(self.out) or {}).get("complete"))


def load_icl(path: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(manifest, item ids, choice_sum (draws, n, C), choice_tokens (n, C)) of a complete ICL folder."""
    out = Path(path)
    manifest = read_manifest(out)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ProbekitError(f"{out} is not an ICL score directory (no {MANIFEST})")
    if not manifest.get("complete"):
        raise ProbekitError(f"{out}: ICL scores are incomplete ({len(manifest['draw_info'])} of "
                            f"{manifest['icl']['draws']} draws); rerun the command")
    sums, ids, toks = [], None, None
    for b in range(manifest["icl"]["draws"]):
        with h5py.File(out / manifest["draw_info"][str(b)]["file"], "r") as f:
            sums.append(f["logprob/choice_sum"][...])
            if ids is None:
                ids = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in f["items/id"][...]])
                toks = f["logprob/choice_tokens"][...]
    return manifest, ids, np.stack(sums), toks
