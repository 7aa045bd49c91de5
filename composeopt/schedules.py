"""Schedules: callables `step -> value` that any hyperparameter can follow.

`Adam(eta=CosineAnnealing(1e-3, t_max=1000))` makes Adam's learning rate
follow a cosine; `Momentum(rho=Linear(0.85, 0.95, 500))` ramps a momentum;
`Optimiser(WeightDecay(Step(1e-4, 100, 0.5)), Adam())` halves a weight decay
every 100 steps.  The engine evaluates each schedule once per optimiser step,
before any parameter, and the hyperparameter then reads as that value.

Steps are counted from 1 (the first `update_` call is step 1).  The formulas
below are written with `t = step - 1`, the 0-based count that torch's
`lr_scheduler` (its epoch counter, stepped once per optimiser step), optax and
MindSpore use, so `value(step)` equals their value at `t`.  Every schedule
is a frozen dataclass: printable, comparable, and its `repr` evaluates back.
Any other callable `step -> value` (a lambda) works as a schedule too.

Every field is checked when the schedule is built: a wrong type or an
impossible value raises [ScheduleError][composeopt.errors.ScheduleError]
(a [HyperparameterError][composeopt.errors.HyperparameterError], hence a
`ValueError`) naming the schedule and the field, e.g.
`Linear.steps: expected an integer, got 'a'`.  Values are finite real
numbers (not `bool`, not NaN), step counts are integers (`10`, not `10.0`),
switches are `True` or `False`, and NumPy scalars become Python numbers.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from .errors import HyperparameterError, ScheduleError
from .hyper import flag, nonnegative_int, positive_int

__all__ = [
    "Schedule",
    "Constant",
    "Step",
    "MultiStep",
    "Exponential",
    "ExponentialDecay",
    "InverseTimeDecay",
    "NaturalExpDecay",
    "PolynomialDecay",
    "PiecewiseConstant",
    "CosineAnnealing",
    "CosineAnnealingWarmRestarts",
    "Linear",
    "Warmup",
    "OneCycle",
    "Cyclic",
    "Triangle",
    "Join",
    "Sequence",
]

ScheduleLike = Union["Schedule", Callable[[int], Any], float]


Check = Callable[[Any], Any]


def _checked(owner: Any, /, **checks: Check) -> None:
    """Check and normalise the named fields of the frozen dataclass `owner`."""
    for name, check in checks.items():
        object.__setattr__(owner, name, _field(type(owner).__name__, name, check, getattr(owner, name)))


def _field(owner: str, name: str, check: Check, value: Any) -> Any:
    try:
        return check(value)
    except HyperparameterError as err:
        raise ScheduleError(f"{owner}.{name}: {err}") from None


def _require(condition: bool, owner: str, name: str, message: str) -> None:
    if not condition:
        raise ScheduleError(f"{owner}.{name}: {message}")


def _real(value: Any, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"expected a real number, got {value!r}")
    if math.isnan(value):
        raise HyperparameterError("expected a real number, got NaN")
    if finite and math.isinf(value):
        raise HyperparameterError(f"must be finite, got {value!r}")
    as_given: Any = value  # Python numbers keep their type, so that `repr` shows them as written
    return as_given if type(as_given) in (int, float) else float(value)


def _number(value: Any) -> float:
    """A finite real number."""
    return _real(value)


def _at_least(low: float) -> Check:
    def check(value: Any) -> float:
        number = _real(value)
        if number < low:
            raise HyperparameterError(f"must be >= {low}, got {number!r}")
        return number

    return check


def _positive(value: Any) -> float:
    number = _real(value)
    if number <= 0:
        raise HyperparameterError(f"must be > 0, got {number!r}")
    return number


def _count(value: Any) -> int:
    """An integer step count `>= 1` (NumPy integers become `int`)."""
    return int(positive_int(value))


def _optional_count(value: Any) -> int | None:
    return None if value is None else _count(value)


def _index(value: Any) -> int:
    """A 0-based step `t >= 0`, as a milestone or boundary."""
    return int(nonnegative_int(value))


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        if not (isinstance(value, str) and value in choices):
            raise HyperparameterError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


def _schedule_or_number(value: Any) -> Any:
    if callable(value):
        return value
    try:
        return _number(value)
    except HyperparameterError:
        raise HyperparameterError(f"expected a schedule or a finite real number, got {value!r}") from None


def _items(check: Check) -> Check:
    """A sequence (list, tuple, ...) whose every item passes `check`, as a tuple."""

    def items(value: Any) -> tuple[Any, ...]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise HyperparameterError(f"expected a sequence, got {value!r}")
        checked = []
        for position, item in enumerate(value):
            try:
                checked.append(check(item))
            except HyperparameterError as err:
                raise HyperparameterError(f"item {position}: {err}") from None
        return tuple(checked)

    return items


def _increasing(check: Check) -> Check:
    """A sequence of `check`ed items in non-decreasing order."""
    sequence = _items(check)

    def increasing(value: Any) -> tuple[Any, ...]:
        items: tuple[Any, ...] = sequence(value)
        if list(items) != sorted(items):
            raise HyperparameterError(f"must not decrease, got {items!r}")
        return items

    return increasing


def _as_schedule(value: ScheduleLike) -> Callable[[int], Any]:
    return value if callable(value) else Constant(value)


class Schedule:
    """Base class: a schedule maps the optimiser step (1, 2, ...) to a value."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def preview(self, steps: int) -> list[float]:
        """The values at steps 1 to `steps`, e.g. to plot the schedule."""
        return [self(step) for step in range(1, steps + 1)]


