"""The demo's runs: rules trained on its problems, and what each run reports."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..chain import Optimiser
from ..engine import update_
from ..rule import Rule, walk_rules
from ..rules.adam import Adam
from ..rules.decay import ExpDecay, InvDecay, WeightDecay
from ..rules.sgd import Descent, Momentum
from .problems import SEED, X_STAR, Problem, problems, quartic_gradient

__all__ = [
    "DIM",
    "FLUX_TOLERANCE",
    "PROGRESS_EVERY",
    "REGRESSION_CASES",
    "ConvergenceResult",
    "RunResult",
    "linear_regression",
    "convergence_test",
    "convergence_table",
    "run_rule",
    "compare_rules",
]

DIM = 10
"""Size of the linear-regression problem (`w` and `w1` are DIM x DIM)."""

FLUX_TOLERANCE = 0.01
"""Flux's test asserts `loss(rand(10, 10)) < 0.01` after training."""

PROGRESS_EVERY = 100
"""Steps between two calls of a run's `progress` function."""


def _expdecay_then_descent() -> Rule:
    # Flux's ExpDecay test steps by eta * dx with eta decaying 0.1 -> 1e-4.  Chained before
    # Descent() (eta 0.1), ExpDecay(1.0, ..., clip=1e-3) gives that same step: 0.1 * eta.
    return Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())


REGRESSION_CASES: tuple[tuple[str, Callable[[], Rule], int], ...] = (
    ("Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())", _expdecay_then_descent, 5_000),
    ("Optimiser(InvDecay(), Adam(0.001))", lambda: Optimiser(InvDecay(), Adam(0.001)), 20_000),
    ("Optimiser(WeightDecay(), Adam(0.001))", lambda: Optimiser(WeightDecay(), Adam(0.001)), 20_000),
)
"""`(label, factory, steps)` of each optimiser the demo trains on the linear regression.

The first is Flux's ExpDecay test (its eta reaches the clip value at step
4000); the other two are from its "Optimiser" test set, for which Flux ran
10^5 steps: 2 x 10^4 already pass its `loss < 0.01` check."""


