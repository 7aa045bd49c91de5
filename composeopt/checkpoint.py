"""Checkpoints: an optimiser's state as plain data, keyed by parameter path.

`state_dict(opt, params)` describes everything a resumed run needs: each
parameter's state under its path in the params tree (ids die with the
process, paths do not), the optimiser step count that schedules and decays
follow, the current hyperparameters, and which parameters are frozen.  Arrays
come back on the host as NumPy arrays, so a checkpoint written on the GPU loads
on the CPU and the other way round.

`save` writes it as a `.npz` archive (the arrays, and the rest as JSON in
one string entry), atomically and readable with `allow_pickle=False`:
loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import array_api_compat
import numpy as np

from ._dispatch import is_array, namespace
from .engine import state_store
from .errors import CheckpointError
from .hyper import is_scheduled
from .rule import Rule, State, keep_hyperparameters, walk_rules
from .tree import array_leaves

__all__ = ["FORMAT", "VERSION", "state_dict", "load_state_dict", "save", "load"]

FORMAT = "composeopt-checkpoint"
VERSION = 1
_META = "__composeopt__"
_MISSING: Any = object()


# --- state <-> plain data -------------------------------------------------------


def _to_host(array: Any) -> np.ndarray:
    if array_api_compat.is_cupy_array(array):
        return np.asarray(array.get())  # an explicit device-to-host copy: this is a checkpoint
    if isinstance(array, (np.ndarray, np.generic)):
        return np.array(array, copy=True)
    try:
        return np.array(np.from_dlpack(array), copy=True)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.array(array, copy=True)


def _to_plain(state: Any, path: str) -> Any:
    if is_array(state) or isinstance(state, np.generic):
        return _to_host(state)
    if isinstance(state, State):
        return {"__state__": {name: _to_plain(value, path) for name, value in vars(state).items()}}
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return {"__tuple__": [_to_plain(item, path) for item in state]}
    if isinstance(state, list):
        return [_to_plain(item, path) for item in state]
    if isinstance(state, dict) and all(isinstance(key, str) for key in state):
        return {"__dict__": {key: _to_plain(value, path) for key, value in state.items()}}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise CheckpointError(f"{path}: cannot checkpoint a state of type {type(state).__name__}")


def _from_plain(plain: Any, like: Any) -> Any:
    """The state described by `plain`, its arrays in `like`'s module and device."""
    if isinstance(plain, np.ndarray):
        return namespace(like).asarray(plain, device=array_api_compat.device(like))
    if isinstance(plain, list):
        return [_from_plain(item, like) for item in plain]
    if isinstance(plain, dict):
        ((kind, content),) = plain.items()
        if kind == "__state__":
            return State(**{name: _from_plain(value, like) for name, value in content.items()})
        if kind == "__tuple__":
            return tuple(_from_plain(item, like) for item in content)
        return {key: _from_plain(value, like) for key, value in content.items()}
    return plain


# --- what must match -------------------------------------------------------------


def _structure(rule: Rule) -> list[Any]:
    """The rule's type and its children's structures, for comparing optimisers."""
    return [type(rule).__name__, [_structure(child) for child in rule.children()]]


def _stored_hyperparameters(opt: Rule) -> list[dict[str, Any]]:
    """Per rule (depth first), the hyperparameters that are values, not schedules."""
    stored = []
    for rule in walk_rules(opt):
        as_set = rule.settings()
        current = rule.hyperparameters()
        stored.append(
            {
                name: list(value) if isinstance(value, tuple) else value  # plain data: JSON has no tuples
                for name, value in current.items()
                if not is_scheduled(as_set[name])
            }
        )
    return stored


def _distinct_leaves(params: Any) -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    seen: set[int] = set()
    for path, x in array_leaves(params):
        if id(x) not in seen:  # a tied array is saved once, under its first path
            seen.add(id(x))
            leaves[str(path)] = x
    return leaves


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rpartition(".")[2]


# --- public API -------------------------------------------------------------------


def state_dict(opt: Rule, params: Any) -> dict[str, Any]:
    """The optimiser's state as plain data: dicts, lists, numbers, strings and NumPy arrays.

    Keys: `format`, `version`, `optimiser` (its `repr`), `structure`,
    `step` (optimiser steps taken), `hyperparameters` (per rule, depth
    first; scheduled ones are left out, as the step count determines them),
    `params` (each path's shape and dtype), `states` (each path's state)
    and `frozen` (paths).
    """
    store = state_store(opt)
    described, states, frozen = {}, {}, []
    for path, x in _distinct_leaves(params).items():
        described[path] = {"shape": [int(n) for n in x.shape], "dtype": _dtype_name(x.dtype)}
        state = store.get(x, _MISSING)
        if state is not _MISSING:
            states[path] = _to_plain(state, path)
        if x in store.frozen:
            frozen.append(path)
    return {
        "format": FORMAT,
        "version": VERSION,
        "optimiser": repr(opt),
        "structure": _structure(opt),
        "step": store.step,
        "hyperparameters": _stored_hyperparameters(opt),
        "params": described,
        "states": states,
        "frozen": frozen,
    }


