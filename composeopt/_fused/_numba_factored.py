"""numba loops of a whole Adafactor step (imported only with numba present).

`step(jobs, table, scalars, work, like)` takes the step of each array `table[job]`,
`job` in `jobs`, from start to end on the calling thread, so that an array that fits
in cache is read from memory once and then from cache.  The layout of the table and of
a factored array (`(outer, P, between, Q, inner)`) is described in `.factored`; `work`
is scratch of the arrays' dtype (`like`'s), `scalars` each a value of that dtype.

Everything is computed in the arrays' dtype, as the generic path computes it: the second
moments are rounded exactly as there, and the sums over P are taken in the same order (so
they match to the bit where NumPy sums along an outer axis, one row after the other).  The
other sums (over Q, and of `x²` and `u²`) are taken per block of a row and added up in
float64; the update uses the reciprocals of the square roots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from numba.np.numpy_support import carray

from ._numba_pointers import pointer as _pointer

pointer: Any = _pointer  # called by numba only, with numba's own arguments

__all__ = ["step"]

# Columns of the integer table; the same numbers in `.factored`.
KIND, X, DX, STATE_P, STATE_Q, M, OUTER, SIZE_P, BETWEEN, SIZE_Q, INNER, ROW_IS_P, WIDTH = range(13)
FACTORED = 1
# Columns of the scalars; the same numbers in `.factored`.
EPS, DECAY, KEEP, ETA, THRESHOLD, SCALED, MU, KEEP_MU, LAMBDA = range(9)

SUM_BLOCK = 512
"""An unfactored array's partial sums cover this many elements before they go into float64."""

_compiled = njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
# reassoc alone lets the sums be vectorised; it replaces no operation (no FMA, no reciprocal),
# so the state updates round exactly as written.


@_compiled
def _maximum(a: Any, b: Any) -> Any:  # pragma: no cover - compiled
    """NumPy's NaN-propagating maximum."""
    return a if (a > b or a != a) else b


@_compiled
def _squares(a: Any) -> float:  # pragma: no cover - compiled
    """`sum a²`, summed in `a`'s dtype (vectorised) and returned in float64."""
    total = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        total += a[i] * a[i]
    return float(total)


@_compiled
def _scale(k: Any, u_squares: float, x_squares: float, n: int, like: Any) -> Any:  # pragma: no cover
    """`eta * max(rms(x), 1e-3) / max(1, rms(u) / d)`, each factor rounded as the generic path."""
    cast = like.dtype.type
    one = cast(1.0)
    clip = one
    if k[THRESHOLD] > 0:
        clip = _maximum(one, np.sqrt(cast(u_squares) / cast(n)) / cast(k[THRESHOLD]))
    parameter = one
    if k[SCALED] != 0:
        parameter = _maximum(np.sqrt(cast(x_squares) / cast(n)), cast(1e-3))
    return cast(k[ETA] / np.float64(clip) * np.float64(parameter))


@_compiled
def _decays(k: Any, x_squares: float) -> bool:  # pragma: no cover - compiled
    """Whether `x -= u + lambda x` needs its last term: with lambda = 0 it is `0 * x`, which
    changes nothing unless some `x` is infinite or NaN (then it is NaN), and a finite
    `sum x²` shows that none is."""
    return bool(k[LAMBDA] != 0 or k[SCALED] == 0 or not np.isfinite(x_squares))


