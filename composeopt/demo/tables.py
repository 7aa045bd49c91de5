"""The demo's printed parts: each runs its examples and prints them as plain-text tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TextIO

from . import runs
from .problems import X_STAR, Problem
from .progress import progress_bar
from .runs import FLUX_TOLERANCE, RunResult, compare_rules, convergence_table, linear_regression

__all__ = ["format_table", "print_regression", "print_convergence", "print_comparison"]


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


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def print_regression(out: TextIO, seed: int, show_progress: bool) -> None:
    """Part 1: train every optimiser of `runs.REGRESSION_CASES` on Flux's linear regression."""
    print("1. Linear regression (Flux.jl's optimiser tests, test/optimise.jl)", file=out)
    print(
        "   w, w1 ~ 10x10 standard normal; loss(x) = mse(w @ x, w1 @ x); every step draws\n"
        "   x = rng.random(10) and calls update_(opt, w1, d loss / d w1).  The loss is\n"
        f"   measured on one fixed batch rng.random((10, 10)).  Seed {seed}.\n",
        file=out,
    )
    cases = runs.REGRESSION_CASES  # read at call time, so that a test can shorten it
    total = sum(steps for _, _, steps in cases)
    with progress_bar(total, "linear regression", show_progress) as progress:
        results = [
            linear_regression(factory(), steps=steps, seed=seed, progress=progress)
            for _, factory, steps in cases
        ]
    rows = []
    for k, ((label, _, steps), result) in enumerate(zip(cases, results, strict=True)):
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


def print_convergence(out: TextIO) -> None:
    """Part 2: the nine runs of TensorFlow's convergence test."""
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


def print_comparison(
    out: TextIO, problem_list: Sequence[Problem], steps: int | None, show_progress: bool
) -> list[RunResult]:
    """Part 3: every rule of every problem; returns the runs, for the plots."""
    print("3. Rules side by side: standard test functions and a small MLP", file=out)
    for problem in problem_list:
        print(f"   {problem.title}: {problem.description}", file=out)
    print(
        "   Each rule has a learning rate suited to the problem; time includes the gradients.\n",
        file=out,
    )
    total = sum((problem.steps if steps is None else steps) * len(problem.rules) for problem in problem_list)
    with progress_bar(total, "comparison", show_progress) as progress:
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
