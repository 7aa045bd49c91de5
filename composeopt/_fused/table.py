"""A replayed step of several stages as tables: one compiled call per stage for the whole tree.

A replayed step (see `.replay`) still spends microseconds of Python per array
and stage: its job, its scalars, one backend call, its measures.  When every
parameter of the tree takes the same route (a plan without groups), through
stages of elementwise kernels and reductions (norm clips, the finite flag of
SkipNonFinite, the trust ratios of Lamb, Lars, Novograd and Fromage), over
NumPy arrays of one dtype, the replay also keeps a `Table`: per stage, the
addresses of what each array's stage reads and writes (its input, `x`, its
output, its states) and a row of scalars per array.  A step then

1. checks what `.batch` checks of a batched step: that the check phase has
   just proved this very tree, that every state still holds the arrays and the
   step counts in the table, that the reductions' host-side state is as they
   expect, and that every gradient can be read where it is (C-contiguous,
   aligned, meeting nothing the step writes);
2. runs the executor's three phases (see `.run`) with one call of a generated
   numba function per stage and thread (`numba_backend.table_function`): the
   deciding reduction first (nothing is written before it but scratch and
   the counters, which are put back on any error), then the scalars, then the
   stages in order, each measuring what its reduction needs as it writes, and
   each reduction's `finish` called as on the ordinary path, per array or for
   the whole tree.  A stage before a reduction only measures (in a block in
   cache, `measured_only`) when the stage after it can make its values again
   in front of its own kernels: its kernels again if they keep no state, or
   its last kernel's update from the states it wrote (`tail`).

The stage's loop, the blocks it is measured in and the order in which the parts
of a measure are added are those of the ordinary path, chunk for chunk, so the
two give the same bits.  Anything else (a gradient to be copied first)
declines before anything changed, and the replay's jobs take the step.  The table keeps the states and the
scratch buffers alive (their addresses must stay valid), not the parameters.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import numpy as np

from .. import check
from .._memory import readable_in_place
from ..store import StateStore
from .held import Held, disjoint, fit
from .jobs import Job
from .kernel import Kernel
from .numba_backend import MEASURE_BLOCK, _kind, table_function
from .plan import Route, stateless
from .threads import chunk_shares, run_together

__all__ = ["Table", "make_table"]

TABLE_MIN = 16
"""Trees with fewer arrays keep the replay's per-array calls, whose overhead is then small."""

GRADIENT = -1
"""A stage's input that is the gradient (else the number of a scratch buffer)."""


class _Stage:
    """One stage of the route as the table runs it.

    A stage that only measures (`keep` false: see `measured_only`) writes no output; the
    stage after it makes its values again in front of its own kernels, from the same input
    (`prefix`: all its kernels if they keep no state, else the `tail` of its last).
    Per kernel run, `positions` is its entry's position in the route, `readers` gives the
    kernels that read a reduction's scalars (the kernel's index, and the number of the
    stage the scalars are given to), and `arrays` are the indices of the state arrays the
    kernels read, in a job's `arrays`."""

    def __init__(
        self,
        route: Route,
        number: int,
        source: int,
        output: int | None,
        keep: bool = True,
        prefix: _Stage | None = None,
    ) -> None:
        stage = route.stages[number]
        own = tuple(entry.kernel for entry in stage.entries)
        first_entry, first_array, last_array = route.starts[number]
        self.number = number
        self.kernels: tuple[Any, ...] = own
        self.positions = list(range(first_entry, first_entry + len(own)))
        self.readers: list[tuple[int, int]] = [(0, number)]
        self.arrays = list(range(first_array, last_array))
        if prefix is not None:
            made = prefix.remade()
            self.kernels = made.kernels + own
            self.positions = made.positions + self.positions
            self.readers = [*made.readers, (len(made.kernels), number)]
            self.arrays = made.arrays + self.arrays
        self.source = source  # GRADIENT, or a scratch buffer's number
        self.output = output  # a scratch buffer's number; None: it writes x (the last stage) or nothing
        self.keep = keep
        self.stateless = stateless(stage)
        self.boundary = route.boundaries[number] if number < len(route.boundaries) else None

    def remade(self) -> _Remade:
        """What the next stage runs to make this stage's values again."""
        if self.stateless:  # its kernels write nothing: all of them again
            return _Remade(self.kernels, self.positions, self.readers, self.arrays)
        last = len(self.kernels) - 1
        made = tail(self.kernels[last])
        assert made is not None
        arrays = self.arrays[len(self.arrays) - len(made.state) :]
        readers = [(0, number) for index, number in self.readers if index == last]
        return _Remade((made,), [self.positions[last]], readers, arrays)