@_compiled
def _elementwise(row: Any, k: Any, like: Any) -> None:  # pragma: no cover - compiled
    """The step of an array with one second moment `v` per entry (`row[OUTER]` of them)."""
    cast = like.dtype.type
    n = row[OUTER]
    x = carray(pointer(row[X], like), n)
    g = carray(pointer(row[DX], like), n)
    v = carray(pointer(row[STATE_P], like), n)
    eps, decay, keep = cast(k[EPS]), cast(k[DECAY]), cast(k[KEEP])
    for i in range(n):
        d = g[i]
        v[i] = v[i] * decay + keep * (d * d + eps)
    x_squares = 0.0
    if k[SCALED] != 0:
        for lo in range(0, n, SUM_BLOCK):
            x_squares += _squares(x[lo : min(n, lo + SUM_BLOCK)])
    u_squares = 0.0
    if k[THRESHOLD] > 0:
        for lo in range(0, n, SUM_BLOCK):
            gb, vb = g[lo : min(n, lo + SUM_BLOCK)], v[lo : min(n, lo + SUM_BLOCK)]
            total = cast(0.0)
            for i in range(gb.shape[0]):
                u = gb[i] / np.sqrt(vb[i])
                total += u * u
            u_squares += np.float64(total)
    scale = _scale(k, u_squares, x_squares, n, like)
    mu, keep_mu, lam = cast(k[MU]), cast(k[KEEP_MU]), cast(k[LAMBDA])
    decays = _decays(k, x_squares)
    if k[MU] > 0:
        m = carray(pointer(row[M], like), n)
        for i in range(n):
            m[i] = m[i] * mu + keep_mu * (g[i] / np.sqrt(v[i]) * scale)
            x[i] = x[i] - (m[i] + lam * x[i]) if decays else x[i] - m[i]
    elif decays:
        for i in range(n):
            x[i] = x[i] - (g[i] / np.sqrt(v[i]) * scale + lam * x[i])
    else:
        for i in range(n):
            x[i] = x[i] - g[i] / np.sqrt(v[i]) * scale


@_compiled
def _copy(destination: Any, source: Any) -> None:  # pragma: no cover - compiled
    """`destination[:] = source` for arrays that do not overlap (a loop that vectorises)."""
    for j in range(source.shape[0]):
        destination[j] = source[j]


@_compiled
def _add(destination: Any, source: Any) -> None:  # pragma: no cover - compiled
    """`destination += source` for arrays that do not overlap."""
    for j in range(source.shape[0]):
        destination[j] += source[j]


@_compiled
def _tile(tile: Any, factors: Any, scale: Any, inverse: bool) -> None:  # pragma: no cover - compiled
    """`tile[j] = factors[j % inner] * scale` (`scale / factors[j % inner]` if `inverse`) for a
    tile of whole runs of `inner`: one run, then doubled (copies that vectorise, where a stride
    of `inner` would not)."""
    inner = factors.shape[0]
    if inner == 1:
        value = scale / factors[0] if inverse else factors[0] * scale
        for j in range(tile.shape[0]):
            tile[j] = value
        return
    for c in range(inner):
        tile[c] = scale / factors[c] if inverse else factors[c] * scale
    filled = inner
    while filled < tile.shape[0]:
        copied = min(filled, tile.shape[0] - filled)
        _copy(tile[filled : filled + copied], tile[:copied])
        filled += copied


@_compiled
def _first_pass(
    g: Any,
    x: Any,
    k: Any,
    shape: Any,
    state_q: Any,
    along_p: Any,
    weighted: Any,
    acc: Any,
    tile: Any,
) -> float:  # pragma: no cover - compiled
    """The one pass over `dx` (and `x`) before the update; returns `sum x²` (0 unless scaled).

    With `G = dx² + eps`, row `r = (a, p, b)` by row: `along_p[a, b, q, c] += G` (the sums
    over P, one row after the other) and `state_q[a, p, b, c]` updated with the mean of `G`
    over q.  With clipping, the row is then read again, from cache, for
    `weighted[a, b, q, c] += dx² / state_q[a, p, b, c]`: the sum of `u²` is then
    `sum weighted * mean / state_p` (`mean` that of the rows), without another pass."""
    outer, size_p, between, size_q, inner = shape
    length, width = size_q * inner, acc.shape[0]
    cast = g.dtype.type
    zero, one = cast(0.0), cast(1.0)
    eps, decay, keep, count_q = cast(k[EPS]), cast(k[DECAY]), cast(k[KEEP]), cast(size_q)
    scaled, clipped = k[SCALED] != 0, k[THRESHOLD] > 0
    x_squares = 0.0
    for a in range(outer):
        for p in range(size_p):
            for b in range(between):
                r = (a * size_p + p) * between + b  # the row of this (a, p, b)
                gr = g[r * length : (r + 1) * length]
                # without the parameter scale, dx stands in for x: nothing more is read
                xr = x[r * length : (r + 1) * length] if scaled else gr
                start = (a * between + b) * length
                pr, wr = along_p[start : start + length], weighted[start : start + length]
                row_sum = 0.0  # a matrix's (inner == 1); else per c, in acc
                acc[:] = zero
                for j0 in range(0, length, width):
                    w = min(width, length - j0)
                    gb, pb, xb = gr[j0 : j0 + w], pr[j0 : j0 + w], xr[j0 : j0 + w]
                    block_x = zero
                    total = zero
                    if inner == 1:
                        for j in range(w):
                            d = gb[j]
                            square = d * d + eps
                            pb[j] += square
                            total += square
                            block_x += xb[j] * xb[j]
                    else:
                        for j in range(w):
                            d = gb[j]
                            square = d * d + eps
                            pb[j] += square
                            acc[j] += square
                            block_x += xb[j] * xb[j]
                    row_sum += np.float64(total)
                    x_squares += np.float64(block_x)
                qr = state_q[r * inner : (r + 1) * inner]
                if inner == 1:
                    qr[0] = qr[0] * decay + keep * (cast(row_sum) / count_q)
                else:  # the runs of acc summed, one sum per c: halved while their number is even
                    runs = width // inner
                    while runs % 2 == 0:
                        runs //= 2
                        _add(acc[: runs * inner], acc[runs * inner : 2 * runs * inner])
                    for c in range(inner):
                        column_sum = 0.0
                        for i in range(c, runs * inner, inner):
                            column_sum += np.float64(acc[i])
                        qr[c] = qr[c] * decay + keep * (cast(column_sum) / count_q)
                if clipped and inner == 1:
                    weight = one / qr[0]
                    for j in range(length):
                        wr[j] += gr[j] * gr[j] * weight
                elif clipped:
                    _tile(tile, qr, one, True)
                    for j0 in range(0, length, width):
                        w = min(width, length - j0)
                        gb, wb = gr[j0 : j0 + w], wr[j0 : j0 + w]
                        for j in range(w):
                            wb[j] += gb[j] * gb[j] * tile[j]
    return x_squares if scaled else 0.0


