"""Exceptions raised by composeopt.

Every error derives from [ComposeoptError][composeopt.errors.ComposeoptError]
and also from the built-in exception a caller would expect (`ValueError`,
`TypeError`, `FloatingPointError`), so `except ValueError` keeps working.
Errors about one parameter start with that parameter's path in the params
tree, e.g. `params['layer1']['W']: gradient shape (3, 4) != parameter shape (4, 3)`.

Examples:
    >>> import numpy as np, composeopt as co
    >>> params = {"layer1": {"W": np.zeros((4, 3))}}
    >>> try:
    ...     co.update_(co.Adam(), params, {"layer1": {"W": np.zeros((3, 4))}})
    ... except ValueError as err:
    ...     print(type(err).__name__, "-", err)
    ShapeMismatchError - params['layer1']['W']: gradient shape (3, 4) != parameter shape (4, 3)
"""

from __future__ import annotations

__all__ = [
    "AliasingError",
    "CheckpointError",
    "ComposeoptError",
    "DistributedError",
    "HyperparameterError",
    "NonFiniteError",
    "ScheduleError",
    "ShapeMismatchError",
    "StateResetWarning",
    "TreeStructureError",
    "UnknownHyperparameterError",
    "UnsupportedArrayError",
]


class ComposeoptError(Exception):
    """Base class of every error raised by composeopt."""


class HyperparameterError(ComposeoptError, ValueError):
    """A rule was given an impossible hyperparameter (negative `eta`, `beta` outside [0, 1), ...)."""


class UnknownHyperparameterError(HyperparameterError, AttributeError):
    """A rule was asked for, or given, an attribute it does not have (`Adam().lr = 0.1`).

    A typo would otherwise create a new attribute that no step ever reads, so
    rules refuse new public attributes once constructed; the message suggests
    the nearest hyperparameter (`did you mean 'eta'?`).  It is also an
    `AttributeError`, so `hasattr` and `getattr(rule, name, default)` behave
    as for any object.
    """


class ScheduleError(HyperparameterError):
    """A schedule was built with an impossible field: a wrong type (`Linear(0.1, 0.2, "a")`)
    or value (`Step(0.1, step_size=0)`).  The message names the schedule and the field,
    as `Linear.steps: expected an integer, got 'a'`.  Like every impossible
    hyperparameter it is a `ValueError`, whether the type or the value is wrong."""


class TreeStructureError(ComposeoptError, ValueError):
    """The gradient tree does not have the structure of the params tree."""


class ShapeMismatchError(ComposeoptError, ValueError):
    """A gradient (or an update returned by a rule) does not have its parameter's shape."""


class UnsupportedArrayError(ComposeoptError, TypeError):
    """A parameter or gradient cannot be used: not an array, integer or boolean dtype,
    read-only, or from another array module or device than its partner."""


class NonFiniteError(ComposeoptError, FloatingPointError):
    """A rule met a non-finite value it was told to refuse (`ClipNorm(throw=True)`)."""


class CheckpointError(ComposeoptError, ValueError):
    """A checkpoint does not fit the optimiser or the parameters it is loaded onto."""


class AliasingError(ComposeoptError, ValueError):
    """Two parameters share memory (`W` and `W.T`, overlapping slices), or a parameter's
    elements overlap each other (an expanded view): an in-place step cannot update them."""


class DistributedError(ComposeoptError, RuntimeError):
    """The ranks of a data-parallel step disagree: a check failed on some rank, or their
    parameter trees differ.  Every rank raises it, with the same message, before anything
    has changed on any of them."""


class StateResetWarning(UserWarning):
    """A new array took the place of a parameter whose state is gone, so its state starts
    again from `init` (every step is then the optimiser's first).  Filter it, or make it an
    error with `warnings.simplefilter("error", co.errors.StateResetWarning)`."""
