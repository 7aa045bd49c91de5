"""The demo's plots (matplotlib, imported only when they are drawn).

Two figures per problem, drawn so that nothing the tables report is hidden:

* `paths_figure`: one panel per rule, all on the same axes, each with the
  start, the minimum, the rule's path and where it ended, over the loss
  contours (or along the loss curve in one dimension).  Overlaid, the paths
  cover each other: in one dimension they all lie on the same curve.
* `loss_figure`: the loss (or its distance to the minimum) per step on a log
  scale, without a floor, so that a loss of 7e-29 is drawn at 7e-29.  A loss
  at the minimum exactly, or below it by rounding, has no place on a log
  scale: a strip under the curves marks those steps, rule by rule.  Each rule
  has its own colour, line style and marker, and the markers of different
  rules fall on different steps, so that curves that coincide stay apart.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .problems import Problem
from .runs import RunResult

__all__ = ["RULE_STYLES", "save_plots", "paths_figure", "loss_figure"]

RULE_STYLES: tuple[tuple[str, Any, str], ...] = (
    ("#0072B2", "-", "o"),
    ("#E69F00", "--", "s"),
    ("#009E73", "-.", "^"),
    ("#CC79A7", ":", "D"),
    ("#56B4E9", (0, (5, 1)), "v"),
    ("#D55E00", (0, (3, 1, 1, 1, 1, 1)), "P"),
    ("#000000", (0, (1, 1)), "X"),
)
"""`(colour, line style, marker)` of the rules in the order a problem lists them: the
Okabe-Ito colours, which stay apart for colour-blind readers, without its yellow, kept
for the minimum's star."""

MARKERS_PER_CURVE = 10
START = {"marker": "s", "markersize": 8, "markerfacecolor": "white", "markeredgecolor": "black"}
MINIMUM = {"marker": "*", "markersize": 16, "markerfacecolor": "#F0E442", "markeredgecolor": "black"}
END = {"marker": "o", "markersize": 7, "markeredgecolor": "black"}


def _style(k: int) -> tuple[str, Any, str]:
    return RULE_STYLES[k % len(RULE_STYLES)]


def _figure(**options: Any) -> Any:
    return importlib.import_module("matplotlib.figure").Figure(layout="constrained", **options)


def save_plots(results: Sequence[RunResult], problem_list: Sequence[Problem], directory: Path) -> list[Path]:
    """Save, per problem, `paths_figure` (problems in one or two dimensions) and `loss_figure`.

    Files `<problem>_paths.png` and `<problem>_loss.png` in `directory`, created if need be.
    Returns the files written.  Raises `ImportError` when matplotlib is not installed.
    """
    importlib.import_module("matplotlib.figure")
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for problem in problem_list:
        runs = [run for run in results if run.problem == problem.name]
        if not runs:
            continue
        if _has_paths(problem, runs):
            files.append(_save(paths_figure(problem, runs), directory / f"{problem.name}_paths.png"))
        files.append(_save(loss_figure(problem, runs), directory / f"{problem.name}_loss.png"))
    return files


def _has_paths(problem: Problem, runs: Sequence[RunResult]) -> bool:
    drawable = problem.surface is not None and problem.window is not None and problem.minimum is not None
    return drawable and all(run.path is not None for run in runs)


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------
# Paths: one panel per rule
# --------------------------------------------------------------------------


def _finite_path(run: RunResult) -> np.ndarray:
    assert run.path is not None
    return run.path[np.all(np.isfinite(run.path), axis=1)]


WIDEST = 2.0
"""How far the panels may widen past the problem's window, in widths of that window: far
enough for every path of the demo, not so far that a diverging run shrinks the others."""


def _window(problem: Problem, runs: Sequence[RunResult]) -> list[tuple[float, float]]:
    """`(low, high)` per coordinate: the problem's window, widened to hold every path, start and minimum.

    A path that runs further than `WIDEST` windows away (a diverging run) is left to leave the
    panel, which its title then says.
    """
    assert problem.window is not None and problem.minimum is not None
    points = np.concatenate(
        [*(_finite_path(run) for run in runs), np.atleast_2d(problem.start()), [problem.minimum]]
    )
    limits = []
    for axis in range(points.shape[1]):
        low, high = problem.window[2 * axis], problem.window[2 * axis + 1]
        span = high - low
        margin = 0.03 * span
        low = max(min(low, float(points[:, axis].min()) - margin), low - WIDEST * span)
        high = min(max(high, float(points[:, axis].max()) + margin), high + WIDEST * span)
        limits.append((low, high))
    return limits