@_compiled
def _apply(
    g: Any,
    x: Any,
    m: Any,
    factor_p: Any,
    factor_q: Any,
    shape: Any,
    tile: Any,
    scale: Any,
    momentum: bool,
    mu: Any,
    keep_mu: Any,
    lam: Any,
    decays: bool,
) -> None:  # pragma: no cover - compiled
    """`m = mu m + (1 - mu) u` (with `momentum`) and `x -= m + lam x` (`x -= m` unless
    `decays`), with `u = dx * factor_p * factor_q * scale`."""
    outer, size_p, between, size_q, inner = shape
    length, width = size_q * inner, tile.shape[0]
    for a in range(outer):
        for p in range(size_p):
            for b in range(between):
                r = (a * size_p + p) * between + b
                gr, xr = g[r * length : (r + 1) * length], x[r * length : (r + 1) * length]
                mr = m[r * length : (r + 1) * length]
                pr = factor_p[(a * between + b) * length : (a * between + b + 1) * length]
                _tile(tile, factor_q[r * inner : (r + 1) * inner], scale, False)
                for j0 in range(0, length, width):
                    w = min(width, length - j0)
                    gb, pb, xb, mb = gr[j0 : j0 + w], pr[j0 : j0 + w], xr[j0 : j0 + w], mr[j0 : j0 + w]
                    if momentum and decays:
                        for j in range(w):
                            mb[j] = mb[j] * mu + keep_mu * (gb[j] * pb[j] * tile[j])
                            xb[j] = xb[j] - (mb[j] + lam * xb[j])
                    elif momentum:
                        for j in range(w):
                            mb[j] = mb[j] * mu + keep_mu * (gb[j] * pb[j] * tile[j])
                            xb[j] = xb[j] - mb[j]
                    elif decays:
                        for j in range(w):
                            xb[j] = xb[j] - (gb[j] * pb[j] * tile[j] + lam * xb[j])
                    else:
                        for j in range(w):
                            xb[j] = xb[j] - gb[j] * pb[j] * tile[j]


