"""``update_`` and ``update``: one optimiser step over a params tree.

A step runs in three phases so that a failure never leaves it half done:

1. check: pair params with grads, check structure, shapes, dtypes, modules,
   devices and writability, and copy each gradient (the caller's arrays are
   never modified; tied parameters get the sum of their gradients);
2. compute: every rule's update for every parameter, mutating only state
   (copied first when a rule in the chain can fail, and put back on failure);
3. commit: subtract the updates from the parameters and keep the new state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import array_api_compat
import numpy as np

from . import _fused
from ._dispatch import backend_name, is_array, namespace
from .errors import ComposeoptError, ShapeMismatchError, UnsupportedArrayError
from .rule import Rule, walk_rules
from .store import StateStore, copy_state
from .tree import rebuild, zip_leaves

__all__ = ["update_", "update", "state_store", "reset_"]

T = TypeVar("T")

_STORE_ATTRIBUTE = "_composeopt_state"
_MISSING: Any = object()


@dataclass
class _Leaf:
    """One distinct parameter of this step, with the engine's own copy of its gradient."""

    path: str
    x: Any
    dx: Any


def state_store(opt: Rule) -> StateStore:
    """The :class:`~composeopt.store.StateStore` that ``opt`` owns (created on first use)."""
    store = vars(opt).get(_STORE_ATTRIBUTE)
    if store is None:
        store = StateStore()
        setattr(opt, _STORE_ATTRIBUTE, store)
    return store


def reset_(opt: Rule) -> Rule:
    """Forget every parameter's state and the step count of ``opt``; returns ``opt``."""
    state_store(opt).clear()
    return opt


def update_(opt: Rule, params: T, grads: Any) -> T:
    """Take one optimiser step in place: ``x -= update`` for every array of ``params``.

    ``params`` is an array or a tree of arrays (dicts, lists, tuples,
    namedtuples, nested); ``grads`` has the same structure, with ``None``
    wherever a parameter is to be left alone this step.  The gradient arrays
    are not modified.  The optimiser ``opt`` keeps each parameter's state,
    keyed by the parameter's identity, so pass the same arrays every step.
    Returns ``params``.

    Raises an error naming the parameter's path on bad input, before anything
    is changed; a step that raises leaves every parameter and state as it was.

    Example:
        >>> import numpy as np, composeopt as co
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> _ = co.update_(co.Descent(0.1), params, {"w": np.array([1.0, 1.0])})
        >>> params["w"]
        array([ 0.9, -2.1])
    """
    if not isinstance(opt, Rule):
        raise TypeError(f"update_: expected a composeopt Rule, got a {type(opt).__name__}")
    fused = _fused.plan(opt)  # issue 5: fused in-place step, see composeopt/_fused
    leaves = _collect(params, grads, copy=fused is None)
    for leaf in leaves:
        _check_writable(leaf)
    if fused is not None and _fused.step_(fused, opt, state_store(opt), leaves):
        return params  # one pass wrote x and the states; otherwise leaves now hold gradient copies
    updates = _step(opt, leaves)
    for leaf, change in zip(leaves, updates):
        x = leaf.x
        x -= change
    return params


def update(opt: Rule, params: T, grads: Any) -> T:
    """Like :func:`update_` but returns new parameters and leaves ``params`` untouched.

    For immutable arrays (JAX) or read-only ones.  The optimiser's state moves
    to the returned arrays: pass those at the next step.
    """
    if not isinstance(opt, Rule):
        raise TypeError(f"update: expected a composeopt Rule, got a {type(opt).__name__}")
    leaves = _collect(params, grads)
    updates = _step(opt, leaves)
    store = state_store(opt)
    new_arrays = {}
    for leaf, change in zip(leaves, updates):
        new_arrays[id(leaf.x)] = new = _as_array(leaf.x - change)
        store.move(leaf.x, new)
    new_params: T = rebuild(params, lambda x: new_arrays.get(id(x), x))
    return new_params


