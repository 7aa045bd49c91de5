"""Hyperparameter fields: defaults, validation on construction and on assignment.

A rule declares each hyperparameter once, as a class attribute:

```python
class Momentum(Rule):
    eta: Hyper[float] = Hyper(default=0.01, check=nonnegative)
    rho: Hyper[float] = Hyper(default=0.9, check=unit_interval)
```

The declaration order is the constructor's positional order, the names are its
keywords, and `repr` and `==` are derived from them.  The annotations are for
type checkers, which then check the constructor's arguments as those of a
dataclass (see [Rule][composeopt.Rule]); `eta = Hyper(0.01, nonnegative)`
works the same at run time.  Assigning
`opt.eta = -1` later raises just as `Momentum(-1)` does, and assigning a
name that is not declared (`opt.lr = 0.1`) raises
[UnknownHyperparameterError][composeopt.errors.UnknownHyperparameterError]
(see [Rule][composeopt.Rule]).  The functions of this module are the checks
to pass to [Hyper][composeopt.Hyper].

Any hyperparameter may instead be given a *schedule*: a callable `step -> value`
(see `composeopt.schedules`), or a tuple holding some, as in
`beta=(Linear(0.85, 0.95, 1000), 0.999)`.  The engine evaluates schedules once
per optimiser step, before any parameter; the attribute then reads as the
current value, so `opt.eta` is always a number that can be logged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Generic, TypeAlias, TypeVar, overload

from .errors import HyperparameterError

__all__ = [
    "REQUIRED",
    "Hyper",
    "HyperTuple",
    "Scheduled",
    "is_scheduled",
    "follow_schedules",
    "settings",
    "nonnegative",
    "positive",
    "unit_interval",
    "beta_pair",
    "decay_factor",
    "positive_int",
    "nonnegative_int",
    "flag",
    "norm_order",
]

T = TypeVar("T")
H = TypeVar("H", bound="Hyper[Any]")

Scheduled: TypeAlias = T | Callable[[int], T]
"""What a hyperparameter of type `T` may be given: a value, or a schedule `step -> value`."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a hyperparameter that the constructor must be given."""


class Hyper(Generic[T]):
    """A validated hyperparameter field of a [Rule][composeopt.Rule].

    Args:
        default: value used when the constructor is not given one; leave it
            out (or give [REQUIRED][composeopt.hyper.REQUIRED]) for an
            argument the constructor must be given.
        check: function that returns the normalised value or raises
            [HyperparameterError][composeopt.errors.HyperparameterError].
        doc: one line for `help()`; by default the field's entry under
            `Args:` in the rule's docstring.

    `Hyper[T]` is the type of a field whose value is a `T`: reading
    `rule.eta` gives a `T`, and the constructor and assignments take a
    `Scheduled[T]` (from `composeopt.hyper`): a `T` or a schedule.  Give
    `default` by name when the field is annotated: type checkers read the
    declaration as a dataclass field.

    Examples:
        >>> import composeopt as co
        >>> from composeopt.hyper import unit_interval
        >>> class Smooth(co.Rule):
        ...     rho: co.Hyper[float] = co.Hyper(default=0.9, check=unit_interval)
        ...     def apply_(self, state, x, dx):
        ...         return (1 - self.rho) * dx
        >>> rule = Smooth()
        >>> rule.rho = 1.5
        Traceback (most recent call last):
        ...
        composeopt.errors.HyperparameterError: Smooth.rho: must be in [0, 1), got 1.5
    """

    def __init__(
        self, default: T = REQUIRED, check: Callable[[Any], T] | None = None, doc: str | None = None
    ) -> None:
        self.default = default
        self.check = check
        self.name = ""
        self.__doc__ = doc  # what help() shows under the field's name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        check = getattr(self.check, "__name__", self.check)
        return f"{type(self).__name__}(default={self.default!r}, check={check})"

    @overload
    def __get__(self: H, obj: None, objtype: type | None = None) -> H: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...
    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: object, value: Scheduled[T]) -> None:
        self._store(obj, value)

    def _store(self, obj: object, value: Any) -> None:
        schedules = obj.__dict__.setdefault(_SCHEDULES, {})
        if is_scheduled(value):
            current = self.validate(obj, _evaluate(value, 1), value, 1)
            schedules[self.name] = value
        else:
            current = self.validate(obj, value)
            schedules.pop(self.name, None)
        obj.__dict__[self.name] = current

    def validate(self, obj: Any, value: Any, schedule: Any = None, step: int = 0) -> Any:
        """`value` normalised by the check, or an error naming the rule and field."""
        if self.check is None:
            return value
        try:
            return self.check(value)
        except HyperparameterError as err:
            origin = f" (from {schedule!r} at step {step})" if schedule is not None else ""
            raise HyperparameterError(f"{type(obj).__name__}.{self.name}: {err}{origin}") from None


