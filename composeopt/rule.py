"""The rule protocol: `init(x) -> state` and `apply_(state, x, dx) -> update`.

A rule is a small mutable object that holds hyperparameters only.  The
per-parameter state it needs (moments, step counts) comes from `Rule.init`
and is kept by the optimiser's state store, outside the rule.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from ._dispatch import namespace
from .errors import ComposeoptError, UnknownHyperparameterError
from .hyper import REQUIRED, Hyper, HyperTuple, follow_schedules, settings
from .kernel import Kernel

if TYPE_CHECKING:
    # Type checkers know typing_extensions without it being installed, and Python 3.10's
    # typing has no dataclass_transform.
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_: Any) -> Callable[[type], type]:
        # At run time Rule.__init_subclass__ does what the decorator describes; the standard
        # one would only add a `__dataclass_transform__` attribute for help() to show.
        return lambda cls: cls


__all__ = ["Rule", "State", "Replace", "walk_rules", "start_step", "keep_hyperparameters"]


class State(SimpleNamespace):
    """A mutable record of per-parameter state, e.g. `State(mu=..., nu=..., t=0)`.

    Rules update their state in place (`state.t += 1`, `state.mu = ...`);
    [Rule.apply_][composeopt.Rule.apply_] returns only the update.

    Examples:
        >>> import composeopt as co
        >>> state = co.State(t=0)
        >>> state.t += 1
        >>> state
        State(t=1)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _last_change[0] = next(_changes)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _last_change[0] = next(_changes)


# Every field set or deleted on any State draws a fresh number, so a repeat step that holds
# state arrays by address can tell with one comparison that no field moved since it last
# looked.  `next` on a count is atomic, and each number is stored by the one thread that drew
# it, so a number once replaced never comes back.
_changes = itertools.count(1)
_last_change = [0]


def state_changes() -> int:
    """A number that differs from every earlier one once any `State`'s field was set or deleted
    (through attribute access: writes into its `__dict__` are not seen)."""
    return _last_change[0]