def _collect(params: Any, grads: Any, copy: bool = True) -> list[_Leaf]:
    """Phase 1: pair and check every (parameter, gradient); one entry per distinct array.

    ``copy=False`` (the fused step, which never writes a gradient) skips copying gradients
    that already have the parameter's dtype."""
    by_id: dict[int, _Leaf] = {}
    reference: tuple[str, Any] | None = None
    for path, x, g in zip_leaves(params, grads):
        _check_parameter(path, x)
        if reference is None:
            reference = (path, x)
        elif namespace(x) is not namespace(reference[1]):
            raise UnsupportedArrayError(
                f"{path}: parameter is a {backend_name(x)} array but {reference[0]} "
                f"is a {backend_name(reference[1])} array; one tree must use one array module"
            )
        _check_gradient(path, x, g)
        xp = namespace(x)
        leaf = by_id.get(id(x))
        if leaf is None:
            by_id[id(x)] = _Leaf(path, x, xp.astype(g, x.dtype, copy=copy))
        else:  # the same array twice in the tree: one update from the summed gradients
            leaf.dx = leaf.dx + xp.astype(g, x.dtype)
    return list(by_id.values())


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    return bool(xp.isdtype(dtype, "real floating"))


def _check_parameter(path: str, x: Any) -> None:
    xp = namespace(x)
    if not _is_real_floating(xp, x.dtype):
        raise UnsupportedArrayError(
            f"{path}: parameter has dtype {x.dtype}; only real floating-point arrays can be optimised"
        )


def _check_gradient(path: str, x: Any, g: Any) -> None:
    if not is_array(g):
        raise UnsupportedArrayError(f"{path}: gradient is a {type(g).__name__}, not an array")
    if namespace(g) is not namespace(x):
        raise UnsupportedArrayError(
            f"{path}: gradient is a {backend_name(g)} array but the parameter is a "
            f"{backend_name(x)} array; move one of them explicitly"
        )
    if array_api_compat.device(g) != array_api_compat.device(x):
        raise UnsupportedArrayError(
            f"{path}: gradient is on device {array_api_compat.device(g)} but the parameter "
            f"is on device {array_api_compat.device(x)}"
        )
    if tuple(g.shape) != tuple(x.shape):
        raise ShapeMismatchError(
            f"{path}: gradient shape {tuple(g.shape)} != parameter shape {tuple(x.shape)}"
        )
    if not _is_real_floating(namespace(g), g.dtype):
        raise UnsupportedArrayError(
            f"{path}: gradient has dtype {g.dtype}; expected a real floating-point array"
        )


def _check_writable(leaf: _Leaf) -> None:
    x = leaf.x
    if array_api_compat.is_jax_array(x) or (isinstance(x, np.ndarray) and not x.flags.writeable):
        raise UnsupportedArrayError(
            f"{leaf.path}: parameter is a read-only {backend_name(x)} array; update_ changes "
            "arrays in place, use composeopt.update(opt, params, grads), which returns new ones"
        )


def _step(opt: Rule, leaves: list[_Leaf]) -> list[Any]:
    """Phases 2 and 3 for the state: the updates of every leaf, and the new state kept."""
    store = state_store(opt)
    rules = list(walk_rules(opt))
    states = []
    backups = []
    must_backup = any(rule.fallible for rule in rules)
    for leaf in leaves:
        state = store.get(leaf.x, _MISSING)
        if state is _MISSING:
            try:
                state = opt.init(leaf.x)
            except ComposeoptError as err:
                raise type(err)(f"{leaf.path}: {err}") from err
        elif must_backup:
            backups.append((leaf.x, copy_state(state)))
        states.append(state)
    # begin_step may change hyperparameters (ExpDecay's eta): keep them to put back.
    saved_hyperparameters = [(rule, dict(vars(rule))) for rule in rules]
    step = store.step + 1
    try:
        with np.errstate(all="ignore"):  # overflow is the caller's business, as in every peer
            opt.begin_step(step)
            updates = opt.apply_tree_(
                states,
                [leaf.x for leaf in leaves],
                [leaf.dx for leaf in leaves],
                [leaf.path for leaf in leaves],
            )
            updates = [_checked_update(opt, leaf, change) for leaf, change in zip(leaves, updates)]
    except BaseException:
        for rule, saved in saved_hyperparameters:
            vars(rule).clear()
            vars(rule).update(saved)
        for x, state in backups:
            store.set(x, state)
        raise
    store.step = step
    for leaf, state in zip(leaves, states):
        store.set(leaf.x, state)
    return updates


def _as_array(value: Any) -> Any:
    """NumPy turns 0-d results into scalars (``np.float64``); make them arrays again."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def _checked_update(opt: Rule, leaf: _Leaf, change: Any) -> Any:
    x = leaf.x
    change = _as_array(change)
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
