"""Adafactor's whole-rule fast path on NumPy arrays: the step of every parameter in two or
three passes over its memory, by numba loops or, without numba, blocked NumPy calls.

Adafactor's update needs reductions over each array between reading `dx` and writing `x`
(row and column means, two RMS), so it is no elementwise `Kernel`.  `FactoredKernel` takes
the whole step of one rule over many parameters instead.  The numba loops (see
`._numba_factored`) take two passes over a factored array:

1. read `dx` (and `x` for the parameter scale), row by row: the sums of `G = dx² + eps`
   over each of the two factored axes, `sum x²`, and, for the clipping, the sums over the
   rows of `dx²` divided by the rows' new second moment, from which `sum u²` follows
   without reading `dx` a third time; update the second moments;
2. read `dx` and `x`, write `x` (and the momentum).

An unfactored array (one moment `v` per entry) and the NumPy fallback take a pass more,
for `sum u²`.  `u = dx / sqrt(row scale) / sqrt(column)` is never stored.  Each array is
stepped from start to end by one thread (an array that fits in cache is read from there
the second time); the arrays are shared between the threads by their cost.

An array is seen as `(outer, P, between, Q, inner)`, where P and Q are its two factored
axes in axis order (the largest and the second largest, as `Adafactor` picks them): a
conv weight `(out, in, kh, kw)` is `(1, out, 1, in, kh * kw)`.  The second moment that is
a mean over P (indexed `(a, b, q, c)`) is `state_p`, the one over Q (`(a, p, b, c)`)
`state_q`; which of them is the rule's `v_row` depends on which axis is the largest.

Rounding: every state is updated in the arrays' dtype as the generic path updates it, but
from sums taken in another order (blocks of a row summed in the dtype, then in float64;
`sum u²` from the factored form); the update is computed with the factors' reciprocals.
In float64 that is the generic result to about 1e-15; in float32 the states differ by
about the generic path's own summation error (a few ulps to a few tens), `x` by an ulp or
two of its largest entries.
"""

from __future__ import annotations

import ctypes
import heapq
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any, NamedTuple

import numpy as np

from ..rule import Rule, State
from .threads import PARALLEL_MIN, run_together, thread_count

__all__ = ["FactoredKernel", "implementation"]

# Columns of the integer table and of the scalars, as `._numba_factored` reads them.
KIND, X, DX, STATE_P, STATE_Q, M, OUTER, SIZE_P, BETWEEN, SIZE_Q, INNER, ROW_IS_P, WIDTH = range(13)
FACTORED, ELEMENTWISE = 1, 2
EPS, DECAY, KEEP, ETA, THRESHOLD, SCALED, MU, KEEP_MU, LAMBDA = range(9)

ROW_BLOCK = 512
"""The numba loops take a row about this many elements at a time: a whole number of `inner`
runs (so that the partial sums over Q and the factors along Q line up with the block) and of
64 (the step of a vectorised loop, which leaves no remainder to do one element at a time)."""

