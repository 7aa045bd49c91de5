"""Fused in-place steps: a chain of elementwise rules as one pass over memory.

The engine's `update_` asks `plan` whether every rule
of the optimiser has a fast path (a `.kernel.Kernel`, or a
`.kernel.NormClip` between stages) and none can fail; if so it leaves
the gradients uncopied and hands the step to `step_`, which checks the
arrays and states, runs `begin_step`, and then computes every rule's update
and writes `x` and the states in one pass per stage.  Anything it does not
know (a user rule, a subclass that changes a rule's behaviour, float16, a
non-contiguous array, a state that is not what `init` makes) takes the
generic path instead, on the same states: the two paths can alternate.
Before all that, `batched_step_` looks for a tree that the last numba steps
have seen already, and updates it in one call (`.batch`).

The backend follows the arrays: numba on NumPy arrays (or, without numba, a
cache-blocked NumPy `out=` path), CuPy `ElementwiseKernel` s on CuPy arrays.
`COMPOSEOPT_FUSED` (or `MODE`) chooses: `auto` (the default),
`numpy` (force the NumPy path on the CPU) or `off` (always generic).
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .._dispatch import copy as copy_array
from .._dispatch import namespace
from .._memory import Extents, extent, owns_memory
from ..check import MISSING
from ..errors import ComposeoptError
from ..rule import Rule, keep_hyperparameters, start_step
from ..store import StateStore
from . import batch
from .kernel import Kernel, NormClip
from .plan import Entry, Plan, make_plan

__all__ = ["MODE", "Kernel", "NormClip", "plan", "step_", "batched_step_", "backend_name"]

MODE = os.environ.get("COMPOSEOPT_FUSED", "auto")
"""`auto`: numba on the CPU when importable, else blocked NumPy; `numpy`: blocked NumPy
on the CPU; `off`: the generic path everywhere.  Read at every step."""


def plan(opt: Rule) -> Plan | None:
    """The fused plan of `opt` if every rule in it has a fast path and none is fallible."""
    if MODE == "off":
        return None
    return make_plan(opt)


class Backend(Protocol):
    """What a backend does; the step's logic (stages, clipping, state) is shared."""

    name: str

    def accepts(self, x: Any) -> bool: ...
    def flat(self, a: Any) -> Any: ...
    def gradient(self, x: Any, dx: Any) -> Any: ...
    def state_array(self, a: Any, x: Any) -> Any: ...
    def scratch(self, x: Any) -> Any: ...
    def vector(self, values: list[float], scale: Any, dtype: Any) -> Any: ...
    def run_stage(self, kernels: tuple[Kernel, ...], scaled: bool, to_x: bool, jobs: list[Any]) -> None: ...
    def clip_scales(self, sources: Sequence[Any], omega: float, p: float, joint: bool) -> list[Any]: ...


def _numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


_backends: dict[str, Backend] = {}


def _backend(x: Any) -> Backend | None:
    if type(x) is np.ndarray:
        key = "numba" if MODE != "numpy" and _numba_available() else "numpy"
    elif type(x).__module__.startswith("cupy"):
        key = "cupy"
    else:
        return None
    if key not in _backends:
        if key == "numba":
            from .host import NumbaBackend

            _backends[key] = NumbaBackend()
        elif key == "numpy":
            from .host import NumpyBackend

            _backends[key] = NumpyBackend()
        else:
            from .cupy_backend import CupyBackend

            _backends[key] = CupyBackend()
    return _backends[key]


def backend_name(x: Any) -> str | None:
    """The backend a fused step on `x` uses now (`numba`, `numpy`, `cupy`), or `None`."""
    backend = _backend(x) if MODE != "off" else None
    return None if backend is None else backend.name


class _Job:
    """One parameter in a fused step."""

    __slots__ = (
        "leaf",
        "x",
        "state",
        "new",
        "rule_states",
        "arrays",
        "source",
        "scale",
        "scratch",
        "checked",
    )

    def __init__(self, leaf: Any, x: Any, state: Any, rule_states: list[Any], arrays: list[Any]) -> None:
        self.leaf = leaf
        self.x = x  # 1-d view
        self.state = state  # the whole state, as the store keeps it
        self.new = False  # made by init this step, so not in the store yet
        self.rule_states = rule_states  # per entry of the plan: that rule's state
        self.arrays = arrays  # every entry's state arrays in plan order, 1-d views
        self.source: Any = None  # the update as it flows: the gradient, then the scratch buffer
        self.scale: Any = None  # a pending factor from a clip, applied by the next stage
        self.scratch: Any = None
        self.checked: Any = None  # what `_check` found of its state arrays


_scratch: weakref.WeakKeyDictionary[StateStore, StateStore] = weakref.WeakKeyDictionary()