class Replace:
    """An update that sets the parameter to `value` instead of being subtracted from it.

    Most rules return an array Δ and the engine does `x -= Δ`.  A rule
    that keeps its own copy of the parameter ([MixedPrecision][composeopt.MixedPrecision]'s
    float32 master, [Lookahead][composeopt.Lookahead]'s slow weights) returns
    `Replace(value)` instead, so that `x` becomes exactly `value` (cast to
    `x`'s dtype) rather than `x - (x - value)` with its rounding.  Such a rule
    sets `assigns = True` and must come last in a chain: there is no gradient
    left for a later rule.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> class Reset(co.Rule):
        ...     assigns = True
        ...     def apply_(self, state, x, dx):
        ...         return co.Replace(co.namespace(x).zeros_like(x))
        >>> x = np.array([1.5, -2.0])
        >>> _ = co.update_(Reset(), x, np.ones(2))
        >>> print(x)
        [0. 0.]
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Replace({self.value!r})"


@dataclass_transform(field_specifiers=(Hyper, HyperTuple))
class Rule:
    """Base class of every optimisation rule.

    Subclasses declare hyperparameters as [Hyper][composeopt.Hyper] class
    attributes and implement two methods:

    * `init(x)` returns the per-parameter state for array `x` (arrays in `x`'s
      own module, device and dtype), or `None` when the rule has none.
    * `apply_(state, x, dx)` returns the update that the engine subtracts from
      `x`.  It may mutate `state` and `dx` (the engine passes its own copy of
      the gradient), must not mutate `x`, and must not return an array that it
      keeps in its state (a later rule in a chain may overwrite it).  It may
      also return `None` (leave `x` alone this step; later rules in a chain do
      not see it) or a [Replace][composeopt.Replace] (set `x` to a value).

    A rule that works element by element may instead declare its math once,
    as a class attribute `kernel = Kernel(...)` (see
    [composeopt.kernel][composeopt.kernel]): it then gets `apply_` from it
    (unless it writes its own), `init` too (zero arrays named by the kernel's
    `state`, and its `counter` at 0), `fallible = False` (unless it says
    otherwise: the math cannot raise), and fast paths that fuse it with the
    other elementwise rules of a chain.  The class keeps the kernel privately:
    `kernel` is neither a hyperparameter nor an attribute of its instances.

    The constructor takes the hyperparameters positionally in declaration order
    or by name; `repr` and `==` are derived from them.  See
    [Writing your own rule](../writing-rules.md) for a worked example.

    Type checkers read a subclass as a dataclass whose fields are its
    annotated hyperparameters (`scale: Hyper[float] = Hyper(default=0.5)`),
    so they check the constructor's arguments: `Adam(lr=1e-3)` and
    `Adam("fast")` are errors before the program runs.  `help()` lists each
    hyperparameter with its entry under `Args:` in the class docstring.

    Once constructed, a rule refuses new public attributes, so that a typo
    such as `opt.lr = 0.1` raises
    [UnknownHyperparameterError][composeopt.errors.UnknownHyperparameterError]
    (`Adam has no hyperparameter 'lr'; did you mean 'eta'?`) instead of
    creating an attribute that no step reads.  A rule may set any attribute of
    its own while its constructor runs (a subclass's `__init__` that sets
    `self.inner = inner`); afterwards it may set its hyperparameters, the
    attributes its constructor created, attributes its class defines, and
    private ones (a leading underscore).

    Examples:
        >>> import numpy as np, composeopt as co
        >>> from composeopt.hyper import nonnegative
        >>> class Halve(co.Rule):
        ...     scale: co.Hyper[float] = co.Hyper(default=0.5, check=nonnegative)
        ...     def apply_(self, state, x, dx):
        ...         return self.scale * dx
        >>> x = np.array([4.0])
        >>> _ = co.update_(Halve(), x, np.array([2.0]))
        >>> print(x, Halve(0.25))
        [3.] Halve(scale=0.25)
    """

    fallible: ClassVar[bool] = True
    """Whether `apply_` may raise on input that passed the engine's checks.
    A fallible rule takes the generic path, which copies the states first and puts
    them back if anything raises; the fused paths write in one pass that cannot be
    undone, so they take only rules that cannot fail, which set it to `False`."""

    assigns: ClassVar[bool] = False
    """Whether `apply_` may return a [Replace][composeopt.Replace]; such a rule must be last in a chain."""

    _hyper_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _take_kernel(cls)
        own_init = vars(cls).get("__init__")
        if own_init is not None and not getattr(own_init, "_opens_attributes", False):
            cls.__init__ = _constructor(own_init)  # type: ignore[method-assign]
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Hyper) and name not in names:
                    names.append(name)
        cls._hyper_names = tuple(names)
        described = _arguments(cls.__doc__)
        for name, value in vars(cls).items():
            if isinstance(value, Hyper) and value.__doc__ is None and name in described:
                value.__doc__ = described[name]
        if cls.__init__ is Rule.__init__:
            # help(), IDEs and inspect.signature show `Adam(eta=0.001, beta=(0.9, 0.999), ...)`.
            cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [
                    inspect.Parameter(
                        name,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD,
                        default=inspect.Parameter.empty
                        if getattr(cls, name).default is REQUIRED
                        else getattr(cls, name).default,
                    )
                    for name in names
                ]
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        names = cls._hyper_names
        if len(args) > len(names):
            raise TypeError(
                f"{cls.__name__}() takes at most {len(names)} positional arguments {names}, got {len(args)}"
            )
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise TypeError(
                    f"{cls.__name__}() got an unexpected keyword argument {name!r}; "
                    f"its hyperparameters are {names}"
                )
            if name in values:
                raise TypeError(f"{cls.__name__}() got multiple values for {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                default = getattr(cls, name).default
                if default is REQUIRED:
                    raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
                values[name] = default
            setattr(self, name, values[name])

    if not TYPE_CHECKING:  # hidden from type checkers, which would then accept any attribute

        def __setattr__(self, name: str, value: Any) -> None:
            own = vars(self)
            if (
                name.startswith("_")
                or name in own
                or _CONSTRUCTING in own
                or _class_defines(type(self), name)
            ):
                object.__setattr__(self, name, value)
            else:
                raise UnknownHyperparameterError(_no_such_attribute(self, name))

        def __getattr__(self, name: str) -> Any:
            # Only reached when the normal lookup fails.  Names the class knows (a
            # hyperparameter not set yet, a property whose getter failed) and private
            # or special names get the plain error: they are not typos of the user's.
            if name.startswith("_") or _class_defines(type(self), name):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            raise UnknownHyperparameterError(_no_such_attribute(self, name))

    def hyperparameters(self) -> dict[str, Any]:
        """The current hyperparameter values, by name, in constructor order.

        A hyperparameter that follows a schedule reads as its value at the
        current optimiser step; [settings][composeopt.Rule.settings] gives the schedule itself.

        Examples:
            >>> import composeopt as co
            >>> co.Momentum(0.1).hyperparameters()
            {'eta': 0.1, 'rho': 0.9}
        """
        return {name: getattr(self, name) for name in type(self)._hyper_names}

    def settings(self) -> dict[str, Any]:
        """The hyperparameters as set: a schedule where one was given, else the value."""
        return settings(self, type(self)._hyper_names)

    def init(self, x: Any) -> Any:
        """The per-parameter state for `x`; `None` for a stateless rule.

        A rule with a kernel gets zero arrays shaped like `x` (its dtype and
        device) for the kernel's state names, and its step counter at 0.
        """
        kernel = getattr(self, "_kernel", None)
        if not isinstance(kernel, Kernel) or not (kernel.state or kernel.counter is not None):
            return None
        xp = namespace(x)
        state = State(**{name: xp.zeros_like(x) for name in kernel.state})
        if kernel.counter is not None:
            setattr(state, kernel.counter, 0)
        return state

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        """The update to subtract from `x`, given its gradient `dx`.

        A rule with a kernel gets this from its math, run on whole arrays of
        `x`'s namespace (see [composeopt.kernel][composeopt.kernel]).
        """
        kernel = getattr(self, "_kernel", None)
        if not isinstance(kernel, Kernel):
            raise NotImplementedError(f"{type(self).__name__} has no kernel and does not implement apply_")
        return _kernel_runner()(kernel, self, state, x, dx)

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        """States for several new parameters at once.

        The default calls [init][composeopt.Rule.init] on each; rules that need to know where a
        parameter sits (parameter groups) override it.  `paths` are
        [Path][composeopt.tree.Path] strings.
        """
        states = []
        for x, path in zip(xs, paths):
            try:
                states.append(self.init(x))
            except ComposeoptError as err:
                raise type(err)(f"{path}: {err}") from err
        return states

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        """Updates for every parameter of a tree at once.

        The default applies [apply_][composeopt.Rule.apply_] leaf by leaf.
        Tree-level rules (a global norm, gradient accumulation) override it to see
        every gradient as it reaches them.  `paths` name the parameters for error
        messages.
        """
        updates = []
        for state, x, dx, path in zip(states, xs, dxs, paths):
            try:
                updates.append(self.apply_(state, x, dx))
            except ComposeoptError as err:
                raise type(err)(f"{path}: {err}") from err
        return updates

    def begin_step(self, step: int) -> None:
        """Called once per optimiser step (`step` = 1, 2, ...) before any parameter.

        Rules that follow the optimiser's step count rather than per-parameter calls
        ([ExpDecay][composeopt.ExpDecay], [InvDecay][composeopt.InvDecay]) use it.
        """

    def children(self) -> tuple[Rule, ...]:
        """The rules this rule is made of (a chain's rules); empty for a plain rule."""
        return ()

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={_format(value)}" for name, value in self.settings().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Rule)
        return self.settings() == other.settings()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


@functools.cache
def _kernel_runner() -> Callable[..., Any]:
    """The generic path of kernels, imported on first use (its package imports this module)."""
    from ._fused.xp_backend import apply_kernel

    return apply_kernel


def _take_kernel(cls: type[Rule]) -> None:
    """Move a class's public `kernel` declaration to `_kernel`, where the engine reads it.

    Out of the public names, it is no attribute that an instance could set (to no effect),
    and `help()` lists only what a user of the rule may set.
    """
    own = vars(cls)
    if "kernel" not in own or isinstance(own["kernel"], Hyper):  # a hyperparameter named kernel
        return
    declared = own["kernel"]
    if declared is not None and not isinstance(declared, Kernel):
        raise TypeError(
            f"{cls.__name__}.kernel must be a composeopt.kernel.Kernel (or None), got {declared!r}"
        )
    delattr(cls, "kernel")
    cls._kernel = declared  # type: ignore[attr-defined]
    if declared is not None and "apply_" not in own:
        # The class's math is its kernel, even where a base class wrote an apply_ of its own:
        # the generic path and the fast paths then compute the same thing.
        cls.apply_ = Rule.apply_  # type: ignore[method-assign]
        if "fallible" not in own:
            cls.fallible = False


def _class_defines(cls: type, name: str) -> bool:
    """Whether `cls` or a base defines `name` (a hyperparameter, property or class attribute).

    Unlike `hasattr(cls, name)` this leaves out the metaclass's attributes (`mro`)."""
    return any(name in vars(klass) for klass in cls.__mro__)


_ENTRY = re.compile(r"(\*{0,2}\w+)(?: \(.*\))?:(?: (.*))?$")


def _arguments(doc: str | None) -> dict[str, str]:
    """The entries of a docstring's `Args:` section, `{name: text}`, each text on one line."""
    lines = inspect.cleandoc(doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    section_indent = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, list[str]] = {}
    entry_indent = None
    name = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if match is not None:
            name = match.group(1)
            entries[name] = [match.group(2) or ""]
        elif name is not None:
            entries[name].append(line.strip())
    return {name: " ".join(part for part in parts if part) for name, parts in entries.items()}


_CONSTRUCTING = "_composeopt_constructing"
"""Present in a rule's `__dict__` while one of its constructors runs."""


def _constructor(init: Callable[..., None]) -> Callable[..., None]:
    """`init`, run with the rule open to new attributes (only the outermost call closes it)."""

    @functools.wraps(init)
    def __init__(self: Rule, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - it becomes the class's __init__
        own = vars(self)
        outermost = _CONSTRUCTING not in own
        own[_CONSTRUCTING] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outermost:
                own.pop(_CONSTRUCTING, None)

    __init__._opens_attributes = True  # type: ignore[attr-defined]
    return __init__


_ALIASES = {
    "lr": "eta",
    "learning_rate": "eta",
    "weight_decay": "lambda_",
    "momentum": "rho",
    "alpha": "rho",
    "betas": "beta",
    "beta1": "beta",
    "beta2": "beta",
    "b1": "beta",
    "b2": "beta",
    "eps": "epsilon",
}
"""torch.optim and optax names of hyperparameters that composeopt names otherwise."""


def _closest(rule: Rule, name: str) -> str | None:
    """The hyperparameter (or own public attribute) of `rule` that `name` most likely meant."""
    names = type(rule)._hyper_names
    alias = _ALIASES.get(name)
    if alias in names:
        return alias
    candidates = [*names, *(key for key in vars(rule) if not key.startswith("_") and key not in names)]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _nested(rule: Rule, prefix: str) -> Iterator[tuple[str, Rule]]:
    """`(path, rule)` for every rule inside `rule`, its path written as the user would reach it."""
    own = {id(value): key for key, value in vars(rule).items() if not key.startswith("_")}
    for index, child in enumerate(rule.children()):
        path = f"{prefix}.{own[id(child)]}" if id(child) in own else f"{prefix}[{index}]"
        yield path, child
        yield from _nested(child, path)


def _no_such_attribute(rule: Rule, name: str) -> str:
    kind = type(rule).__name__
    message = f"{kind} has no hyperparameter {name!r}"
    suggestion = _closest(rule, name)
    if suggestion is not None:
        return f"{message}; did you mean {suggestion!r}?"
    inner = [
        (path, child, meant)
        for path, child in _nested(rule, "opt")
        for meant in [name if name in type(child)._hyper_names else _closest(child, name)]
        if meant is not None and meant in type(child)._hyper_names
    ]
    if inner:
        shown = ", ".join(f"{path}.{meant} ({type(child).__name__})" for path, child, meant in inner[:3])
        message = f"{message}; did you mean {shown}{', ...' if len(inner) > 3 else ''}?"
        meant_names = {meant for _, _, meant in inner}
        if len(meant_names) == 1:
            message += f" adjust_(opt, {meant_names.pop()}=...) sets it on every rule that has it."
        return message
    names = type(rule)._hyper_names
    if not names:
        return f"{message}; it has none of its own"
    return f"{message}; its hyperparameters are {', '.join(names)}"


def _format(value: Any) -> str:
    """`repr` that evaluates back to the value (`math.inf` has no literal)."""
    if isinstance(value, float) and math.isinf(value):
        return "float('inf')" if value > 0 else "float('-inf')"
    if isinstance(value, tuple):
        return "(" + ", ".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def walk_rules(rule: Rule) -> Iterator[Rule]:
    """`rule` and every rule nested in it, depth first."""
    yield rule
    for child in rule.children():
        yield from walk_rules(child)


def keep_hyperparameters(rule: Rule) -> Callable[[], None]:
    """A function that puts every rule in `rule` back as it is now.

    Whatever changes hyperparameters and may fail half-way (a step's schedules and
    `begin_step`, `adjust_`, loading a checkpoint) calls it on failure.
    """
    kept = [(inner, dict(vars(inner))) for inner in walk_rules(rule)]

    def restore() -> None:
        for inner, values in kept:
            vars(inner).clear()
            vars(inner).update(values)

    return restore


def start_step(rule: Rule, step: int) -> None:
    """Open optimiser step `step` of `rule`: every schedule in it takes its value, then `begin_step`."""
    for inner in walk_rules(rule):
        follow_schedules(inner, step)
    rule.begin_step(step)