NUMPY_BLOCK = 1 << 16
"""Elements per NumPy call in the fallback: its temporaries stay in a core's cache."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FIELDS = {"v_row", "v_col", "v", "m", "t"}


class Layout(NamedTuple):
    """How one parameter shape is stepped."""

    factored: bool
    view: tuple[int, int, int, int, int]  # (outer, P, between, Q, inner); (size, 1, 1, 1, 1) if not factored
    row_is_p: bool  # v_row is the mean over P (P is the largest axis)
    v_row: tuple[int, ...] | None  # the state shapes init makes
    v_col: tuple[int, ...] | None
    width: int  # the numba loops' block of a row (see `ROW_BLOCK`)
    work: int  # the scratch they need, in the array's dtype (see `_work`)
    columns: tuple[int, ...]  # the table's columns KIND and OUTER to WIDTH


def _width(view: tuple[int, ...]) -> int:
    inner = view[4]
    step = math.lcm(inner, 64)
    return min(view[3] * inner, step * max(1, ROW_BLOCK // step))


def _work(view: tuple[int, ...], width: int) -> int:
    """Sums then factors of both layouts, the weighted sums of dx² over P, and two blocks."""
    outer, size_p, between, size_q, inner = view
    return outer * between * (2 * size_q + size_p) * inner + 2 * width


@lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], factored: bool) -> Layout:
    if not factored:
        view = (math.prod(shape), 1, 1, 1, 1)
        return Layout(False, view, False, None, None, 0, 0, (ELEMENTWISE, *view, 0, 0))
    from ..rules.factored import _largest_axes, _without  # the rule's own choice of axes

    d1, d0 = _largest_axes(shape)
    first, second = sorted((d0, d1))
    view = (
        math.prod(shape[:first]),
        shape[first],
        math.prod(shape[first + 1 : second]),
        shape[second],
        math.prod(shape[second + 1 :]),
    )
    width = _width(view)
    columns = (FACTORED, *view, int(d0 == first), width)
    return Layout(
        True, view, d0 == first, _without(shape, d0), _without(shape, d1), width, _work(view, width), columns
    )


def _fits(a: Any, shape: tuple[int, ...], dtype: Any) -> bool:
    return (
        type(a) is np.ndarray
        and a.dtype == dtype
        and a.shape == shape
        and a.flags.c_contiguous
        and a.flags.writeable
    )


def implementation() -> str:
    """`numba`, or `numpy` where numba is missing or `COMPOSEOPT_FUSED` (the fused engine's
    `MODE`) is `numpy`."""
    package = sys.modules.get(__package__ or "")
    mode = getattr(package, "MODE", os.environ.get("COMPOSEOPT_FUSED", "auto"))
    if mode == "numpy" or importlib.util.find_spec("numba") is None:
        return "numpy"
    return "numba"


class _Job(NamedTuple):
    x: Any
    dx: Any
    state_p: Any  # factored: the mean over P; else v
    state_q: Any  # factored: the mean over Q; else None
    m: Any
    layout: Layout
    k: tuple[float, ...]  # the scalars, each a value of the arrays' dtype


class FactoredKernel:
    """The whole step of `Adafactor` over many NumPy parameters (see the module docstring).

    `accepts(rule, state, x)` says whether `x` and `state` are what this step handles;
    `run_(rule, states, xs, dxs)` takes one step of every parameter after `begin_step`:
    it advances the counters, writes the states and does `x -= update` in place.
    """

    def accepts(self, rule: Rule, state: Any, x: Any) -> bool:
        """`x` a writable C-contiguous float32 or float64 NumPy array and `state` what
        `rule.init(x)` makes for the rule's hyperparameters now."""
        if not (
            type(x) is np.ndarray
            and x.dtype in _DTYPES
            and x.flags.c_contiguous
            and x.flags.writeable
            and type(state) is State
            and vars(state).keys() == _FIELDS
            and type(state.t) is int
        ):
            return False
        layout = _layout(x.shape, rule._factors(x.shape))  # type: ignore[attr-defined]
        if layout.factored:
            shapes_fit = (
                state.v is None
                and _fits(state.v_row, layout.v_row, x.dtype)  # type: ignore[arg-type]
                and _fits(state.v_col, layout.v_col, x.dtype)  # type: ignore[arg-type]
            )
        else:
            shapes_fit = state.v_row is None and state.v_col is None and _fits(state.v, x.shape, x.dtype)
        if not shapes_fit:
            return False
        if rule.momentum > 0:  # type: ignore[attr-defined]
            return _fits(state.m, x.shape, x.dtype)
        return state.m is None

    def run_(self, rule: Rule, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any]) -> None:
        """One step of `rule` for every `xs[i]`, gradient `dxs[i]`, state `states[i]`."""
        scalars: dict[tuple[Any, int], tuple[float, ...]] = {}
        jobs = []
        for state, x, dx in zip(states, xs, dxs):
            if x.size == 0:  # nothing to average: the generic path only counts the step
                continue
            key = (x.dtype, state.t)
            k = scalars.get(key)
            if k is None:
                k = scalars[key] = _scalars(rule, x.dtype, state.t + 1)
            layout = _layout(x.shape, state.v is None)
            if not layout.factored:
                state_p, state_q = state.v, None
            elif layout.row_is_p:
                state_p, state_q = state.v_row, state.v_col
            else:
                state_p, state_q = state.v_col, state.v_row
            jobs.append(_Job(x, dx, state_p, state_q, state.m, layout, k))
        if jobs:
            run = _run_numba if implementation() == "numba" else _run_numpy
            with np.errstate(all="ignore"):
                run(jobs)
        for state in states:
            state.t += 1