def step_(fused: Plan, opt: Rule, store: StateStore, leaves: Sequence[Any]) -> bool:
    """Take the in-place step of `opt` over `leaves` (the engine's checked leaves, whose
    gradients were not copied) and return `True`, or return `False` having changed
    nothing but copying each leaf's gradient, as the generic path expects."""
    backend = _backend(leaves[0].x) if leaves else None
    if backend is None:
        return _decline(leaves)
    jobs = _jobs(backend, opt, fused, store, leaves)
    if jobs is None:
        return _decline(leaves)
    restore = keep_hyperparameters(opt)
    step = store.step + 1
    try:
        start_step(opt, step)  # schedules and decays change hyperparameters here
        if make_plan(opt) != fused:  # begin_step changed which kernels apply: let the generic path do it
            restore()
            return _decline(leaves)
        with np.errstate(all="ignore"):
            _run(backend, fused, store, jobs)
    except BaseException:
        restore()
        raise
    store.step = step
    for job in jobs:
        if job.new:  # the others were updated in place
            store.set(job.leaf.x, job.state)
    if backend.name == "numba":
        batch.remember(fused, store, jobs)
    return True


def batched_step_(fused: Plan, opt: Rule, store: StateStore, params: Any, grads: Any) -> bool:
    """Take the step in one call over every array if the store remembers this tree (see
    `.batch`) and return `True`; else return `False`, having changed nothing."""
    if MODE == "off" or MODE == "numpy":
        return False
    return batch.step_(fused, opt, store, params, grads)


def _decline(leaves: Sequence[Any]) -> bool:
    for leaf in leaves:
        leaf.dx = copy_array(namespace(leaf.dx), leaf.dx)
    return False


class _Checked:
    """What `_jobs` found fit for one parameter, kept to skip the checks while nothing changed."""

    __slots__ = ("layout", "state", "rule_states", "originals", "arrays", "extents")

    # Nothing here refers to the parameter itself (a view of it would): the entry is keyed
    # weakly by the parameter and must not keep it alive.
    def __init__(self, layout: Any, state: Any, rule_states: list[Any], originals: list[Any]) -> None:
        self.layout = layout  # the plan's (path, state names, counter) per entry
        self.state = state
        self.rule_states = rule_states
        self.originals = originals  # the state arrays themselves, to see whether one was replaced
        self.arrays: list[Any] = []  # their 1-d views
        self.extents = [extent(a) for a in originals]  # their memory, which a gradient must not share

    def holds(self, layout: Any, state: Any) -> bool:
        if layout != self.layout or state is not self.state:
            return False
        originals = iter(self.originals)
        for (_, names, counter), rule_state in zip(layout, self.rule_states):
            for name in names:
                if getattr(rule_state, name, None) is not next(originals):
                    return False
            if counter is not None and type(getattr(rule_state, counter, None)) is not int:
                return False
        return True


_checked: weakref.WeakKeyDictionary[StateStore, StateStore] = weakref.WeakKeyDictionary()


def _jobs(
    backend: Backend, opt: Rule, fused: Plan, store: StateStore, leaves: Sequence[Any]
) -> list[_Job] | None:
    """Check every array and state, making missing states; `None` if any is not fit."""
    layout = tuple((entry.path, entry.kernel.state, entry.kernel.counter) for entry in fused.entries)
    known = _checked.get(store)
    if known is None:
        known = _checked[store] = StateStore()
    jobs = []
    for leaf in leaves:
        x = leaf.x
        if not backend.accepts(x):
            return None
        state = leaf.state
        new = state is MISSING
        if new:
            try:
                state = opt.init(x)
            except ComposeoptError as err:
                raise type(err)(f"{leaf.path}: {err}") from err
        checked = None if new else known.get(x)
        if checked is None or not checked.holds(layout, state):
            checked = _check(backend, layout, state, x)
            if checked is None:
                return None
            known.set(x, checked)
        job = _Job(leaf, backend.flat(x), state, checked.rule_states, checked.arrays)
        job.new = new
        job.checked = checked
        jobs.append(job)
    _read_gradients(backend, jobs)
    return jobs


def _read_gradients(backend: Backend, jobs: list[_Job]) -> None:
    """Each job's gradient as the kernels read it.

    A gradient that is (a view of) an array this step writes, another parameter say, would be
    read after that array changed: the kernels read a copy of it instead, as the generic path
    does.  A gradient that owns its memory and is none of those arrays cannot be one of them.
    """
    written = {id(job.leaf.x) for job in jobs}
    for job in jobs:
        written.update(map(id, job.checked.originals))
    table: Extents | None = None
    for job in jobs:
        dx = job.leaf.dx
        if not (owns_memory(dx) and id(dx) not in written):
            if table is None:
                table = Extents(
                    [extent(j.leaf.x) for j in jobs] + [e for j in jobs for e in j.checked.extents]
                )
            if table.meets(dx):
                dx = copy_array(namespace(dx), dx)
        job.source = backend.gradient(job.leaf.x, dx)