def _inside(path: np.ndarray, limits: list[tuple[float, float]]) -> bool:
    return all(
        bool(np.all((low <= path[:, k]) & (path[:, k] <= high))) for k, (low, high) in enumerate(limits)
    )


def _run_summary(run: RunResult) -> str:
    if not math.isfinite(run.final_loss):
        return f"diverged after {run.steps} steps"
    return f"loss {run.final_loss:.4e} after {run.steps} steps"  # as the table prints it


def paths_figure(problem: Problem, runs: Sequence[RunResult]) -> Any:
    """Each rule's path in a panel of its own, over the loss contours or along the loss curve.

    The panels share their axes, which hold every path whole, the start and
    the minimum; the last panel holds the legend.
    """
    assert problem.surface is not None and problem.minimum is not None
    columns = 4
    rows = -(-(len(runs) + 1) // columns)
    figure = _figure(figsize=(3.5 * columns, 3.4 * rows + 0.5))
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    panels = list(grid.flat)
    limits = _window(problem, runs)
    two_d = len(problem.minimum) == 2
    background = _contours(problem, limits) if two_d else _curve(problem, limits[0])
    for k, (axes, run) in enumerate(zip(panels, runs)):
        colour, _, _ = _style(k)
        background(axes)
        path = _finite_path(run)
        xs = path[:, 0]
        ys = path[:, 1] if two_d else problem.surface(xs)
        if two_d:
            axes.plot(xs, ys, color=colour, linewidth=1.3, gid=run.rule)
        else:
            axes.plot(xs, ys, color=colour, linewidth=0.6, marker=".", markersize=4, gid=run.rule)
        start = np.atleast_1d(problem.start())
        start_y = start[1] if two_d else float(problem.surface(start[:1])[0])
        minimum_y = problem.minimum[1] if two_d else problem.min_loss
        axes.plot(start[0], start_y, linestyle="none", zorder=4, **START)
        axes.plot(problem.minimum[0], minimum_y, linestyle="none", zorder=4, **MINIMUM)
        axes.plot(xs[-1], ys[-1], linestyle="none", color=colour, zorder=5, **END)
        leaves = "" if _inside(path, limits) else "; the path leaves the panel"
        axes.set_title(f"{run.rule}\n{_run_summary(run)}{leaves}", fontsize=9.5)
    for axes in grid[-1]:
        axes.set_xlabel("x")
    for axes in grid[:, 0]:
        axes.set_ylabel("y" if two_d else "loss L(x)")
    key = panels[len(runs)]
    for axes in panels[len(runs) :]:
        axes.set_axis_off()
    handles = _path_key(problem, two_d)
    key.legend(handles=handles, loc="center", fontsize=9, frameon=False, title="one rule per panel")
    figure.suptitle(f"{problem.title}: paths of the parameters, {problem.description}", fontsize=11)
    return figure


def _contours(problem: Problem, limits: list[tuple[float, float]]) -> Any:
    assert problem.surface is not None
    log_norm = importlib.import_module("matplotlib.colors").LogNorm
    (x0, x1), (y0, y1) = limits
    grid = np.stack(np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300)))
    height = problem.surface(grid) - problem.min_loss + 1e-3
    levels = np.logspace(np.log10(height.min()), np.log10(height.max()), 25)

    def draw(axes: Any) -> None:
        axes.contour(grid[0], grid[1], height, levels=levels, norm=log_norm(), cmap="Greys", linewidths=0.5)
        axes.set_xlim(x0, x1)
        axes.set_ylim(y0, y1)

    return draw


def _curve(problem: Problem, limits: tuple[float, float]) -> Any:
    assert problem.surface is not None
    x = np.linspace(limits[0], limits[1], 600)
    y = problem.surface(x)
    low, high = min(float(y.min()), problem.min_loss), float(y.max())

    ticker = importlib.import_module("matplotlib.ticker")

    def draw(axes: Any) -> None:
        axes.plot(x, y, color="0.6", linewidth=1)
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlim(*limits)
        axes.set_ylim(low / 1.15, high * 1.15)

    return draw


def _path_key(problem: Problem, two_d: bool) -> list[Any]:
    line_class = importlib.import_module("matplotlib.lines").Line2D
    assert problem.minimum is not None

    def point(values: Sequence[float]) -> str:
        return f"({', '.join(f'{value:g}' for value in values)})" if two_d else f"x = {values[0]:g}"

    path = {"linewidth": 1.3} if two_d else {"linewidth": 0.6, "marker": ".", "markersize": 4}
    return [
        line_class([], [], linestyle="none", label=f"start {point(problem.start())}", **START),
        line_class([], [], linestyle="none", label=f"minimum {point(problem.minimum)}", **MINIMUM),
        line_class(
            [],
            [],
            color="0.3",
            label="path of the parameters" + ("" if two_d else ", one dot a step"),
            **path,
        ),
        line_class([], [], linestyle="none", color="0.3", label="where the run ended", **END),
        line_class(
            [], [], color="0.6", linewidth=1, label="loss contours, log-spaced" if two_d else "the loss L(x)"
        ),
    ]


