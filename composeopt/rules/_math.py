"""Small pieces of arithmetic shared by several rules, generic over the array module."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from array_api_compat import device

__all__ = ["ema", "bias_corrected_direction", "widened", "norm_power", "norm_from_power"]


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
    """Adam's direction `m̂ / (sqrt(v̂) + eps)` with `m̂ = mu / (1 - β1^t)`, `v̂ = nu / (1 - β2^t)`."""
    b1, b2 = beta
    return (mu / (1 - b1**t)) / (xp.sqrt(nu / (1 - b2**t)) + eps)


def widened(xp: ModuleType, a: Any) -> Any:
    """`a` in float32 if it is narrower, else `a` itself: what sums over it are reduced in.

    16-bit sums of squares overflow (float16 tops out at 65504).
    """
    return xp.astype(a, xp.float32) if xp.finfo(a.dtype).bits < 32 else a


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