class HyperTuple(Hyper[T]):
    """A [Hyper][composeopt.Hyper] whose value is a tuple of numbers, such as Adam's `beta`.

    The same field at run time; for type checkers it also takes a tuple with
    a schedule in place of any of its numbers, as in
    `Adam(beta=(Linear(0.85, 0.95, 1000), 0.999))`.

    Examples:
        >>> import composeopt as co
        >>> from composeopt.hyper import beta_pair
        >>> class Pair(co.Rule):
        ...     beta: co.hyper.HyperTuple[tuple[float, float]] = co.hyper.HyperTuple(
        ...         default=(0.9, 0.99), check=beta_pair
        ...     )
        >>> Pair(beta=(co.Linear(0.5, 0.9, 10), 0.99)).beta
        (0.5, 0.99)
    """

    def __set__(self, obj: object, value: Scheduled[T] | tuple[Scheduled[float], ...]) -> None:
        self._store(obj, value)


_SCHEDULES = "_scheduled_hyperparameters"


def is_scheduled(value: Any) -> bool:
    """Whether `value` is a schedule (a callable), or a tuple holding one."""
    if isinstance(value, tuple):
        return any(callable(item) for item in value)
    return callable(value)


def _evaluate(schedule: Any, step: int) -> Any:
    if isinstance(schedule, tuple):
        return tuple(item(step) if callable(item) else item for item in schedule)
    return schedule(step)


def follow_schedules(obj: Any, step: int) -> None:
    """Set every scheduled hyperparameter of `obj` to its value at optimiser `step`."""
    for name, schedule in obj.__dict__.get(_SCHEDULES, {}).items():
        descriptor: Hyper[Any] = getattr(type(obj), name)
        obj.__dict__[name] = descriptor.validate(obj, _evaluate(schedule, step), schedule, step)


def settings(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each hyperparameter as it was set: its schedule if it follows one, else its value."""
    schedules = obj.__dict__.get(_SCHEDULES, {})
    return {name: schedules.get(name, getattr(obj, name)) for name in names}


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"expected a real number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise HyperparameterError("got NaN")
    return number


def _real_in(value: Any, low: float, high: float, *, closed_low: bool, closed_high: bool) -> float:
    number = _real(value)
    above = low <= number if closed_low else low < number
    below = number <= high if closed_high else number < high
    if not (above and below):
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise HyperparameterError(f"must be in {interval}, got {number!r}")
    return number


def nonnegative(value: Any) -> float:
    """A finite real number `>= 0` (learning rates, epsilons, penalties)."""
    return _real_in(value, 0, math.inf, closed_low=True, closed_high=False)


def positive(value: Any) -> float:
    """A finite real number `> 0`."""
    return _real_in(value, 0, math.inf, closed_low=False, closed_high=False)


def unit_interval(value: Any) -> float:
    """A real number in `[0, 1)` (momentum and moving-average coefficients)."""
    return _real_in(value, 0, 1, closed_low=True, closed_high=False)


def beta_pair(value: Any) -> tuple[float, float]:
    """A pair `(beta1, beta2)` of coefficients in `[0, 1)`."""
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise HyperparameterError(f"expected a pair (beta1, beta2), got {value!r}") from None
    return unit_interval(b1), unit_interval(b2)


def decay_factor(value: Any) -> float:
    """A multiplicative decay in `(0, 1]`."""
    return _real_in(value, 0, 1, closed_low=False, closed_high=True)


def _integer_from(value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HyperparameterError(f"expected an integer, got {value!r}")
    number = int(value)
    if number < low:
        raise HyperparameterError(f"must be >= {low}, got {number!r}")
    return number


def positive_int(value: Any) -> int:
    """An integer `>= 1` (step counts)."""
    return _integer_from(value, 1)


def nonnegative_int(value: Any) -> int:
    """An integer `>= 0`."""
    return _integer_from(value, 0)


def flag(value: Any) -> bool:
    """A boolean switch (`True`/`False`, not 0/1 or a string)."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise HyperparameterError(f"expected True or False, got {value!r}")
    return bool(value)


def norm_order(value: Any) -> float | int:
    """The order `p > 0` of a p-norm, `math.inf` for the max-norm; integers stay integers."""
    real = _real(value)
    if real <= 0:
        raise HyperparameterError(f"must be > 0 (or math.inf), got {value!r}")
    if real != math.inf and real == int(real):
        return int(real)
    return real