# --------------------------------------------------------------------------
# 1. Linear regression (Flux.jl, test/optimise.jl)
# --------------------------------------------------------------------------


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def linear_regression(
    opt: Rule | None = None,
    steps: int = 5_000,
    seed: int = SEED,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Train `w1` to imitate a fixed random matrix `w`, as Flux.jl's optimiser tests do.

    `w` and `w1` are 10x10 standard-normal matrices and the loss is
    `loss(x) = mse(w @ x, w1 @ x)`.  Each step draws `x` uniformly from
    [0, 1)^10, computes the gradient of the loss with respect to `w1` by hand
    (with `e = w1 @ x - w @ x`, `loss = mean(e^2)` and
    `d loss / d w1 = (2/10) outer(e, x)`) and calls `update_(opt, w1, grad)`.

    Args:
        opt: the optimiser; by default `Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())`,
            whose step `0.1 * eta * grad` is Flux's `ExpDecay(0.1, 0.1, 1000, 1e-4)` step.
        steps: number of optimiser steps.
        seed: seed of `numpy.random.default_rng`.
        progress: called with the number of steps just taken, now and then.

    Returns:
        A dict with `steps`, `loss_before` and `loss_after` (the loss on
        one fixed batch `rng.random((10, 10))`, as Flux's `loss(rand(10, 10))`),
        and, when `opt` holds an `ExpDecay`: `eta` (its
        final learning rate) and `eta_changes`, a list of
        `(step, eta_before, eta_after)` for every step that changed it.
    """
    if opt is None:
        opt = _expdecay_then_descent()
    decay = next((rule for rule in walk_rules(opt) if isinstance(rule, ExpDecay)), None)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((DIM, DIM))
    w1 = rng.standard_normal((DIM, DIM))
    batch = rng.random((DIM, DIM))
    loss_before = _mse(w @ batch, w1 @ batch)
    eta_changes = []
    for step in range(1, steps + 1):
        x = rng.random(DIM)
        error = w1 @ x - w @ x
        grad = (2 / DIM) * np.outer(error, x)
        eta_before = decay.eta if decay is not None else None
        update_(opt, w1, grad)
        if decay is not None and decay.eta != eta_before:
            eta_changes.append((step, eta_before, decay.eta))
        if progress is not None and step % PROGRESS_EVERY == 0:
            progress(PROGRESS_EVERY)
    result: dict[str, Any] = {
        "steps": steps,
        "loss_before": loss_before,
        "loss_after": _mse(w @ batch, w1 @ batch),
    }
    if decay is not None:
        result["eta"] = decay.eta
        result["eta_changes"] = eta_changes
    return result


# --------------------------------------------------------------------------
# 2. Convergence on a quartic (TensorFlow Core, "Optimizers with Core APIs")
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvergenceResult:
    """The outcome of one `convergence_test` run.

    `outcome` is `"converged"` (an update left `x` unchanged),
    `"exploded"` (the gradient was not finite) or `"exceeded"` (no
    convergence within the allowed iterations); `iterations` is the
    iteration at which that was decided and `x` the final value.
    """

    rule: str
    lr: float
    outcome: str
    iterations: int
    x: float

    @property
    def error(self) -> float:
        """`|x - x*|`, the distance to the minimiser `x* = -9/8`."""
        return abs(self.x - X_STAR)

    def describe(self) -> str:
        """The outcome in words, as the TensorFlow guide prints it."""
        if self.outcome == "converged":
            return f"converged in {self.iterations} iterations"
        if self.outcome == "exploded":
            return f"exploded at iteration {self.iterations}"
        return f"exceeded {self.iterations} iterations"


def convergence_test(
    rule_factory: Callable[[float], Rule], lr: float, max_iters: int = 2000, x0: float = 2.0
) -> ConvergenceResult:
    """Minimise `2x^4 + 3x^3 + 2` from `x0` in float32, as TensorFlow's guide does.

    Each iteration computes the gradient; if it is not finite the run has
    exploded; otherwise `update_` takes a step, and if `x` is then exactly
    unchanged (the guide's criterion) the run has converged.  After
    `max_iters` iterations it has exceeded its budget.

    Args:
        rule_factory: called with the learning rate, e.g. `Adam` or `Momentum`
            (their other hyperparameters stay at their defaults).
        lr: the learning rate.
        max_iters: iterations allowed.
        x0: the starting point.
    """
    rule = rule_factory(lr)
    name = type(rule).__name__
    x = np.array([x0], dtype=np.float32)
    for iteration in range(1, max_iters + 1):
        grad = quartic_gradient(x)
        if not bool(np.all(np.isfinite(grad))):
            return ConvergenceResult(name, lr, "exploded", iteration, float(x[0]))
        previous = x.copy()
        update_(rule, x, grad)
        if np.array_equal(x, previous):
            return ConvergenceResult(name, lr, "converged", iteration, float(x[0]))
    return ConvergenceResult(name, lr, "exceeded", max_iters, float(x[0]))


def convergence_table(max_iters: int = 2000) -> list[ConvergenceResult]:
    """The guide's nine runs: Descent, Momentum and Adam at learning rates 1e-3, 1e-2, 1e-1."""
    factories: tuple[Callable[[float], Rule], ...] = (Descent, Momentum, Adam)
    return [convergence_test(factory, lr, max_iters) for factory in factories for lr in (1e-3, 1e-2, 1e-1)]


# --------------------------------------------------------------------------
# 3. Rules side by side: standard test functions and a small MLP
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    """One rule on one problem: the loss before every step and after the last, the path, the time.

    `path` holds the parameters before every step and after the last, for
    problems of one or two dimensions (`None` for others).  A run stops early
    when the loss stops being finite.
    """

    problem: str
    rule: str
    losses: list[float]
    seconds: float
    path: np.ndarray | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Steps taken."""
        return len(self.losses) - 1

    @property
    def final_loss(self) -> float:
        """The loss after the last step (not finite if the run diverged)."""
        return self.losses[-1]


def run_rule(
    problem: Problem,
    rule: Rule,
    steps: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> RunResult:
    """Minimise `problem` with `rule` for `steps` steps (the problem's own count by default)."""
    steps = problem.steps if steps is None else steps
    params = problem.start()
    small = isinstance(params, np.ndarray) and params.size <= 2
    losses: list[float] = []
    path: list[np.ndarray] = []
    reported = 0
    began = time.perf_counter()
    with np.errstate(all="ignore"):  # a run that diverges overflows; it is reported, not warned about
        for step in range(steps + 1):
            loss, gradient = problem.loss_and_gradient(params)
            losses.append(loss)
            if small:
                path.append(params.copy())
            if step == steps or not math.isfinite(loss):
                break
            update_(rule, params, gradient)
            if progress is not None and (step + 1) % PROGRESS_EVERY == 0:
                progress(PROGRESS_EVERY)
                reported += PROGRESS_EVERY
    seconds = time.perf_counter() - began
    if progress is not None:
        progress(steps - reported)
    return RunResult(problem.name, _label(rule), losses, seconds, np.array(path) if small else None)


def _label(rule: Rule) -> str:
    """`Adam(0.01)`: the rule's name and its learning rate, the one hyperparameter the demo sets."""
    eta = rule.hyperparameters().get("eta")
    return f"{type(rule).__name__}({eta:g})" if eta is not None else repr(rule)


def compare_rules(
    problem_list: Sequence[Problem] | None = None,
    steps: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[RunResult]:
    """Run every rule of every problem (by default `problems()`); one `RunResult` per pair."""
    problem_list = problems() if problem_list is None else problem_list
    return [
        run_rule(problem, factory(), steps, progress) for problem in problem_list for factory in problem.rules
    ]
