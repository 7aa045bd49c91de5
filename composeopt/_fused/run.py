"""The executor: one fused step over checked jobs, stage by stage, in three phases.

1. Decide: the step counters are advanced; if some route has a decisive
   reduction (a finite flag that skips the step, a norm that must be
   finite), the rounds up to the last such reduction are run: their stages
   keep no state (else the step is declined), so an error here leaves
   nothing changed but the counters, which are put back.
2. Prepare: every kernel's scalars are computed (an error puts the counters
   back), and the counters of skipped jobs are put back.
3. Run: round `r` runs the stage `r` of every job that has a reduction after
   it (into scratch, measuring as it goes), finishes those reductions (the
   jobs of a tree-scope reduction together), then runs the last stage of the
   jobs whose route ends here (writing `x`, or handing the update to a
   whole-rule kernel).  Nothing here raises but the array library itself.

Jobs running the same kernels in the same round go to the backend in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..store import StateStore
from .jobs import Job
from .plan import Boundary, Entry, stateless

__all__ = ["run_step", "Declined"]


class Declined(Exception):
    """The jobs cannot take the fast path together (raised before anything changed)."""


def run_step(backend: Any, store: StateStore, jobs: list[Job], scratch: Any) -> list[Any]:
    """Take the step; returns the reductions' commits, to call once it has all been taken."""
    decided = _decided_rounds(jobs)
    commits: list[Any] = []
    scalars = _Scalars(backend)
    _advance_counters(jobs, 1)  # first, as each apply_ does: a reduction may read them
    try:
        for number in range(decided + 1):
            at = [job for job in jobs if not job.skipped and len(job.route.boundaries) > number]
            _measure_and_finish(backend, at, number, scalars, scratch, commits)
        going = [job for job in jobs if not job.skipped]
        for job in going:
            for position, entry in enumerate(job.route.entries):
                scalars.named(entry, job, position)
    except BaseException:
        _advance_counters(jobs, -1)
        raise
    _advance_counters([job for job in jobs if job.skipped], -1)
    pending = going
    number = 0
    while pending:
        ahead = [job for job in pending if len(job.route.boundaries) > number]
        if number > decided:
            _measure_and_finish(backend, ahead, number, scalars, scratch, commits)
        ending = [job for job in pending if len(job.route.boundaries) == number]
        _run_last(backend, ending, number, scalars, scratch)
        pending = [job for job in ahead if not job.skipped]
        number += 1
    return commits


def _decided_rounds(jobs: Sequence[Job]) -> int:
    """The last round whose reductions decide (raise or skip), or -1: those rounds run
    before anything is written, so every stage they run must keep no state."""
    decided = max((job.route.last_decisive for job in jobs), default=-1)
    if decided >= 0:
        for job in jobs:
            if not all(
                stateless(stage) for stage in job.route.stages[: min(len(job.route.boundaries), decided + 1)]
            ):
                raise Declined
    return decided


def _advance_counters(jobs: Sequence[Job], by: int) -> None:
    for job in jobs:
        for entry, rule_state in zip(job.route.entries, job.entry_states):
            counter = entry.kernel.counter
            if counter is not None:
                setattr(rule_state, counter, getattr(rule_state, counter) + by)


class _Scalars:
    """Each kernel's scalars this step, computed once per (kernel's rule, dtype, counter)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.values: dict[Any, dict[str, float]] = {}
        self.vectors: dict[Any, Any] = {}

    def named(self, entry: Entry, job: Job, position: int) -> tuple[Any, dict[str, float]]:
        rule_state = job.entry_states[position]
        counter = entry.kernel.counter
        key = (id(entry), job.x.dtype, None if counter is None else getattr(rule_state, counter))
        values = self.values.get(key)
        if values is None:
            values = self.values[key] = dict(entry.kernel.scalars(entry.rule, rule_state, job.x.dtype))
        return key, values

    def vector(self, job: Job, number: int) -> Any:
        """The scalars of stage `number`'s kernels for this job, as the backend takes them."""
        first = job.route.starts[number][0]
        entries = job.route.stages[number].entries
        states = job.entry_states
        extra = job.extra.get(number)
        memo = (job.x.dtype, number, *self._counted(entries, states, first))
        if extra is None:
            vector = self.vectors.get(memo)
            if vector is not None:
                return vector
        values: list[float] = []
        for offset, entry in enumerate(entries):
            _, named = self.named(entry, job, first + offset)
            if offset == 0 and extra is not None:
                named = {**named, **extra}
            values.extend(float(named[name]) for name in entry.kernel.scalar_names)
        vector = self.backend.vector(values, None, job.x.dtype)
        if extra is None:
            self.vectors[memo] = vector
        return vector

    @staticmethod
    def _counted(entries: Sequence[Entry], states: Sequence[Any], first: int) -> list[Any]:
        """What a stage's scalars depend on besides the dtype: each entry, and its step count."""
        found: list[Any] = []
        for offset, entry in enumerate(entries):
            counter = entry.kernel.counter
            found.append(id(entry))
            found.append(None if counter is None else getattr(states[first + offset], counter))
        return found


