"""The demo's plots (matplotlib, imported only when they are drawn)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .problems import Problem
from .runs import RunResult

__all__ = ["save_plots"]


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
