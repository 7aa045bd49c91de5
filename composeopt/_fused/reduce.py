"""How a rule describes a reduction in its fast path: a stage boundary of the plan.

An elementwise rule's fast path is one `Kernel`.  A rule whose update needs a
number computed from a whole array, or from the whole tree, before it can go
on (a norm, a trust ratio, a finite flag) describes its fast path as
`Staged(part, part, ...)`: kernels and `Reduce` s in the order they happen.
At each `Reduce` the planner ends a stage: the kernels before it run over
every array (fused with the kernels of the rules before it in the chain) and
write the update as it reaches the reduction into a scratch buffer, the
backend's reduction kernels measure that update (or the parameter) per
array, and the rule's `finish` turns the measures into scalars for the
kernel that follows it, which starts the next stage.

A wrapper whose inner rule keeps its own fast path (SkipNonFinite) sets
`Wrapping(reduce)` instead: its reduction, then the inner rule's plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .kernel import Kernel

__all__ = [
    "FINITE",
    "Measure",
    "Outcome",
    "Reduce",
    "Staged",
    "Wrapping",
    "capped",
    "norm_of",
    "joint_power",
    "clip_scale",
]

FINITE = "finite"
"""A measure's `p` for the finite flag: 0.0 when every element is finite, NaN otherwise."""


@dataclass(frozen=True)
class Measure:
    """One number per array: `sum |a|^p` (`max |a|` for `p = inf`, the finite flag for
    `FINITE`), in float64, of `a` = the update as it reaches the rule (`of="d"`) or the
    parameter (`of="x"`)."""

    of: str
    p: float | str


@dataclass(frozen=True)
class Outcome:
    """What a `finish` decided for the arrays of one reduction.

    `scalars`: per array, the named scalars of the kernel that follows; `None` to skip
    the step for these arrays (nothing of theirs changes).  `commit`: called once the
    whole step has been computed, to change host-side state (counters of skipped steps).
    """

    scalars: Sequence[Mapping[str, float]] | None
    commit: Callable[[], None] | None = None


Finish = Callable[[Any, Sequence[Any], Sequence[Sequence[float]], Sequence[Any], Sequence[str]], Outcome]


@dataclass(frozen=True, eq=False)
class Reduce:
    """A reduction between two stages of a rule's fast path.

    Args:
        measures: `measures(rule) -> tuple[Measure, ...]`, what to measure per array.
        finish: `finish(rule, states, values, dtypes, paths) -> Outcome` for the arrays
            that meet at this reduction (for `scope="tree"`, every array that reaches
            the rule; for `scope="array"`, one or many arrays, each to be decided on its
            own): their rule states, their measures (in the order of `measures`), dtypes
            and paths.  It may raise a `ComposeoptError` only if `decisive` says so, and
            skip (`scalars=None`) only then and only for `scope="tree"`.
        scope: `"array"` or `"tree"`.
        decisive: `decisive(rule) -> bool`, whether `finish` may raise or skip.  A
            decisive reduction must come before any state is written this step: the
            planner lets it be only the first boundary, after stateless kernels.
        state_ok: `state_ok(rule_state, x) -> bool`, whether host-side state that
            `finish` reads and writes is what `init` makes (else: the generic path).
        exchange: for a tree-scope reduction that combines the updates themselves rather
            than numbers measured from them (the all-reduce of `AllReduceMean`):
            `exchange(rule, updates, dtypes, paths) -> updates`, called before `finish`
            with the 1-d updates as they reach the rule, which it must not write; what
            it returns is what the next stage reads.
    """

    measures: Callable[[Any], tuple[Measure, ...]]
    finish: Finish
    scope: str = "array"
    decisive: Callable[[Any], bool] = lambda rule: False
    state_ok: Callable[[Any, Any], bool] = lambda state, x: True
    exchange: Callable[[Any, Sequence[Any], Sequence[Any], Sequence[str]], list[Any]] | None = None


@dataclass(frozen=True, eq=False)
class Staged:
    """A fast path in several stages: `Kernel` s and `Reduce` s, in order.

    The kernel right after a `Reduce` also reads the scalars its `finish` returns.
    """

    parts: tuple[Kernel | Reduce, ...]

    def __init__(self, *parts: Kernel | Reduce) -> None:
        object.__setattr__(self, "parts", parts)


@dataclass(frozen=True, eq=False)
class Wrapping:
    """The fast path of a wrapper: its `reduce` first, then its inner rule's plan (the
    inner rule's state is the wrapper's state attribute `inner`)."""

    reduce: Reduce


def capped(power: float, dtype: Any) -> float:
    """A measured power as the generic path, summing in the arrays' own dtype (as torch and
    optax do), sees it: infinite when that dtype cannot hold it (NaN stays NaN)."""
    return math.inf if power > float(np.finfo(dtype).max) else power


def norm_of(power: float, p: float) -> float:
    """The p-norm whose power `sum |a|^p` (`max |a|` for `p = inf`) is `power`."""
    if p == math.inf or p == 1:
        return power
    if p == 2:
        return math.sqrt(power)
    return float(power ** (1 / p))


def joint_power(powers: Sequence[float], p: float, dtypes: Sequence[Any]) -> float:
    """The power of the joint norm of arrays whose powers are `powers`."""
    if p == math.inf:
        return math.nan if any(power != power for power in powers) else max(powers, default=0.0)
    total = math.fsum(powers) if all(math.isfinite(power) for power in powers) else sum(powers)
    if dtypes and total > max(float(np.finfo(dtype).max) for dtype in dtypes):
        return math.inf
    return total


def clip_scale(norm: float, omega: float) -> float:
    """`omega / max(norm, omega)` with NumPy's NaN-propagating maximum."""
    return omega / (norm if (norm > omega or norm != norm) else omega)
