"""From the check phase's leaves to the executor's jobs: each parameter's route and state.

The check phase (`composeopt.check`) has already checked the inputs; what is
left to see here is whether the fast path can take each parameter: its
backend, its route through the plan, and its state as the route expects it
(the arrays each kernel reads and writes, contiguous and of the parameter's
dtype; counters that are ints; host-side state as the reductions expect it).
What was found is kept per parameter, so that a steady state checks only
that nothing was replaced.  Missing states are made here, as `init_tree_`
makes them on the generic path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._dispatch import copy as copy_array
from .._dispatch import namespace
from .._memory import Extents, extent, owns_memory
from ..check import MISSING
from ..rule import Rule
from ..store import StateStore
from .plan import Plan, Route, state_at, usable

__all__ = ["Job", "make_jobs", "read_gradients"]


class Job:
    """One parameter in a fused step."""

    __slots__ = (
        "leaf",
        "x",
        "state",
        "new",
        "route",
        "entry_states",
        "boundary_states",
        "whole_state",
        "arrays",
        "source",
        "scratch",
        "checked",
        "skipped",
        "extra",
    )

    def __init__(self, leaf: Any, x: Any, state: Any, new: bool, route: Route, checked: Checked) -> None:
        self.leaf = leaf
        self.x = x  # 1-d view
        self.state = state  # the whole state, as the store keeps it
        self.new = new  # made this step, so not in the store yet
        self.route = route
        self.entry_states = checked.entry_states  # per entry of the route: that rule's state
        self.boundary_states = checked.boundary_states
        self.whole_state = checked.whole_state
        self.arrays = checked.arrays  # every entry's state arrays in route order, 1-d views
        self.checked = checked
        self.source: Any = None  # the update as it flows: the gradient, then a scratch buffer
        self.scratch: list[Any] = []  # the stages' outputs (two when one stage reads another's)
        self.skipped = False  # a reduction skipped this parameter's step
        self.extra: dict[int, Any] = {}  # stage number -> scalars a reduction gave its first kernel

    @property
    def rule_states(self) -> list[Any]:
        """Per entry of the route, that rule's state (as `.batch` reads it)."""
        return self.entry_states


class Checked:
    """What was found fit in one parameter's state, kept to skip the checks while nothing changed.

    Nothing here refers to the parameter itself (a view of it would): the entry is keyed
    weakly by the parameter and must not keep it alive."""

    __slots__ = ("route", "state", "entry_states", "boundary_states", "whole_state", "originals", "arrays")

    def __init__(self, route: Route, state: Any) -> None:
        self.route = route
        self.state = state
        self.entry_states: list[Any] = []
        self.boundary_states: list[Any] = []
        self.whole_state: Any = None
        self.originals: list[Any] = []  # the state arrays themselves, to see whether one was replaced
        self.arrays: list[Any] = []  # their 1-d views

    def holds(self, route: Route, state: Any) -> bool:
        if route is not self.route or state is not self.state:
            return False
        originals = iter(self.originals)
        for entry, rule_state in zip(route.entries, self.entry_states):
            kernel = entry.kernel
            for name in kernel.state:
                if getattr(rule_state, name, None) is not next(originals):
                    return False
            if kernel.counter is not None and type(getattr(rule_state, kernel.counter, None)) is not int:
                return False
        return True

    def host_state_ok(self, x: Any) -> bool:
        """Whether the reductions' host-side state, and a whole-rule kernel's state, are still
        what they expect.  Checked at every step: the first is replaced at every step, and
        what the second expects depends on hyperparameters that may have changed since."""
        whole = self.route.whole
        if whole is not None and not whole.kernel.accepts(whole.rule, self.whole_state, x):
            return False
        return all(
            boundary.reduce.state_ok(rule_state, x)
            for boundary, rule_state in zip(self.route.boundaries, self.boundary_states)
        )


def make_jobs(
    backend: Any, opt: Rule, plan: Plan, store: StateStore, leaves: Sequence[Any]
) -> list[Job] | None:
    """A job per leaf, missing states made; `None` if the fast path cannot take some leaf."""
    if not all(backend.accepts(leaf.x) for leaf in leaves):
        return None
    states = [leaf.state for leaf in leaves]
    new = [i for i, state in enumerate(states) if state is MISSING]
    if new:
        fresh = opt.init_tree_([leaves[i].x for i in new], [leaves[i].path for i in new])
        for i, state in zip(new, fresh):
            states[i] = state
    known = getattr(store, "_fused_checked", None)  # on the store, as the plan (see `step_`)
    if known is None:
        known = store._fused_checked = StateStore()  # type: ignore[attr-defined]
    jobs = []
    made = set(new)
    for i, (leaf, state) in enumerate(zip(leaves, states)):
        x = leaf.x
        route = plan.route_of(state)
        if route is None or not usable(route):
            return None
        checked = None if i in made else known.get(x)
        if checked is None or not (checked.holds(route, state) and checked.host_state_ok(x)):
            checked = _check(backend, route, state, x)
            if checked is None:
                return None
            known.set(x, checked)
        jobs.append(Job(leaf, backend.flat(x), state, i in made, route, checked))
    read_gradients(backend, jobs)
    return jobs


def _check(backend: Any, route: Route, state: Any, x: Any) -> Checked | None:
    """The state of one parameter, checked against its route; `None` if it is not fit."""
    checked = Checked(route, state)
    for entry in route.entries:
        rule_state = state_at(state, entry.path)
        kernel = entry.kernel
        if (kernel.state or kernel.counter) and rule_state is None:
            return None
        for name in kernel.state:
            original = getattr(rule_state, name, None)
            view = backend.state_array(original, x)
            if view is None:
                return None
            checked.originals.append(original)
            checked.arrays.append(view)
        if kernel.counter is not None and type(getattr(rule_state, kernel.counter, None)) is not int:
            return None
        checked.entry_states.append(rule_state)
    for boundary in route.boundaries:
        rule_state = state_at(state, boundary.path)
        if not boundary.reduce.state_ok(rule_state, x):
            return None
        checked.boundary_states.append(rule_state)
    if route.whole is not None:
        rule_state = state_at(state, route.whole.path)
        if not route.whole.kernel.accepts(route.whole.rule, rule_state, x):
            return None
        checked.whole_state = rule_state
    return checked


def read_gradients(backend: Any, jobs: list[Job]) -> None:
    """Each job's gradient as the kernels read it.

    A gradient that is (a view of) an array this step writes, another parameter say, would be
    read after that array changed: the kernels read a copy of it instead, as the generic path
    does.  A gradient that owns its memory and is none of those arrays cannot be one of them.
    """
    written = {id(job.leaf.x) for job in jobs}
    for job in jobs:
        written.update(map(id, job.checked.originals))
        written.update(map(id, _host_arrays(job)))
    table: Extents | None = None
    for job in jobs:
        dx = job.leaf.dx
        if not (owns_memory(dx) and id(dx) not in written):
            if table is None:
                table = Extents(
                    [extent(j.leaf.x) for j in jobs]
                    + [extent(a) for j in jobs for a in j.checked.originals]
                    + [extent(a) for j in jobs for a in _host_arrays(j)]
                )
            if table.meets(dx):
                dx = copy_array(namespace(dx), dx)
        job.source = backend.gradient(job.leaf.x, dx)


def _host_arrays(job: Job) -> list[Any]:
    """Arrays of a whole-rule kernel's state, which it writes too."""
    state = job.whole_state
    if state is None:
        return []
    return [value for value in vars(state).values() if hasattr(value, "__array_interface__")]
