"""numba reductions for the norm-clipping stages (imported only with numba present)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = ["power", "combine_max"]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def power(lo: int, hi: int, a: Any, p: float, kind: int) -> float:  # pragma: no cover - compiled
    """Over `a[lo:hi]`, in float64: kind 0 `sum a²`, 1 `sum |a|`, 2 `max |a|`, 3 `sum |a|^p`,
    4 `sum a·0` (0 if every element is finite, else NaN).

    Only the sums may be reordered (vectorised); NaN still propagates."""
    a = a[lo:hi]
    total = 0.0
    if kind == 0:
        for i in range(a.shape[0]):
            v = np.float64(a[i])
            total += v * v
    elif kind == 1:
        for i in range(a.shape[0]):
            total += abs(np.float64(a[i]))
    elif kind == 2:
        for i in range(a.shape[0]):
            v = abs(np.float64(a[i]))
            if v > total or v != v:
                total = v
            if total != total:
                break
    elif kind == 3:
        for i in range(a.shape[0]):
            total += abs(np.float64(a[i])) ** p
    else:
        # Four interleaved quarters: one stream of reads gets about two thirds of what four
        # get from memory, and this pass does nothing but read.  Its sum is exact (zeros, or
        # NaN), so neither the split nor the vectorisation can change it.
        q = a.shape[0] // 4
        b, c, d = a[q:], a[2 * q :], a[3 * q :]
        t1 = t2 = t3 = 0.0
        for i in range(q):
            total += np.float64(a[i]) * 0.0
            t1 += np.float64(b[i]) * 0.0
            t2 += np.float64(c[i]) * 0.0
            t3 += np.float64(d[i]) * 0.0
        for i in range(4 * q, a.shape[0]):
            total += np.float64(a[i]) * 0.0
        total += t1 + t2 + t3
    return total


def combine_max(parts: Any) -> float:
    """The largest value of `parts`, NaN if any is NaN (as `numpy.max`)."""
    return float(np.max(parts)) if len(parts) else 0.0
