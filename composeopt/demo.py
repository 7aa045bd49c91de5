"""Worked examples that show composeopt at work: `python -m composeopt demo`.

Three parts, each solved with hand-written NumPy gradients and
`composeopt.update_`:

1. `linear_regression` -- the linear-regression problem of Flux.jl's
   optimiser tests (`test/optimise.jl`): learn a 10x10 matrix `w1` so that
   `w1 @ x` matches `w @ x` for random `x`.  It shows the learning-rate decay
   of `ExpDecay` at optimiser steps 1000, 2000, 3000 and 4000, and two chains
   of Flux's "Optimiser" test set.
2. `convergence_test` -- the convergence test of TensorFlow's "Optimizers
   with Core APIs" guide: minimise `L(x) = 2x^4 + 3x^3 + 2` from `x = 2` in
   float32 with gradient descent, momentum and Adam at three learning rates,
   and report whether each run converges, stalls or explodes.
3. `compare_rules` -- seven rules side by side on the Rosenbrock and Beale
   functions, the guide's quartic and a small MLP on two spirals: a table of
   steps, final loss and time, and, with matplotlib, plots of the parameter
   paths over the loss contours and of the loss curves (`save_plots`).

Everything is seeded, so the printed tables are the same on every run (but
for the times).  The tables need only NumPy; the plots need matplotlib and
the progress bar tqdm, both in the `demo` extra (`pip install 'composeopt[demo]'`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .chain import Optimiser
from .engine import update_
from .rule import Rule, walk_rules
from .rules.adam import AdaBelief, Adam
from .rules.adaptive import AdaGrad, RMSProp
from .rules.decay import ExpDecay, InvDecay, WeightDecay
from .rules.sgd import Descent, Momentum, Nesterov

__all__ = [
    "SEED",
    "X_STAR",
    "REGRESSION_CASES",
    "ConvergenceResult",
    "Problem",
    "RunResult",
    "linear_regression",
    "convergence_test",
    "convergence_table",
    "rosenbrock",
    "rosenbrock_gradient",
    "beale",
    "beale_gradient",
    "quartic",
    "quartic_gradient",
    "two_spirals",
    "problems",
    "run_rule",
    "compare_rules",
    "save_plots",
    "format_table",
    "check_arguments",
    "check_plots_directory",
    "run_demo",
    "build_parser",
    "main",
]

SEED = 42
"""Seed of every random number the demo draws."""

DIM = 10
"""Size of the linear-regression problem (`w` and `w1` are DIM x DIM)."""

X_STAR = -9 / 8
"""The minimiser of `2x^4 + 3x^3 + 2`: its gradient `x^2 (8x + 9)` vanishes
at `x = 0` (a saddle, not a minimum) and at `x = -9/8`."""

DEFAULT_PLOTS = Path("out")
"""Where `python -m composeopt demo` saves its plots unless told otherwise."""

PLOTS_HINT = (
    "Plots need matplotlib: pip install 'composeopt[demo]' (or `make demo` in a clone of the\n"
    "repository) and run the demo again."
)

FLUX_TOLERANCE = 0.01
"""Flux's test asserts `loss(rand(10, 10)) < 0.01` after training."""


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
        if progress is not None and step % _PROGRESS_EVERY == 0:
            progress(_PROGRESS_EVERY)
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


def quartic_gradient(x: np.ndarray) -> np.ndarray:
    """The gradient `8x^3 + 9x^2` of `L(x) = 2x^4 + 3x^3 + 2`.

    Overflow is expected once a run diverges: it gives `inf` or `nan`,
    which `convergence_test` reports, so NumPy is asked not to warn.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        gradient: np.ndarray = 8 * x**3 + 9 * x**2
    return gradient


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
# Printing and the command line
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# 3. Rules side by side: standard test functions and a small MLP
# --------------------------------------------------------------------------


def quartic(x: np.ndarray) -> np.ndarray:
    """`L(x) = 2x^4 + 3x^3 + 2`, the loss of TensorFlow's guide; minimum about 0.932 at `x = -9/8`."""
    value: np.ndarray = 2 * x**4 + 3 * x**3 + 2
    return value


