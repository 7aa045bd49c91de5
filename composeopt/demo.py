"""Worked examples that show composeopt at work: ``python -m composeopt demo``.

Two small problems from the libraries composeopt learns from, each solved with
hand-written NumPy gradients and :func:`composeopt.update_`:

1. :func:`linear_regression` -- the linear-regression problem of Flux.jl's
   optimiser tests (``test/optimise.jl``): learn a 10x10 matrix ``w1`` so that
   ``w1 @ x`` matches ``w @ x`` for random ``x``.  It shows the learning-rate
   decay of :class:`~composeopt.ExpDecay` at optimiser steps 1000, 2000, 3000
   and 4000, and two chains of Flux's "Optimiser" test set.
2. :func:`convergence_test` -- the convergence test of TensorFlow's
   "Optimizers with Core APIs" guide: minimise ``L(x) = 2x^4 + 3x^3 + 2`` from
   ``x = 2`` in float32 with gradient descent, momentum and Adam at three
   learning rates, and report whether each run converges, stalls or explodes.

Everything is seeded, so the printed tables are the same on every run.  Only
NumPy and composeopt are needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .chain import Optimiser
from .engine import update_
from .rule import Rule, walk_rules
from .rules.adam import Adam
from .rules.decay import ExpDecay, InvDecay, WeightDecay
from .rules.sgd import Descent, Momentum

__all__ = [
    "SEED",
    "X_STAR",
    "REGRESSION_CASES",
    "ConvergenceResult",
    "linear_regression",
    "convergence_test",
    "convergence_table",
    "format_table",
    "run_demo",
    "main",
]

SEED = 42
"""Seed of every random number the demo draws."""

DIM = 10
"""Size of the linear-regression problem (``w`` and ``w1`` are DIM x DIM)."""

X_STAR = -9 / 8
"""The minimiser of ``2x^4 + 3x^3 + 2``: its gradient ``x^2 (8x + 9)`` vanishes
at ``x = 0`` (a saddle, not a minimum) and at ``x = -9/8``."""

FLUX_TOLERANCE = 0.01
"""Flux's test asserts ``loss(rand(10, 10)) < 0.01`` after training."""


def _expdecay_then_descent() -> Rule:
    # Flux's ExpDecay test steps by eta * dx with eta decaying 0.1 -> 1e-4.  Chained before
    # Descent() (eta 0.1), ExpDecay(1.0, ..., clip=1e-3) gives that same step: 0.1 * eta.
    return Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())


REGRESSION_CASES: tuple[tuple[str, Callable[[], Rule], int], ...] = (
    ("Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())", _expdecay_then_descent, 5_000),
    ("Optimiser(InvDecay(), Adam(0.001))", lambda: Optimiser(InvDecay(), Adam(0.001)), 20_000),
    ("Optimiser(WeightDecay(), Adam(0.001))", lambda: Optimiser(WeightDecay(), Adam(0.001)), 20_000),
)
"""``(label, factory, steps)`` of each optimiser the demo trains on the linear regression.

The first is Flux's ExpDecay test (its eta reaches the clip value at step
4000); the other two are from its "Optimiser" test set, for which Flux ran
10^5 steps: 2 x 10^4 already pass its ``loss < 0.01`` check."""