def _arrays(job: Job, number: int) -> list[Any]:
    _, first, last = job.route.starts[number]
    return job.arrays[first:last]


def _output(job: Job, scratch: Any) -> Any:
    """A scratch buffer for the stage's output that is not the stage's input."""
    for buffer_number in (0, 1):
        if len(job.scratch) <= buffer_number:
            job.scratch.append(scratch(job.leaf.x, buffer_number))
        if job.scratch[buffer_number] is not job.source:
            return job.scratch[buffer_number]
    raise AssertionError("unreachable")


def _by_kernels(jobs: Sequence[Job], number: int) -> dict[Any, list[Job]]:
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.route.stages[number].key, []).append(job)
    return groups


def _measure_and_finish(
    backend: Any, jobs: Sequence[Job], number: int, scalars: _Scalars, scratch: Any, commits: list[Any]
) -> None:
    """Run stage `number` of `jobs` into scratch (or nothing, if it is empty), measure what
    reaches each job's reduction `number`, and finish the reductions."""
    values: dict[int, list[float]] = {}
    by_measures: dict[Any, list[Job]] = {}
    for job in jobs:
        boundary = job.route.boundaries[number]
        by_measures.setdefault(
            (job.route.stages[number].key, boundary.reduce.measures(boundary.rule)), []
        ).append(job)
    for (_, measures), group in by_measures.items():
        kernels = tuple(entry.kernel for entry in group[0].route.stages[number].entries)
        if kernels:
            work = []
            for job in group:
                out = _output(job, scratch)
                work.append((job.source, job.x, out, scalars.vector(job, number), *_arrays(job, number)))
                job.source = out
            measured = backend.run_stage(kernels, False, False, work, measures)
        else:
            measured = _measure(backend, group, measures)
        for job, part in zip(group, measured):
            values[id(job)] = part
    _finish(jobs, number, values, commits)


def _measure(backend: Any, jobs: Sequence[Job], measures: tuple[Any, ...]) -> list[list[float]]:
    columns = []
    for measure in measures:
        arrays = [job.source if measure.of == "d" else job.x for job in jobs]
        columns.append(backend.measure(arrays, measure.p))
    return [list(row) for row in zip(*columns)] if columns else [[] for _ in jobs]


def _finish(jobs: Sequence[Job], number: int, values: dict[int, list[float]], commits: list[Any]) -> None:
    """Each reduction's finish, over the jobs that meet there, in the order of the tree."""
    meetings: dict[Any, list[Job]] = {}
    for job in jobs:
        boundary: Boundary = job.route.boundaries[number]
        key = (id(boundary.rule), boundary.path) if boundary.reduce.scope == "tree" else id(job)
        meetings.setdefault(key, []).append(job)
    for members in meetings.values():
        boundary = members[0].route.boundaries[number]
        if boundary.reduce.exchange is not None:
            exchanged = boundary.reduce.exchange(
                boundary.rule,
                [job.source for job in members],
                [job.x.dtype for job in members],
                [str(job.leaf.path) for job in members],
            )
            for job, source in zip(members, exchanged):
                job.source = source
        outcome = boundary.reduce.finish(
            boundary.rule,
            [job.boundary_states[number] for job in members],
            [values[id(job)] for job in members],
            [job.x.dtype for job in members],
            [str(job.leaf.path) for job in members],
        )
        if outcome.commit is not None:
            commits.append(outcome.commit)
        if outcome.scalars is None:
            for job in members:
                job.skipped = True
        else:
            for job, named in zip(members, outcome.scalars):
                if named:
                    job.extra[number + 1] = named


def _run_last(backend: Any, jobs: Sequence[Job], number: int, scalars: _Scalars, scratch: Any) -> None:
    """The last stage of each job: it writes `x`, or gives a whole-rule kernel its update."""
    wholes: dict[Any, list[Job]] = {}
    for _, group in _by_kernels(jobs, number).items():
        kernels = tuple(entry.kernel for entry in group[0].route.stages[number].entries)
        to_whole = [job for job in group if job.route.whole is not None]
        to_x = [job for job in group if job.route.whole is None]
        if to_x:
            work = [
                (job.source, job.x, job.x, scalars.vector(job, number), *_arrays(job, number)) for job in to_x
            ]
            backend.run_stage(kernels, False, True, work, ())
        if to_whole and kernels:
            work = []
            for job in to_whole:
                out = _output(job, scratch)
                work.append((job.source, job.x, out, scalars.vector(job, number), *_arrays(job, number)))
                job.source = out
            backend.run_stage(kernels, False, False, work, ())
        for job in to_whole:
            whole = job.route.whole
            assert whole is not None
            wholes.setdefault((id(whole.rule), whole.path), []).append(job)
    for members in wholes.values():
        whole = members[0].route.whole
        assert whole is not None
        whole.kernel.run_(
            whole.rule,
            [job.whole_state for job in members],
            [job.leaf.x for job in members],
            [job.source.reshape(job.leaf.x.shape) for job in members],
        )
