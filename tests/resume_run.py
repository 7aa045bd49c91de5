"""Train every registry case for a range of steps; run as a script in a fresh process.

``python resume_run.py first DIR`` trains 40 steps and saves the parameters
and a composeopt checkpoint per case; ``python resume_run.py second DIR``
loads them into a newly built optimiser and trains 40 more steps.
tests/test_checkpoint.py compares the result with 80 steps in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import composeopt as co
from composeopt.registry import CASES

FIRST, TOTAL = 40, 80


def make_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"W": rng.uniform(-2, 2, (3, 4)), "b": rng.uniform(-2, 2, 4), "s": np.array(rng.uniform(-2, 2))}


def grads_at(params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """A quadratic's gradient plus noise that depends only on the step."""
    rng = np.random.default_rng(1000 + step)
    return {key: value + 0.1 * rng.standard_normal(value.shape) for key, value in params.items()}


def train(opt: co.Rule, params: dict[str, np.ndarray], start: int, stop: int) -> None:
    for step in range(start, stop):
        co.update_(opt, params, grads_at(params, step))


def main(mode: str, folder: Path) -> None:
    for index, make in enumerate(CASES.values()):
        opt = make()
        if mode == "first":
            params = make_params()
            train(opt, params, 0, FIRST)
            np.savez(folder / f"params-{index}.npz", **params)
            co.save(folder / f"opt-{index}.npz", opt, params)
        else:
            with np.load(folder / f"params-{index}.npz") as saved:
                params = {key: np.array(saved[key]) for key in saved.files}
            co.load(folder / f"opt-{index}.npz", opt, params)
            train(opt, params, FIRST, TOTAL)
            np.savez(folder / f"final-{index}.npz", **params)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
