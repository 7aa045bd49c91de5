"""The CPU backends: numba loops, or blocked NumPy without a compiler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .kernel import Kernel

__all__ = ["NumbaBackend", "NumpyBackend", "clip_scale"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def clip_scale(norm: float, omega: float) -> float:
    """`omega / max(norm, omega)` with NumPy's NaN-propagating maximum."""
    return omega / (norm if (norm > omega or norm != norm) else omega)


def norm_from_power(power: float, p: float) -> float:
    if p == math.inf or p == 1:
        return power
    if p == 2:
        return math.sqrt(power)
    return float(power ** (1 / p))


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

    def powers(self, sources: Sequence[Any], p: float) -> list[float]:
        raise NotImplementedError

    def clip_scales(self, sources: Sequence[Any], omega: float, p: float, joint: bool) -> list[float]:
        # Summed in float64 here, but a power that the generic path, summing in the arrays' own
        # dtype (as torch and optax do), finds too big to hold is infinite here too: the same
        # norm, give or take the order of the sum, and so the same clip.
        powers = [
            math.inf if power > np.finfo(source.dtype).max else power  # NaN stays NaN
            for power, source in zip(self.powers(sources, p), sources)
        ]
        if not joint:
            return [clip_scale(norm_from_power(power, p), omega) for power in powers]
        if p == math.inf:
            total = max(powers, default=0.0) if not any(power != power for power in powers) else math.nan
        else:
            total = math.fsum(powers) if all(math.isfinite(power) for power in powers) else sum(powers)
            if sources and total > max(np.finfo(source.dtype).max for source in sources):
                total = math.inf
        return [clip_scale(norm_from_power(total, p), omega)] * len(sources)


class NumbaBackend(_HostBackend):
    name = "numba"

    def __init__(self) -> None:
        from . import numba_backend

        self._compiled = numba_backend

    def run_stage(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None:
        function = self._compiled.stage_function(kernels, scaled, to_x)
        self._compiled.run_stage(function, jobs)

    def powers(self, sources: Sequence[Any], p: float) -> list[float]:
        return self._compiled.powers(sources, p)


class NumpyBackend(_HostBackend):
    name = "numpy"

    def __init__(self) -> None:
        from . import numpy_backend

        self._blocked = numpy_backend

    def run_stage(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None:
        program = self._blocked.stage_program(kernels, scaled, to_x)
        self._blocked.run_stage(program, jobs)

    def powers(self, sources: Sequence[Any], p: float) -> list[float]:
        return self._blocked.powers(sources, p)
