"""Small pieces of arithmetic shared by several rules, generic over the array module."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from array_api_compat import device

__all__ = [
    "ema",
    "bias_corrected_direction",
    "DIRECTION",
    "direction_scalars",
    "widened",
    "widened_dtype",
    "clamp",
    "norm_power",
    "norm_from_power",
]


def ema(average: Any, value: Any, decay: float) -> Any:
    """`decay * average + (1 - decay) * value`, in place when the array allows it.

    Returns the result: assign it back (`state.mu = ema(state.mu, dx, b1)`) so
    that immutable arrays (JAX) work too.
    """
    average *= decay
    average += (1 - decay) * value
    return average


def bias_corrected_direction(
    xp: ModuleType, mu: Any, nu: Any, t: int, beta: tuple[float, float], eps: float
) -> Any:
    """Adam's direction `m̂ / (sqrt(v̂) + eps)` with `m̂ = mu / (1 - β1^t)`, `v̂ = nu / (1 - β2^t)`.

    Computed as `(mu * r1) / (sqrt(nu) * r2 + eps)` with `r1 = 1 / (1 - β1^t)` and
    `r2 = 1 / sqrt(1 - β2^t)` (torch's form): the same number, give or take an ulp, with one
    division per element instead of three.  In cache, where a step is not memory-bound, the
    divisions are what an Adam step costs.  The fused kernels (`DIRECTION`) do the same.
    """
    r1, r2 = direction_scalars(beta, t)
    return (mu * r1) / (xp.sqrt(nu) * r2 + eps)


DIRECTION = "(mu * r1) / (sqrt(nu) * r2 + eps)"
"""`bias_corrected_direction` in kernel math, with the scalars of `direction_scalars`."""


def direction_scalars(beta: tuple[float, ...], t: int) -> tuple[float, float]:
    """`r1 = 1 / (1 - β1^t)` and `r2 = 1 / sqrt(1 - β2^t)`, Adam's bias corrections."""
    b1, b2 = beta[0], beta[1]
    return 1 / (1 - b1**t), 1 / math.sqrt(1 - b2**t)


def widened_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float32 for a narrower dtype (float16, bfloat16), else `dtype` itself."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def widened(xp: ModuleType, a: Any) -> Any:
    """`a` in float32 if it is narrower, else `a` itself: what sums over it are reduced in,
    and what accumulators and scalars that outgrow a 16-bit dtype are computed in.

    16-bit sums of squares overflow (float16 tops out at 65504), and bfloat16's 8-bit
    significand loses small additions to a large sum.
    """
    wide = widened_dtype(xp, a.dtype)
    return a if wide == a.dtype else xp.astype(a, wide)


def clamp(xp: ModuleType, a: Any, low: float, high: float) -> Any:
    """`a` clipped to `[low, high]` (NaN stays NaN), as the kernels' `minimum(maximum(a, low), high)`.

    array-api-compat's `clip` raises on ml_dtypes' bfloat16 (NumPy's UFuncTypeError); `maximum`
    and `minimum` take it.
    """
    return xp.minimum(xp.maximum(a, low), high)


def norm_power(xp: ModuleType, dx: Any, p: float) -> Any:
    """`sum |dx|^p` as a 0-d array (`max |dx|` for `p = inf`), reduced in float32 or wider."""
    if math.prod(dx.shape) == 0:
        return xp.zeros((), dtype=widened(xp, dx).dtype, device=device(dx))
    magnitude = widened(xp, xp.abs(dx))
    if p == math.inf:
        return xp.max(magnitude)
    if p == 1:
        return xp.sum(magnitude)
    if p == 2:
        return xp.sum(magnitude * magnitude)
    return xp.sum(magnitude**p)


def norm_from_power(xp: ModuleType, power: Any, p: float) -> Any:
    """The p-norm from `norm_power`'s result."""
    if p == math.inf or p == 1:
        return power
    if p == 2:
        return xp.sqrt(power)
    return power ** (1 / p)
