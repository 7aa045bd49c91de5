"""A whole tree in one call: the fused step of a tree that is the same as at the last steps.

An ordinary fused step spends some microseconds of Python per array: pairing
the trees with paths, checking every array, finding its state, one kernel
call.  Over a thousand small arrays that is most of the step.  Step after
step, all of it comes out the same except for the gradients.  So once the
same tree of NumPy arrays has taken two fused numba steps in a row (at least
`BATCH_MIN` arrays, one dtype and gradients of it, no two sharing memory, a
chain without a norm clip, every step counter equal), the optimiser's store
gets a `Batch`: the addresses of every parameter and state array in one
table.  The next step then

1. asks the check phase whether the input is what it accepted last time
   (`composeopt.check.unchanged`: the same parameters with the same layouts,
   still writable, nothing in the store changed, gradients of the same shapes
   and dtypes), which reads the gradients' addresses and flags on the way;
2. checks what only this way of running the step needs: that every state
   still holds the same arrays and step counts (a state changed by hand,
   `state.mu = ...`, does not move the store's version), and that every
   gradient is C-contiguous, aligned and shares no memory with a parameter or
   a state, since the kernel reads it where it is;
3. runs one generated numba function per thread over the table.

If any of that fails, the ordinary path takes the step: its full check gives
the errors with their paths, and nothing of this step has been changed by
then.  A tree that stops fitting waits twice as many steps before its next
batch.  The batch keeps the state arrays alive (their addresses must stay
valid) but not the parameters: a parameter that is collected moves the
store's version, and with it the check phase's proof.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from .. import check
from .._memory import DTYPE, OBJECT, readable_in_place
from ..rule import Rule, keep_hyperparameters, start_step
from ..store import StateStore
from .held import Held, disjoint, fit
from .kernel import Kernel
from .plan import Entry, Plan, make_plan
from .threads import run_together, shares

__all__ = ["BATCH_MIN", "Batch", "remember", "step_"]

BATCH_MIN = 16
"""Trees with fewer arrays keep the per-array path, whose overhead is then small."""


class Batch:
    """What a batched step needs of one tree of parameters and one optimiser's store,
    besides what the check phase proves (`seen`, what it accepted of that tree)."""

    def __init__(self, fused: Plan, jobs: Sequence[Any], seen: check.Seen) -> None:
        from .numba_backend import batch_function

        entries = fused.entries
        xs = [job.leaf.x for job in jobs]
        self.seen = seen
        self.key = _key(entries)
        self.function = batch_function(tuple(entry.kernel for entry in entries), True)
        self.dtype = xs[0].dtype
        # Per entry of the plan: every array's state of that rule, its arrays and its counter.
        self.rule_states = [[job.rule_states[position] for job in jobs] for position in range(len(entries))]
        self.held = Held(entries, self.rule_states)
        self.addresses = np.array(
            [[x.ctypes.data, *(a[i].ctypes.data for _, _, a in self.held.arrays)] for i, x in enumerate(xs)],
            dtype=np.int64,
        ).reshape(len(xs), 1 + len(self.held.arrays))
        self.chunks = [
            np.array(share, dtype=np.int64).reshape(-1, 3) for share in shares([x.size for x in xs])
        ]
        self.gradients = seen.gradients[0]  # this step's addresses of the gradients, once proved
        self.nbytes = np.array([x.nbytes for x in xs], dtype=np.int64)
        # The memory this step writes (parameters and states, all disjoint), in order, to
        # find a gradient that overlaps some of it.
        used = self.nbytes > 0
        starts = self.addresses[used].reshape(-1)
        order = np.argsort(starts)
        self.written_starts = starts[order]
        self.written_ends = self.written_starts + np.repeat(self.nbytes[used], self.addresses.shape[1])[order]

    def take(self, fused: Plan, seen: check.Seen) -> bool:
        """If this step is the remembered one (`seen` is what the check phase has just proved
        of it) and the kernel can read its gradients where they are, note their addresses
        and return `True`; else change nothing."""
        if seen is not self.seen or _key(fused.entries) != self.key:
            return False
        if not self.held.unchanged():  # a state array or a count replaced by hand
            return False
        # The kernel reads each gradient where it is, while it writes parameters and states.
        return readable_in_place(
            self.gradients, self.nbytes, seen.gradients[1], self.written_starts, self.written_ends
        )

    def run(self, k: Any) -> None:
        """The kernel over every array, one call per thread, with the step's scalars `k`."""
        run_together(
            [partial(self.function, chunks, self.gradients, k, self.addresses) for chunks in self.chunks]
        )