@_compiled
def _factors(
    state_p: Any, state_q: Any, shape: Any, row_is_p: bool, factor_p: Any, factor_q: Any, weighted: Any
) -> float:  # pragma: no cover - compiled
    """`factor = 1 / sqrt(state)`, the rows' state first divided by its mean along the other
    factored axis (summed in float64), each step rounded as the generic path rounds it; returns
    `sum u²` from `weighted` (see `_first_pass`; `None` without clipping)."""
    cast = state_p.dtype.type
    outer, size_p, between, size_q, inner = shape
    rows, others = (state_p, state_q) if row_is_p else (state_q, state_p)
    row_factor, other_factor = (factor_p, factor_q) if row_is_p else (factor_q, factor_p)
    along = size_q if row_is_p else size_p
    # rows[a, b, q, c] with the stride of q, or rows[a, p, b, c] with the stride of p
    stride = inner if row_is_p else between * inner
    u_squares = 0.0
    for a in range(outer):
        for b in range(between):
            start = (a * between + b) * size_q * inner if row_is_p else (a * size_p * between + b) * inner
            for c in range(inner):
                total = 0.0
                for i in range(start + c, start + c + along * stride, stride):
                    total += np.float64(rows[i])
                mean = cast(total) / cast(along)
                for i in range(start + c, start + c + along * stride, stride):
                    row_factor[i] = cast(1.0) / np.sqrt(rows[i] / mean)
                if weighted is not None:  # sum over q of weighted / state_p, times the mean
                    first = (a * between + b) * size_q * inner + c
                    part = 0.0
                    for i in range(first, first + size_q * inner, inner):
                        part += np.float64(weighted[i]) / np.float64(state_p[i])
                    u_squares += part * np.float64(mean)
    for i in range(others.shape[0]):
        other_factor[i] = cast(1.0) / np.sqrt(others[i])
    return u_squares


@_compiled
def _factored(row: Any, k: Any, work: Any, like: Any) -> None:  # pragma: no cover - compiled
    """The step of an array seen as `(outer, P, between, Q, inner)`, its second moments
    factored over P and Q: `state_p` (indexed `(a, b, q, c)`) is the mean over P of `dx² + eps`,
    `state_q` (indexed `(a, p, b, c)`) the mean over Q.  Two passes over the array: one to
    read, one to write."""
    cast = like.dtype.type
    shape = (row[OUTER], row[SIZE_P], row[BETWEEN], row[SIZE_Q], row[INNER])
    outer, size_p, between, size_q, inner = shape
    n = outer * size_p * between * size_q * inner
    n_p, n_q = outer * between * size_q * inner, outer * size_p * between * inner
    width = row[WIDTH]
    factor_p = work[:n_p]  # first the sums over P, then the factors of that layout
    weighted = work[n_p : 2 * n_p]
    factor_q = work[2 * n_p : 2 * n_p + n_q]
    acc = work[2 * n_p + n_q : 2 * n_p + n_q + width]
    tile = work[2 * n_p + n_q + width : 2 * n_p + n_q + 2 * width]
    x = carray(pointer(row[X], like), n)
    g = carray(pointer(row[DX], like), n)
    state_p = carray(pointer(row[STATE_P], like), n_p)
    state_q = carray(pointer(row[STATE_Q], like), n_q)

    factor_p[:] = cast(0.0)
    weighted[:] = cast(0.0)
    x_squares = _first_pass(g, x, k, shape, state_q, factor_p, weighted, acc, tile)
    decay, keep, count_p = cast(k[DECAY]), cast(k[KEEP]), cast(size_p)
    for i in range(n_p):
        state_p[i] = state_p[i] * decay + keep * (factor_p[i] / count_p)
    clipped = k[THRESHOLD] > 0
    u_squares = _factors(
        state_p, state_q, shape, row[ROW_IS_P] != 0, factor_p, factor_q, weighted if clipped else None
    )
    scale = _scale(k, u_squares, x_squares, n, like)
    momentum = k[MU] > 0
    m = carray(pointer(row[M] if momentum else row[X], like), n)  # not read without momentum
    lam = cast(k[LAMBDA])
    _apply(
        g,
        x,
        m,
        factor_p,
        factor_q,
        shape,
        tile,
        scale,
        momentum,
        cast(k[MU]),
        cast(k[KEEP_MU]),
        lam,
        _decays(k, x_squares),
    )


@_compiled
def step(jobs: Any, table: Any, scalars: Any, work: Any, like: Any) -> None:  # pragma: no cover - compiled
    """The whole step of every array `table[job]`, `job` in `jobs`, one after the other."""
    for job in jobs:
        if table[job, KIND] == FACTORED:
            _factored(table[job], scalars[job], work, like)
        else:
            _elementwise(table[job], scalars[job], like)
