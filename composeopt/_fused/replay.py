"""A repeat of the last fused step's jobs, for a tree that comes back unchanged.

An ordinary fused step pairs the trees, checks every leaf (`composeopt.check`)
and builds each parameter's job (`.jobs`): its route through the plan and its
state, checked.  Step after step over the same tree, all of that comes out the
same; only the gradients differ.  Once a store's tree has taken a fused step
that the check phase remembers (see `composeopt.check.watch`), the store keeps
a `Replay`: per parameter, its path, its state, its route and what was found
fit in that state.  The next step then

1. asks the check phase for its proof that parameters and gradients are as it
   last accepted them (`composeopt.check.unchanged_leaves`: the same
   parameters with the same layouts, still writable, nothing in the store
   added, replaced or removed, gradients of the same shapes and dtypes);
2. checks, per parameter, what the store's version does not show: that every
   state still holds the arrays the kernels were given, with integer step
   counts, and the reductions' host-side state as they expect it (`.jobs`);
3. reads the gradients as the ordinary step reads them (a gradient that
   overlaps what the step writes is copied first) and runs the same executor
   (`.run`) over jobs rebuilt from what was kept.

If any of this fails, the replay is dropped and the ordinary path takes the
step, with its full check and its errors.  Nothing of this step has changed by
then.  The replay holds the states and the routes (which refer to the rules),
but no parameter and no gradient: it lives on the store, as the plan does, so
that the cycle through the rules is the garbage collector's to take.

Unlike `.batch`, this runs every kind of plan (stages, reductions, groups,
whole-rule kernels) on every CPU backend, one backend call per stage and group
of arrays; `.batch` is one call for the whole tree, for single-stage plans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import check
from .._memory import DTYPE, OBJECT
from ..store import StateStore
from .jobs import Job, read_gradients
from .plan import Plan

if TYPE_CHECKING:
    from .table import Table

__all__ = ["ENABLED", "Replay", "remember", "proof", "jobs_of"]

ENABLED = True
"""Whether fused steps are replayed (the tests turn it off to reach the ordinary fused step)."""


class _Kept:
    """What one parameter's job needs again, without the parameter or its gradient."""

    __slots__ = ("path", "state", "route", "checked", "scratch")

    def __init__(self, job: Job) -> None:
        self.path = job.leaf.path
        self.state = job.state
        self.route = job.route
        self.checked = job.checked
        self.scratch = job.scratch  # the stages' output buffers, kept between steps anyway


class Replay:
    """The jobs of one tree's last fused step, kept for the next (see the module's docstring)."""

    __slots__ = ("plan", "seen", "kept", "table")

    def __init__(self, plan: Plan, seen: check.Seen, jobs: Sequence[Job], table: Table | None) -> None:
        self.plan = plan
        self.seen = seen
        self.kept = [_Kept(job) for job in jobs]
        self.table = table  # the same step as tables, where one can run it (see `.table`)


def remember(plan: Plan, store: StateStore, jobs: Sequence[Job], scratch: Callable[[Any, int], Any]) -> None:
    """After an ordinary fused step over `jobs`: keep them for the next step if the check
    phase has remembered this very tree (it does from the step after it was first asked to
    watch the store), with gradients of the parameters' dtypes."""
    store._fused_replay = None  # type: ignore[attr-defined]
    if not ENABLED:
        return
    check.watch(store)
    seen = check.seen(store)
    if seen is None or len(jobs) != seen.count:
        return
    if not np.array_equal(seen.parameters[:, OBJECT], [id(job.leaf.x) for job in jobs]):
        return  # not (yet) what the check phase accepted of this tree
    if not np.array_equal(seen.gradient_dtypes, seen.parameters[:, DTYPE]):
        return  # gradients the ordinary step would cast first
    from .table import make_table  # numba's, imported with the first fused step on NumPy arrays

    route = plan.linear
    table = None if route is None else make_table(route, seen, jobs, scratch)
    store._fused_replay = Replay(plan, seen, jobs, table)  # type: ignore[attr-defined]


def proof(plan: Plan, store: StateStore, params: Any, grads: Any) -> tuple[Replay, Any] | None:
    """The store's replay and the check phase's proof that this step is the one it kept
    (`check.unchanged_leaves`); else `None`, and the replay is dropped."""
    replay: Replay | None = getattr(store, "_fused_replay", None)
    if replay is None:
        return None
    proved = check.unchanged_leaves(store, params, grads)
    if proved is None or proved[0] is not replay.seen or replay.plan != plan:
        store._fused_replay = None  # type: ignore[attr-defined]
        return None
    return replay, proved


def jobs_of(backend: Any, replay: Replay, proved: Any, store: StateStore) -> list[Job] | None:
    """This step's jobs, rebuilt from `replay` (`proved` by `proof`); `None` if a state was
    changed by hand (and the replay is dropped), having changed nothing."""
    _, parameters, gradients = proved
    jobs = []
    for kept, x, dx in zip(replay.kept, parameters, gradients):
        checked = kept.checked
        if not (checked.holds(kept.route, kept.state) and checked.host_state_ok(x)):
            store._fused_replay = None  # type: ignore[attr-defined]
            return None  # the ordinary step checks it again
        leaf = check.Leaf(kept.path, x, dx, kept.state)
        job = Job(leaf, backend.flat(x), kept.state, False, kept.route, checked)
        job.scratch = kept.scratch
        jobs.append(job)
    read_gradients(backend, jobs)
    return jobs
