"""The benchmark's floor: a loop with Adam's memory traffic and no arithmetic to speak of."""

from __future__ import annotations

from typing import Any

from numba import njit

__all__ = ["same_traffic"]


@njit(cache=True, nogil=True, error_model="numpy")
def same_traffic(lo: int, hi: int, x: Any, g: Any, m: Any, v: Any) -> None:  # pragma: no cover - compiled
    """Read `x, g, m, v` and write `x, m, v` over `lo:hi`: 28 bytes per float32 element."""
    x, g, m, v = x[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    for i in range(x.shape[0]):
        d = g[i]
        x[i] += d
        m[i] += d
        v[i] += d
