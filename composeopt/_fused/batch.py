"""A whole tree in one call: the fused step of a tree that is the same as at the last steps.

An ordinary fused step spends some microseconds of Python per array: pairing
the trees with paths, checking every array, finding its state, one kernel
call.  Over a thousand small arrays that is most of the step.  Step after
step, all of it comes out the same except for the gradients.  So once the
same tree of NumPy arrays has taken two fused numba steps in a row (at least
`BATCH_MIN` arrays, one dtype, no two sharing memory, a chain without a norm
clip, every step counter equal), the optimiser's store gets a `Batch`:
the addresses of every parameter and state array in one table, and what to
compare to know that nothing has changed.  The next step then

1. pairs the trees without paths and checks that the parameters are the same
   objects in the same order, with the same shapes, strides and dtype, and
   still writable; that the store has not changed since (no state added,
   replaced or removed, nothing frozen or thawed, no parameter collected);
   that every state still holds the same arrays and counters; and that the
   gradients are NumPy arrays of the parameters' shapes: whatever the check
   phase would refuse fails one of these, and goes to the ordinary path;
2. takes the gradients: small arrays (`BATCH_MEAN_SIZE` elements or fewer
   on average) are copied into one buffer with one `numpy.concatenate`, in
   any floating dtype; big ones are read where they are, so they must have
   the parameters' dtype, be C-contiguous and share no memory with a
   parameter or a state;
3. runs one generated numba function per thread over the table.

Anything else, or any check that fails, takes the ordinary path, which gives
the errors with their paths; nothing of this step has been changed by then.
A tree that stops fitting waits twice as many steps before its next batch.
The batch keeps the state arrays alive (their addresses must stay valid) but
not the parameters: a parameter that is collected moves the store's version.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from operator import attrgetter, is_
from typing import Any

import numpy as np

from ..rule import Rule, keep_hyperparameters, start_step
from ..store import StateStore
from .kernel import Kernel
from .plan import Entry, Plan, make_plan
from .threads import run_together, shares

__all__ = ["BATCH_MIN", "Batch", "remember", "step_"]

BATCH_MIN = 16
"""Trees with fewer arrays keep the per-array path, whose overhead is then small."""

BATCH_MEAN_SIZE = 1 << 13
"""Trees whose arrays hold more elements than this on average are read where their
gradients are, rather than from one copy of them all.  Per array, reading in place costs
about a microsecond more in checks, the copy a quarter of a nanosecond per element: measured,
the two cross between 4000 and 10000 elements."""


_shape = attrgetter("shape")
_strides = attrgetter("strides")
_dtype = attrgetter("dtype")
_writeable = attrgetter("flags.writeable")


class Batch:
    """What a batched step needs of one tree of parameters and one optimiser's store.

    `by_address`: the kernel reads each gradient where it is (its address goes into
    `gradients` each step) instead of from a copy in `buffer`; for big arrays, whose copy
    would cost more than the per-array checks it saves.
    """

    def __init__(self, fused: Plan, store: StateStore, jobs: Sequence[Any], by_address: bool) -> None:
        from .numba_backend import batch_function

        entries = fused.entries
        xs = [job.leaf.x for job in jobs]
        self.key = _key(entries)
        self.function = batch_function(tuple(entry.kernel for entry in entries), by_address)
        self.by_address = by_address
        self.ids = list(map(id, xs))
        self.shapes = list(map(_shape, xs))
        self.strides = list(map(_strides, xs))
        self.dtype = xs[0].dtype
        self.versions = (store.version, store.frozen.version)
        # Per entry of the plan: every array's state of that rule, its arrays and its counter.
        self.rule_states = [[job.rule_states[position] for job in jobs] for position in range(len(entries))]
        self.arrays = [
            (states, name, [getattr(state, name) for state in states])
            for entry, states in zip(entries, self.rule_states)
            for name in entry.kernel.state
        ]
        self.counters = [
            [states, entry.kernel.counter, getattr(states[0], entry.kernel.counter)]
            for entry, states in zip(entries, self.rule_states)
            if entry.kernel.counter is not None
        ]
        self.addresses = np.array(
            [[x.ctypes.data, *(held[i].ctypes.data for _, _, held in self.arrays)] for i, x in enumerate(xs)],
            dtype=np.int64,
        ).reshape(len(xs), 1 + len(self.arrays))
        sizes = [x.size for x in xs]
        self.chunks = [np.array(share, dtype=np.int64).reshape(-1, 3) for share in shares(sizes)]
        if by_address:
            self.nbytes = np.array([x.nbytes for x in xs], dtype=np.int64)
            self.gradients = np.zeros(len(xs), dtype=np.int64)
            self.ends = np.zeros(len(xs), dtype=np.int64)
            # The memory this step writes (parameters and states, all disjoint), in order, to
            # find a gradient that overlaps some of it.
            used = self.nbytes > 0
            starts = self.addresses[used].reshape(-1)
            order = np.argsort(starts)
            self.x_starts = starts[order]
            self.x_ends = self.x_starts + np.repeat(self.nbytes[used], self.addresses.shape[1])[order]
        else:
            self.offsets = np.cumsum([0, *sizes], dtype=np.int64)
            self.buffer = np.empty(int(self.offsets[-1]), dtype=self.dtype)

    def take(self, fused: Plan, store: StateStore, xs: list[Any], gs: list[Any]) -> bool:
        """If this step is the remembered one, with gradients the kernel can read, take the
        gradients (their addresses, or a copy) and return `True`; else change nothing."""
        if (
            (store.version, store.frozen.version) != self.versions
            or list(map(id, xs)) != self.ids
            or _key(fused.entries) != self.key
            # What the check phase would refuse in a parameter: a shape or layout changed in
            # place since the states were made, a dtype, a parameter made read-only.
            or list(map(_shape, xs)) != self.shapes
            or list(map(_strides, xs)) != self.strides
            or set(map(_dtype, xs)) != {self.dtype}
            or not all(map(_writeable, xs))
            or set(map(type, gs)) != {np.ndarray}
            or list(map(_shape, gs)) != self.shapes
        ):
            return False
        dtypes = set(map(_dtype, gs))
        if (dtypes != {self.dtype}) if self.by_address else any(dtype.kind != "f" for dtype in dtypes):
            return False
        try:
            for states, name, held in self.arrays:  # a state array replaced by hand
                if not all(map(is_, map(attrgetter(name), states), held)):
                    return False
            for states, counter, value in self.counters:
                if list(map(attrgetter(counter), states)) != [value] * len(states):
                    return False
        except AttributeError:
            return False
        if not self.by_address:
            np.concatenate(gs, axis=None, out=self.buffer, casting="same_kind")
            return True
        starts = self.gradients
        for position, g in enumerate(gs):
            interface = g.__array_interface__
            if interface["strides"] is not None:
                return False  # not C-contiguous
            starts[position] = interface["data"][0]
        return not self._overlap(starts)

    def _overlap(self, starts: Any) -> bool:
        """Whether a gradient shares memory with a parameter or a state (it would be read
        while written).

        Those arrays are disjoint (`remember` checks), so only the first of them that ends
        after a gradient starts can overlap it."""
        ends = np.add(starts, self.nbytes, out=self.ends)
        first = np.searchsorted(self.x_ends, starts, side="right")
        inside = first < len(self.x_starts)
        candidates = self.x_starts[first[inside]]
        return bool(np.any((candidates < ends[inside]) & (ends[inside] > starts[inside])))

    def run(self, k: Any) -> None:
        """The kernel over every array, one call per thread, with the step's scalars `k`."""
        if self.by_address:
            arguments: tuple[Any, ...] = (self.gradients, k, self.addresses)
        else:
            arguments = (self.offsets, self.buffer, k, self.addresses)
        run_together([partial(self.function, chunks, *arguments) for chunks in self.chunks])


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
    if history.repeats < history.needed:
        return
    history.repeats = 0
    dtype = jobs[0].x.dtype
    if any(job.x.dtype != dtype for job in jobs):
        return
    for position, entry in enumerate(fused.entries):
        counter = entry.kernel.counter
        if counter is not None:
            values = {getattr(job.rule_states[position], counter) for job in jobs}
            if len(values) != 1:
                return
    if not _disjoint([array for job in jobs for array in (job.x, *job.arrays)]):
        return  # arrays that share memory: threads would race on it
    by_address = sum(job.x.size for job in jobs) > BATCH_MEAN_SIZE * len(jobs)
    _batches[store] = Batch(fused, store, jobs, by_address)


