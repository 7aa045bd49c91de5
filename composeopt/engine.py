"""`update_` and `update`: one optimiser step over a params tree.

A step runs in three phases so that a failure never leaves it half done:

1. check (`composeopt.check`): pair params with grads and check structure,
   shapes, dtypes, modules, devices, writability and memory, before anything is
   written; the generic path copies each gradient (the caller's arrays are never
   modified; tied parameters get the sum of their gradients);
2. compute: every rule's update for every parameter, mutating only state, which
   is copied first and put back if anything raises (a rule, a schedule, or the
   array library itself);
3. commit: subtract the updates from the parameters and keep the new state.

A step holds its optimiser's lock, so that threads sharing one optimiser take
their steps one after another.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, TypeVar

import numpy as np

from . import _fused
from ._collective import comms_of
from ._dispatch import backend_name, is_array, namespace
from .check import MISSING, Leaf, as_array, collect
from .errors import ShapeMismatchError, UnsupportedArrayError
from .rule import Replace, Rule, keep_hyperparameters, start_step
from .store import StateStore, copy_state, zero_d_arrays
from .tree import rebuild

__all__ = ["update_", "update", "state_store", "reset_"]

T = TypeVar("T")

_STORE_ATTRIBUTE = "_composeopt_state"
_creating = threading.Lock()  # two threads' first steps on one optimiser make one store


class SelfStepping(Protocol):
    """An optimiser that takes its steps its own way (`composeopt.dist.ShardedOptimiser`)."""

    def _composeopt_update_(self, params: Any, grads: Any) -> None: ...


def state_store(opt: Rule) -> StateStore:
    """The [StateStore][composeopt.store.StateStore] that `opt` owns (created on first use).

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.Momentum(), np.ones(2)
        >>> _ = co.update_(opt, x, np.ones(2))
        >>> store = co.state_store(opt)
        >>> store.step, len(store), store.get(x)
        (1, 1, State(v=array([0.01, 0.01])))
    """
    store = vars(opt).get(_STORE_ATTRIBUTE)
    if store is None:
        with _creating:
            store = vars(opt).get(_STORE_ATTRIBUTE)
            if store is None:
                store = StateStore()
                setattr(opt, _STORE_ATTRIBUTE, store)
    return store


def reset_(opt: Rule) -> Rule:
    """Forget every parameter's state and the step count of `opt`; returns `opt`.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.Adam(), np.ones(2)
        >>> _ = co.update_(opt, x, np.ones(2))
        >>> len(co.state_store(opt)), len(co.state_store(co.reset_(opt)))
        (1, 0)
    """
    store = state_store(opt)
    with store.lock:
        store.clear()
    return opt


def update_(opt: Rule | SelfStepping, params: T, grads: Any) -> T:
    """Take one optimiser step in place: `x -= update` for every array of `params`.

    The optimiser `opt` keeps each parameter's state, keyed by the parameter's
    identity, so pass the same arrays every step.  The gradient arrays are not
    modified.

    Args:
        opt: a rule or a chain of rules ([Optimiser][composeopt.Optimiser]).
        params: an array or a tree of arrays (dicts, lists, tuples, namedtuples,
            dataclasses, JAX-registered pytree nodes, nested), all from one array
            module; updated in place.
        grads: the same structure as `params`, with `None` wherever a parameter
            (or a whole subtree) is to be left alone this step.

    Returns:
        `params`, the same object.

    Raises:
        composeopt.errors.ComposeoptError: on bad input, with the parameter's
            path in the message, before anything is changed; a step that raises
            leaves every parameter and every state as it was.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> _ = co.update_(co.Descent(0.1), params, {"w": np.array([1.0, 1.0])})
        >>> print(params["w"])
        [ 0.9 -2.1]
    """
    hook = getattr(type(opt), "_composeopt_update_", None)
    if hook is not None:  # an optimiser that takes its step its own way (dist.ShardedOptimiser)
        hook(opt, params, grads)
        return params
    if not isinstance(opt, Rule):
        raise TypeError(f"update_: expected a composeopt Rule, got a {type(opt).__name__}")
    store = state_store(opt)
    with store.lock:
        fused = _fused.plan(opt)
        comms = comms_of(opt)
        if not comms and fused is not None and _fused.batched_step_(fused, opt, store, params, grads):
            return params  # the same tree as the last steps: one call over all of it
        leaves = _checked_everywhere(comms, store, params, grads, copy=fused is None, in_place=True)
        if fused is not None and _fused.step_(fused, opt, store, leaves):
            return params  # one pass wrote x and the states; otherwise leaves now hold gradient copies
        updates = _step(opt, store, leaves)
        for leaf, change in zip(leaves, updates):
            x = leaf.x
            if type(change) is Replace:
                x[...] = change.value
            elif change is not None:  # None: the rule leaves this parameter alone this step
                x -= change
    return params


def update(opt: Rule, params: T, grads: Any) -> T:
    """Like [update_][composeopt.update_] but returns new parameters and leaves `params` untouched.

    For immutable arrays (JAX) or read-only ones.  The optimiser's state moves
    to the returned arrays: pass those at the next step.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, params = co.Descent(0.5), {"w": np.ones(2)}
        >>> new = co.update(opt, params, {"w": np.ones(2)})
        >>> print(params["w"], new["w"])
        [1. 1.] [0.5 0.5]
    """
    if getattr(type(opt), "_composeopt_update_", None) is not None:
        raise TypeError(f"update: a {type(opt).__name__} updates its params in place; call update_")
    if not isinstance(opt, Rule):
        raise TypeError(f"update: expected a composeopt Rule, got a {type(opt).__name__}")
    store = state_store(opt)
    with store.lock:
        leaves = _checked_everywhere(comms_of(opt), store, params, grads, copy=True, in_place=False)
        updates = _step(opt, store, leaves)
        new_arrays = {}
        for leaf, change in zip(leaves, updates):
            if change is None:
                continue
            new = change.value if type(change) is Replace else leaf.x - change
            new_arrays[id(leaf.x)] = new = as_array(new)
            store.move(leaf.x, new, leaf.path)
    new_params: T = rebuild(params, lambda x: new_arrays.get(id(x), x))
    return new_params


def _checked_everywhere(
    comms: list[Any], store: StateStore, params: Any, grads: Any, **how: bool
) -> list[Leaf]:
    """The check phase; for a chain that communicates (`AllReduceMean`), on every rank at
    once: if it fails on one, or the ranks' trees differ, every rank raises before the
    step begins (else the others would wait for the one that raised)."""
    if not comms:
        return collect(store, params, grads, **how)
    from .dist.agree import agree, fingerprint

    try:
        leaves = collect(store, params, grads, **how)
    except Exception as err:
        for comm in comms:
            agree(comm, err, b"")
        raise
    # The digest of the layout, remade only when some path, shape or dtype changed.
    key = tuple((leaf.path, leaf.x.shape, leaf.x.dtype) for leaf in leaves)
    known = getattr(store, "_agreed_layout", None)
    if known is not None and known[0] == key:
        layout = known[1]
    else:
        layout = fingerprint(*zip(*key)) if key else fingerprint((), (), ())
        store._agreed_layout = (key, layout)  # type: ignore[attr-defined]
    for comm in comms:
        agree(comm, None, layout)
    return leaves


def _step(opt: Rule, store: StateStore, leaves: list[Leaf]) -> list[Any]:
    """Phases 2 and 3 for the state: the updates of every leaf, and the new state kept."""
    states = [leaf.state for leaf in leaves]
    # Any rule may raise mid-step, if only from the array library (an unsupported dtype, memory):
    # a copy of the existing states puts back what the leaves before it changed in place.
    backups = [(leaf.x, copy_state(state)) for leaf, state in zip(leaves, states) if state is not MISSING]
    new = [i for i, state in enumerate(states) if state is MISSING]
    if new:
        fresh = opt.init_tree_([leaves[i].x for i in new], [leaves[i].path for i in new])
        for i, state in zip(new, fresh):
            states[i] = state
    # Schedules and begin_step change hyperparameters (ExpDecay's eta): keep them to put back.
    restore = keep_hyperparameters(opt)
    step = store.step + 1
    try:
        with np.errstate(all="ignore"):  # overflow is the caller's business, as in every peer
            start_step(opt, step)
            updates = opt.apply_tree_(
                states,
                [leaf.x for leaf in leaves],
                [leaf.dx for leaf in leaves],
                [leaf.path for leaf in leaves],
            )
            updates = [_checked_update(opt, leaf, change) for leaf, change in zip(leaves, updates)]
    except BaseException:
        restore()
        for x, state in backups:
            store.set(x, state)
        raise
    store.step = step
    for leaf, state in zip(leaves, states):
        if isinstance(leaf.x, np.ndarray) and leaf.x.ndim == 0:
            state = zero_d_arrays(state, leaf.x.dtype)
        store.set(leaf.x, state)
    return updates


def _checked_update(opt: Rule, leaf: Leaf, change: Any) -> Any:
    if change is None:
        return None
    if type(change) is Replace:
        return Replace(_checked_update(opt, leaf, change.value))
    x = leaf.x
    change = as_array(change)
    if not is_array(change) or namespace(change) is not namespace(x):
        raise UnsupportedArrayError(
            f"{leaf.path}: {opt!r} returned a {type(change).__name__} update, "
            f"expected a {backend_name(x)} array"
        )
    if tuple(change.shape) != tuple(x.shape):
        raise ShapeMismatchError(
            f"{leaf.path}: update shape {tuple(change.shape)} from {opt!r} "
            f"!= parameter shape {tuple(x.shape)}"
        )
    if change.dtype != x.dtype:
        change = namespace(x).astype(change, x.dtype)
    return change
