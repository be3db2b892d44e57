"""Process-wide resources of the probe engine's host path: worker threads, BLAS threading, memory.

Kept apart from the maths (:mod:`probekit.probe.kernel`) and the executors
(:mod:`probekit.probe.engine`): what lives here belongs to the process, not to a fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import scipy.linalg  # noqa: F401 - loads the LAPACK that jax's CPU kernels call, so BLAS thread limits reach it
from threadpoolctl import threadpool_limits

_POOLS: dict[int, ThreadPoolExecutor] = {}


def default_workers() -> int:
    """Host threads fitting heads concurrently: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pool(workers: int) -> ThreadPoolExecutor:
    """A long-lived pool of ``workers`` threads (reused across calls, so are their allocator arenas)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="probekit")
    return _POOLS[workers]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS libraries (numpy's and the LAPACK jax's CPU kernels call) single-threaded meanwhile: the
    host path runs one head per thread instead."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
