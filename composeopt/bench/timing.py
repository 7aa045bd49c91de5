"""How the benchmark times a step: alternately with the memory-traffic floor, or with a rival."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _fused
from .peers import Make, Step
from .sets import BYTES_PER_ELEMENT, arrays, shapes

__all__ = ["SETTLE_SECONDS", "floor_step", "settle", "time_beside", "run", "head_to_head"]

SETTLE_SECONDS = 0.02


def floor_step(elements: int) -> tuple[Step, str]:
    """The same-traffic loop over `elements` float32 elements, and how it is done."""
    x, g, m, v = arrays([(elements,)] * 4, 2)
    if _fused._numba_available():
        from .._fused._numba_floor import same_traffic
        from .._fused.threads import run_chunks

        def step() -> None:
            run_chunks(lambda job, lo, hi: same_traffic(lo, hi, x, g, m, v), [elements])

        how = "numba loop, x += g; m += g; v += g"
    else:

        def step() -> None:
            np.add(x, g, out=x)
            np.add(m, g, out=m)
            np.add(v, g, out=v)

        how = "three NumPy adds (no numba: an estimate)"
    return step, how


def settle() -> None:
    """Wait `SETTLE_SECONDS` without sleeping.

    OpenMP threads (torch's) and XLA's spin for several milliseconds after their work, on
    the cores that the next call needs: the call after such a step waits for them to go
    idle, so that it does not pay for the step before it.  Busy, not asleep, so that this
    thread's core stays awake.  Other steps are followed at once, as an optimiser step
    follows the backward pass: waiting costs a small step its warm cores.
    """
    end = time.perf_counter() + SETTLE_SECONDS
    while time.perf_counter() < end:
        pass


def _spins(impl: str) -> bool:
    """Whether the implementation leaves threads spinning after a step (see `settle`)."""
    return impl.startswith(("torch", "optax"))


def time_beside(step: Step, floor: Step, reps: int, wait: tuple[bool, bool]) -> tuple[float, float]:
    """Median seconds of `step` and of `floor`, timed alternately: on a shared machine both
    see the same conditions, so their ratio is steadier than either time.  `wait` says
    whether to `settle` before `step` and before `floor`."""
    for _ in range(2):
        step()
        floor()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for function, samples, first in ((step, times[0], wait[0]), (floor, times[1], wait[1])):
            if first:
                settle()
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def run(
    sets: list[str],
    impls: dict[str, Make],
    floor: Callable[[int], tuple[Step, str]],
    scale: float,
    reps: int,
) -> tuple[list[dict[str, Any]], str]:
    """Every implementation on every set, each timed alternately with the set's floor."""
    results: list[dict[str, Any]] = []
    how = ""
    for set_name in sets:
        set_shapes = shapes(set_name, scale)
        elements = sum(int(np.prod(shape)) for shape in set_shapes)
        floor_of_set, how = floor(elements)
        for impl, make in impls.items():
            step = make(set_name, set_shapes)
            if step is None:
                continue
            seconds, floor_seconds = time_beside(step, floor_of_set, reps, wait=(False, _spins(impl)))
            ms, floor_ms = 1e3 * seconds, 1e3 * floor_seconds
            results.append(
                {
                    "impl": impl,
                    "set": set_name,
                    "arrays": len(set_shapes),
                    "elements": elements,
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "GB/s": BYTES_PER_ELEMENT * elements / seconds / 1e9,
                    "floor_GB/s": BYTES_PER_ELEMENT * elements / floor_seconds / 1e9,
                    "x_floor": ms / floor_ms,
                }
            )
            del step
            gc.collect()
        del floor_of_set
    return results, how


def head_to_head(sets: list[str], ours: Make, theirs: Make, scale: float, reps: int) -> list[dict[str, Any]]:
    """composeopt's fused step and torch's, timed alternately with each other on every set:
    rows of the main table are timed one after the other, so on a shared machine they drift
    apart by more than the few per cent between these two."""
    rows = []
    for set_name in sets:
        set_shapes = shapes(set_name, scale)
        step, other = ours(set_name, set_shapes), theirs(set_name, set_shapes)
        if step is None or other is None:
            continue
        # Both wait before their turn: torch's threads go idle, and each starts from the same state.
        their_seconds, our_seconds = time_beside(other, step, reps, wait=(True, True))
        rows.append(
            {
                "set": set_name,
                "composeopt_ms": 1e3 * our_seconds,
                "torch_fused_ms": 1e3 * their_seconds,
                "ratio": our_seconds / their_seconds,
            }
        )
        del step, other
        gc.collect()
    return rows