# --------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------


def _gap(problem: Problem, run: RunResult) -> np.ndarray:
    gap: np.ndarray = np.asarray(run.losses, dtype=float) - problem.min_loss
    return gap


def _last(gap: np.ndarray) -> str:
    value = float(gap[-1])
    if not math.isfinite(value):
        return f"diverged at step {len(gap) - 1}"
    return "last 0" if value == 0 else f"last {value:.3g}"


def loss_figure(problem: Problem, runs: Sequence[RunResult]) -> Any:
    """The loss per step of every rule on a log scale (the distance to the minimum where that is not 0).

    Positive values are drawn as they are, however small.  Steps at which the
    value is 0, or below 0 by rounding, are marked in a strip under the curves.
    """
    gaps = [_gap(problem, run) for run in runs]
    at_minimum = [np.flatnonzero(np.isfinite(gap) & (gap <= 0)) for gap in gaps]
    strip_needed = any(steps.size for steps in at_minimum)
    figure = _figure(figsize=(10, 6.2 if strip_needed else 5.2))
    if strip_needed:
        curves, strip = figure.subplots(2, 1, sharex=True, height_ratios=[4, 1.7])
    else:
        curves, strip = figure.subplots(), None
    longest = max(len(gap) for gap in gaps)
    every = max(len(runs), longest // MARKERS_PER_CURVE)
    for k, (run, gap) in enumerate(zip(runs, gaps)):
        colour, linestyle, marker = _style(k)
        shown = np.where(np.isfinite(gap) & (gap > 0), gap, np.nan)
        curves.plot(
            np.arange(len(gap)),
            shown,
            color=colour,
            linestyle=linestyle,
            marker=marker,
            markersize=5,
            markevery=np.arange(k * every // len(runs), len(gap), every),
            linewidth=1.3,
            label=f"{run.rule}, {_last(gap)}",
            gid=run.rule,
        )
    curves.set_yscale("log")
    if not all(math.isfinite(float(gap[-1])) for gap in gaps):
        # A diverging run climbs to 1e300 before it stops: past the start it runs off the
        # top (its legend entry says it diverged) rather than flatten every other curve.
        starts = [float(gap[0]) for gap in gaps if math.isfinite(float(gap[0])) and gap[0] > 0]
        if starts:
            curves.set_ylim(top=1e3 * max(starts))
    offset = problem.min_loss != 0
    curves.set_ylabel(f"loss − minimum ({problem.min_loss:.12g})" if offset else "loss")
    spacing = float(np.spacing(problem.min_loss))
    smallest = min((float(np.min(gap[gap > 0])) for gap in gaps if np.any(gap > 0)), default=math.inf)
    if offset and (strip_needed or smallest < 1e3 * spacing):
        curves.axhline(
            spacing,
            color="0.5",
            linestyle=(0, (1, 3)),
            linewidth=1,
            label=f"float64 spacing at the minimum, {spacing:.2g}:\ngaps of a few spacings are rounding",
        )
    curves.grid(True, which="major", axis="y", color="0.9", linewidth=0.6)
    curves.xaxis.set_major_locator(importlib.import_module("matplotlib.ticker").MaxNLocator(integer=True))
    if strip is not None:
        _zero_strip(strip, runs, at_minimum, offset)
        strip.set_xlabel("step")
    else:
        curves.set_xlabel("step")
    figure.legend(loc="outside right upper", fontsize=9, frameon=False)
    curves.set_title(f"{problem.title}: loss per step (log scale, no floor)", fontsize=11)
    return figure


def _zero_strip(strip: Any, runs: Sequence[RunResult], at_minimum: list[np.ndarray], offset: bool) -> None:
    for k, (run, steps) in enumerate(zip(runs, at_minimum)):
        if steps.size:
            colour, _, _ = _style(k)
            strip.plot(
                steps, np.full(steps.size, k), linestyle="none", marker="|", color=colour, gid=run.rule
            )
    strip.set_yticks(range(len(runs)), [run.rule for run in runs], fontsize=7)
    strip.set_ylim(len(runs) - 0.5, -0.5)
    what = "loss − minimum is 0, or below 0 by rounding" if offset else "the loss is 0"
    strip.set_title(f"steps at which {what} (no place on a log scale)", fontsize=9, loc="left")