@dataclass(frozen=True)
class Constant(Schedule):
    """`value` at every step."""

    value: float

    def __post_init__(self) -> None:
        # Infinity is allowed: the rule's own check decides whether it fits the hyperparameter.
        _checked(self, value=lambda value: _real(value, finite=False))

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class Step(Schedule):
    """`value · gamma^floor(t / step_size)`: torch's `StepLR`."""

    value: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _checked(self, value=_number, step_size=_count, gamma=_positive)

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** ((step - 1) // self.step_size)


@dataclass(frozen=True)
class MultiStep(Schedule):
    """`value · gamma^k` with `k` the number of milestones `<= t`: torch's `MultiStepLR`."""

    value: float
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _checked(self, value=_number, milestones=_increasing(_index), gamma=_positive)

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** bisect_right(self.milestones, step - 1)


@dataclass(frozen=True)
class Exponential(Schedule):
    """`value · gamma^t`: torch's `ExponentialLR` stepped every optimiser step."""

    value: float
    gamma: float

    def __post_init__(self) -> None:
        _checked(self, value=_number, gamma=_positive)

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** (step - 1)


@dataclass(frozen=True)
class _TimeDecay(Schedule):
    """Fields and checks shared by the decays of `p = t / decay_steps` (`floor` when `staircase`)."""

    value: float
    decay_rate: float
    decay_steps: int
    staircase: bool = False

    def __post_init__(self) -> None:
        _checked(self, value=_number, decay_rate=_at_least(0), decay_steps=_count, staircase=flag)

    def progress(self, step: int) -> float:
        t = step - 1
        return t // self.decay_steps if self.staircase else t / self.decay_steps


class ExponentialDecay(_TimeDecay):
    """`value · decay_rate^p`, `p = t / decay_steps` (floored when `staircase`).

    MindSpore's `ExponentialDecayLR(learning_rate, decay_rate, decay_steps, is_stair)`
    and TensorFlow's `ExponentialDecay`; optax's `exponential_decay` with
    `transition_steps=decay_steps`.
    """

    def __call__(self, step: int) -> float:
        return self.value * float(self.decay_rate ** self.progress(step))


class InverseTimeDecay(_TimeDecay):
    """`value / (1 + decay_rate · p)`, `p = t / decay_steps` (floored when `staircase`).

    MindSpore's `InverseDecayLR` and TensorFlow's `InverseTimeDecay`.
    """

    def __call__(self, step: int) -> float:
        return self.value / (1 + self.decay_rate * self.progress(step))


class NaturalExpDecay(_TimeDecay):
    """`value · exp(-decay_rate · p)`, `p = t / decay_steps` (floored when `staircase`).

    MindSpore's `NaturalExpDecayLR`.
    """

    def __call__(self, step: int) -> float:
        return self.value * math.exp(-self.decay_rate * self.progress(step))


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    """`(value - end_value) · (1 - t / T)^power + end_value`.

    Without `cycle`, `t` stops at `T = decay_steps` (then `end_value`
    holds); with `cycle`, `T` grows to the next multiple of `decay_steps`
    above `t`.  MindSpore's `PolynomialDecayLR` and TensorFlow's
    `PolynomialDecay`; torch's `PolynomialLR` with `end_value=0`.
    """

    value: float
    end_value: float
    decay_steps: int
    power: float = 1.0
    cycle: bool = False

    def __post_init__(self) -> None:
        _checked(self, value=_number, end_value=_number, decay_steps=_count, power=_at_least(0), cycle=flag)

    def __call__(self, step: int) -> float:
        t = step - 1
        if self.cycle:
            horizon = self.decay_steps * max(1, math.ceil(t / self.decay_steps))
        else:
            horizon, t = self.decay_steps, min(t, self.decay_steps)
        return (self.value - self.end_value) * float((1 - t / horizon) ** self.power) + self.end_value


@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    """`values[k]` with `k` the number of `boundaries <= t`.

    `len(values) == len(boundaries) + 1`.  MindSpore's
    `piecewise_constant_lr(milestone, learning_rates)` is
    `PiecewiseConstant(milestone[:-1], learning_rates)`.
    """

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        _checked(self, boundaries=_increasing(_index), values=_items(_number))
        _require(
            len(self.values) == len(self.boundaries) + 1,
            "PiecewiseConstant",
            "values",
            f"needs one more value than boundaries, got {len(self.values)} values "
            f"and {len(self.boundaries)} boundaries",
        )

    def __call__(self, step: int) -> float:
        return self.values[bisect_right(self.boundaries, step - 1)]


def _cosine(high: float, low: float, fraction: float) -> float:
    return low + (high - low) * (1 + math.cos(math.pi * fraction)) / 2


@dataclass(frozen=True)
class CosineAnnealing(Schedule):
    """`eta_min + (value - eta_min) · (1 + cos(π · min(t, t_max) / t_max)) / 2`.

    torch's `CosineAnnealingLR(T_max=t_max, eta_min=eta_min)` for `t <= t_max`
    (torch keeps following the cosine after `t_max`; this one stays at
    `eta_min`, as optax's `cosine_decay_schedule` and MindSpore's `CosineDecayLR`).
    """

    value: float
    t_max: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _checked(self, value=_number, t_max=_count, eta_min=_number)

    def __call__(self, step: int) -> float:
        return _cosine(self.value, self.eta_min, min(step - 1, self.t_max) / self.t_max)


@dataclass(frozen=True)
class CosineAnnealingWarmRestarts(Schedule):
    """SGDR: cosine from `value` to `eta_min` over `T_i` steps, then a restart.

    The first cycle lasts `t_0` steps and each next one `t_mult` times longer:
    torch's `CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`.
    Reference: Loshchilov & Hutter (2016), https://arxiv.org/abs/1608.03983
    """

    value: float
    t_0: int
    t_mult: int = 1
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _checked(self, value=_number, t_0=_count, t_mult=_count, eta_min=_number)

    def __call__(self, step: int) -> float:
        t_cur, period = step - 1, self.t_0
        while t_cur >= period:  # whole cycles are subtracted exactly, in integers
            t_cur -= period
            period *= self.t_mult
        return _cosine(self.value, self.eta_min, t_cur / period)


@dataclass(frozen=True)
class Linear(Schedule):
    """From `start` at step 1 to `end` after `steps` steps, then `end`.

    torch's `LinearLR(start_factor, end_factor, total_iters)` is
    `Linear(base · start_factor, base · end_factor, total_iters)`; optax's
    `linear_schedule(start, end, steps)`.
    """

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        _checked(self, start=_number, end=_number, steps=_count)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step - 1, self.steps) / self.steps


