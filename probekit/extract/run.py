"""The extraction pipeline: items -> model -> prefix-shared capture -> HDF5 shard cache.

``extract`` tokenises every item with its set's prompt template (docs/protocol.md §2), runs the model once
per batch of items with the prompt shared by all choices (:mod:`probekit.extract.capture`), and
writes hidden states (float16, or as :func:`settle_store_dtype` decides), choice log-probs and item metadata through
:func:`probekit.store.write_cache`, computing one shard's arrays at a time. The cache's lock is
taken before the model loads, so a second writer of the same cache is refused at once. A rerun
checks every recorded shard against its sha256, rewrites the damaged ones (naming them) and skips
the rest, so an interrupted or damaged cache is finished by running the command again.

Under ``torchrun``/``accelerate`` (``RANK``/``WORLD_SIZE`` in the environment) rank r writes the
shards k with ``k % world_size == r`` into the same cache directory; the manifest turns complete
when the last shard of any rank lands.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probekit.data.prompts import TEMPLATE_TEXT, render_prompt
from probekit.data.schema import choice_surface
from probekit.errors import ProbekitError
from probekit.extract.capture import capture_batch, resolve_sites
from probekit.extract.inputs import check_items, limit_items, with_template
from probekit.layers import parse as parse_layers
from probekit.layers import resolve_layers
from probekit.llm.batches import barrier as wait_for_ranks
from probekit.llm.batches import dist_env, length_batches
from probekit.llm.models import LoadedModel, ModelSpec, prepare_model, settle_model
from probekit.llm.progress import progress_bar
from probekit.llm.tokens import check_table_context, encode_rows
from probekit.store.layout import DTYPES as STORE_DTYPES
from probekit.store.layout import dtype_max, value_dtype

#: ``store_dtype="auto"``: a new cache is float16 unless the hidden states of the set's first batch of items
#: pass float16's largest value over this factor (65504 / 4 = 16376); then it is bfloat16.
AUTO_HEADROOM = 4


@dataclass
class ExtractSummary:
    out_dir: Path
    n_items: int  # items in the cache
    items_run: int  # items this process ran through the model
    tokens: int  # tokens this process ran
    seconds: float
    shards_written: list[int]
    bytes_on_disk: int
    complete: bool
    rank: int = 0
    world_size: int = 1
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)  # rewritten shard -> what was wrong
    store_dtype: str = "float16"
    store_note: str = ""  # how --store-dtype auto chose, when it did

    def line(self) -> str:
        rate = self.items_run / self.seconds if self.seconds > 0 else 0.0
        done = "complete" if self.complete else "incomplete (other ranks still writing)"
        repaired = "".join(f"; rewrote damaged {name} ({problem})" for name, problem in self.damaged.items())
        return (
            f"{self.items_run} items, {self.tokens:,} tokens in {self.seconds:.1f} s ({rate:.1f} items/s); "
            f"{len(self.shards_written)} shards written{repaired}; cache {self.out_dir} "
            f"{self.bytes_on_disk / 2**20:.1f} MiB, {self.n_items} items, {done}; hidden states {self.store_dtype}"
            + (f" ({self.store_note})" if self.store_note else "")
        )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*") if p.is_file())


def extract(
    items,
    out_dir: str | os.PathLike,
    model: str | ModelSpec | LoadedModel | None = None,
    *,
    layers: str | Sequence[int] = "all",
    sites: str | Sequence[str] = ("answer_end", "question_end"),
    batch_size: int = 8,
    shard_size: int = 256,
    store_dtype: str = "auto",
    limit: int | None = None,
    template: str | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    barrier: bool = True,
) -> ExtractSummary:
    """Run ``items`` through a model and write (or finish) the hidden-state cache ``out_dir``.

    ``model``: hub id, folder, ``.gguf`` file, named offline model, or None for the offline SmolLM2
    default (each means ``ModelSpec(model=...)``: device, dtype and quantize "auto"), a
    :class:`ModelSpec`, or an already loaded :class:`LoadedModel`. ``layers``: a layer spec (:mod:`probekit.layers`), e.g.
    ``"all"``, ``"middle_and_last"`` or indices into ``hidden_states``. ``sites``: ``answer_end``
    and/or ``question_end``. ``template``: a prompt template instead of the set's (``"cloze"``;
    recorded in the manifest). ``store_dtype``: float16, bfloat16 (stored as uint16 bits), float32, or
    ``auto`` (:func:`settle_store_dtype`). Rank and world size default to the ``RANK``/``WORLD_SIZE`` environment.
    """
    from probekit.store.manifest import read_manifest
    from probekit.store.writer import holding_cache

    sites = resolve_sites(sites)
    if not sites:
        raise ProbekitError("sites: at least one of answer_end, question_end is needed")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbekitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ProbekitError(f"shard_size must be a positive integer, got {shard_size!r}")
    if store_dtype not in (*STORE_DTYPES, "auto"):
        raise ProbekitError(f"store dtype {store_dtype!r} is not one of {', '.join(STORE_DTYPES)}, auto")
    items = with_template(limit_items(items, limit), template)
    if len(items) == 0:
        raise ProbekitError(f"dataset {getattr(items, 'name', '?')!r} has no items: nothing to extract")
    env_rank, env_world, local_rank = dist_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ProbekitError(f"rank {rank} is not in 0..{world_size - 1}")
    layer_spec = parse_layers(layers)  # a bad spec fails before the model loads
    out_dir = Path(out_dir)
    template = items.prompt_template
    render_prompt("q", ["a", "b"], template)  # unknown template -> error before loading
    check_items(items)  # choices the pass can score, before anything is written
    model = settle_model(model, local_rank, world_size)  # what this machine cannot run, before anything is written

    damaged: dict[str, str] = {}
    counts: dict[str, Any] = {"items": 0, "tokens": 0}
    t0 = time.perf_counter()
    with holding_cache(out_dir, rank):  # a second writer is refused before the model loads
        written = _extract_locked(items, out_dir, model, layer_spec, sites, template, batch_size, shard_size,
                                  store_dtype, rank, world_size, progress, counts, damaged.__setitem__)
    if world_size > 1 and barrier:
        wait_for_ranks(rank, world_size)
    seconds = time.perf_counter() - t0
    complete = bool((read_manifest(out_dir) or {}).get("complete"))
    return ExtractSummary(out_dir=out_dir, n_items=len(items), items_run=counts["items"], tokens=counts["tokens"],
                          seconds=seconds, shards_written=written, bytes_on_disk=_dir_bytes(out_dir),
                          complete=complete, rank=rank, world_size=world_size, damaged=damaged,
                          store_dtype=counts["store_dtype"], store_note=counts["store_note"])


def _extract_locked(items, out_dir: Path, model: ModelSpec | LoadedModel, layer_spec: Any, sites: list[str],
                    template: str, batch_size: int, shard_size: int, store_dtype: str, rank: int, world_size: int,
                    progress: bool, counts: dict[str, int], on_damaged: Any) -> list[int]:
    """Load the model (settled for this process) and write this rank's pending shards (the cache's lock is held)."""
    from probekit.store import write_cache

    lm = prepare_model(model)
    layer_idx = resolve_layers(layer_spec, lm.n_layers)
    table = items.table.reset_index(drop=True)
    check_table_context(lm, table, template)  # every prompt fits the model, before the first shard
    measures = list(items.measures)
    max_choices = int(items.max_choices)
    header = {
        "model": lm.identity,
        "dataset": {"name": items.name, "fingerprint": items.fingerprint, "n_items": len(table),
                    "origin": getattr(items, "origin", "")},
        "prompt": {"template": template, "text": TEMPLATE_TEXT.get(template, template), "k_shot": 0,
                   "tokenization": lm.rules.describe()},
        "capture": {"prefix_shared": True},
    }
    meta = table[["id", "label", "pool", "source", *measures]].assign(
        n_choices=table["choices"].map(len), **choice_surface(table["choices"]))
    desc = "extract" if world_size == 1 else f"extract rank {rank}/{world_size}"
    asked = store_dtype
    store_dtype, seen = settle_store_dtype(store_dtype, out_dir, lm, table, template, layer_idx, sites, max_choices,
                                           batch_size)
    if seen is not None and store_dtype == "bfloat16":
        header["dtype_choice"] = seen  # float16 chosen by auto stays byte-identical to --store-dtype float16
    counts["store_dtype"] = store_dtype
    counts["store_note"] = (f"auto: |h| up to {seen['max_abs']:.4g} on the first {seen['items']} items, "
                            f"float16 kept below {seen['limit']:.6g}" if seen else
                            "auto: the cache's own dtype" if asked == "auto" else "")
    with ExitStack() as stack:
        bar = None

        def start(ranges: list[tuple[int, int]]) -> None:
            nonlocal bar
            total = sum(hi - lo for lo, hi in ranges)
            bar = stack.enter_context(progress_bar(total, desc, enabled=progress and total > 0))

        def compute(lo: int, hi: int) -> dict[str, np.ndarray]:
            """Rows lo:hi through the model: hidden states (store dtype), choice log-probs and token counts."""
            encoded = encode_rows(lm, table.iloc[lo:hi], template, lm.rules)
            n = hi - lo
            out: dict[str, np.ndarray] = {
                s: np.zeros((len(layer_idx), n, max_choices, lm.hidden_size) if s == "answer_end"
                            else (len(layer_idx), n, lm.hidden_size), dtype=value_dtype(store_dtype))
                for s in sites
            }
            out["choice_sum"] = np.full((n, max_choices), -np.inf, dtype=np.float32)
            out["choice_tokens"] = np.zeros((n, max_choices), dtype=np.int32)
            for idx in length_batches(encoded, batch_size):
                cap = capture_batch(lm, [encoded[i] for i in idx], layer_idx, sites, max_choices)
                for site in sites:
                    _check_store_range(getattr(cap, site), store_dtype, site, layer_idx, [encoded[i].item_id for i in idx],
                                       chosen=counts["store_note"])
                if cap.answer_end is not None:
                    out["answer_end"][:, idx] = cap.answer_end
                if cap.question_end is not None:
                    out["question_end"][:, idx] = cap.question_end
                out["choice_sum"][idx] = cap.choice_sum
                out["choice_tokens"][idx] = cap.choice_tokens
                bar.advance(len(idx), cap.n_tokens)
                counts["tokens"] += cap.n_tokens
            counts["items"] += n
            return out

        written = write_cache(out_dir, header, meta, compute, layers=layer_idx, sites=sites,
                              hidden_size=lm.hidden_size, max_choices=max_choices, measures=measures,
                              shard_size=shard_size, dtype=store_dtype, rank=rank, world_size=world_size,
                              choice_surface=True, verify=True, on_start=start, on_damaged=on_damaged)
    return written


def _check_store_range(hidden: np.ndarray | None, store_dtype: str, site: str, layers: Sequence[int],
                       item_ids: Sequence[str], chosen: str = "") -> None:
    """Refuse hidden states the cache's dtype cannot hold (float16 ends at 65504; Gemma-3's residual
    stream reaches a few 10^4), instead of writing inf. ``chosen``: how ``auto`` chose the dtype."""
    if hidden is None:
        return
    limit = dtype_max(store_dtype)
    big = np.abs(hidden) > limit
    if big.any():
        at = np.argwhere(big)[0]
        fix = ("extract again into a new --out with --store-dtype bfloat16" if chosen.startswith("auto")
               else "extract with --store-dtype bfloat16 (or float32, or auto to choose from the first items)")
        raise ProbekitError(f"hidden state {float(hidden[tuple(at)]):.4g} at {site}, layer {layers[at[0]]}, item "
                            f"{item_ids[at[1]]!r} is beyond {store_dtype}'s range (±{limit:.6g})"
                            + (f" (--store-dtype {chosen})" if chosen else "") + f": {fix}")


def settle_store_dtype(store_dtype: str, out_dir: Path, lm: LoadedModel, table: Any, template: str,
                       layers: Sequence[int], sites: Sequence[str], max_choices: int,
                       batch_size: int) -> tuple[str, dict[str, Any] | None]:
    """The dtype a cache stores hidden states in, and for a new ``auto`` cache what the choice saw.

    A cache's dtype is fixed before its first shard, so ``auto`` decides from the set's first
    ``batch_size`` items (the same items on every rank, so every rank decides alike): float16 while
    their hidden states at the cached layers and sites stay within float16's largest value over
    :data:`AUTO_HEADROOM` (room for later items), else bfloat16, whose range is float32's. An
    existing cache keeps its own dtype. A cache ``auto`` keeps at float16 is the cache
    ``store_dtype="float16"`` writes, byte for byte; a later item that still passes float16's
    range is refused by the range check, as under an explicit float16.
    """
    if store_dtype != "auto":
        return store_dtype, None
    from probekit.store.manifest import read_manifest

    existing = read_manifest(out_dir)
    if existing is not None:
        return existing.get("dtype", "float16"), None
    rows = table.iloc[:batch_size]
    cap = capture_batch(lm, encode_rows(lm, rows, template, lm.rules), layers, sites, max_choices)
    hidden = [h for h in (cap.answer_end, cap.question_end) if h is not None]
    peak = max(float(np.nan_to_num(np.abs(h), nan=0.0).max()) for h in hidden)
    limit = dtype_max("float16") / AUTO_HEADROOM
    seen = {"rule": f"bfloat16 when the first items' |h| passes float16's {dtype_max('float16'):.6g} / {AUTO_HEADROOM}",
            "items": len(rows), "max_abs": peak, "limit": limit}
    return ("float16" if peak <= limit else "bfloat16"), seen