def _disjoint(xs: list[Any]) -> bool:
    spans = sorted((x.ctypes.data, x.ctypes.data + x.nbytes) for x in xs if x.nbytes)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def step_(fused: Plan, opt: Rule, store: StateStore, params: Any, grads: Any) -> bool:
    """Take the step from the store's batch and return `True`, or return `False` having
    changed nothing (no batch, or this step is not the one it remembers)."""
    batch = _batches.get(store)
    if batch is None:
        return False
    xs: list[Any] = []
    gs: list[Any] = []
    if not (_pair(params, grads, xs, gs) and batch.take(fused, store, xs, gs)):
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
        _advance(batch, 1)
        advanced = True
        k = np.array(_scalars(fused, batch), dtype=batch.dtype)
    except BaseException:
        restore()
        if advanced:
            _advance(batch, -1)
        raise
    batch.run(k)
    store.step = step
    return True


def _advance(batch: Batch, by: int) -> None:
    for counter in batch.counters:
        states, name, value = counter
        counter[2] = value = value + by
        for state in states:
            setattr(state, name, value)


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


def _pair(params: Any, grads: Any, xs: list[Any], gs: list[Any]) -> bool:
    """Append the leaves of `params` and `grads` to `xs` and `gs` in the engine's order;
    `False` at anything but dicts, lists, tuples and NumPy arrays with the same keys and lengths."""
    kind = type(params)
    if kind is np.ndarray:
        xs.append(params)
        gs.append(grads)
        return True
    if kind is list or kind is tuple:
        if type(grads) not in (list, tuple) or len(grads) != len(params):
            return False
        pairs: Any = zip(params, grads)
    elif kind is dict:
        if type(grads) is not dict or grads.keys() != params.keys():
            return False
        pairs = ((value, grads[key]) for key, value in params.items())
    else:
        return False
    for x, g in pairs:
        if type(x) is np.ndarray:
            xs.append(x)
            gs.append(g)
        elif not _pair(x, g, xs, gs):
            return False
    return True