def load_state_dict(opt: Rule, params: Any, checkpoint: dict[str, Any], strict: bool = True) -> Rule:
    """Restore a [state_dict][composeopt.state_dict] onto `opt` for the arrays of `params`.

    State arrays are created on each parameter's own device.  Raises
    [CheckpointError][composeopt.errors.CheckpointError], changing nothing, when the checkpoint is not one,
    comes from a newer format, was made for another rule or chain structure, or
    when a parameter's shape or dtype changed; with `strict` (the default)
    also when parameters are missing from it or it has unexpected ones.
    Returns `opt`.
    """
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError("not a composeopt checkpoint")
    if not isinstance(checkpoint.get("version"), int) or checkpoint["version"] > VERSION:
        raise CheckpointError(
            f"checkpoint format version {checkpoint.get('version')!r} is newer than {VERSION}"
        )
    if checkpoint["structure"] != _structure(opt):
        raise CheckpointError(
            f"checkpoint is for {checkpoint['optimiser']}, not for {opt!r}: the rules or the chain differ"
        )
    leaves = _distinct_leaves(params)
    saved = checkpoint["params"]
    missing = [path for path in leaves if path not in saved]
    unexpected = [path for path in saved if path not in leaves]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"parameters missing from the checkpoint: {missing}; unexpected in it: {unexpected}"
        )
    for path, x in leaves.items():
        if path in saved:
            shape, dtype = tuple(saved[path]["shape"]), saved[path]["dtype"]
            if shape != tuple(x.shape) or dtype != _dtype_name(x.dtype):
                raise CheckpointError(
                    f"{path}: checkpoint has shape {shape} and dtype {dtype}, the parameter "
                    f"has shape {tuple(x.shape)} and dtype {_dtype_name(x.dtype)}"
                )
    # Build everything first, then commit: a failure leaves opt as it was.
    restored = {
        path: _from_plain(checkpoint["states"][path], x)
        for path, x in leaves.items()
        if path in checkpoint["states"]
    }
    rules = list(walk_rules(opt))
    restore = keep_hyperparameters(opt)
    try:
        for rule, values in zip(rules, checkpoint["hyperparameters"]):
            for name, value in values.items():
                setattr(rule, name, tuple(value) if isinstance(value, list) else value)
    except BaseException:
        restore()
        raise
    store = state_store(opt)
    store.step = checkpoint["step"]
    for path, x in leaves.items():
        if path in restored:
            store.set(x, restored[path])
        if path in saved:
            if path in checkpoint["frozen"]:
                store.frozen.set(x, True)
            else:
                store.frozen.discard(x)
    return opt


def _split_arrays(plain: Any, arrays: dict[str, np.ndarray]) -> Any:
    """`plain` with each array replaced by a reference into `arrays`."""
    if isinstance(plain, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = plain
        return {"__array__": name}
    if isinstance(plain, dict):
        return {key: _split_arrays(value, arrays) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_split_arrays(item, arrays) for item in plain]
    return plain


def _join_arrays(plain: Any, arrays: Any) -> Any:
    if isinstance(plain, dict):
        if set(plain) == {"__array__"}:
            return arrays[plain["__array__"]]
        return {key: _join_arrays(value, arrays) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_join_arrays(item, arrays) for item in plain]
    return plain


def save(file: str | os.PathLike[str], opt: Rule, params: Any) -> None:
    """Write [state_dict][composeopt.state_dict] to `file` as `.npz`, atomically.

    The archive is written to a temporary file beside `file`, then renamed over it.
    """
    arrays: dict[str, np.ndarray] = {}
    meta = json.dumps(_split_arrays(state_dict(opt, params), arrays))
    target = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".composeopt-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **{_META: np.array(meta)}, **arrays)  # type: ignore[arg-type]
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load(file: str | os.PathLike[str], opt: Rule, params: Any, strict: bool = True) -> Rule:
    """Read a checkpoint written by [save][composeopt.save] (never unpickling) and load it onto `opt`."""
    with np.load(os.fspath(file), allow_pickle=False) as archive:
        if _META not in archive.files:
            raise CheckpointError(f"{os.fspath(file)} is not a composeopt checkpoint")
        plain = json.loads(str(archive[_META]))
        checkpoint = _join_arrays(plain, {name: archive[name] for name in archive.files if name != _META})
    return load_state_dict(opt, params, checkpoint, strict=strict)
