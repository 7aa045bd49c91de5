"""The states of a tree's parameters as a repeat step holds them, field by field.

The batched step (`.batch`) and the tabled step (`.table`) read the state
arrays through a table of addresses, so before each step they must see that
no state array and no step count was replaced by hand since the table was
made (the store's version does not move for `state.mu = ...`).  `Held` keeps,
per field, every array's state dict and the object it held; one pass of
`is` per field tells.  That pass is needed only when some State's field was
set since it last ran (`rule.state_changes`), which in a loop of repeat
steps it never is: their step counts move through the dicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import is_, itemgetter, setitem
from typing import Any

from ..rule import State, state_changes

__all__ = ["Held", "fit", "disjoint"]


class Held:
    """Per entry's state field, every array's state and the object it held when made.

    `rule_states[position][array]` is that entry's state of that array.  A State keeps its
    fields in its `__dict__`, which it never replaces; reading them from there skips
    getattr's lookup in the class, a third of the cost per field."""

    def __init__(self, entries: Sequence[Any], rule_states: Sequence[Sequence[Any]]) -> None:
        fields = [
            [vars(state) for state in states] if entry.kernel.state or entry.kernel.counter else []
            for entry, states in zip(entries, rule_states)
        ]
        self.arrays = [
            (itemgetter(name), dicts, [state[name] for state in dicts])
            for entry, dicts in zip(entries, fields)
            for name in entry.kernel.state
        ]
        self.counters = [
            [itemgetter(entry.kernel.counter), entry.kernel.counter, dicts, dicts[0][entry.kernel.counter]]
            for entry, dicts in zip(entries, fields)
            if entry.kernel.counter is not None
        ]
        for _, name, dicts, value in self.counters:
            for state in dicts:  # one int object for all, so that `is` can tell that none changed
                state[name] = value
        self.looked: int | None = None  # `state_changes()` when a pass last found all held

    def unchanged(self) -> bool:
        """Whether every state still holds the same arrays and the same step count."""
        changes = state_changes()
        if changes == self.looked:
            return True
        try:
            for getter, dicts, held in self.arrays:
                if not all(map(is_, map(getter, dicts), held)):
                    return False
            for getter, _, dicts, value in self.counters:
                if not all(map(is_, map(getter, dicts), repeat(value))):
                    return False
        except KeyError:  # a field deleted by hand
            return False
        self.looked = changes
        return True

    def advance(self, by: int) -> None:
        """Every step count moved by `by`, as one int object again."""
        for counter in self.counters:
            _, name, dicts, value = counter
            counter[3] = value = value + by
            deque(map(setitem, dicts, repeat(name), repeat(value)), maxlen=0)  # the loop runs in C


def fit(entries: Sequence[Any], rule_states: Sequence[Sequence[Any]]) -> bool:
    """Whether `Held` can hold these states: `State` objects wherever a kernel keeps state
    or counts steps, and every count an int, the same for all arrays."""
    for entry, states in zip(entries, rule_states):
        counter = entry.kernel.counter
        if (entry.kernel.state or counter) and any(type(state) is not State for state in states):
            return False  # fields that may not live in the state's __dict__
        if counter is not None:
            values = [getattr(state, counter) for state in states]
            if any(type(value) is not int for value in values) or len(set(values)) != 1:
                return False
    return True


def disjoint(arrays: Sequence[Any]) -> bool:
    """Whether no two of the (NumPy) arrays share a byte: threads writing them cannot race."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
