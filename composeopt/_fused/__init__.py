"""The fast path's entry points: the plan of an optimiser, and a step taken by it.

Who owns what:

* `plan.py`, the planner: rules to a plan of stages (kernels fused across
  rules, reductions between stages, a branch per parameter group);
* `jobs.py`: each checked leaf's route through the plan and its state, checked
  once and remembered while nothing is replaced;
* `run.py`, the executor: decide, prepare, run the stages, in that order;
* the backends, one module each: `numba_backend.py` (through `host.py`),
  `numpy_backend.py` (blocked NumPy, without a compiler), `cupy_backend.py`;
  the generic `xp` path is the engine's own (`composeopt.engine`);
* `batch.py`: a tree that comes back unchanged, in one call;
* `replay.py`: a tree that comes back unchanged, on the jobs of its last step.

The engine's `update_` asks `plan` for the optimiser's plan; with one, it
leaves the gradients uncopied and hands the checked leaves to `step_`.
Anything the fast path does not know (a rule without a fast path, a
subclass that changes a rule's behaviour, float16, a non-contiguous array, a
state that is not what `init` makes) takes the generic path instead, on the
same states: the two paths can alternate.

The backend follows the arrays: numba on NumPy arrays (or, without numba, the
blocked NumPy path), CuPy kernels on CuPy arrays.  `COMPOSEOPT_FUSED` (or
`MODE`) chooses: `auto` (the default), `numpy` (force the NumPy path on the
CPU) or `off` (always generic).
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import numpy as np

from .._dispatch import copy as copy_array
from .._dispatch import namespace
from ..rule import Rule, keep_hyperparameters, start_step
from ..store import StateStore
from . import batch, replay
from .jobs import make_jobs
from .kernel import Kernel
from .plan import Plan, make_plan
from .reduce import FINITE, Measure, Outcome, Reduce, Staged, Wrapping
from .run import Declined, run_step

__all__ = [
    "MODE",
    "Kernel",
    "Reduce",
    "Staged",
    "Wrapping",
    "Measure",
    "Outcome",
    "FINITE",
    "plan",
    "step_",
    "batched_step_",
    "backend_name",
]

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
    def run_stage(
        self,
        kernels: tuple[Kernel, ...],
        scaled: bool,
        to_x: bool,
        jobs: list[Any],
        measures: Sequence[Measure] = (),
    ) -> list[list[float]]: ...
    def measure(self, arrays: Sequence[Any], p: float | str) -> list[float]: ...


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


_scratch: weakref.WeakKeyDictionary[StateStore, list[StateStore]] = weakref.WeakKeyDictionary()


def step_(fused: Plan, opt: Rule, store: StateStore, leaves: Sequence[Any]) -> bool:
    """Take the in-place step of `opt` over `leaves` (the engine's checked leaves, whose
    gradients were not copied) and return `True`, or return `False` having changed
    nothing but copying each leaf's gradient, as the generic path expects."""
    backend = _backend(leaves[0].x) if leaves else None
    if backend is None:
        return _decline(leaves)
    fused = _known_plan(fused, store)
    restore = keep_hyperparameters(opt)
    try:
        jobs = make_jobs(backend, opt, fused, store, leaves)
    except BaseException:
        restore()
        raise
    if jobs is None or not _run(fused, opt, store, restore, partial(_run_jobs, backend, store, jobs)):
        return _decline(leaves)
    for job in jobs:
        if job.new:  # the others were updated in place
            store.set(job.leaf.x, job.state)
    if backend.name == "numba":
        if len(fused.stages) == 1:
            batch.remember(fused, store, jobs)
        else:
            replay.remember(fused, store, jobs, partial(_scratch_for, backend, store))
    return True


def _known_plan(fused: Plan, store: StateStore) -> Plan:
    # The last plan rides on the store (it refers to the rules, and so to the optimiser that
    # owns the store: a cycle, which the garbage collector takes with the optimiser).
    last: Plan | None = getattr(store, "_fused_plan", None)
    if last is not None and last == fused:
        return last  # its routes, and what was checked against them, are known
    store._fused_plan = fused  # type: ignore[attr-defined]
    return fused


def _run(fused: Plan, opt: Rule, store: StateStore, restore: Any, steps: Any) -> bool:
    """The step, by `steps()` (its commits, or `None` if it declined before anything
    changed); `False` if it declined."""
    step = store.step + 1
    try:
        start_step(opt, step)  # schedules and decays change hyperparameters here
        if make_plan(opt) != fused:  # begin_step changed which kernels apply: let the generic path do it
            restore()
            return False
        with np.errstate(all="ignore"):
            commits = steps()
    except BaseException:
        restore()
        raise
    if commits is None:
        restore()
        return False
    for commit in commits:
        commit()
    store.step = step
    return True


def _run_jobs(backend: Backend, store: StateStore, jobs: list[Any]) -> list[Any] | None:
    try:
        return run_step(backend, store, jobs, partial(_scratch_for, backend, store))
    except Declined:
        return None


def batched_step_(fused: Plan, opt: Rule, store: StateStore, params: Any, grads: Any) -> bool:
    """Take the step in one call over every array if the store remembers this tree (see
    `.batch`), or from the jobs of its last step (see `.replay`, `.table`), and return
    `True`; else return `False`, having changed nothing."""
    if MODE == "off" or MODE == "numpy":
        return False
    if len(fused.stages) == 1:
        return batch.step_(fused, opt, store, params, grads)
    backend = _backends.get("numba")
    if backend is None:
        return False
    fused = _known_plan(fused, store)
    proved = replay.proof(fused, store, params, grads)
    if proved is None:
        return False
    kept, proof = proved
    restore = keep_hyperparameters(opt)
    if kept.table is not None and kept.table.take(proof[0], proof[1]):
        from . import table

        if _run(fused, opt, store, restore, partial(table.run_table, kept.table, store)):
            return True
    try:
        jobs = replay.jobs_of(backend, kept, proof, store)
    except BaseException:
        restore()
        raise
    if jobs is None:
        return False
    if not _run(fused, opt, store, restore, partial(_run_jobs, backend, store, jobs)):
        store._fused_replay = None  # type: ignore[attr-defined]
        return False
    return True


def _decline(leaves: Sequence[Any]) -> bool:
    for leaf in leaves:
        leaf.dx = copy_array(namespace(leaf.dx), leaf.dx)
    return False


def _scratch_for(backend: Backend, store: StateStore, x: Any, number: int) -> Any:
    """Buffer `number` (0 or 1) for a stage's output, kept between steps (no allocation
    after the first)."""
    buffers = _scratch.get(store)
    if buffers is None:
        buffers = _scratch[store] = [StateStore(), StateStore()]
    buffer = buffers[number].get(x)
    if buffer is None:
        buffer = backend.scratch(x)
        buffers[number].set(x, buffer)
    return buffer
