"""The planner: from an optimiser to its plan of stages.

The chain is flattened into a program: `Entry` (an elementwise kernel),
`Boundary` (a reduction: the stage ends there), `Whole` (a rule whose fast
path takes all its arrays at once, Adafactor's; it ends the program) and
`Branch` (parameter groups: one program per group).  Each parameter follows
its own path through the branches, decided by its state, and its program cut
at the boundaries gives its `Route`: the stages it runs, one after another.
Parameters whose routes meet at a tree-scope boundary wait for each other
there; everything else runs side by side, one backend call per stage kind.

A rule takes part if its class (or the class that set it, unchanged since)
sets `_kernel` to a `Kernel`, `Staged`, `Wrapping` or whole-rule kernel;
anything else makes the plan `None`, and the step takes the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..chain import Optimiser
from ..groups import Groups
from ..rule import Rule
from .kernel import Kernel
from .reduce import Reduce, Staged, Wrapping

__all__ = ["Entry", "Boundary", "Whole", "Branch", "Stage", "Plan", "Route", "make_plan", "state_at"]

_PROTOCOL = ("init", "apply_", "apply_tree_", "init_tree_", "begin_step", "children")

Path = tuple[Any, ...]  # into the chain's state: an int indexes a tuple, a str names an attribute


@dataclass(frozen=True)
class Entry:
    """One elementwise kernel and where its rule's state sits in the chain's state."""

    rule: Rule
    kernel: Kernel
    path: Path


@dataclass(frozen=True)
class Boundary:
    """A reduction of `rule` (the end of a stage)."""

    rule: Rule
    reduce: Reduce
    path: Path


@dataclass(frozen=True)
class Whole:
    """A rule whose fast path updates all its parameters in one call (`kernel.run_`)."""

    rule: Rule
    kernel: Any
    path: Path


@dataclass(frozen=True)
class Branch:
    """Parameter groups: a parameter's group index is its state at `path`, `[0]`."""

    rule: Rule
    path: Path
    programs: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Stage:
    """Consecutive elementwise kernels, fused into one pass (possibly none of them)."""

    entries: tuple[Entry, ...]

    @cached_property
    def key(self) -> tuple[int, ...]:
        return tuple(id(entry.kernel) for entry in self.entries)


@dataclass(frozen=True, eq=False)
class Route:
    """One parameter's way through a plan: `stages[0]`, `boundaries[0]`, `stages[1]`, ...,
    `stages[-1]`, then `whole` if there is one (else the last stage writes `x`)."""

    stages: tuple[Stage, ...]
    boundaries: tuple[Boundary, ...]
    whole: Whole | None

    @property
    def last_decisive(self) -> int:
        """The last boundary that may raise or skip, or -1 (asked at every step: it depends
        on hyperparameters, `ClipNorm.throw`, which may change between steps)."""
        decisive = [n for n, b in enumerate(self.boundaries) if b.reduce.decisive(b.rule)]
        return decisive[-1] if decisive else -1

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(entry for stage in self.stages for entry in stage.entries)

    @cached_property
    def starts(self) -> tuple[tuple[int, int, int], ...]:
        """Per stage: its first entry's position in `entries`, and the range of its state
        arrays in a job's `arrays` (every entry's, in route order)."""
        found = []
        entry = array = 0
        for stage in self.stages:
            count = sum(len(e.kernel.state) for e in stage.entries)
            found.append((entry, array, array + count))
            entry += len(stage.entries)
            array += count
        return tuple(found)

    @property
    def parts(self) -> list[Any]:
        """Entries, boundaries and the whole rule: everything whose state a step reads."""
        return [*self.entries, *self.boundaries, *([self.whole] if self.whole else [])]


@dataclass(frozen=True)
class Plan:
    """The fast path of one optimiser, as it is this step."""

    program: tuple[Any, ...]
    routes: dict[tuple[int, ...], Route] = field(default_factory=dict, compare=False, repr=False)

    @property
    def linear(self) -> Route | None:
        """The one route of a plan without groups."""
        if any(isinstance(part, Branch) for part in self.program):
            return None
        return self.route(())

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages of a plan without groups or reductions (else none)."""
        route = self.linear
        if route is None or route.boundaries or route.whole:
            return ()
        return route.stages

    @property
    def entries(self) -> list[Entry]:
        route = self.linear
        return [] if route is None else list(route.entries)

    def route_of(self, state: Any) -> Route | None:
        """The route of a parameter whose chain state is `state`; `None` if its state
        does not say which group it is in."""
        choices: list[int] = []
        program = self.program
        while True:
            branch = next((part for part in program if isinstance(part, Branch)), None)
            if branch is None:
                return self.route(tuple(choices))
            held = state_at(state, branch.path)
            if not (type(held) is tuple and len(held) == 2 and type(held[0]) is int):
                return None
            if not 0 <= held[0] < len(branch.programs):
                return None
            choices.append(held[0])
            program = branch.programs[held[0]]

    def route(self, choices: tuple[int, ...]) -> Route:
        route = self.routes.get(choices)
        if route is None:
            route = self.routes[choices] = _route(self.program, choices)
        return route


def state_at(state: Any, path: Path) -> Any:
    """The part of a chain's state at `path`; `None` where there is none."""
    try:
        for step in path:
            state = state[step] if type(step) is int else getattr(state, step)
    except (TypeError, IndexError, KeyError, AttributeError):
        return None
    return state


