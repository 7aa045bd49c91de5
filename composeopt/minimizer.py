"""`minimize`: run a rule to a minimum of a deterministic loss, with a line search for L-BFGS.

`update_` takes one step from a gradient.  Quasi-Newton methods also need
the loss, to choose how far to go along their direction; `minimize` owns
that loop: it calls the user's `fun_and_grad(params)` as often as the line
search needs, and stops when the gradient is small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._dispatch import copy, namespace
from .engine import reset_, update_
from .rule import Rule
from .rules.lbfgs import LBFGS
from .tree import zip_leaves

__all__ = ["minimize", "MinimizeResult"]

T = TypeVar("T")

_ARMIJO = 1e-4  # the sufficient-decrease constant c1 that Nocedal & Wright suggest
_SHRINK = 0.5
_MAX_BACKTRACKS = 40


@dataclass
class MinimizeResult:
    """What [minimize][composeopt.minimize] did.

    Attributes:
        loss: the loss at the returned parameters.
        losses: the loss at each accepted point, the starting point first.
        steps: steps taken (accepted points after the start).
        evaluations: calls of `fun_and_grad`.
        converged: whether the gradient's largest magnitude reached `tol`.
        message: why the loop stopped.
    """

    loss: float
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    evaluations: int = 0
    converged: bool = False
    message: str = ""


def minimize(
    fun_and_grad: Callable[[T], tuple[Any, Any]],
    params: T,
    opt: Rule | None = None,
    *,
    steps: int = 100,
    tol: float = 1e-6,
    line_search: bool | None = None,
) -> tuple[T, MinimizeResult]:
    r"""Minimise a loss over `params` in place; returns `(params, result)`.

    Each step asks `opt` for its update $\Delta$ (through
    [update_][composeopt.update_], so any rule or chain works).  With a line
    search, the step is then cut back, $x = x_0 - \tau\Delta$ for
    $\tau = 1, \frac12, \frac14, \dots$, until the Armijo condition
    $f(x) \le f(x_0) - 10^{-4}\,\tau\, g^T\Delta$ holds (backtracking; the
    rule sees the step actually taken at its next update).  Without one, each
    step is a plain `update_`.

    Args:
        fun_and_grad: `fun_and_grad(params) -> (loss, grads)`, the loss (a
            number or a 0-d array) and its gradient with the structure of
            `params`, at the current values of `params`.
        params: an array or a tree of arrays, updated in place.
        opt: the rule; by default `LBFGS()`.
        steps: the most steps to take.
        tol: stop when every gradient component has magnitude $\le$ `tol`.
        line_search: backtrack on the loss; by default only when `opt` is an
            [LBFGS][composeopt.LBFGS].

    Returns:
        `params` (the same object) and a
        [MinimizeResult][composeopt.MinimizeResult].

    A direction that does not go downhill ($g^T\Delta \le 0$, rounding in a
    badly conditioned problem) resets `opt`'s state and is taken again; a line
    search that finds no decrease puts the parameters back and stops.  Reading
    the loss and the slope waits for the device once per evaluation.

    Examples:
        The Rosenbrock function from its classic start:

        >>> import numpy as np, composeopt as co
        >>> def rosenbrock(x):
        ...     loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     grad = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2),
        ...                      200 * (x[1] - x[0] ** 2)])
        ...     return loss, grad
        >>> x, result = co.minimize(rosenbrock, np.array([-1.2, 1.0]), tol=1e-10)
        >>> print(np.round(x, 6), result.converged)
        [1. 1.] True
    """
    if opt is None:
        opt = LBFGS()
    if not isinstance(opt, Rule):
        raise TypeError(f"minimize: opt must be a composeopt Rule, got {type(opt).__name__}")
    search = isinstance(opt, LBFGS) if line_search is None else line_search
    result = MinimizeResult(loss=math.nan)

    def evaluate() -> tuple[float, Any]:
        result.evaluations += 1
        loss, grads = fun_and_grad(params)
        return float(loss), grads

    loss, grads = evaluate()
    result.losses.append(loss)
    while True:
        pairs = _pairs(params, grads)
        if max((_largest(g) for _, g in pairs), default=0.0) <= tol:
            result.converged, result.message = True, f"every gradient component is within {tol}"
            break
        if result.steps == steps:
            result.message = f"stopped after {steps} steps"
            break
        if not search:
            update_(opt, params, grads)
            loss, grads = evaluate()
        else:
            found = _line_search(opt, params, grads, pairs, loss, evaluate)
            if found is None:
                result.message = "the line search found no decrease"
                break
            loss, grads = found
        result.steps += 1
        result.losses.append(loss)
    result.loss = loss
    return params, result


def _pairs(params: Any, grads: Any) -> list[tuple[Any, Any]]:
    """(parameter, gradient) for each distinct array; tied arrays get their summed gradient."""
    by_id: dict[int, list[Any]] = {}
    for _, x, g in zip_leaves(params, grads):
        if id(x) in by_id:
            by_id[id(x)][1] = by_id[id(x)][1] + g
        else:
            by_id[id(x)] = [x, g]
    return [(x, g) for x, g in by_id.values()]


def _largest(g: Any) -> float:
    xp = namespace(g)
    return float(xp.max(xp.abs(g))) if math.prod(g.shape) else 0.0


def _line_search(
    opt: Rule,
    params: Any,
    grads: Any,
    pairs: list[tuple[Any, Any]],
    loss: float,
    evaluate: Callable[[], tuple[float, Any]],
) -> tuple[float, Any] | None:
    """One backtracking step: the new (loss, grads), or `None` with the parameters put back."""
    start = [copy(namespace(x), x) for x, _ in pairs]
    for attempt in range(2):
        update_(opt, params, grads)
        steps = [x0 - x for (x, _), x0 in zip(pairs, start)]
        slope = sum(float(namespace(g).sum(g * d)) for (_, g), d in zip(pairs, steps))
        if slope > 0:
            break
        _restore(pairs, start)
        if attempt == 0:  # uphill: forget the curvature memory and take the first-step direction
            reset_(opt)
    else:
        return None
    tau = 1.0
    for _ in range(_MAX_BACKTRACKS):
        trial, trial_grads = evaluate()
        if trial <= loss - _ARMIJO * tau * slope:
            return trial, trial_grads
        tau *= _SHRINK
        for (x, _), x0, d in zip(pairs, start, steps):
            x[...] = x0 - tau * d
    _restore(pairs, start)
    return None


def _restore(pairs: list[tuple[Any, Any]], start: list[Any]) -> None:
    for (x, _), x0 in zip(pairs, start):
        x[...] = x0