def rosenbrock(p: np.ndarray) -> np.ndarray:
    """`(1 - x)^2 + 100 (y - x^2)^2` at `p = (x, y)` (`p[0]` and `p[1]` may be grids); minimum 0 at (1, 1)."""
    x, y = p[0], p[1]
    value: np.ndarray = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    return value


def rosenbrock_gradient(p: np.ndarray) -> np.ndarray:
    """The gradient of `rosenbrock` at `p`."""
    x, y = p[0], p[1]
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def _beale_terms(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = p[0], p[1]
    return 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3


def beale(p: np.ndarray) -> np.ndarray:
    """Beale's function `sum_k (c_k - x + x y^k)^2`, `c = (1.5, 2.25, 2.625)`; minimum 0 at (3, 0.5)."""
    t1, t2, t3 = _beale_terms(p)
    value: np.ndarray = t1**2 + t2**2 + t3**2
    return value


def beale_gradient(p: np.ndarray) -> np.ndarray:
    """The gradient of `beale` at `p`."""
    x, y = p[0], p[1]
    t1, t2, t3 = _beale_terms(p)
    return np.array(
        [
            2 * t1 * (y - 1) + 2 * t2 * (y**2 - 1) + 2 * t3 * (y**3 - 1),
            2 * t1 * x + 4 * t2 * x * y + 6 * t3 * x * y**2,
        ]
    )


def two_spirals(n_per_arm: int = 100, noise: float = 0.08, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Points on two interleaved spirals: `(points (2n, 2), labels (2n,))`, labels 0 and 1."""
    rng = np.random.default_rng(seed)
    angle = np.sqrt(rng.random(n_per_arm)) * 3 * np.pi  # up to one and a half turns
    arm = np.stack([angle * np.cos(angle), angle * np.sin(angle)], axis=1) / (3 * np.pi)
    points = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * n_per_arm, 2))
    labels = np.concatenate([np.zeros(n_per_arm), np.ones(n_per_arm)])
    return points, labels


MLP_SIZES = (2, 16, 16, 1)
"""Layer sizes of the demo's MLP: two inputs, two tanh layers, one logit."""


def mlp_init(seed: int = SEED) -> dict[str, np.ndarray]:
    """The MLP's parameters: weights with variance 2 / fan-in, zero biases."""
    rng = np.random.default_rng(seed)
    params = {}
    for k, (fan_in, fan_out) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]), start=1):
        params[f"W{k}"] = rng.normal(0.0, math.sqrt(2 / fan_in), (fan_in, fan_out))
        params[f"b{k}"] = np.zeros(fan_out)
    return params