class _Remade(NamedTuple):
    kernels: tuple[Any, ...]
    positions: list[int]
    readers: list[tuple[int, int]]
    arrays: list[int]


@cache
def tail(kernel: Kernel) -> Kernel | None:
    """The kernel's update made from its states as it left them, if its `return` reads
    nothing else but `x` and scalars: the same math, reading the states and assigning
    none, so it gives the update's bits again without the gradient."""
    result = kernel.body[-1]
    assert isinstance(result, ast.Return) and result.value is not None
    read = {node.id for node in ast.walk(result.value) if isinstance(node, ast.Name)}
    calls = {
        node.func.id
        for node in ast.walk(result.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    if not (read - calls) <= {*kernel.state, *kernel.scalar_names, "x"}:
        return None  # the gradient, or a local
    made = object.__new__(Kernel)  # the parsed math as it is: no parser runs again
    fields = {
        "math": f"return {ast.unparse(result.value)}",
        "scalars": kernel.scalars,
        "state": kernel.state,
        "counter": None,
        "body": (result,),
        "scalar_names": kernel.scalar_names,
        "reads_x": "x" in read,
    }
    for name, value in fields.items():
        object.__setattr__(made, name, value)
    return made


def measured_only(route: Route) -> list[bool]:
    """Per stage, whether it only measures: a stage of kernels with a reduction after it,
    followed by a stage of kernels, whose values the next stage can make again (they keep
    no state, or the last one's update is its `tail`).  That costs less than writing them
    out and reading them back."""
    stages = route.stages
    return [
        number < len(stages) - 1
        and bool(stage.entries)
        and bool(stages[number + 1].entries)
        and (stateless(stage) or tail(stage.entries[-1].kernel) is not None)
        for number, stage in enumerate(stages)
    ]


class Table:
    """What a staged step over one tree needs, as tables (see the module's docstring)."""

    def __init__(self, route: Route, seen: check.Seen, jobs: Sequence[Job], buffers: list[list[Any]]) -> None:
        xs = [job.leaf.x for job in jobs]
        self.route = route
        self.seen = seen
        self.count = len(jobs)
        self.dtype = xs[0].dtype
        self.dtypes = [self.dtype] * self.count
        self.paths = [str(job.leaf.path) for job in jobs]
        self.buffers = buffers  # [buffer number][array]: kept alive, for their addresses
        self.entry_states = [[job.entry_states[p] for job in jobs] for p in range(len(route.entries))]
        self.boundary_states = [
            [job.boundary_states[b] for job in jobs] for b in range(len(route.boundaries))
        ]
        self.held = Held(route.entries, self.entry_states)
        held = [job.arrays for job in jobs]  # every entry's state arrays, 1-d, in route order
        self.nbytes = np.array([x.nbytes for x in xs], dtype=np.int64)
        written = [x.ctypes.data for x in xs] + [a.ctypes.data for arrays in held for a in arrays]
        lengths = list(self.nbytes) + [a.nbytes for arrays in held for a in arrays]
        order = np.argsort(written)
        self.written_starts = np.array(written, dtype=np.int64)[order]
        self.written_ends = self.written_starts + np.array(lengths, dtype=np.int64)[order]
        self.chunks = [
            np.array(share, dtype=np.int64).reshape(-1, 3) for share in chunk_shares([x.size for x in xs])
        ]
        self.chunk_arrays = np.concatenate([chunks[:, 0] for chunks in self.chunks])
        self.blocks = [np.empty(MEASURE_BLOCK, dtype=self.dtype) for _ in self.chunks]  # per thread
        self.stages: list[_Stage] = []
        self.addresses: list[Any] = []
        source = GRADIENT
        prefix: _Stage | None = None
        for number, (stage, only) in enumerate(zip(route.stages, measured_only(route))):
            last = number == len(route.stages) - 1
            output = None if last or only else (source + 1) % 2 if stage.entries else None
            plan = _Stage(route, number, source, output, not only, prefix)
            prefix = plan if only else None
            self.stages.append(plan)
            columns = [
                np.zeros(self.count, np.int64) if source == GRADIENT else _addresses(buffers[source]),
                _addresses(xs),
                _addresses(xs) if output is None else _addresses(buffers[output]),
                *(np.array([arrays[a].ctypes.data for arrays in held], dtype=np.int64) for a in plan.arrays),
            ]
            self.addresses.append(np.ascontiguousarray(np.stack(columns, axis=1)))
            if output is not None:
                source = output

    def take(self, seen: check.Seen, xs: Sequence[Any]) -> bool:
        """Whether this step is the one the table describes (`seen` is what the check phase
        has just proved of it, with parameters `xs`), with gradients that the kernels may read where they are;
        if so, their addresses are written into the table."""
        if seen is not self.seen:
            return False
        if not self.held.unchanged():  # a state array or a count replaced by hand
            return False
        for boundary, states in zip(self.route.boundaries, self.boundary_states):
            if not all(map(boundary.reduce.state_ok, states, xs)):
                return False
        if not readable_in_place(
            seen.gradients[0], self.nbytes, seen.gradients[1], self.written_starts, self.written_ends
        ):
            return False
        for stage, addresses in zip(self.stages, self.addresses):
            if stage.source == GRADIENT:
                addresses[:, 0] = seen.gradients[0]
        return True


def _addresses(arrays: Sequence[Any]) -> Any:
    return np.array([a.ctypes.data for a in arrays], dtype=np.int64)


def make_table(
    route: Route, seen: check.Seen, jobs: Sequence[Job], scratch: Callable[[Any, int], Any]
) -> Table | None:
    """The table of a replayed tree, if the table can run it (see the module's docstring)."""
    if len(jobs) < TABLE_MIN or route.whole is not None:
        return None
    if any(job.route is not route for job in jobs):
        return None
    if any(boundary.reduce.exchange is not None for boundary in route.boundaries):
        return None
    dtype = jobs[0].x.dtype
    if any(job.x.dtype != dtype for job in jobs):
        return None
    if not fit(route.entries, [[job.entry_states[p] for job in jobs] for p in range(len(route.entries))]):
        return None
    written = [array for job in jobs for array in (job.x, *job.arrays)]
    if not all(array.flags.aligned for array in written):
        return None
    if not disjoint(written):
        return None  # arrays that share memory: threads would race on it
    needed = sum(
        1 for stage, only in zip(route.stages[:-1], measured_only(route)) if stage.entries and not only
    )
    buffers = [[scratch(job.leaf.x, number) for job in jobs] for number in range(min(needed, 2))]
    return Table(route, seen, jobs, buffers)


def run_table(table: Table, store: StateStore) -> list[Any] | None:
    """The step over the table (its gradients taken by `take`): the reductions' commits, to
    call once it has all been taken; `None` if it declined, having changed nothing."""
    route = table.route
    decided = route.last_decisive
    if decided >= 0 and not all(stateless(stage) for stage in route.stages[: decided + 1]):
        return None
    scalars = _Scalars(table)
    commits: list[Any] = []
    extra: dict[int, Any] = {}  # stage number -> per array, the scalars a reduction gave
    table.held.advance(1)
    try:
        for number in range(decided + 1):
            if _measure_and_finish(table, table.stages[number], scalars, extra, commits):
                table.held.advance(-1)
                return commits  # every array skipped: nothing more changes
        for stage in table.stages:
            scalars.row(stage)
    except BaseException:
        table.held.advance(-1)
        raise
    for stage in table.stages[decided + 1 :]:
        if stage.boundary is None:
            _run(table, stage, scalars.rows(stage, extra), ())
        else:
            skipped = _measure_and_finish(table, stage, scalars, extra, commits)
            assert not skipped, "only a deciding reduction skips"
    return commits


class _Scalars:
    """Each stage's scalars this step: one row for every array (their counts are equal)."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.base: dict[int, Any] = {}

    def row(self, stage: _Stage) -> Any:
        row = self.base.get(stage.number)
        if row is None:
            table = self.table
            values: list[float] = []
            readers = {reader for reader, _ in stage.readers}
            for offset, (kernel, position) in enumerate(zip(stage.kernels, stage.positions)):
                entry = table.route.entries[position]
                named = kernel.scalars(entry.rule, table.entry_states[position][0], table.dtype)
                if offset in readers:  # a reduction before it may give some of them (`rows`)
                    values.extend(float(named.get(name, math.nan)) for name in kernel.scalar_names)
                else:
                    values.extend(float(named[name]) for name in kernel.scalar_names)
            row = self.base[stage.number] = np.array(values, dtype=table.dtype)
        return row

    def rows(self, stage: _Stage, extras: dict[int, Any]) -> Any:
        """Per array, the stage's scalars, those of its readers as the reductions gave them
        (`extras[stage number]`: per array, a reduction's scalars for that stage)."""
        row = self.row(stage)
        rows = np.empty((self.table.count, max(1, row.size)), dtype=self.table.dtype)
        rows[:, : row.size] = row
        for reader, number in stage.readers:
            extra = extras.get(number)
            if extra is None or reader >= len(stage.kernels):
                continue
            names = stage.kernels[reader].scalar_names
            start = sum(len(kernel.scalar_names) for kernel in stage.kernels[:reader])
            given = {name for named in extra for name in named}
            for name in given & set(names):
                column = start + names.index(name)
                rows[:, column] = [float(named[name]) if name in named else row[column] for named in extra]
        return rows


def _run(table: Table, stage: _Stage, rows: Any, measures: Sequence[Any]) -> Any:
    """The stage over every array, one call per thread; per chunk, its measures."""
    pairs = [_kind(measure.p) for measure in measures]
    kinds = tuple((measure.of, kind) for measure, (kind, _) in zip(measures, pairs))
    ps = np.array([power for _, power in pairs], dtype=np.float64)
    function = table_function(stage.kernels, stage.boundary is None, kinds, stage.keep)
    addresses = table.addresses[stage.number]
    accumulators = [
        np.zeros((len(chunks), max(1, len(measures))), dtype=np.float64) for chunks in table.chunks
    ]
    run_together(
        [
            partial(function, chunks, rows, addresses, acc, ps, block)
            for chunks, acc, block in zip(table.chunks, accumulators, table.blocks)
        ]
    )
    return np.concatenate(accumulators)


def _measure_and_finish(
    table: Table, stage: _Stage, scalars: _Scalars, extra: dict[int, Any], commits: list[Any]
) -> bool:
    """Run the stage into scratch, measuring; then its reduction's finish, once for every
    array (per array or for the whole tree, as its scope says).  Returns whether the
    reduction skipped the step (only a tree-wide one does, for every array at once)."""
    boundary = stage.boundary
    assert boundary is not None
    measures = boundary.reduce.measures(boundary.rule)
    parts = _run(table, stage, scalars.rows(stage, extra), measures)
    values = np.zeros((table.count, parts.shape[1]), dtype=np.float64)
    for m, measure in enumerate(measures):
        if measure.p == float("inf"):
            np.maximum.at(values[:, m], table.chunk_arrays, parts[:, m])
        else:
            np.add.at(values[:, m], table.chunk_arrays, parts[:, m])
    measured = values[:, : len(measures)].tolist()
    states = table.boundary_states[stage.number]
    outcome = boundary.reduce.finish(boundary.rule, states, measured, table.dtypes, table.paths)
    if outcome.commit is not None:
        commits.append(outcome.commit)
    if outcome.scalars is None:
        assert boundary.reduce.scope == "tree", "only a tree-wide reduction skips"
        return True
    if any(outcome.scalars):
        extra[stage.number + 1] = list(outcome.scalars)
    return False