# --------------------------------------------------------------------------
# 1. Linear regression (Flux.jl, test/optimise.jl)
# --------------------------------------------------------------------------


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def linear_regression(opt: Rule | None = None, steps: int = 5_000, seed: int = SEED) -> dict[str, Any]:
    """Train ``w1`` to imitate a fixed random matrix ``w``, as Flux.jl's optimiser tests do.

    ``w`` and ``w1`` are 10x10 standard-normal matrices and the loss is
    ``loss(x) = mse(w @ x, w1 @ x)``.  Each step draws ``x`` uniformly from
    [0, 1)^10, computes the gradient of the loss with respect to ``w1`` by hand
    (with ``e = w1 @ x - w @ x``, ``loss = mean(e^2)`` and
    ``d loss / d w1 = (2/10) outer(e, x)``) and calls ``update_(opt, w1, grad)``.

    Args:
        opt: the optimiser; by default ``Optimiser(ExpDecay(1.0, 0.1, 1000, 1e-3), Descent())``,
            whose step ``0.1 * eta * grad`` is Flux's ``ExpDecay(0.1, 0.1, 1000, 1e-4)`` step.
        steps: number of optimiser steps.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        A dict with ``steps``, ``loss_before`` and ``loss_after`` (the loss on
        one fixed batch ``rng.random((10, 10))``, as Flux's ``loss(rand(10, 10))``),
        and, when ``opt`` holds an :class:`~composeopt.ExpDecay`: ``eta`` (its
        final learning rate) and ``eta_changes``, a list of
        ``(step, eta_before, eta_after)`` for every step that changed it.
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
    """The gradient ``8x^3 + 9x^2`` of ``L(x) = 2x^4 + 3x^3 + 2``.

    Overflow is expected once a run diverges: it gives ``inf`` or ``nan``,
    which :func:`convergence_test` reports, so NumPy is asked not to warn.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        gradient: np.ndarray = 8 * x**3 + 9 * x**2
    return gradient


@dataclass(frozen=True)
class ConvergenceResult:
    """The outcome of one :func:`convergence_test` run.

    ``outcome`` is ``"converged"`` (an update left ``x`` unchanged),
    ``"exploded"`` (the gradient was not finite) or ``"exceeded"`` (no
    convergence within the allowed iterations); ``iterations`` is the
    iteration at which that was decided and ``x`` the final value.
    """

    rule: str
    lr: float
    outcome: str
    iterations: int
    x: float

    @property
    def error(self) -> float:
        """``|x - x*|``, the distance to the minimiser ``x* = -9/8``."""
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
    """Minimise ``2x^4 + 3x^3 + 2`` from ``x0`` in float32, as TensorFlow's guide does.

    Each iteration computes the gradient; if it is not finite the run has
    exploded; otherwise ``update_`` takes a step, and if ``x`` is then exactly
    unchanged (the guide's criterion) the run has converged.  After
    ``max_iters`` iterations it has exceeded its budget.

    Args:
        rule_factory: called with the learning rate, e.g. ``Adam`` or ``Momentum``
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


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: left-aligned first column, right-aligned others."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if k == 0 else str(cell).rjust(width)
            for k, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _print_regression(out: TextIO, seed: int) -> None:
    print("1. Linear regression (Flux.jl's optimiser tests, test/optimise.jl)", file=out)
    print(
        "   w, w1 ~ 10x10 standard normal; loss(x) = mse(w @ x, w1 @ x); every step draws\n"
        "   x = rng.random(10) and calls update_(opt, w1, d loss / d w1).  The loss is\n"
        f"   measured on one fixed batch rng.random((10, 10)).  Seed {seed}.\n",
        file=out,
    )
    results = [linear_regression(factory(), steps=steps, seed=seed) for _, factory, steps in REGRESSION_CASES]
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


def run_demo(seed: int = SEED, out: TextIO | None = None) -> None:
    """Print both examples' tables to ``out`` (standard output by default)."""
    out = sys.stdout if out is None else out
    _print_regression(out, seed)
    print(file=out)
    _print_convergence(out)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m composeopt``."""
    parser = argparse.ArgumentParser(
        prog="python -m composeopt",
        description="composeopt: composable optimiser rules for NumPy, CuPy and array-API arrays.",
        epilog="With no command, prints this help.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the worked examples (Flux's linear regression, TensorFlow's convergence test)",
        description="Run two seeded worked examples and print their results as plain-text tables.",
    )
    demo.add_argument(
        "--seed", type=int, default=SEED, help=f"seed of the linear regression (default {SEED})"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m composeopt``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    run_demo(seed=args.seed)
    return 0