def mlp_loss_and_gradient(
    params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean binary cross-entropy of the MLP's logits on `(X, y)`, and its gradient (backpropagation)."""
    h1 = np.tanh(X @ params["W1"] + params["b1"])
    h2 = np.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    dz = ((1 + np.tanh(z / 2)) / 2 - y)[:, None] / len(y)  # sigmoid(z) - y, without overflow
    da2 = (dz @ params["W3"].T) * (1 - h2 * h2)
    da1 = (da2 @ params["W2"].T) * (1 - h1 * h1)
    grads = {
        "W1": X.T @ da1,
        "b1": da1.sum(axis=0),
        "W2": h1.T @ da2,
        "b2": da2.sum(axis=0),
        "W3": h2.T @ dz,
        "b3": dz.sum(axis=0),
    }
    return loss, grads


RuleFactory = Callable[[], Rule]


@dataclass(frozen=True)
class Problem:
    """A minimisation problem that `compare_rules` runs every rule of `rules` on.

    `start` returns fresh parameters (an array, or a tree of arrays) and
    `loss_and_gradient` the loss and gradient at given parameters.  For
    problems in one or two dimensions, `surface` is the loss as a function of
    a grid (`surface(np.stack([X, Y]))`, or `surface(x)` in one dimension)
    and `window` the region to draw, `(x_min, x_max, y_min, y_max)` or
    `(x_min, x_max)`.
    """

    name: str
    title: str
    description: str
    start: Callable[[], Any]
    loss_and_gradient: Callable[[Any], tuple[float, Any]]
    steps: int
    rules: tuple[RuleFactory, ...]
    min_loss: float = 0.0
    minimum: tuple[float, ...] | None = None
    surface: Callable[[np.ndarray], np.ndarray] | None = None
    window: tuple[float, ...] | None = None


def _value_and_gradient(
    f: Callable[[np.ndarray], np.ndarray], gradient: Callable[[np.ndarray], np.ndarray]
) -> Callable[[Any], tuple[float, Any]]:
    """`p -> (f(p) as a float, gradient(p))` for a function of one small array."""
    return lambda p: (float(np.sum(f(p))), gradient(p))


def _lineup(
    descent: float,
    momentum: float,
    nesterov: float,
    rmsprop: float,
    adagrad: float,
    adam: float,
    adabelief: float,
) -> tuple[RuleFactory, ...]:
    """The seven rules of the comparison, each with the learning rate given for this problem."""
    return (
        lambda: Descent(descent),
        lambda: Momentum(momentum),
        lambda: Nesterov(nesterov),
        lambda: RMSProp(rmsprop),
        lambda: AdaGrad(adagrad),
        lambda: Adam(adam),
        lambda: AdaBelief(adabelief),
    )


def problems(seed: int = SEED) -> list[Problem]:
    """The problems of the comparison; `seed` draws the spirals and the MLP's initial weights.

    Each rule gets a learning rate suited to the problem (steps that
    converge without diverging), as one would tune it by hand.
    """
    points, labels = two_spirals(seed=seed)
    return [
        Problem(
            name="rosenbrock",
            title="Rosenbrock",
            description="(1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2); minimum 0 at (1, 1)",
            start=lambda: np.array([-1.5, 2.0]),
            loss_and_gradient=_value_and_gradient(rosenbrock, rosenbrock_gradient),
            steps=3000,
            rules=_lineup(1e-3, 5e-4, 1e-3, 3e-3, 1.0, 0.05, 0.05),
            minimum=(1.0, 1.0),
            surface=rosenbrock,
            window=(-2.0, 2.0, -0.5, 3.5),
        ),
        Problem(
            name="beale",
            title="Beale",
            description="sum_k (c_k - x + x y^k)^2 from (1, 1.5); minimum 0 at (3, 0.5)",
            start=lambda: np.array([1.0, 1.5]),
            loss_and_gradient=_value_and_gradient(beale, beale_gradient),
            steps=2000,
            rules=_lineup(1e-2, 1e-3, 3e-3, 3e-3, 0.5, 0.05, 0.05),
            minimum=(3.0, 0.5),
            surface=beale,
            window=(-0.5, 4.0, -1.5, 2.0),
        ),
        Problem(
            name="quartic",
            title="Quartic",
            description="2x^4 + 3x^3 + 2 from x = 2 (TensorFlow's guide); minimum 0.932 at x = -9/8",
            start=lambda: np.array([2.0]),
            loss_and_gradient=_value_and_gradient(quartic, quartic_gradient),
            steps=500,
            rules=_lineup(1e-2, 1e-2, 1e-2, 1e-2, 0.5, 0.1, 0.1),
            min_loss=float(quartic(np.array(X_STAR))),
            minimum=(X_STAR,),
            surface=quartic,
            window=(-1.8, 2.2),
        ),
        Problem(
            name="mlp",
            title="MLP on two spirals",
            description="2-16-16-1 tanh MLP, mean cross-entropy on 200 points, full batch",
            start=lambda: mlp_init(seed),
            loss_and_gradient=lambda params: mlp_loss_and_gradient(params, points, labels),
            steps=1500,
            rules=_lineup(0.5, 0.05, 0.05, 3e-3, 0.1, 0.01, 0.01),
        ),
    ]


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


_PROGRESS_EVERY = 100


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
            if progress is not None and (step + 1) % _PROGRESS_EVERY == 0:
                progress(_PROGRESS_EVERY)
                reported += _PROGRESS_EVERY
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


# --------------------------------------------------------------------------
# Plots (matplotlib, optional)
# --------------------------------------------------------------------------


def save_plots(results: Sequence[RunResult], problem_list: Sequence[Problem], directory: Path) -> list[Path]:
    """Save, per problem, the paths over the loss contours (or along the curve in 1-D) and the loss curves.

    Returns the files written.  Raises `ImportError` when matplotlib is not installed.
    """
    figure_class = importlib.import_module("matplotlib.figure").Figure
    log_norm = importlib.import_module("matplotlib.colors").LogNorm
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for problem in problem_list:
        runs = [run for run in results if run.problem == problem.name]
        if not runs:
            continue
        if problem.surface is not None and problem.window is not None and problem.minimum is not None:
            figure = figure_class(figsize=(7, 5.5))
            axes = figure.subplots()
            if len(problem.minimum) == 2:
                _draw_contours(axes, problem, log_norm)
            else:
                _draw_curve(axes, problem)
            for run in runs:
                if run.path is not None:
                    _draw_path(axes, problem, run)
            axes.set_title(f"{problem.title}: paths of the parameters")
            axes.legend(fontsize="small", loc="best")
            files.append(_save(figure, directory / f"{problem.name}_paths.png"))
        figure = figure_class(figsize=(7, 5))
        axes = figure.subplots()
        for run in runs:
            gap = np.asarray(run.losses) - problem.min_loss
            axes.semilogy(np.maximum(gap, 1e-16), label=run.rule, linewidth=1.2)
        axes.set_xlabel("step")
        axes.set_ylabel("loss" if problem.min_loss == 0 else "loss - minimum")
        axes.set_title(f"{problem.title}: loss per step")
        axes.legend(fontsize="small", loc="best")
        files.append(_save(figure, directory / f"{problem.name}_loss.png"))
    return files


def _draw_contours(axes: Any, problem: Problem, log_norm: Any) -> None:
    assert problem.surface is not None and problem.window is not None and problem.minimum is not None
    x0, x1, y0, y1 = problem.window
    grid = np.stack(np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300)))
    height = problem.surface(grid) - problem.min_loss + 1e-3
    levels = np.logspace(np.log10(height.min()), np.log10(height.max()), 25)
    axes.contour(grid[0], grid[1], height, levels=levels, norm=log_norm(), cmap="Greys", linewidths=0.6)
    axes.plot(*problem.minimum, marker="*", markersize=14, color="crimson", linestyle="none", label="minimum")
    axes.plot(*problem.start(), marker="o", color="black", linestyle="none", label="start")
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_xlabel("x")
    axes.set_ylabel("y")