def _scalars(rule: Any, dtype: Any, t: int) -> tuple[float, ...]:
    """The step's scalars for arrays of `dtype` at step `t`, each rounded to `dtype` as the
    generic path casts them (`1 - decay` taken before the cast, as there)."""
    from .._dispatch import eps_for

    cast = dtype.type
    decay = 1 - max(t - rule.decay_offset, 1) ** -rule.decay_rate
    threshold = rule.clipping_threshold
    momentum = rule.momentum
    with np.errstate(all="ignore"):
        values = (
            cast(eps_for(dtype, rule.epsilon)),
            cast(decay),
            cast(1 - decay),
            cast(rule.eta),
            cast(0.0 if threshold is None else threshold),
            1.0 if rule.multiply_by_parameter_scale else 0.0,
            cast(momentum),
            cast(1 - momentum),
            cast(rule.lambda_),
        )
    return tuple(float(value) for value in values)


def _cost(job: _Job) -> int:
    """About how long a job takes, in elements of a plain matrix: a row's runs over `inner`
    and a small array's fixed costs make the others slower per element."""
    size: int = job.x.size
    if not job.layout.factored:
        return 2 * size + 2000
    return (size * 3 // 2 if job.layout.view[4] > 1 else size) + 2000


def _shares(jobs: Sequence[_Job]) -> list[list[int]]:
    """The jobs split between threads, whole arrays each, the costliest first to the least loaded."""
    total = sum(job.x.size for job in jobs)
    threads = min(thread_count(), max(1, total // PARALLEL_MIN), len(jobs))
    costs = [_cost(job) for job in jobs]
    shares: list[list[int]] = [[] for _ in range(threads)]
    loads = [(0, share) for share in range(threads)]
    for index in sorted(range(len(jobs)), key=lambda i: -costs[i]):
        load, share = heapq.heappop(loads)
        shares[share].append(index)
        heapq.heappush(loads, (load + costs[index], share))
    return [sorted(share) for share in shares if share]


def _together(calls: Sequence[Callable[[], None]]) -> None:
    if len(calls) == 1:
        calls[0]()
    else:
        run_together(calls)


# --------------------------------------------------------------------------
# numba
# --------------------------------------------------------------------------


def _address(a: Any) -> int:
    """Where `a`'s elements start (through ctypes' buffer view when writable: three times faster)."""
    if a.flags.writeable:
        return int(ctypes.addressof(ctypes.c_char.from_buffer(a)))
    return int(a.ctypes.data)


def _table(jobs: Sequence[_Job]) -> tuple[Any, Any]:
    rows = []
    for job in jobs:
        kind, *view = job.layout.columns
        rows.append(
            (
                kind,
                _address(job.x),
                _address(job.dx),
                _address(job.state_p),
                0 if job.state_q is None else _address(job.state_q),
                0 if job.m is None else _address(job.m),
                *view,
            )
        )
    return np.array(rows, dtype=np.int64), np.array([job.k for job in jobs], dtype=np.float64)


def _run_numba(jobs: Sequence[_Job]) -> None:
    from ._numba_factored import step

    calls = []
    for dtype in {job.x.dtype for job in jobs}:
        group = [job for job in jobs if job.x.dtype == dtype]
        table, scalars = _table(group)
        like = np.empty(0, dtype=dtype)
        # Compiled (or loaded) here, before anything is written.
        step(np.empty(0, dtype=np.int64), table, scalars, like, like)
        for share in _shares(group):
            work = np.empty(max(group[i].layout.work for i in share), dtype=dtype)
            calls.append(partial(step, np.array(share, dtype=np.int64), table, scalars, work, like))
    _together(calls)


# --------------------------------------------------------------------------
# NumPy
# --------------------------------------------------------------------------


def _run_numpy(jobs: Sequence[_Job]) -> None:
    calls = []
    for share in _shares(jobs):
        mine = [jobs[i] for i in share]
        size = max(
            [NUMPY_BLOCK]
            + [
                job.layout.view[2] * job.layout.view[3] * job.layout.view[4]
                for job in mine
                if job.layout.factored
            ]
        )
        buffers = {
            dtype: (np.empty(size, dtype), np.empty(size, dtype)) for dtype in {j.x.dtype for j in mine}
        }
        calls.append(partial(_numpy_share, mine, buffers))
    _together(calls)


def _numpy_share(jobs: Sequence[_Job], buffers: dict[Any, tuple[Any, Any]]) -> None:
    for job in jobs:
        if job.layout.factored:
            _numpy_factored(job, *buffers[job.x.dtype])
        else:
            _numpy_elementwise(job, *buffers[job.x.dtype])


def _dot(a: Any) -> float:
    return float(np.einsum("i,i->", a, a))


def _numpy_scale(k: tuple[float, ...], u_squares: float, x_squares: float, n: int, dtype: Any) -> float:
    """`eta * max(rms(x), 1e-3) / max(1, rms(u) / d)`, as `._numba_factored` computes it."""
    cast = dtype.type
    one = cast(1.0)
    clip = one
    if k[THRESHOLD] > 0:
        clip = np.maximum(one, np.sqrt(cast(u_squares) / cast(n)) / cast(k[THRESHOLD]))
    parameter = one
    if k[SCALED] != 0:
        parameter = np.maximum(np.sqrt(cast(x_squares) / cast(n)), cast(1e-3))
    return k[ETA] / float(clip) * float(parameter)


def _numpy_finish(job: _Job, u: Any, lo: int, hi: int, other: Any) -> None:
    """`m = mu m + (1 - mu) u` (with momentum) and `x -= m + lambda x` over `lo:hi` of the flat arrays."""
    cast = job.x.dtype.type
    x = job.x.reshape(-1)[lo:hi]
    if job.m is not None:
        m = job.m.reshape(-1)[lo:hi]
        m *= cast(job.k[MU])
        u *= cast(job.k[KEEP_MU])
        m += u
        u = m
    np.multiply(x, cast(job.k[LAMBDA]), out=other)
    other += u
    x -= other


def _numpy_elementwise(job: _Job, buffer: Any, other: Any) -> None:
    cast = job.x.dtype.type
    k = job.k
    n = job.x.size
    x, g, v = job.x.reshape(-1), job.dx.reshape(-1), job.state_p.reshape(-1)
    eps, decay, keep = cast(k[EPS]), cast(k[DECAY]), cast(k[KEEP])
    blocks = [(lo, min(n, lo + NUMPY_BLOCK)) for lo in range(0, n, NUMPY_BLOCK)]
    x_squares = 0.0
    for lo, hi in blocks:
        square = np.multiply(g[lo:hi], g[lo:hi], out=buffer[: hi - lo])
        square += eps
        square *= keep
        v[lo:hi] *= decay
        v[lo:hi] += square
        if k[SCALED] != 0:
            x_squares += _dot(x[lo:hi])

    def direction(lo: int, hi: int) -> Any:
        u = np.sqrt(v[lo:hi], out=buffer[: hi - lo])
        return np.divide(g[lo:hi], u, out=u)

    u_squares = 0.0
    if k[THRESHOLD] > 0:
        for lo, hi in blocks:
            u_squares += _dot(direction(lo, hi))
    scale = cast(_numpy_scale(k, u_squares, x_squares, n, job.x.dtype))
    for lo, hi in blocks:
        u = direction(lo, hi)
        u *= scale
        _numpy_finish(job, u, lo, hi, other[: hi - lo])


def _numpy_factored(job: _Job, buffer: Any, other: Any) -> None:
    dtype = job.x.dtype
    cast = dtype.type
    k = job.k
    outer, size_p, between, size_q, inner = job.layout.view
    g = job.dx.reshape(job.layout.view)
    x = job.x.reshape(-1)
    row = between * size_q * inner  # the elements of one (a, p)
    rows = max(1, NUMPY_BLOCK // row)
    blocks = [(a, p0, min(size_p, p0 + rows)) for a in range(outer) for p0 in range(0, size_p, rows)]

    along_p = np.zeros((outer, between, size_q, inner))
    along_q = np.empty((outer, size_p, between, inner))
    x_squares = 0.0
    for a, p0, p1 in blocks:
        square = np.multiply(
            g[a, p0:p1], g[a, p0:p1], out=buffer[: (p1 - p0) * row].reshape(p1 - p0, between, size_q, inner)
        )
        square += cast(k[EPS])
        along_p[a] += square.sum(axis=0)
        # einsum sums over q at the speed of a contiguous sum; NumPy's sum over an axis in the
        # middle runs its loop over `inner` entries at a time
        along_q[a, p0:p1] = square.sum(axis=2) if inner == 1 else np.einsum("pbqc->pbc", square)
        if k[SCALED] != 0:
            offset = (a * size_p + p0) * row
            x_squares += _dot(x[offset : offset + (p1 - p0) * row])

    decay, keep = cast(k[DECAY]), cast(k[KEEP])
    state_p = job.state_p.reshape(outer, between, size_q, inner)
    state_q = job.state_q.reshape(outer, size_p, between, inner)
    state_p *= decay
    state_p += keep * (along_p.astype(dtype) / cast(size_p))
    state_q *= decay
    state_q += keep * (along_q.astype(dtype) / cast(size_q))
    if job.layout.row_is_p:
        means = state_p.sum(axis=2, keepdims=True, dtype=np.float64).astype(dtype) / cast(size_q)
        factor_p = 1 / np.sqrt(state_p / means)
        factor_q = 1 / np.sqrt(state_q)
    else:
        means = state_q.sum(axis=1, keepdims=True, dtype=np.float64).astype(dtype) / cast(size_p)
        factor_p = 1 / np.sqrt(state_p)
        factor_q = 1 / np.sqrt(state_q / means)

    def direction(a: int, p0: int, p1: int, along_q: Any) -> Any:
        u = buffer[: (p1 - p0) * row].reshape(p1 - p0, between, size_q, inner)
        np.multiply(g[a, p0:p1], factor_p[a], out=u)
        u *= along_q[a, p0:p1, :, None, :]
        return u

    u_squares = 0.0
    if k[THRESHOLD] > 0:
        for a, p0, p1 in blocks:
            u_squares += _dot(direction(a, p0, p1, factor_q).reshape(-1))
    scaled_q = factor_q * cast(_numpy_scale(k, u_squares, x_squares, job.x.size, dtype))
    for a, p0, p1 in blocks:
        u = direction(a, p0, p1, scaled_q).reshape(-1)
        offset = (a * size_p + p0) * row
        _numpy_finish(job, u, offset, offset + u.size, other[: u.size])
