"""Where arrays live in memory: the facts the checks need to refuse aliasing.

An in-place step must not read memory that it has already written.  Two
parameters that share memory would be updated twice, each with its own state;
a gradient that is (a view of) another parameter would be read after that
parameter moved; a parameter whose elements overlap each other (an expanded or
broadcast view) would receive several updates in one element.  These helpers
find such cases from the arrays' addresses and strides, without reading any
element, for every array type that exposes its address (NumPy, CuPy, torch).

`read_headers` gives the layout of many NumPy arrays at once, as a table, for the
check phase's proof that a tree has not changed since the last step.
"""

from __future__ import annotations

import bisect
import importlib.util
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Extent",
    "extent",
    "owns_memory",
    "overlaps_itself",
    "first_overlap",
    "shares_memory",
    "Extents",
    "read_headers",
    "headers_agree",
    "headers_readable",
    "readable_in_place",
]


class Extent:
    """The bytes `[start, end)` on `device` that an array's elements lie in, and its layout."""

    __slots__ = ("device", "start", "end", "address", "shape", "strides", "itemsize")

    def __init__(
        self,
        device: Any,
        address: int,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        itemsize: int,
        nbytes: int = 0,
        contiguous: bool = False,
    ) -> None:
        self.device = device
        self.address = address
        self.shape = shape
        self.strides = strides
        self.itemsize = itemsize
        if contiguous:  # C order: the elements fill [address, address + nbytes)
            self.start, self.end = address, address + nbytes
            return
        low = high = 0
        empty = False
        for n, stride in zip(shape, strides):
            if n == 0:
                empty = True
            elif stride < 0:
                low += stride * (n - 1)
            else:
                high += stride * (n - 1)
        self.start = address + low
        self.end = self.start if empty else address + high + itemsize

    def intersects(self, other: Extent) -> bool:
        return self.device == other.device and self.start < other.end and other.start < self.end


def extent(a: Any) -> Extent | None:
    """The memory of array `a`, or `None` for arrays that do not expose their address."""
    if isinstance(a, np.ndarray):
        interface = a.__array_interface__
        return Extent(
            None, interface["data"][0], a.shape, a.strides, a.itemsize, a.nbytes, interface["strides"] is None
        )
    module = type(a).__module__
    if module.startswith("cupy"):
        return Extent(("cupy", a.device.id), a.data.ptr, a.shape, a.strides, a.itemsize)
    if module.startswith("torch"):
        size = a.element_size()
        strides = tuple(stride * size for stride in a.stride())
        return Extent(("torch", str(a.device)), a.data_ptr(), tuple(a.shape), strides, size)
    return None


def owns_memory(a: Any) -> bool:
    """Whether `a` is a NumPy array that owns its memory: no other array owning memory can
    share any of it, so it needs no address check against them."""
    return type(a) is np.ndarray and a.base is None