@dataclass(frozen=True)
class Warmup(Schedule):
    """A linear warm-up from `start` over `steps` steps, then `schedule` from its own step 1.

    During the warm-up the value rises from `start` towards `schedule(1)`;
    `Warmup(CosineAnnealing(1e-3, 900), 100)` is optax's
    `warmup_cosine_decay_schedule(0, 1e-3, 100, 1000)`.
    """

    schedule: Any
    steps: int
    start: float = 0.0

    def __post_init__(self) -> None:
        _checked(self, schedule=_schedule_or_number, steps=_index, start=_number)

    def __call__(self, step: int) -> float:
        inner = _as_schedule(self.schedule)
        if step - 1 < self.steps:
            return self.start + (float(inner(1)) - self.start) * (step - 1) / self.steps
        return float(inner(step - self.steps))


@dataclass(frozen=True)
class OneCycle(Schedule):
    """The 1cycle policy: up from `max_value / div_factor` to `max_value`, then down to
    `max_value / div_factor / final_div_factor`, over `total_steps`.

    torch's `OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor,
    final_div_factor, three_phase)` (`anneal` is `"cos"` or `"linear"`);
    past `total_steps` the last value holds.
    Reference: Smith & Topin (2017), https://arxiv.org/abs/1708.07120
    """

    max_value: float
    total_steps: int
    pct_start: float = 0.3
    anneal: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    def __post_init__(self) -> None:
        _checked(
            self,
            max_value=_number,
            total_steps=_count,
            pct_start=_number,
            anneal=_one_of("cos", "linear"),
            div_factor=_positive,
            final_div_factor=_positive,
            three_phase=flag,
        )
        _require(self.total_steps >= 2, "OneCycle", "total_steps", f"must be >= 2, got {self.total_steps}")
        _require(0 < self.pct_start < 1, "OneCycle", "pct_start", f"must be in (0, 1), got {self.pct_start}")
        # Each phase must span a positive number of steps, or its fraction divides by zero.
        rise_end = self.pct_start * self.total_steps - 1
        _require(
            rise_end > 0,
            "OneCycle",
            "pct_start",
            f"the rise must last more than one step (pct_start * total_steps > 1), "
            f"got {self.pct_start} * {self.total_steps}",
        )
        _require(
            not self.three_phase or 2 * rise_end < self.total_steps - 1,
            "OneCycle",
            "pct_start",
            f"with three_phase, the rise and the fall must end before the last step "
            f"(2 * pct_start * total_steps < total_steps + 1), got {self.pct_start} * {self.total_steps}",
        )

    def __call__(self, step: int) -> float:
        initial = self.max_value / self.div_factor
        final = initial / self.final_div_factor
        rise_end = self.pct_start * self.total_steps - 1
        phases = [(rise_end, initial, self.max_value)]
        if self.three_phase:
            phases += [(2 * rise_end, self.max_value, initial), (self.total_steps - 1, initial, final)]
        else:
            phases += [(self.total_steps - 1, self.max_value, final)]
        t = min(step - 1, self.total_steps - 1)
        phase_start = 0.0
        for index, (phase_end, high, low) in enumerate(phases):
            if t <= phase_end or index == len(phases) - 1:
                fraction = (t - phase_start) / (phase_end - phase_start)
                if self.anneal == "cos":
                    return _cosine(high, low, fraction)
                return high + (low - high) * fraction
            phase_start = phase_end
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Cyclic(Schedule):
    """A triangular wave between `base` and `max_value`: torch's `CyclicLR`.

    It rises for `step_size_up` steps and falls for `step_size_down` (default:
    the same).  `mode` `"triangular2"` halves the amplitude every cycle;
    `"exp_range"` scales it by `gamma^t`.
    Reference: Smith (2015), https://arxiv.org/abs/1506.01186
    """

    base: float
    max_value: float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _checked(
            self,
            base=_number,
            max_value=_number,
            step_size_up=_count,
            step_size_down=_optional_count,
            mode=_one_of("triangular", "triangular2", "exp_range"),
            gamma=_positive,
        )

    def __call__(self, step: int) -> float:
        t = step - 1
        down = self.step_size_up if self.step_size_down is None else self.step_size_down
        period = self.step_size_up + down
        rise = self.step_size_up / period
        cycle = math.floor(1 + t / period)
        position = 1 + t / period - cycle
        height = position / rise if position <= rise else (position - 1) / (rise - 1)
        amplitude = (self.max_value - self.base) * height
        if self.mode == "triangular2":
            amplitude /= 2 ** (cycle - 1)
        elif self.mode == "exp_range":
            amplitude *= self.gamma**t
        return self.base + amplitude


