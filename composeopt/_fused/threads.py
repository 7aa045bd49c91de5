"""Splitting a step's work between CPU threads.

A step is memory-bound, and one core cannot saturate memory bandwidth: the
elements of all parameters are cut into one contiguous share per thread, so
a big array is split and many small ones are grouped.  The kernels release
the GIL (numba `nogil`, NumPy ufuncs), so the threads run at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["thread_count", "run_chunks", "chunk_shares", "shares", "run_together"]

PARALLEL_MIN = 1 << 18
"""Below this many elements in big jobs, one thread does it all (waking others costs more)."""

BIG_JOB = 1 << 15
"""Jobs this long or longer are split between threads; smaller ones stay on the calling thread,
where the call overhead, not memory, is what they cost (and it holds the GIL)."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def thread_count() -> int:
    """`COMPOSEOPT_NUM_THREADS`, or the number of CPUs this process may use."""
    configured = os.environ.get("COMPOSEOPT_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="composeopt")
        return _pool


Chunk = tuple[int, int, int]  # (job, lo, hi)


def run_chunks(work: Callable[[int, int, int], Any], sizes: Sequence[int]) -> list[list[Any]]:
    """Call `work(job, lo, hi)` over `[0, sizes[job])` for every job, in shares per thread.

    Returns, per job, the results of its chunks in order (one chunk unless it was split).
    """
    results: list[list[Any]] = [[] for _ in sizes]
    plan = chunk_shares(sizes)
    if len(plan) == 1:
        for job, lo, hi in plan[0]:
            results[job].append(work(job, lo, hi))
        return results

    def run(share: list[Chunk]) -> list[Any]:
        return [work(job, lo, hi) for job, lo, hi in share]

    futures: list[Future[list[Any]]] = [_executor(len(plan) - 1).submit(run, share) for share in plan[1:]]
    outputs = [run(plan[0])] + [future.result() for future in futures]
    for share, output in zip(plan, outputs):  # shares are in order, so are each job's chunks
        for (job, _, _), value in zip(share, output):
            results[job].append(value)
    return results


def chunk_shares(sizes: Sequence[int]) -> list[list[Chunk]]:
    """The `(job, lo, hi)` chunks of `run_chunks`, one share per thread: small jobs first and
    whole, big jobs cut between threads; a single share if the big jobs are too small to
    be worth waking other threads for."""
    big = sum(size for size in sizes if size >= BIG_JOB)
    threads = min(thread_count(), max(1, big // PARALLEL_MIN))
    if threads == 1:
        return [[(job, 0, size) for job, size in enumerate(sizes)]]
    order = sorted(range(len(sizes)), key=lambda job: sizes[job] >= BIG_JOB)  # small jobs first
    return [
        [(order[job], lo, hi) for job, lo, hi in share]
        for share in _split([sizes[j] for j in order], threads)
    ]


def _split(sizes: Sequence[int], parts: int) -> list[list[Chunk]]:
    """Cut the concatenated ranges into `parts` shares of nearly equal length, in order."""
    total = sum(sizes)
    shares: list[list[Chunk]] = [[] for _ in range(parts)]
    share, room = 0, -(-total // parts)
    for job, size in enumerate(sizes):
        lo = 0
        while lo < size:
            hi = size if share == parts - 1 else min(size, lo + room)
            shares[share].append((job, lo, hi))
            room -= hi - lo
            lo = hi
            if room <= 0 and share < parts - 1:
                share, room = share + 1, -(-total // parts)
        if size == 0:
            shares[share].append((job, 0, 0))
    return shares


def shares(sizes: Sequence[int]) -> list[list[Chunk]]:
    """`(job, lo, hi)` chunks of all the jobs' elements, one share per thread, for work that
    releases the GIL whatever the jobs' sizes (one call over many small jobs)."""
    threads = min(thread_count(), max(1, sum(sizes) // PARALLEL_MIN))
    return _split(sizes, threads)


def run_together(calls: Sequence[Callable[[], Any]]) -> None:
    """Run the calls at once, the first on this thread and the others in the pool."""
    futures = [_executor(len(calls) - 1).submit(call) for call in calls[1:]]
    calls[0]()
    for future in futures:
        future.result()
