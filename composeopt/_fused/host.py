"""The CPU backends: numba loops, or blocked NumPy without a compiler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .kernel import Kernel
from .reduce import Measure

__all__ = ["NumbaBackend", "NumpyBackend"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _HostBackend:
    """Array checks shared by the CPU backends."""

    name = ""

    def accepts(self, x: Any) -> bool:
        return x.dtype in _DTYPES and x.flags.c_contiguous

    def flat(self, a: Any) -> Any:
        return a.reshape(-1)

    def gradient(self, x: Any, dx: Any) -> Any:
        """`dx` (which shares no memory with what the step writes) as a 1-d contiguous array."""
        if not (dx.flags.c_contiguous and dx.dtype == x.dtype):
            dx = np.array(dx, dtype=x.dtype, order="C")
        return dx.reshape(-1)

    def state_array(self, a: Any, x: Any) -> Any:
        if (
            type(a) is np.ndarray
            and a.dtype == x.dtype
            and a.shape == x.shape
            and a.flags.c_contiguous
            and a.flags.writeable
        ):
            return a.reshape(-1)
        return None

    def scratch(self, x: Any) -> Any:
        return np.empty(x.size, dtype=x.dtype)

    def vector(self, values: list[float], scale: Any, dtype: Any) -> Any:
        """The stage's scalars (and a clip's scale), cast to the arrays' dtype as NumPy casts them."""
        return np.array(values if scale is None else [*values, scale], dtype=dtype)

    def measure(self, arrays: Sequence[Any], p: float | str) -> list[float]:
        """Per array, in float64: `sum |a|^p` (`max |a|` for `p = inf`), or the finite flag
        (0.0 if every element is finite, else NaN) for `FINITE`."""
        raise NotImplementedError

    def run_stage(
        self,
        kernels: tuple[Kernel, ...],
        scaled: bool,
        to_x: bool,
        jobs: list[Any],
        measures: Sequence[Measure] = (),
    ) -> list[list[float]]:
        """Run the stage over every job `(g, x, out, k, *state)`; then, per job, each measure of
        its output `out` or its parameter `x` (which a stage that writes `out` leaves alone)."""
        self._run(kernels, scaled, to_x, jobs)
        columns = [self.measure([job[2] if m.of == "d" else job[1] for job in jobs], m.p) for m in measures]
        return [list(row) for row in zip(*columns)] if columns else [[] for _ in jobs]

    def _run(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None:
        raise NotImplementedError


class NumbaBackend(_HostBackend):
    name = "numba"

    def __init__(self) -> None:
        from . import numba_backend

        self._compiled = numba_backend

    def run_stage(
        self,
        kernels: tuple[Kernel, ...],
        scaled: bool,
        to_x: bool,
        jobs: list[Any],
        measures: Sequence[Measure] = (),
    ) -> list[list[float]]:
        if not measures:
            self._run(kernels, scaled, to_x, jobs)
            return [[] for _ in jobs]
        # Measured as it is written, block by block while the block is in cache.
        return self._compiled.run_measured_stage(kernels, scaled, jobs, measures)

    def _run(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None:
        function = self._compiled.stage_function(kernels, scaled, to_x)
        self._compiled.run_stage(function, jobs)

    def measure(self, arrays: Sequence[Any], p: float | str) -> list[float]:
        return self._compiled.powers(arrays, p)


class NumpyBackend(_HostBackend):
    name = "numpy"

    def __init__(self) -> None:
        from . import numpy_backend

        self._blocked = numpy_backend

    def _run(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None:
        program = self._blocked.stage_program(kernels, scaled, to_x)
        self._blocked.run_stage(program, jobs)

    def measure(self, arrays: Sequence[Any], p: float | str) -> list[float]:
        return self._blocked.powers(arrays, p)