def make_plan(opt: Rule) -> Plan | None:
    """The plan of `opt`, or `None` when some rule has no fast path this step."""
    program = _program(opt, ())
    return None if program is None else Plan(program)


def _program(rule: Rule, path: Path) -> tuple[Any, ...] | None:
    cls = type(rule)
    if isinstance(rule, Optimiser):
        if not _unchanged(cls, Optimiser):
            return None
        parts: list[Any] = []
        for index, child in enumerate(rule.rules):
            program = _program(child, (*path, index))
            if program is None:
                return None
            parts.extend(program)
        return tuple(parts)
    if isinstance(rule, Groups):
        if not _unchanged(cls, Groups):
            return None
        programs = []
        for inner in rule.children():
            program = _program(inner, (*path, 1))
            if program is None:
                return None
            programs.append(program)
        return (Branch(rule, path, tuple(programs)),)
    fused = _fast_path(rule)
    if isinstance(fused, Kernel):
        return None if rule.fallible else (Entry(rule, fused, path),)
    if isinstance(fused, Staged):
        parts = []
        for part in fused.parts:
            if isinstance(part, Kernel):
                parts.append(Entry(rule, part, path))
            else:
                parts.append(Boundary(rule, part, path))
        return tuple(parts)
    if isinstance(fused, Wrapping):
        wrapped = _program(rule.inner, (*path, "inner"))  # type: ignore[attr-defined]
        return None if wrapped is None else (Boundary(rule, fused.reduce, path), *wrapped)
    if fused is not None and hasattr(fused, "run_") and not rule.fallible:
        return (Whole(rule, fused, path),)
    return None


def _route(program: tuple[Any, ...], choices: tuple[int, ...]) -> Route:
    stages: list[Stage] = []
    boundaries: list[Boundary] = []
    whole: Whole | None = None
    current: list[Entry] = []
    pending = list(program)
    chosen = iter(choices)
    while pending:
        part = pending.pop(0)
        if isinstance(part, Branch):
            pending = list(part.programs[next(chosen)]) + pending
        elif isinstance(part, Entry):
            current.append(part)
        elif isinstance(part, Boundary):
            stages.append(Stage(tuple(current)))
            boundaries.append(part)
            current = []
        else:
            whole = part
            if pending:  # a rule after a whole-rule kernel: not planned (see `_valid`)
                whole = None
                boundaries.append(Boundary(part.rule, _AFTER_WHOLE, part.path))
    stages.append(Stage(tuple(current)))
    return Route(tuple(stages), tuple(boundaries), whole)


_AFTER_WHOLE = Reduce(lambda rule: (), lambda *args: None)  # type: ignore[arg-type]
"""Marks a route in which rules follow a whole-rule kernel: the step declines it."""


def usable(route: Route) -> bool:
    """Whether the executor can take this route: no rule after a whole-rule kernel, and a
    decisive reduction only after stages that keep no state (it decides before anything
    is written)."""
    if any(boundary.reduce is _AFTER_WHOLE for boundary in route.boundaries):
        return False
    last = route.last_decisive
    return all(stateless(stage) for stage in route.stages[: last + 1])


def stateless(stage: Stage) -> bool:
    return not any(entry.kernel.state or entry.kernel.counter is not None for entry in stage.entries)


_accepted: dict[type, bool] = {}


def _fast_path(rule: Rule) -> Any:
    """The rule's `_kernel` description, unless a subclass changed the behaviour it describes."""
    cls = type(rule)
    accepted = _accepted.get(cls)
    if accepted is None:
        owner = next((klass for klass in cls.__mro__ if "_kernel" in vars(klass)), None)
        accepted = _accepted[cls] = owner is not None and _unchanged(cls, owner)
    return getattr(rule, "_kernel", None) if accepted else None


def _unchanged(cls: type, owner: type) -> bool:
    return all(getattr(cls, name, None) is getattr(owner, name, None) for name in _PROTOCOL)
