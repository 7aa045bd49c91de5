"""The optimiser's per-parameter state, keyed by the parameter's identity.

Like Flux's `IdDict` but safe against Python's reuse of `id`s: each entry
keeps a weak reference to its parameter, a different object under a reused id
is a new parameter, and an entry disappears when its parameter is garbage
collected, so rebuilding a model does not leak state.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ._dispatch import copy as copy_array
from ._dispatch import is_array, namespace
from .errors import StateResetWarning
from .rule import State

__all__ = ["IdentityMap", "StateStore", "copy_state", "zero_d_arrays"]

_MISSING: Any = object()


class _StrongRef:
    """Stand-in for arrays that refuse weak references: keeps them alive instead."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


class IdentityMap:
    """A mapping from objects (by identity, held weakly) to values."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], Any, Any]] = {}
        self._changes = [0]  # a list, so that the weak references' callbacks can count too

    @property
    def version(self) -> int:
        """A number that changes whenever an entry is added, replaced or removed (also by the
        garbage collector): a cache of what the map holds is stale when it has moved."""
        return self._changes[0]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, x: Any) -> bool:
        return self.get(x, _MISSING) is not _MISSING

    def get(self, x: Any, default: Any = None) -> Any:
        """The state of parameter `x`, or `default` if it has none."""
        entry = self._entries.get(id(x))
        if entry is None or entry[0]() is not x:
            return default
        return entry[1]

    def layout(self, x: Any) -> tuple[tuple[int, ...], Any] | None:
        """The shape and dtype `x` had when its value was stored, or `None` if it has none.

        A parameter can change shape in place (`x.shape = ...`, torch's `x.data = ...`);
        its state then no longer fits it."""
        entry = self._entries.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        layout: tuple[tuple[int, ...], Any] | None = entry[2]
        return layout

    def set(self, x: Any, state: Any) -> None:
        """Store `state` for parameter `x` (replacing any state of a dead object with its id)."""
        key = id(x)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is x:
            if entry[1] is not state:
                self._entries[key] = (entry[0], state, _layout(x))
                self._changes[0] += 1
            return
        try:
            ref: Callable[[], Any] = weakref.ref(x, _forget(self._entries, self._changes, key))
        except TypeError:
            ref = _StrongRef(x)
        self._entries[key] = (ref, state, _layout(x))
        self._changes[0] += 1

    def discard(self, x: Any) -> None:
        """Forget the state of parameter `x`, if any."""
        if x in self:
            del self._entries[id(x)]
            self._changes[0] += 1

    def move(self, old: Any, new: Any) -> None:
        """Hand `old`'s state over to `new` (the functional `update` returns new arrays)."""
        state = self.get(old, _MISSING)
        if state is not _MISSING:
            self.discard(old)
            self.set(new, state)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._changes[0] += 1


class StateStore(IdentityMap):
    """Per-parameter states of one optimiser, its step count and its frozen parameters.

    `step` counts completed optimiser steps (`update_` calls); `frozen`
    marks the parameters that [freeze_][composeopt.freeze_] froze.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.frozen = IdentityMap()
        self.lock = threading.RLock()  # one step at a time: a step reads and writes all of this
        # Per path, the last parameter given a state there, and its layout: a new array at the
        # path of one whose state is gone (collected, or moved by `update`) most likely means
        # that the caller rebuilt the arrays and so restarted the optimiser without meaning to.
        self._owners: dict[str, tuple[Callable[[], Any], Any]] = {}
        self._reset_warned = False

    def clear(self) -> None:
        """Forget every state and reset the step count (frozen marks stay)."""
        super().clear()
        self.step = 0
        self._owners.clear()

    def move(self, old: Any, new: Any, path: str | None = None) -> None:
        """Hand `old`'s state over to `new`, which is now the parameter at `path`."""
        super().move(old, new)
        if path is not None:
            self._own(path, new)

    def claim(self, path: str, x: Any) -> None:
        """Note that `x`, which has no state yet, is the parameter at `path`; warn (once per
        store) if it replaces an array of the same shape and dtype whose state is gone."""
        layout = _layout(x)
        previous = self._owners.get(path)
        if previous is not None and not self._reset_warned:
            owner = previous[0]()
            if owner is not x and (owner is None or owner not in self) and previous[1] == layout:
                self._reset_warned = True
                warnings.warn(
                    f"{path}: a new array has taken the place of the parameter of the same shape "
                    "and dtype that was here, so its optimiser state starts again; pass the same "
                    "array objects every step (make views once; after composeopt.update, pass "
                    "the arrays it returned)",
                    StateResetWarning,
                    stacklevel=4,
                )
        self._own(path, x)

    def _own(self, path: str, x: Any) -> None:
        try:
            self._owners[path] = (weakref.ref(x), _layout(x))
        except TypeError:  # arrays without weak references: no warning for them
            pass


def _layout(x: Any) -> tuple[tuple[int, ...], Any] | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else (tuple(shape), x.dtype)


def _forget(entries: dict[int, Any], changes: list[int], key: int) -> Callable[[Any], None]:
    # The callback holds the dict, not the store, so that a dead store is not kept alive.
    def forget(ref: Any) -> None:
        entry = entries.get(key)
        if entry is not None and entry[0] is ref:
            del entries[key]
            changes[0] += 1

    return forget


def copy_state(state: Any) -> Any:
    """A deep copy of a state: arrays are copied on their own device, records recursed."""
    kind = type(state)
    if kind is np.ndarray:  # the common case, without the array-API dispatch
        return state.copy()
    if kind is State:
        return State(**{name: copy_state(value) for name, value in vars(state).items()})
    if state is None or kind is int or kind is float:
        return state
    if is_array(state):
        return copy_array(namespace(state), state)
    if isinstance(state, State):
        return State(**{name: copy_state(value) for name, value in vars(state).items()})
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(copy_state(item) for item in state)
    if isinstance(state, list):
        return [copy_state(item) for item in state]
    if isinstance(state, dict):
        return {key: copy_state(value) for key, value in state.items()}
    return copy.deepcopy(state)


def zero_d_arrays(state: Any, dtype: Any) -> Any:
    """Turn NumPy scalars in a 0-d parameter's state back into 0-d arrays of its dtype.

    NumPy computes on 0-d arrays as on scalars and returns `np.float64`-style
    scalars; NumPy 1.x also widens them (float32 scalar * Python float is
    float64).  Left alone, the state would drift from the parameter's dtype.
    """
    if isinstance(state, np.generic):
        return np.asarray(state, dtype=dtype)
    if isinstance(state, State):
        for name, value in vars(state).items():
            setattr(state, name, zero_d_arrays(value, dtype))
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(zero_d_arrays(item, dtype) for item in state)
    if isinstance(state, list):
        return [zero_d_arrays(item, dtype) for item in state]
    return state
