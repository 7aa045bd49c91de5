"""`python -m composeopt demo`: the command line, its checks, and the whole demo run."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .plots import save_plots
from .problems import SEED, problems
from .tables import print_comparison, print_convergence, print_regression

__all__ = [
    "DEFAULT_PLOTS",
    "PLOTS_HINT",
    "check_plots_directory",
    "check_arguments",
    "run_demo",
    "build_parser",
    "main",
]

DEFAULT_PLOTS = Path("out")
"""Where `python -m composeopt demo` saves its plots unless told otherwise."""

PLOTS_HINT = (
    "Plots need matplotlib: pip install 'composeopt[demo]' (or `make demo` in a clone of the\n"
    "repository) and run the demo again."
)


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
        progress: show progress bars on standard error when it is a terminal (needs tqdm).
        steps: steps of every run of the comparison (by default each problem's own).

    Returns:
        The plot files written (none without matplotlib, which is then explained in `out`).

    Raises:
        ValueError: before printing anything, for a negative `seed`, `steps < 1`, or
            a `plots` directory that cannot be created or written to (`check_arguments`).
    """
    check_arguments(seed, plots, steps)
    out = sys.stdout if out is None else out
    print_regression(out, seed, progress)
    print(file=out)
    print_convergence(out)
    print(file=out)
    problem_list = problems(seed)
    results = print_comparison(out, problem_list, steps, progress)
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
    demo.add_argument(
        "--quiet", action="store_true", help="no progress bars (they are shown only on a terminal)"
    )
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
