"""An address (a Python int) as a typed pointer inside numba code, for `numba.carray`.

The batched step (see `.batch`) hands numba one table of addresses
instead of a thousand arrays: unpacking an array argument costs about a
microsecond, reading a row of the table nothing.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.extending import intrinsic

__all__ = ["pointer"]


@intrinsic
def pointer(typingctx: Any, address: Any, like: Any) -> Any:  # pragma: no cover - runs at compile time
    """`pointer(address, like)`: `address` as a pointer to elements of `like`'s dtype."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    result = types.CPointer(like.dtype)  # type: ignore[no-untyped-call]

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(result))

    return result(address, like), codegen
