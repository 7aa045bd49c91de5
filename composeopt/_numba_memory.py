"""The numba half of `composeopt._memory`: many arrays' headers and extents in one call.

Asking a thousand arrays for their shape, strides, dtype, flags and address
costs a thousand attribute lookups per fact (`__array_interface__` alone costs
a microsecond an array).  The same facts sit in each array's C header
(`PyArrayObject_fields`, whose layout is part of NumPy's ABI: extensions built
against older headers read it directly), at fixed offsets after the object's
`PyObject_HEAD`.  `read` copies them, for every object of an object array (a
table of object pointers), into rows of an int64 table; `agree` compares them
with such a table.  `composeopt._memory` checks the offsets against arrays whose
facts it knows before trusting them.  `readable_in_place` asks of many arrays at
once whether a step may read them while it writes others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["read", "agree", "readable_in_place"]


def _load(typingctx: Any, address: Any, width: int) -> Any:  # pragma: no cover - runs at compile time
    """A load of an integer of `width` bits at `address`, widened to int64."""
    if not isinstance(address, types.Integer):
        return None
    loaded = types.int64 if width == 64 else types.int32

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = builder.inttoptr(args[0], context.get_value_type(types.CPointer(loaded)))  # type: ignore[no-untyped-call]
        value = builder.load(pointer)
        return value if width == 64 else builder.sext(value, context.get_value_type(types.int64))

    return types.int64(address), codegen


def _word_at(typingctx: Any, address: Any) -> Any:  # pragma: no cover - runs at compile time
    return _load(typingctx, address, 64)


def _int_at(typingctx: Any, address: Any) -> Any:  # pragma: no cover - runs at compile time
    return _load(typingctx, address, 32)


_word: Any = intrinsic(_word_at)  # the int64 at an address
_int: Any = intrinsic(_int_at)  # the C int (int32) at an address, as an int64


@njit
def _header(
    obj: int, row: Any, ndarray: int, head: int, max_ndim: int
) -> None:  # pragma: no cover - compiled
    """`row`: the header of the object at address `obj`, in the columns that
    `composeopt._memory` names (its address, its type's, then for an object of type
    `ndarray` exactly: data address, flags, dtype's address, ndim, and `max_ndim` columns
    each of shape and strides, zero past ndim, none at all if ndim is larger).  Anything
    else gets zeros past its type, the one field that every object has.

    `head` is the size of `PyObject_HEAD`, whose last word is the type."""
    kind = _word(obj + head - 8)
    row[0] = obj
    row[1] = kind
    for column in range(2, row.shape[0]):
        row[column] = 0
    if kind != ndarray:
        return
    ndim = _int(obj + head + 8)
    row[2] = _word(obj + head)  # char *data
    row[3] = _int(obj + head + 48)  # int flags
    row[4] = _word(obj + head + 40)  # PyArray_Descr *descr
    row[5] = ndim
    if ndim > max_ndim:
        return
    shape = _word(obj + head + 16)
    strides = _word(obj + head + 24)
    for d in range(ndim):
        row[6 + d] = _word(shape + 8 * d)
        row[6 + max_ndim + d] = _word(strides + 8 * d)


# Both run holding the GIL: no other thread changes an array while its header is read.


@njit(cache=True)
def read(
    objects: int, count: int, out: Any, ndarray: int, head: int, max_ndim: int
) -> None:  # pragma: no cover - compiled
    """Row `i` of `out`: the header of object `i` of the table of object pointers at `objects`."""
    for i in range(count):
        _header(_word(objects + 8 * i), out[i], ndarray, head, max_ndim)


@njit(cache=True)
def agree(
    objects: int,
    count: int,
    expected: Any,
    first: int,
    last: int,
    found: Any,
    ndarray: int,
    head: int,
    max_ndim: int,
) -> bool:  # pragma: no cover - compiled
    """Whether columns `first:last` of each object's header equal those of its row of
    `expected`; on the way, `found[0, i]` and `found[1, i]` get object `i`'s data address and
    flags (up to the first that differs)."""
    row = np.empty(expected.shape[1], dtype=np.int64)
    for i in range(count):
        _header(_word(objects + 8 * i), row, ndarray, head, max_ndim)
        for column in range(first, last):
            if row[column] != expected[i, column]:
                return False
        found[0, i] = row[2]
        found[1, i] = row[3]
    return True


@njit(cache=True)
def readable_in_place(
    starts: Any, lengths: Any, flags: Any, required: int, written_starts: Any, written_ends: Any
) -> bool:  # pragma: no cover - compiled
    """Whether every array `i` (`lengths[i]` bytes from `starts[i]`, with `flags[i]`) has all
    the flag bits `required` and meets none of the written ranges, which are sorted and disjoint:
    only the first of them that ends after an array starts can meet it."""
    for i in range(starts.shape[0]):
        if flags[i] & required != required:
            return False
        if lengths[i] == 0:
            continue
        first = np.searchsorted(written_ends, starts[i], side="right")
        if first < written_starts.shape[0] and written_starts[first] < starts[i] + lengths[i]:
            return False
    return True