def Triangle(low: float, high: float, period: int) -> Cyclic:  # noqa: N802 - reads as a schedule class
    """ParameterSchedulers.jl's `Triangle`: a symmetric triangular wave of `period` steps
    from `low` up to `high` and back (`period` even)."""
    low, high = _field("Triangle", "low", _number, low), _field("Triangle", "high", _number, high)
    period = _field("Triangle", "period", _count, period)
    _require(
        period >= 2 and period % 2 == 0, "Triangle", "period", f"must be an even number >= 2, got {period}"
    )
    return Cyclic(low, high, period // 2)


@dataclass(frozen=True)
class Join(Schedule):
    """Switch schedules at step boundaries: `schedules[k]` runs after `boundaries[k-1]` steps.

    Each schedule starts again from its own step 1, as optax's `join_schedules`:
    `Join([Linear(0, 1e-3, 100), CosineAnnealing(1e-3, 900)], [100])`.
    Alias: `Sequence` (ParameterSchedulers.jl's name).
    """

    schedules: tuple[Any, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        _checked(self, schedules=_items(_schedule_or_number), boundaries=_increasing(_index))
        _require(
            len(self.schedules) == len(self.boundaries) + 1,
            "Join",
            "schedules",
            f"needs one more schedule than boundaries, got {len(self.schedules)} schedules "
            f"and {len(self.boundaries)} boundaries",
        )

    def __call__(self, step: int) -> float:
        index = bisect_right(self.boundaries, step - 1)
        offset = self.boundaries[index - 1] if index else 0
        return float(_as_schedule(self.schedules[index])(step - offset))


Sequence = Join