def _check(backend: Backend, layout: Any, state: Any, x: Any) -> _Checked | None:
    """The state of one parameter, checked against the plan; `None` if it is not fit."""
    rule_states = []
    originals = []
    views = []
    for path, names, counter in layout:
        rule_state = state
        try:
            for index in path:
                rule_state = rule_state[index]
        except (TypeError, IndexError, KeyError):
            return None
        for name in names:
            original = getattr(rule_state, name, None)
            view = backend.state_array(original, x)
            if view is None:
                return None
            originals.append(original)
            views.append(view)
        if counter is not None and type(getattr(rule_state, counter, None)) is not int:
            return None
        rule_states.append(rule_state)
    checked = _Checked(layout, state, rule_states, originals)
    checked.arrays = views
    return checked


def _run(backend: Backend, fused: Plan, store: StateStore, jobs: list[_Job]) -> None:
    entries = fused.entries
    _advance_counters(entries, jobs, 1)  # the step counters first, as each apply_ does
    scalars = _Scalars(backend, entries)
    try:  # every scalar before any kernel runs: a rule whose scalars fail leaves nothing changed
        for position in range(len(entries)):
            for job in jobs:
                scalars.values_of(position, job)
    except BaseException:
        _advance_counters(entries, jobs, -1)
        raise
    first = 0  # the plan's position of the stage's first entry
    arrays_first = 0  # and of its first state array
    for number, stage in enumerate(fused.stages):
        last = number == len(fused.stages) - 1
        count = len(stage.entries)
        arrays_count = sum(len(entry.kernel.state) for entry in stage.entries)
        scaled = any(job.scale is not None for job in jobs)
        if last or count or scaled:
            work = []
            for job in jobs:
                if last:
                    out = job.x
                else:
                    if job.scratch is None:
                        job.scratch = _scratch_for(backend, store, job.leaf.x)
                    out = job.scratch
                vector = scalars.vector(job, first, count, job.scale if scaled else None)
                work.append(
                    (job.source, job.x, out, vector, *job.arrays[arrays_first : arrays_first + arrays_count])
                )
            backend.run_stage(tuple(entry.kernel for entry in stage.entries), scaled, last, work)
            for job in jobs:
                job.scale = None
                if not last:
                    job.source = job.scratch
        if not last:
            rule, clip = fused.clips[number]
            sources = [job.source for job in jobs]
            omega, p = rule.omega, rule.p  # type: ignore[attr-defined]
            for job, scale in zip(jobs, backend.clip_scales(sources, omega, p, clip.scope == "tree")):
                job.scale = scale
        first += count
        arrays_first += arrays_count


def _advance_counters(entries: list[Entry], jobs: list[_Job], by: int) -> None:
    for position, entry in enumerate(entries):
        counter = entry.kernel.counter
        if counter is not None:
            for job in jobs:
                rule_state = job.rule_states[position]
                setattr(rule_state, counter, getattr(rule_state, counter) + by)


class _Scalars:
    """Each rule's scalars for this step, computed once per distinct (dtype, counter) of the leaves."""

    def __init__(self, backend: Backend, entries: list[Entry]) -> None:
        self.backend = backend
        self.entries = entries
        self.values: list[dict[Any, list[float]]] = [{} for _ in entries]
        self.vectors: dict[Any, Any] = {}

    def values_of(self, position: int, job: _Job) -> tuple[Any, list[float]]:
        entry = self.entries[position]
        rule_state = job.rule_states[position]
        counter = entry.kernel.counter
        key = (job.x.dtype, None if counter is None else getattr(rule_state, counter))
        values = self.values[position].get(key)
        if values is None:
            named = entry.kernel.scalars(entry.rule, rule_state, job.x.dtype)
            values = self.values[position][key] = [float(named[name]) for name in entry.kernel.scalar_names]
        return key, values

    def vector(self, job: _Job, first: int, count: int, scale: Any) -> Any:
        """The scalars of the stage's rules for this job, as the backend's kernels take them."""
        keys, values = [], []
        for position in range(first, first + count):
            key, part = self.values_of(position, job)
            keys.append(key)
            values.extend(part)
        if scale is not None:
            return self.backend.vector(values, scale, job.x.dtype)
        memo = (job.x.dtype, first, *keys)
        vector = self.vectors.get(memo)
        if vector is None:
            vector = self.vectors[memo] = self.backend.vector(values, None, job.x.dtype)
        return vector


def _scratch_for(backend: Backend, store: StateStore, x: Any) -> Any:
    """A buffer for a stage's output, kept between steps (no allocation after the first)."""
    buffers = _scratch.get(store)
    if buffers is None:
        buffers = _scratch[store] = StateStore()
    buffer = buffers.get(x)
    if buffer is None:
        buffer = backend.scratch(x)
        buffers.set(x, buffer)
    return buffer