def _draw_curve(axes: Any, problem: Problem) -> None:
    assert problem.surface is not None and problem.window is not None and problem.minimum is not None
    x = np.linspace(problem.window[0], problem.window[1], 400)
    axes.plot(x, problem.surface(x), color="grey", linewidth=1)
    axes.set_yscale("log")
    axes.plot(
        problem.minimum[0], problem.min_loss, marker="*", markersize=14, color="crimson", linestyle="none"
    )
    axes.set_xlim(problem.window[0], problem.window[1])
    axes.set_xlabel("x")
    axes.set_ylabel("loss")


def _draw_path(axes: Any, problem: Problem, run: RunResult) -> None:
    assert run.path is not None and problem.surface is not None
    path = run.path[np.all(np.isfinite(run.path), axis=1)]
    xs = path[:, 0]
    ys = path[:, 1] if path.shape[1] == 2 else problem.surface(xs)
    style = {"linewidth": 1.2} if path.shape[1] == 2 else {"marker": ".", "markersize": 3, "linewidth": 0.6}
    (line,) = axes.plot(xs, ys, label=run.rule, **style)
    axes.plot(xs[-1], ys[-1], marker="o", color=line.get_color())


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------
# Printing and the command line
# --------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if k < left else str(cell).rjust(width)
            for k, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _print_regression(out: TextIO, seed: int, show_progress: bool) -> None:
    print("1. Linear regression (Flux.jl's optimiser tests, test/optimise.jl)", file=out)
    print(
        "   w, w1 ~ 10x10 standard normal; loss(x) = mse(w @ x, w1 @ x); every step draws\n"
        "   x = rng.random(10) and calls update_(opt, w1, d loss / d w1).  The loss is\n"
        f"   measured on one fixed batch rng.random((10, 10)).  Seed {seed}.\n",
        file=out,
    )
    total = sum(steps for _, _, steps in REGRESSION_CASES)
    with _progress_bar(total, "linear regression", show_progress) as progress:
        results = [
            linear_regression(factory(), steps=steps, seed=seed, progress=progress)
            for _, factory, steps in REGRESSION_CASES
        ]
    rows = []
    for k, ((label, _, steps), result) in enumerate(zip(REGRESSION_CASES, results, strict=True)):
        check = "-" if k == 0 else ("passes" if result["loss_after"] < FLUX_TOLERANCE else "fails")
        loss_before, loss_after = f"{result['loss_before']:.4g}", f"{result['loss_after']:.4g}"
        rows.append([label, f"{steps}", loss_before, loss_after, check])
    print(format_table(["optimiser", "steps", "loss before", "loss after", "loss < 0.01"], rows), file=out)
    decay_result = results[0]
    print("\n   ExpDecay(1.0, 0.1, 1000, 1e-3): steps at which its eta changed", file=out)
    changes = [[f"{step}", repr(before), repr(after)] for step, before, after in decay_result["eta_changes"]]
    print(_indent(format_table(["step", "eta before", "eta after"], changes)), file=out)
    print(
        f"   final eta: {decay_result['eta']!r}, the clip value; times Descent's 0.1 the step size went\n"
        "   0.1 -> 1e-4 as in Flux.  Three decays leave eta a rounding error above 1e-3, so the\n"
        "   fourth, at step 4000, is the one that clips it (Flux's test also counts four).",
        file=out,
    )


