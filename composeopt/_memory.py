"""Where arrays live in memory: the facts the checks need to refuse aliasing.

An in-place step must not read memory that it has already written.  Two
parameters that share memory would be updated twice, each with its own state;
a gradient that is (a view of) another parameter would be read after that
parameter moved; a parameter whose elements overlap each other (an expanded or
broadcast view) would receive several updates in one element.  These helpers
find such cases from the arrays' addresses and strides, without reading any
element, for every array type that exposes its address (NumPy, CuPy, torch).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Extent", "extent", "owns_memory", "overlaps_itself", "first_overlap", "shares_memory", "Extents"]


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