def overlaps_itself(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> bool:
    """Whether two elements of this layout may share memory (a stride-0 or expanded view).

    Sorted by stride, each dimension of a layout whose elements are all distinct steps over
    everything the smaller dimensions span; anything else is treated as overlapping.
    """
    span = itemsize
    for stride, n in sorted((abs(stride), n) for n, stride in zip(shape, strides) if n > 1):
        if stride < span:
            return True
        span = stride * n
    return False


class _Layout:
    """An array-like that NumPy can read the layout of but that no code ever dereferences."""

    def __init__(self, e: Extent) -> None:
        self.__array_interface__ = {
            "shape": e.shape,
            "strides": e.strides,
            "typestr": f"|V{e.itemsize}",
            "data": (e.address, True),
            "version": 3,
        }


def shares_memory(a: Extent, b: Extent) -> bool:
    """Whether two layouts have an element in common (exact: interleaved views do not)."""
    if not a.intersects(b):
        return False
    # np.shares_memory works from addresses and strides alone; the arrays it sees point to
    # the original memory (perhaps on a GPU) and are never read.
    return bool(np.shares_memory(np.asarray(_Layout(a)), np.asarray(_Layout(b))))


def first_overlap(extents: Sequence[Extent | None]) -> tuple[int, int] | None:
    """The positions of two of `extents` that share memory, or `None` if all are disjoint."""
    order = sorted((e.start, i) for i, e in enumerate(extents) if e is not None and e.end > e.start)
    active: list[Extent] = []  # earlier extents that reach past the current start
    positions: dict[int, int] = {}
    for start, i in order:
        e = extents[i]
        assert e is not None
        active = [other for other in active if other.end > start]
        for other in active:
            if shares_memory(other, e):
                j = positions[id(other)]
                return (j, i) if j < i else (i, j)
        active.append(e)
        positions[id(e)] = i
    return None


class Extents:
    """A sorted table of memory extents, to ask quickly whether an array meets any of them."""

    def __init__(self, extents: Sequence[Extent | None]) -> None:
        known = sorted((e for e in extents if e is not None and e.end > e.start), key=lambda e: e.start)
        self._extents = known
        self._starts = [e.start for e in known]
        # The largest end among the extents up to each position: what may still reach further.
        self._reach: list[int] = []
        for e in known:
            self._reach.append(max(e.end, self._reach[-1]) if self._reach else e.end)

    def meets(self, a: Any) -> bool:
        """Whether array `a` shares memory with one of the extents (unknown arrays: no)."""
        if not self._extents:
            return False
        e = extent(a)
        if e is None or e.end <= e.start:
            return False
        position = bisect.bisect_left(self._starts, e.end)  # extents that start before `a` ends
        for k in range(position - 1, -1, -1):
            if self._reach[k] <= e.start:
                break
            other = self._extents[k]
            if other.end > e.start and shares_memory(other, e):
                return True
        return False


# --- many arrays' headers at once ---------------------------------------------------------

OBJECT, TYPE, DATA, FLAGS, DTYPE, NDIM, SHAPE = range(7)
"""Columns of a header table: the object's address (its `id`), its type's, and for a NumPy
array (of type `numpy.ndarray` exactly) its data address, flags, dtype's address and ndim,
then `MAX_NDIM` columns of shape and `MAX_NDIM` of strides (zero past ndim).  Anything
else has zeros past its type."""

MAX_NDIM = 8
"""Arrays of more dimensions have no shape or strides in the table (the check phase then
proves nothing about them)."""

STRIDES = SHAPE + MAX_NDIM
WIDTH = STRIDES + MAX_NDIM

C_CONTIGUOUS, ALIGNED = 0x0001, 0x0100
"""NumPy's flag bits `NPY_ARRAY_C_CONTIGUOUS` and `NPY_ARRAY_ALIGNED`, in the FLAGS column."""

_Read = Callable[..., Any]
_reader: list[tuple[_Read, _Read] | None] = []  # empty until first asked: [(read, agree), or None]


def headers_readable() -> bool:
    """Whether `read_headers` and `headers_agree` work here (numba importable, and its reading
    of NumPy's headers checked against arrays whose layout is known)."""
    return _header_reader() is not None


def read_headers(objects: Iterable[Any], count: int, out: Any) -> None:
    """Fill `out[:count]` (int64, `WIDTH` columns) with the headers of the first `count` of
    `objects`; `headers_readable()` must be true."""
    functions = _header_reader()
    assert functions is not None
    held = _pointers(objects, count)
    functions[0](held.__array_interface__["data"][0], count, out, *_layout())


def headers_agree(objects: Iterable[Any], count: int, expected: Any, columns: slice, found: Any) -> bool:
    """Whether the `columns` of the headers of the first `count` of `objects` equal those of
    `expected` (a table as `read_headers` fills); `found[0]` and `found[1]` (int64, two rows of
    at least `count`) get their data addresses and flags on the way."""
    functions = _header_reader()
    assert functions is not None
    held = _pointers(objects, count)
    address = held.__array_interface__["data"][0]
    return bool(functions[1](address, count, expected, columns.start, columns.stop, found, *_layout()))


def _pointers(objects: Iterable[Any], count: int) -> Any:
    # An object array holds the objects, so they stay alive while they are read; its buffer
    # is the table of their addresses.
    return np.fromiter(objects, dtype=object, count=count)


def _layout() -> tuple[int, int, int]:
    return id(np.ndarray), object.__basicsize__, MAX_NDIM


def _header_reader() -> tuple[_Read, _Read] | None:
    if not _reader:
        _reader.append(_checked_reader())
    return _reader[0]


def _checked_reader() -> tuple[_Read, _Read] | None:
    """The numba functions, if their offsets give the facts that NumPy gives of a few arrays."""
    # An object's id is its address only in CPython, and a free-threaded build lays out
    # its object header otherwise.
    if sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    if importlib.util.find_spec("numba") is None:
        return None
    base = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    samples: list[Any] = [base, base[::2, 1:, ::-2], np.float32(1.0), [base], np.zeros((), np.int16)]
    samples[0].flags.writeable = False
    samples.append(np.empty((2,) * (MAX_NDIM + 1), np.uint8))
    count = len(samples)
    expected = np.zeros((count, WIDTH), dtype=np.int64)
    for row, sample in zip(expected, samples):
        row[OBJECT], row[TYPE] = id(sample), id(type(sample))
        if type(sample) is np.ndarray:
            row[DATA : NDIM + 1] = [
                sample.__array_interface__["data"][0],
                sample.flags.num,
                id(sample.dtype),
                sample.ndim,
            ]
            if sample.ndim <= MAX_NDIM:
                row[SHAPE : SHAPE + sample.ndim] = sample.shape
                row[STRIDES : STRIDES + sample.ndim] = sample.strides
    table = np.zeros_like(expected)
    found = np.zeros((2, count), dtype=np.int64)
    held = _pointers(samples, count)
    address = held.__array_interface__["data"][0]
    try:
        from ._numba_memory import agree, read

        read(address, count, table, *_layout())
        agreed = agree(address, count, expected, 0, WIDTH, found, *_layout())
    except Exception:  # a numba that cannot compile them: the check phase does without
        return None
    if not (
        np.array_equal(table, expected) and agreed and np.array_equal(found, expected[:, DATA : FLAGS + 1].T)
    ):
        return None
    expected[-1, SHAPE] = 3  # and a difference is one
    if agree(address, count, expected, 0, WIDTH, found, *_layout()):
        return None
    return read, agree


def readable_in_place(starts: Any, lengths: Any, flags: Any, written_starts: Any, written_ends: Any) -> bool:
    """Whether a step that writes the byte ranges `[written_starts[k], written_ends[k])`
    (sorted and disjoint) may read arrays where they are, as a compiled loop over plain
    pointers reads them: each (`lengths[i]` bytes from `starts[i]`, with NumPy `flags[i]`)
    C-contiguous, so that those bytes are all of it, aligned, and meeting none of the
    written ranges.  Needs numba (`headers_readable()`), as do its callers."""
    from ._numba_memory import readable_in_place as compiled

    return bool(compiled(starts, lengths, flags, C_CONTIGUOUS | ALIGNED, written_starts, written_ends))