def _print_convergence(out: TextIO) -> None:
    print("2. Convergence test (TensorFlow Core guide 'Optimizers with Core APIs')", file=out)
    print(
        "   minimise L(x) = 2x^4 + 3x^3 + 2 from x = 2 (float32), at most 2000 iterations;\n"
        f"   converged = an update left x unchanged.  Minimiser x* = -9/8 = {X_STAR}.\n",
        file=out,
    )
    rows = [
        [
            result.rule,
            f"{result.lr:g}",
            result.describe(),
            f"{result.iterations}",
            f"{result.x:.7g}",
            f"{result.error:.3g}",
        ]
        for result in convergence_table()
    ]
    print(format_table(["rule", "lr", "outcome", "iterations", "final x", "|x - x*|"], rows), file=out)
    print(
        "\n   Descent and Momentum at lr 0.1 jump from x = 2 to x = -8 (gradient 100) and diverge;\n"
        "   plain Descent at small rates stalls near the saddle x = 0, where the gradient vanishes.",
        file=out,
    )


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _print_comparison(
    out: TextIO, problem_list: Sequence[Problem], steps: int | None, show_progress: bool
) -> list[RunResult]:
    print("3. Rules side by side: standard test functions and a small MLP", file=out)
    for problem in problem_list:
        print(f"   {problem.title}: {problem.description}", file=out)
    print(
        "   Each rule has a learning rate suited to the problem; time includes the gradients.\n",
        file=out,
    )
    total = sum((problem.steps if steps is None else steps) * len(problem.rules) for problem in problem_list)
    with _progress_bar(total, "comparison", show_progress) as progress:
        results = compare_rules(problem_list, steps, progress)
    titles = {problem.name: problem.title for problem in problem_list}
    rows = [
        [
            titles[run.problem],
            run.rule,
            f"{run.steps}",
            f"{run.final_loss:.4e}" if math.isfinite(run.final_loss) else "diverged",
            f"{1000 * run.seconds:.0f} ms",
        ]
        for run in results
    ]
    print(format_table(["problem", "rule", "steps", "final loss", "time"], rows, left=2), file=out)
    print(
        "\n   On the quartic, rules that slow down near x = 0 stall on its saddle (loss 2); those with\n"
        "   enough momentum roll through to the minimum.",
        file=out,
    )
    return results


