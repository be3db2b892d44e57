"""How the work is dealt out: to processes (ranks under ``torchrun``/``accelerate``) and to forward passes.

:func:`dist_env` reads a process's rank from the environment; :func:`rank_share` deals pieces of
work (a fine-tuning run's heads, a generation's units) to ranks, ``i % world_size == rank``, with no
process group (each piece is independent); :func:`barrier` waits for every rank where a rendezvous
is configured. :func:`length_batches` groups items of similar packed length into one forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from probekit.errors import ProbekitError
from probekit.llm.tokens import Encoded

T = TypeVar("T")


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/accelerate environment variables (0, 1, 0 if unset)."""
    def _int(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise ProbekitError(f"environment variable {name}={raw!r} is not an integer") from None

    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ProbekitError(f"RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world})")
    return rank, world, local


def rank_share(pieces: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The pieces rank ``rank`` of ``world_size`` takes: those at positions ``i % world_size == rank``."""
    return [p for i, p in enumerate(pieces) if i % world_size == rank]


def length_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar packed length (less padding)."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].n_tokens_shared, i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def barrier(rank: int, world_size: int) -> None:
    """Wait for every rank (gloo, CPU) when a torchrun/accelerate rendezvous is configured."""
    if not os.environ.get("MASTER_ADDR"):
        return
    import datetime

    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(hours=2))
    try:
        dist.barrier()
    finally:
        if own:
            dist.destroy_process_group()
