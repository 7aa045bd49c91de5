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

The modules, one job each: `problems` (the test functions and the problems
of the comparison), `runs` (training rules on them), `tables` (the printed
parts), `progress` (the progress bar), `plots` (matplotlib) and `cli` (the
command line and its checks).  `import composeopt` loads none of them.
"""

from __future__ import annotations

from .cli import build_parser, check_arguments, check_plots_directory, main, run_demo
from .plots import save_plots
from .problems import (
    SEED,
    X_STAR,
    Problem,
    beale,
    beale_gradient,
    mlp_init,
    mlp_loss_and_gradient,
    problems,
    quartic,
    quartic_gradient,
    rosenbrock,
    rosenbrock_gradient,
    two_spirals,
)
from .runs import (
    REGRESSION_CASES,
    ConvergenceResult,
    RunResult,
    compare_rules,
    convergence_table,
    convergence_test,
    linear_regression,
    run_rule,
)
from .tables import format_table

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
    "mlp_init",
    "mlp_loss_and_gradient",
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
