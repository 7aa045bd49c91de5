"""Rules that decide whether a step happens: gradient accumulation and skipping non-finite steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._collective import any_across
from .._dispatch import namespace
from .._fused.reduce import FINITE, Measure, Outcome, Reduce, Wrapping
from ..errors import HyperparameterError, NonFiniteError
from ..hyper import Hyper, positive_int
from ..rule import Rule, State
from .wrappers import Wrapper

__all__ = ["AccumGrad", "SkipNonFinite"]


class AccumGrad(Rule):
    r"""Accumulate gradients over `n` calls and update on the `n`-th: `AccumGrad(n)`.

    $$a \leftarrow a + \frac{dx}{n}; \qquad
    \Delta = \begin{cases} a \text{ (then } a \leftarrow 0) & \text{every } n\text{-th call} \\
    \text{none: } x \text{ is left alone} & \text{otherwise}\end{cases}$$

    Put it first in a chain, `Optimiser(AccumGrad(4), Adam())`: between
    updates the parameter leaves the chain (the rule returns `None`), so the
    later rules neither run nor change their state, and they see the mean of
    the last `n` gradients once every `n` calls.  This is a large batch made
    of `n` small ones.  Each parameter counts its own calls, so all parameters
    update together when they get a gradient at every call.

    Args:
        n: the number of gradients to average per update, an integer $\ge 1$.

    State: `acc` ($a$) and `count`, the calls since the last update.

    Same as `optax.MultiSteps(inner, every_k_schedule=n)` (whose accumulator
    is float32 unless given `accumulator_dtype`) and Optimisers.jl's
    `AccumGrad(n)`, which also skip the later rules between updates.  Rules
    that count optimiser steps rather than their own calls
    ([ExpDecay][composeopt.ExpDecay], schedules) still count every call.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.Optimiser(co.AccumGrad(2), co.Descent(1.0)), np.zeros(1)
        >>> _ = co.update_(opt, x, np.array([1.0]))
        >>> print(x)  # nothing yet
        [0.]
        >>> _ = co.update_(opt, x, np.array([3.0]))
        >>> print(x)  # the mean of 1 and 3
        [-2.]
    """

    fallible = False
    n: Hyper[int] = Hyper(default=1, check=positive_int)
    _kernel = None  # it decides per call whether a step happens: the generic path

    def init(self, x: Any) -> State:
        return State(acc=namespace(x).zeros_like(x), count=0)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        state.count += 1
        state.acc = state.acc + dx / self.n
        if state.count < self.n:
            return None
        update, state.acc, state.count = state.acc, namespace(x).zeros_like(x), 0
        return update


def _max_consecutive(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return positive_int(value)
    except HyperparameterError as err:
        raise HyperparameterError(f"{err} (or None, never give up)") from None


_ANOTHER_RANK = "a parameter of another rank's shard"


def _decide(
    rule: SkipNonFinite, states: Sequence[Any], flags: Sequence[Sequence[float]], paths: Sequence[str]
) -> Outcome:
    """The fast path's decision, from each gradient's finite flag (0.0, or NaN): as `apply_tree_`."""
    finite = [flag == 0.0 for (flag,) in flags]
    if not any_across(not all(finite)):  # in a sharded step, a bad gradient on any rank skips

        def restart() -> None:
            for state in states:
                if state.streak:  # a field set moves `state_changes`: set none that stays
                    state.streak = 0

        return Outcome([{}] * len(states), restart)
    if rule.max_consecutive is not None and max(s.streak for s in states) >= rule.max_consecutive:
        first = next((path for path, ok in zip(paths, finite) if not ok), _ANOTHER_RANK)
        raise NonFiniteError(
            f"{first}: gradient is not finite, after {rule.max_consecutive} skipped steps in a row"
        )

    def count() -> None:
        for state in states:
            state.skipped += 1
            state.streak += 1

    return Outcome(None, count)


class SkipNonFinite(Wrapper):
    r"""Skip every step whose gradients are not all finite: `SkipNonFinite(inner, max_consecutive=None)`.

    A tree-level rule: if any gradient of the tree holds an infinity or a NaN,
    the whole step is skipped (no parameter and no state of `inner` changes)
    and counted; otherwise `inner` takes the step.  Deciding needs one read
    of a device flag per step (a GPU sync).  Inside a
    [ShardedOptimiser][composeopt.dist.ShardedOptimiser] a non-finite gradient
    in any rank's shard skips the step on every rank.

    Args:
        inner: the rule or chain to protect; wrap the whole chain so that no
            rule of it sees the bad gradients.
        max_consecutive: give up after this many skipped steps in a row: the
            next non-finite step raises [NonFiniteError][composeopt.errors.NonFiniteError]
            (and changes nothing).  `None` (the default) never gives up.

    State: `inner` (the inner rule's state), `skipped` (non-finite steps in
    all) and `streak` (non-finite steps in a row, 0 after a finite one).

    Same as `optax.apply_if_finite(inner, max_consecutive_errors)` while it
    skips (`skipped` is optax's `total_notfinite`, `streak` its
    `notfinite_count`); when the limit is passed optax applies the non-finite
    update, where this rule raises.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.SkipNonFinite(co.Descent(0.5)), np.ones(2)
        >>> _ = co.update_(opt, x, np.array([1.0, np.nan]))
        >>> print(x, co.state_store(opt).get(x).skipped)
        [1. 1.] 1
        >>> _ = co.update_(opt, x, np.array([1.0, 1.0]))
        >>> print(x)
        [0.5 0.5]
    """

    max_consecutive: Hyper[int | None] = Hyper(default=None, check=_max_consecutive)
    _kernel = Wrapping(
        Reduce(
            lambda rule: (Measure("d", FINITE),),
            lambda rule, states, values, dtypes, paths: _decide(rule, states, values, paths),
            scope="tree",
            decisive=lambda rule: True,
            state_ok=lambda state, x: (
                type(getattr(state, "skipped", None)) is int and type(getattr(state, "streak", None)) is int
            ),
        )
    )

    @property
    def fallible(self) -> bool:  # type: ignore[override]
        return self.max_consecutive is not None or self.inner.fallible

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        return [State(inner=state, skipped=0, streak=0) for state in self.inner.init_tree_(xs, paths)]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        if not dxs:
            return []
        xp = namespace(*dxs)
        finite = xp.all(xp.isfinite(dxs[0]))
        for dx in dxs[1:]:
            finite = xp.logical_and(finite, xp.all(xp.isfinite(dx)))
        if not any_across(not bool(finite)):  # the one host read of the step
            for state in states:
                state.streak = 0
            return self.inner.apply_tree_([state.inner for state in states], xs, dxs, paths)
        if self.max_consecutive is not None and max(s.streak for s in states) >= self.max_consecutive:
            first = next((p for p, dx in zip(paths, dxs) if not bool(xp.all(xp.isfinite(dx)))), _ANOTHER_RANK)
            raise NonFiniteError(
                f"{first}: gradient is not finite, after {self.max_consecutive} skipped steps in a row"
            )
        for state in states:
            state.skipped += 1
            state.streak += 1
        return [None] * len(dxs)