class _History:
    """The trees of a store's last ordinary fused steps, to decide when a batch is worth making."""

    __slots__ = ("ids", "repeats", "needed")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.repeats = 0  # ordinary steps in a row on the tree `ids`
        self.needed = 2  # doubled each time a batch turns out not to fit (up to MAX_NEEDED)


MAX_NEEDED = 64

_batches: weakref.WeakKeyDictionary[StateStore, Batch] = weakref.WeakKeyDictionary()
_histories: weakref.WeakKeyDictionary[StateStore, _History] = weakref.WeakKeyDictionary()


def remember(fused: Plan, store: StateStore, jobs: Sequence[Any]) -> None:
    """After an ordinary fused numba step over `jobs`: make the batch of this tree once it
    has come `needed` times in a row (a batch costs a few microseconds per array to make;
    a tree seen once may not come back), if it is fit for one."""
    if len(jobs) < BATCH_MIN or len(fused.stages) != 1:
        return
    history = _histories.get(store)
    if history is None:
        history = _histories[store] = _History()
    ids = [id(job.leaf.x) for job in jobs]
    if ids == history.ids:
        history.repeats += 1
    else:
        history.ids, history.repeats = ids, 1
    check.watch(store)  # the check phase remembers this store's trees from now on
    if history.repeats < history.needed:
        return
    history.repeats = 0
    seen = check.seen(store)
    if seen is None or not np.array_equal(seen.parameters[:, OBJECT], ids):
        return  # not (yet) what the check phase accepted of this tree
    dtype = jobs[0].x.dtype
    if any(job.x.dtype != dtype for job in jobs):
        return
    if not np.array_equal(seen.gradient_dtypes, seen.parameters[:, DTYPE]):
        return  # gradients of another dtype: the kernel reads them as the parameters' dtype
    if not fit(fused.entries, [[job.rule_states[p] for job in jobs] for p in range(len(fused.entries))]):
        return
    written = [array for job in jobs for array in (job.x, *job.arrays)]
    if not all(array.flags.aligned for array in written):
        return  # the kernel's loads and stores through plain pointers assume aligned elements
    if not disjoint(written):
        return  # arrays that share memory: threads would race on it
    _batches[store] = Batch(fused, jobs, seen)


def step_(fused: Plan, opt: Rule, store: StateStore, params: Any, grads: Any) -> bool:
    """Take the step from the store's batch and return `True`, or return `False` having
    changed nothing (no batch, or this step is not the one it remembers)."""
    batch = _batches.get(store)
    if batch is None:
        return False
    seen = check.unchanged(store, params, grads)
    if seen is None or not batch.take(fused, seen):
        del _batches[store]  # a step that differs in some way: wait longer before the next batch
        history = _histories.get(store)
        if history is not None:
            history.needed = min(2 * history.needed, MAX_NEEDED)
        return False
    restore = keep_hyperparameters(opt)
    step = store.step + 1
    advanced = False
    try:
        start_step(opt, step)
        if make_plan(opt) != fused:  # begin_step changed which kernels apply
            restore()
            return False
        batch.held.advance(1)
        advanced = True
        k = np.array(_scalars(fused, batch), dtype=batch.dtype)
    except BaseException:
        restore()
        if advanced:
            batch.held.advance(-1)
        raise
    batch.run(k)
    store.step = step
    return True


def _scalars(fused: Plan, batch: Batch) -> list[float]:
    values: list[float] = []
    for entry, states in zip(fused.entries, batch.rule_states):
        named = entry.kernel.scalars(entry.rule, states[0], batch.dtype)
        values.extend(float(named[name]) for name in entry.kernel.scalar_names)
    return values


def _key(entries: list[Entry]) -> tuple[tuple[Kernel, tuple[int, ...]], ...]:
    # The kernels (module-level objects) and where their states sit; not the rules, which
    # would keep the optimiser, and so its store, alive through the batch.
    return tuple((entry.kernel, entry.path) for entry in entries)
