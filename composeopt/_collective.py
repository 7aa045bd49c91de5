"""The processes a step is spread over, as the tree-level rules see them.

A sharded optimiser (`composeopt.dist.ShardedOptimiser`) runs its chain on
each rank over that rank's shard of the parameters.  A rule whose result
depends on the whole tree (the global norm of `ClipGlobalNorm`, the finite
flag of `SkipNonFinite`, the dot products of `LBFGS`) must then combine what
it found on its shard with the other ranks' before it goes on.  While such a
step runs, `across(comm)` makes `comm` the current communicator, and those
rules pass their host-side numbers through the functions here, which are the
identity when no communicator is current (every ordinary step).

Also here: which communicators a chain uses (`comms_of`), so that the engine
can make the ranks agree on each step's check before any of them goes on.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["across", "current", "combine_powers", "any_across", "sum_across", "comms_of"]

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("composeopt_shards", default=None)


@contextlib.contextmanager
def across(comm: Any) -> Iterator[None]:
    """Make `comm` the communicator the tree-level rules reduce over, for the `with` block."""
    token = _current.set(comm)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Any:
    """The communicator of the sharded step being taken, or `None`."""
    return _current.get()


def combine_powers(powers: Sequence[float], p: float) -> list[float]:
    """Each of `powers` (a shard's `sum |a|^p`, or `max |a|` for `p = inf`) combined over
    the ranks: their sum (their maximum), NaN if it is NaN on any rank."""
    comm = _current.get()
    if comm is None or comm.size == 1:
        return list(powers)
    values = np.array(powers, dtype=np.float64)
    if p == math.inf:
        nan = np.isnan(values).astype(np.float64)
        comm.allreduce_(nan, "sum")
        values = np.where(np.isnan(values), -np.inf, values)
        comm.allreduce_(values, "max")
        values = np.where(nan > 0, np.nan, values)
    else:
        comm.allreduce_(values, "sum")
    return [float(value) for value in values]


def sum_across(value: float) -> float:
    """A shard's sum (a dot product's part) summed over the ranks."""
    comm = _current.get()
    if comm is None or comm.size == 1:
        return value
    buffer = np.array([value], dtype=np.float64)
    comm.allreduce_(buffer, "sum")
    return float(buffer[0])


def any_across(flag: bool) -> bool:
    """Whether `flag` holds on some rank."""
    comm = _current.get()
    if comm is None or comm.size == 1:
        return flag
    buffer = np.array([1.0 if flag else 0.0])
    comm.allreduce_(buffer, "max")
    return bool(buffer[0] > 0)


def comms_of(opt: Any) -> list[Any]:
    """The communicators of more than one rank of the rules of `opt` (a rule keeps its own
    as `_comm`), each once."""
    from .rule import walk_rules

    found: list[Any] = []
    for rule in walk_rules(opt):
        comm = vars(rule).get("_comm")
        if comm is not None and comm.size > 1 and all(comm is not other for other in found):
            found.append(comm)
    return found