@contextmanager
def _progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A tqdm progress bar on standard error, as the function that advances it; `None` when
    disabled or when tqdm is not installed."""
    if not enabled:
        yield None
        return
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        yield None
        return
    with tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr) as bar:
        yield bar.update


def check_plots_directory(directory: Path) -> None:
    """Raise `ValueError` unless plots can be saved in `directory`; creates nothing.

    The directory must be one, or not exist yet and be creatable: its nearest
    existing ancestor must be a directory that can be written to.  Writing is
    tried (a temporary file, removed at once), since permission bits do not
    tell the whole story (root, read-only mounts, ACLs).
    """
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        where, prefix = directory, f"cannot write in {directory}"
    else:
        ancestor = next((parent for parent in directory.absolute().parents if parent.exists()), None)
        if ancestor is None or not ancestor.is_dir():
            raise ValueError(f"cannot create {directory}: {ancestor} is not a directory")
        where, prefix = ancestor, f"cannot create {directory}: cannot write in {ancestor}"
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise ValueError(f"{prefix} ({err.strerror or err})") from None


def _plots_possible() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def check_arguments(seed: int = SEED, plots: Path | None = None, steps: int | None = None) -> None:
    """Raise `ValueError`, naming the option, for arguments the demo cannot run with.

    Called before any work, so that a bad argument prints nothing of the tables.
    The plots directory is checked only when matplotlib is there to draw them.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if plots is not None and _plots_possible():
        try:
            check_plots_directory(plots)
        except ValueError as err:
            raise ValueError(f"--plots {plots}: {err}") from None


def run_demo(
    seed: int = SEED,
    out: TextIO | None = None,
    plots: Path | None = None,
    progress: bool = False,
    steps: int | None = None,
) -> list[Path]:
    """Print the three parts' tables to `out` (standard output by default).

    Args:
        seed: seed of the linear regression, the spirals and the MLP's weights.
        out: where to print.
        plots: directory for the plots of the comparison; `None` for none.
        progress: show progress bars on standard error (needs tqdm).
        steps: steps of every run of the comparison (by default each problem's own).

    Returns:
        The plot files written (none without matplotlib, which is then explained in `out`).

    Raises:
        ValueError: before printing anything, for a negative `seed`, `steps < 1`, or
            a `plots` directory that cannot be created or written to
            ([check_arguments][composeopt.demo.check_arguments]).
    """
    check_arguments(seed, plots, steps)
    out = sys.stdout if out is None else out
    _print_regression(out, seed, progress)
    print(file=out)
    _print_convergence(out)
    print(file=out)
    problem_list = problems(seed)
    results = _print_comparison(out, problem_list, steps, progress)
    if plots is None:
        return []
    print(file=out)
    try:
        files = save_plots(results, problem_list, plots)
    except ImportError:
        print(PLOTS_HINT, file=out)
        return []
    print(f"Plots saved in {plots}{os.sep}:", file=out)
    for file in files:
        print(f"   {file.name}", file=out)
    return files


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m composeopt`."""
    parser = argparse.ArgumentParser(
        prog="python -m composeopt",
        description="composeopt: composable optimiser rules for NumPy, CuPy and array-API arrays.",
        epilog="With no command, prints this help.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the worked examples and compare rules on test functions and an MLP",
        description=(
            "Run three seeded worked examples and print their results as tables: the linear "
            "regression of Flux.jl's optimiser tests, the convergence test of TensorFlow's "
            "'Optimizers with Core APIs' guide, and seven rules side by side on the Rosenbrock "
            "and Beale functions, the guide's quartic and an MLP on two spirals.  With matplotlib "
            "installed (the 'demo' extra) it also saves plots of the paths and loss curves."
        ),
    )
    demo.add_argument(
        "--seed", type=int, default=SEED, help=f"seed of every random draw, >= 0 (default {SEED})"
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of every run of the comparison (default: each problem's own, 500 to 3000)",
    )
    demo.add_argument(
        "--plots",
        type=Path,
        default=DEFAULT_PLOTS,
        metavar="DIR",
        help=f"directory for the plots, created if need be (default: {DEFAULT_PLOTS}/)",
    )
    demo.add_argument("--no-plots", action="store_true", help="do not save plots")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m composeopt`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    plots = None if args.no_plots else args.plots
    try:
        check_arguments(args.seed, plots, args.steps)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2, as for any other bad argument
    run_demo(seed=args.seed, plots=plots, progress=not args.quiet, steps=args.steps)
    return 0
