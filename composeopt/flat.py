"""Parameters as views of one flat buffer, so that a step is one pass over one array.

Updating a thousand small arrays costs a thousand trips through the engine
(and, on a GPU, a thousand kernel launches); updating one buffer that holds
them all costs one.  `flatten` copies a tree of arrays into one 1-d
buffer and gives back the same tree made of views into it (Optimisers.jl's
`destructure` is the precedent)::

    flat = co.flatten(params)            # flat.data: one buffer; flat.tree: views into it
    params = flat.tree                   # use these from now on
    grads = flat.zeros_like()            # the same layout, for the gradients
    ...                                  # write each gradient into grads.tree's views
    co.update_(opt, flat.data, grads.data)

Every rule that works element by element gives exactly the update it would
give array by array.  Rules that look at a whole array (`ClipNorm`) see the
buffer as one array; `ClipGlobalNorm` is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ._dispatch import is_array, namespace
from .errors import UnsupportedArrayError
from .tree import rebuild

__all__ = ["Flat", "flatten"]


@dataclass(frozen=True)
class Flat:
    """A 1-d buffer `data` and a tree of arrays `tree` that are views into it."""

    data: Any
    tree: Any
    _layout: tuple[tuple[int, tuple[int, ...]], ...]  # (offset, shape) per distinct array, in tree order

    def zeros_like(self) -> Flat:
        """A new buffer of zeros with the same layout (for gradients)."""
        xp = namespace(self.data)
        return _views(self.tree, xp.zeros_like(self.data), self._layout)


def flatten(params: Any) -> Flat:
    """Copy every array of `params` into one buffer; return it and the tree of views.

    All arrays must share one array module (NumPy or CuPy, whose slices are
    views), one dtype and one device.  An array that appears twice (tied
    weights) gets one place in the buffer.
    """
    arrays: dict[int, Any] = {}
    rebuild(params, lambda x: arrays.setdefault(id(x), x))
    if not arrays:
        raise UnsupportedArrayError("flatten: params holds no array")
    first = next(iter(arrays.values()))
    if not (array_api_compat.is_numpy_array(first) or array_api_compat.is_cupy_array(first)):
        raise UnsupportedArrayError(
            f"flatten: needs NumPy or CuPy arrays (views of one buffer), got {type(first)}"
        )
    xp = namespace(first)
    layout = []
    offset = 0
    for x in arrays.values():
        if (
            namespace(x) is not xp
            or x.dtype != first.dtype
            or array_api_compat.device(x) != array_api_compat.device(first)
        ):
            raise UnsupportedArrayError(
                f"flatten: every array must have the module, dtype and device of the first "
                f"({first.dtype}); got {x.dtype}"
            )
        size = math.prod(x.shape)
        layout.append((offset, tuple(x.shape)))
        offset += size
    data = xp.empty(offset, dtype=first.dtype, device=array_api_compat.device(first))
    for (start, shape), x in zip(layout, arrays.values()):
        data[start : start + math.prod(shape)] = xp.reshape(x, (-1,))
    return _views(params, data, tuple(layout))


def _views(tree: Any, data: Any, layout: tuple[tuple[int, tuple[int, ...]], ...]) -> Flat:
    """The tree whose arrays (matched in order of first appearance) are views of `data`."""
    xp = namespace(data)
    views: dict[int, Any] = {}
    order = iter(layout)

    def view(x: Any) -> Any:
        if id(x) not in views:
            start, shape = next(order)
            views[id(x)] = xp.reshape(data[start : start + math.prod(shape)], shape)
        return views[id(x)]

    return Flat(data, rebuild(tree, lambda x: view(x) if is_array(x) else x), layout)
