"""`update_` and `update`: one optimiser step over a params tree.

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
from .errors import ShapeMismatchError, UnsupportedArrayError
from .rule import Replace, Rule, keep_hyperparameters, start_step, walk_rules
from .store import StateStore, copy_state, zero_d_arrays
from .tree import Path, rebuild, zip_leaves

__all__ = ["update_", "update", "state_store", "reset_"]

T = TypeVar("T")

_STORE_ATTRIBUTE = "_composeopt_state"
_MISSING: Any = object()


@dataclass
class _Leaf:
    """One distinct parameter of this step, with the engine's own copy of its gradient."""

    path: Path
    x: Any
    dx: Any


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
    state_store(opt).clear()
    return opt


def update_(opt: Rule, params: T, grads: Any) -> T:
    """Take one optimiser step in place: `x -= update` for every array of `params`.

    The optimiser `opt` keeps each parameter's state, keyed by the parameter's
    identity, so pass the same arrays every step.  The gradient arrays are not
    modified.

    Args:
        opt: a rule or a chain of rules ([Optimiser][composeopt.Optimiser]).
        params: an array or a tree of arrays (dicts, lists, tuples, namedtuples,
            nested), all from one array module; updated in place.
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
    if not isinstance(opt, Rule):
        raise TypeError(f"update_: expected a composeopt Rule, got a {type(opt).__name__}")
    fused = _fused.plan(opt)  # issue 5: fused in-place step, see composeopt/_fused
    if fused is not None and _fused.batched_step_(fused, opt, state_store(opt), params, grads):
        return params  # the same tree as the last steps: one call over all of it
    leaves = _collect(opt, params, grads, copy=fused is None)
    for leaf in leaves:
        _check_writable(leaf)
    if fused is not None and _fused.step_(fused, opt, state_store(opt), leaves):
        return params  # one pass wrote x and the states; otherwise leaves now hold gradient copies
    updates = _step(opt, leaves)
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
    if not isinstance(opt, Rule):
        raise TypeError(f"update: expected a composeopt Rule, got a {type(opt).__name__}")
    leaves = _collect(opt, params, grads)
    updates = _step(opt, leaves)
    store = state_store(opt)
    new_arrays = {}
    for leaf, change in zip(leaves, updates):
        if change is None:
            continue
        new = change.value if type(change) is Replace else leaf.x - change
        new_arrays[id(leaf.x)] = new = _as_array(new)
        store.move(leaf.x, new)
    new_params: T = rebuild(params, lambda x: new_arrays.get(id(x), x))
    return new_params


def _collect(opt: Rule, params: Any, grads: Any, copy: bool = True) -> list[_Leaf]:
    """Phase 1: pair and check every (parameter, gradient); one entry per distinct array.

    Frozen parameters ([freeze_][composeopt.freeze_]) are left out, as if their gradient were `None`.
    `copy=False` (the fused step, which never writes a gradient) skips copying gradients
    that already have the parameter's dtype.
    """
    frozen = state_store(opt).frozen
    by_id: dict[int, _Leaf] = {}
    reference: tuple[str, Any, Any] | None = None  # the first parameter, and its namespace
    for path, x, g in zip_leaves(params, grads):
        if frozen and x in frozen:
            continue
        xp = namespace(x)
        _check_parameter(path, x, xp)
        if reference is None:
            reference = (path, x, xp)
        elif xp is not reference[2]:
            raise UnsupportedArrayError(
                f"{path}: parameter is a {backend_name(x)} array but {reference[0]} "
                f"is a {backend_name(reference[1])} array; one tree must use one array module"
            )
        g = _as_array(g)  # NumPy hands 0-d gradients over as scalars
        _check_gradient(path, x, g, xp)
        leaf = by_id.get(id(x))
        if leaf is None:
            by_id[id(x)] = _Leaf(path, x, xp.astype(g, x.dtype, copy=copy))
        else:  # the same array twice in the tree: one update from the summed gradients
            leaf.dx = leaf.dx + xp.astype(g, x.dtype)
    return list(by_id.values())


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    if isinstance(dtype, np.dtype):  # NumPy's and CuPy's dtypes: cheaper than isdtype
        return dtype.kind == "f" or dtype.name == "bfloat16"  # ml_dtypes' bfloat16 has kind "V"
    return bool(xp.isdtype(dtype, "real floating"))


def _check_parameter(path: str, x: Any, xp: Any) -> None:
    if not _is_real_floating(xp, x.dtype):
        raise UnsupportedArrayError(
            f"{path}: parameter has dtype {x.dtype}; only real floating-point arrays can be optimised"
        )


def _check_gradient(path: str, x: Any, g: Any, xp: Any) -> None:
    if not (type(g) is np.ndarray and type(x) is np.ndarray):  # two NumPy arrays share module and device
        if not is_array(g):
            raise UnsupportedArrayError(f"{path}: gradient is a {type(g).__name__}, not an array")
        if namespace(g) is not xp:
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
    if not _is_real_floating(xp, g.dtype):
        raise UnsupportedArrayError(
            f"{path}: gradient has dtype {g.dtype}; expected a real floating-point array"
        )


def _check_writable(leaf: _Leaf) -> None:
    x = leaf.x
    read_only = not x.flags.writeable if isinstance(x, np.ndarray) else array_api_compat.is_jax_array(x)
    if read_only:
        raise UnsupportedArrayError(
            f"{leaf.path}: parameter is a read-only {backend_name(x)} array; update_ changes "
            "arrays in place, use composeopt.update(opt, params, grads), which returns new ones"
        )


def _step(opt: Rule, leaves: list[_Leaf]) -> list[Any]:
    """Phases 2 and 3 for the state: the updates of every leaf, and the new state kept."""
    store = state_store(opt)
    rules = list(walk_rules(opt))
    states = [store.get(leaf.x, _MISSING) for leaf in leaves]
    # A rule that may fail mid-step gets a copy of the existing states to put back.
    backups = []
    if any(rule.fallible for rule in rules):
        backups = [
            (leaf.x, copy_state(state)) for leaf, state in zip(leaves, states) if state is not _MISSING
        ]
    new = [i for i, state in enumerate(states) if state is _MISSING]
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


def _as_array(value: Any) -> Any:
    """NumPy turns 0-d results into scalars (`np.float64`); make them arrays again."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def _checked_update(opt: Rule, leaf: _Leaf, change: Any) -> Any:
    if change is None:
        return None
    if type(change) is Replace:
        return Replace(_checked_update(opt, leaf, change.value))
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
