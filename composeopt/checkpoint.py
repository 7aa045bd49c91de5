"""Checkpoints: an optimiser's state as plain data, keyed by parameter path.

`state_dict(opt, params)` describes everything a resumed run needs: each
parameter's state under its path in the params tree (ids die with the
process, paths do not), the optimiser step count that schedules and decays
follow, the current hyperparameters, how parameter groups select, and which
parameters are frozen.  Arrays come back on the host as NumPy arrays, so a
checkpoint written on the GPU loads on the CPU and the other way round.

`save` writes it as a `.npz` archive (each state array as a member named by
its parameter's path, the rest as JSON in one text member), atomically and
readable with `allow_pickle=False`: loading a checkpoint never runs code.

Loading checks the whole checkpoint before it changes anything: every entry's
type and range, every hyperparameter through its own check, and every state
against the state that `init` makes for that parameter now (records and their
fields, lengths, array shapes and dtypes, kinds of numbers).  A file is read
only as far as its manifest and the parameters say it should be.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import array_api_compat
import numpy as np

from ._dispatch import is_array, namespace
from ._npz import ARCHIVE_ERRORS, MAX_MANIFEST_CHARS, META, Archive, Refused
from ._npz import shown as _shown
from .engine import state_store
from .errors import CheckpointError, ComposeoptError, HyperparameterError
from .groups import Groups
from .hyper import Hyper, follow_schedules, is_scheduled
from .rule import Rule, State, keep_hyperparameters, walk_rules
from .tree import Path, array_leaves

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_STEP",
    "MAX_MANIFEST_CHARS",
    "state_dict",
    "load_state_dict",
    "save",
    "load",
]

FORMAT = "composeopt-checkpoint"
VERSION = 2
"""Version 2 records the parameter groups' selectors; version 1 checkpoints still load."""
MAX_STEP = 2**63 - 1
"""The largest step count or state counter a checkpoint may hold (counters are int64 in the kernels)."""
_MISSING: Any = object()
_ENTRIES = {
    1: {
        "format",
        "version",
        "optimiser",
        "structure",
        "step",
        "hyperparameters",
        "params",
        "states",
        "frozen",
    },
}
_ENTRIES[2] = _ENTRIES[1] | {"groups"}
_MAX_HYPER_DEPTH = 3  # a hyperparameter is a number, a string, or a (nested) tuple of them


# --- state -> plain data ----------------------------------------------------------


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


# --- what must match -------------------------------------------------------------


def _structure(rule: Rule) -> list[Any]:
    """The rule's type and its children's structures, for comparing optimisers."""
    return [type(rule).__name__, [_structure(child) for child in rule.children()]]


def _groupings(opt: Rule) -> list[Any]:
    return [rule.describe_selectors() for rule in walk_rules(opt) if isinstance(rule, Groups)]


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


def _distinct_leaves(params: Any) -> dict[str, tuple[Path, Any]]:
    leaves: dict[str, tuple[Path, Any]] = {}
    seen: set[int] = set()
    for path, x in array_leaves(params):
        if id(x) not in seen:  # a tied array is saved once, under its first path
            seen.add(id(x))
            leaves[str(path)] = (path, x)
    return leaves


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rpartition(".")[2]


def _count(value: Any, low: int = 0) -> bool:
    return type(value) is int and low <= value <= MAX_STEP


# --- restoring states: plain data checked against what init makes -------------------


def _host_dtype(array: Any) -> np.dtype[Any]:
    try:
        dtype: np.dtype[Any] = np.dtype(array.dtype)
    except TypeError:  # array_api_strict's dtypes are not NumPy's
        dtype = np.dtype(_dtype_name(array.dtype))
    return dtype


ReadArray = Callable[[Any, tuple[int, ...], "np.dtype[Any]"], np.ndarray]
"""`read(plain, shape, dtype)`: the host array that `plain` stands for (the array itself, or a
reference into an archive), once it is known to have that shape and dtype; else `Refused`."""


@dataclass
class _Restorer:
    """Turns one parameter's plain state back into a state, refusing anything `init` would not make.

    `copy` says whether the arrays that `read` gives must be copied (they belong to the caller).
    """

    read: ReadArray
    copy: bool
    group_states: set[int] = field(default_factory=set)
    path: str = ""

    def fail(self, where: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: checkpoint state{where}: {problem}")

    def unwrap(self, plain: Any, kind: str, what: str, where: str) -> Any:
        if not (isinstance(plain, dict) and len(plain) == 1 and kind in plain):
            raise self.fail(where, f"expected {what} ({{{kind!r}: ...}}), got {_shown(plain)}")
        return plain[kind]

    def restore(self, plain: Any, fresh: Any, where: str = "") -> Any:
        if is_array(fresh) or isinstance(fresh, np.generic):
            return self.array(plain, fresh, where)
        if isinstance(fresh, State):
            fields = self.unwrap(plain, "__state__", "a State record", where)
            if not isinstance(fields, dict):
                raise self.fail(where, f"expected the record's fields as a dict, got {_shown(fields)}")
            expected = vars(fresh)
            missing = [name for name in expected if name not in fields]
            unexpected = [name for name in fields if name not in expected]
            if missing or unexpected:
                raise self.fail(
                    where, f"the record has missing fields {missing} and unexpected fields {unexpected}"
                )
            return State(
                **{
                    name: self.restore(fields[name], value, f"{where}.{name}")
                    for name, value in expected.items()
                }
            )
        if isinstance(fresh, tuple) and not hasattr(fresh, "_fields"):
            items = self.sequence(self.unwrap(plain, "__tuple__", "a tuple", where), len(fresh), where)
            if id(fresh) in self.group_states:
                index, inner = fresh
                if type(items[0]) is not int or items[0] != index:
                    raise self.fail(
                        f"{where}[0]",
                        f"the checkpoint puts the parameter in group {_shown(items[0])}, "
                        f"the current Groups puts it in group {index}",
                    )
                return (index, self.restore(items[1], inner, f"{where}[1]"))
            return tuple(
                self.restore(item, value, f"{where}[{i}]")
                for i, (item, value) in enumerate(zip(items, fresh))
            )
        if isinstance(fresh, list):
            items = self.sequence(plain, len(fresh), where)
            return [
                self.restore(item, value, f"{where}[{i}]")
                for i, (item, value) in enumerate(zip(items, fresh))
            ]
        if isinstance(fresh, dict) and all(isinstance(key, str) for key in fresh):
            entries = self.unwrap(plain, "__dict__", "a dict", where)
            if not isinstance(entries, dict) or set(entries) != set(fresh):
                keys = sorted(map(str, entries)) if isinstance(entries, dict) else _shown(entries)
                raise self.fail(where, f"expected a dict with keys {sorted(fresh)}, got {keys}")
            return {
                key: self.restore(entries[key], value, f"{where}[{key!r}]") for key, value in fresh.items()
            }
        return self.scalar(plain, fresh, where)

    def sequence(self, plain: Any, length: int, where: str) -> list[Any]:
        if not isinstance(plain, list) or len(plain) != length:
            raise self.fail(where, f"expected a list of {length}, got {_shown(plain)}")
        return plain

    def scalar(self, plain: Any, fresh: Any, where: str) -> Any:
        if fresh is None:
            if plain is not None:
                raise self.fail(where, f"expected None, got {_shown(plain)}")
            return None
        if isinstance(fresh, bool):
            if type(plain) is not bool:
                raise self.fail(where, f"expected True or False, got {_shown(plain)}")
            return plain
        if isinstance(fresh, int):
            if fresh >= 0 and not _count(plain):
                raise self.fail(
                    where, f"expected a non-negative integer up to {MAX_STEP}, got {_shown(plain)}"
                )
            if fresh < 0 and not _count(plain, -MAX_STEP):
                raise self.fail(where, f"expected an integer, got {_shown(plain)}")
            return plain
        if isinstance(fresh, float):
            if not isinstance(plain, float):
                raise self.fail(where, f"expected a float, got {_shown(plain)}")
            return float(plain)
        if isinstance(fresh, str):
            if not isinstance(plain, str):
                raise self.fail(where, f"expected a string, got {_shown(plain)}")
            return plain
        raise self.fail(where, f"cannot restore a state of type {type(fresh).__name__}")

    def array(self, plain: Any, fresh: Any, where: str) -> Any:
        shape = tuple(int(n) for n in fresh.shape)
        dtype = _host_dtype(fresh)
        try:
            host = self.read(plain, shape, dtype)
        except Refused as err:
            raise self.fail(where, str(err)) from None
        if isinstance(fresh, (np.ndarray, np.generic)):
            return np.array(host, copy=True) if self.copy else host
        xp = namespace(fresh)
        if self.copy:
            return xp.asarray(host, device=array_api_compat.device(fresh), copy=True)
        return xp.asarray(host, device=array_api_compat.device(fresh))


def _inline_array(plain: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    if not isinstance(plain, np.ndarray) or plain.dtype != dtype or plain.shape != shape:
        raise Refused(f"expected a {dtype} array of shape {shape}, got {_shown(plain)}")
    return plain


def _fresh_states(opt: Rule, leaves: list[tuple[Path, Any]]) -> tuple[list[Any], set[int]]:
    """The states `opt` makes now for `leaves`, and the ids of the `(group, state)` pairs
    that its Groups made among them: a pair's group must be what the checkpoint says."""
    made: set[int] = set()
    patched: dict[int, Groups] = {}
    for rule in walk_rules(opt):
        if isinstance(rule, Groups) and id(rule) not in patched:
            patched[id(rule)] = rule
            original = rule.init_tree_

            def recording(xs: Any, paths: Any, original: Any = original) -> list[Any]:
                states: list[Any] = original(xs, paths)
                made.update(id(state) for state in states)
                return states

            vars(rule)["init_tree_"] = recording
    try:
        fresh = opt.init_tree_([x for _, x in leaves], [path for path, _ in leaves])
    except ComposeoptError as err:
        raise CheckpointError(f"cannot make the states to compare the checkpoint with: {err}") from err
    finally:
        for rule in patched.values():
            del vars(rule)["init_tree_"]
    return fresh, made


# --- checking a whole checkpoint -------------------------------------------------


@dataclass
class _Load:
    """A checked checkpoint: everything loading will do, computed before any of it is done."""

    step: int
    assignments: list[tuple[Rule, str, Any]]
    states: list[tuple[Any, Any]]
    without_state: list[Any]
    frozen: list[tuple[Any, bool]]


def _as_set(value: Any) -> Any:
    """A JSON hyperparameter as a rule holds it: lists are tuples."""
    return tuple(_as_set(item) for item in value) if isinstance(value, (list, tuple)) else value


def _plain_value(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (numbers.Number, str)):
        return True
    if isinstance(value, (list, tuple)) and depth < _MAX_HYPER_DEPTH:
        return all(_plain_value(item, depth + 1) for item in value)
    return False


def _checked_header(checkpoint: Any, opt: Rule) -> int:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"a checkpoint is a dict made by state_dict, got a {type(checkpoint).__name__}")
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"not a composeopt checkpoint: its 'format' entry is {_shown(checkpoint.get('format'))}"
        )
    version = checkpoint.get("version", _MISSING)
    if type(version) is not int:
        shown = "missing" if version is _MISSING else _shown(version)
        raise CheckpointError(f"checkpoint entry 'version' must be an integer, got {shown}")
    if version > VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than {VERSION}, the newest this composeopt reads"
        )
    if version not in _ENTRIES:
        raise CheckpointError(f"checkpoint entry 'version': there is no checkpoint format version {version}")
    missing = sorted(_ENTRIES[version] - set(checkpoint))
    unexpected = sorted(str(key) for key in set(checkpoint) - _ENTRIES[version])
    if missing or unexpected:
        raise CheckpointError(f"checkpoint entries missing: {missing}; unexpected: {unexpected}")
    if not isinstance(checkpoint["optimiser"], str):
        raise CheckpointError(
            f"checkpoint entry 'optimiser' must be a string, got {_shown(checkpoint['optimiser'])}"
        )
    if checkpoint["structure"] != _structure(opt):
        raise CheckpointError(
            f"checkpoint entry 'structure': the checkpoint is for {_shown(checkpoint['optimiser'])}, "
            f"not for {opt!r}: the rules or the chain differ"
        )
    if version >= 2 and checkpoint["groups"] != _groupings(opt):
        raise CheckpointError(
            "checkpoint entry 'groups': the parameter groups' selectors differ: the checkpoint has "
            f"{_shown(checkpoint['groups'])}, the optimiser {_groupings(opt)!r}"
        )
    step: int = checkpoint["step"]
    if not _count(step):
        raise CheckpointError(
            f"checkpoint entry 'step': expected a non-negative integer up to {MAX_STEP}, got {_shown(step)}"
        )
    return step


def _checked_hyperparameters(checkpoint: dict[str, Any], opt: Rule) -> list[tuple[Rule, str, Any]]:
    rules = list(walk_rules(opt))
    saved = checkpoint["hyperparameters"]
    if not isinstance(saved, list) or len(saved) != len(rules):
        raise CheckpointError(
            f"checkpoint entry 'hyperparameters': expected a list of {len(rules)} dicts, got {_shown(saved)}"
        )
    assignments = []
    for index, (rule, values) in enumerate(zip(rules, saved)):
        where = f"checkpoint entry 'hyperparameters'[{index}] ({type(rule).__name__})"
        if not isinstance(values, dict):
            raise CheckpointError(f"{where}: expected a dict, got {_shown(values)}")
        names = type(rule)._hyper_names
        for name, value in values.items():
            descriptor = getattr(type(rule), name, None) if isinstance(name, str) else None
            if name not in names or not isinstance(descriptor, Hyper):
                raise CheckpointError(
                    f"{where}: {_shown(name)} is not a hyperparameter of it; its hyperparameters are {names}"
                )
            if not _plain_value(value):
                raise CheckpointError(f"{where}: {type(rule).__name__}.{name} cannot be {_shown(value)}")
            try:
                descriptor.validate(rule, _as_set(value))
            except HyperparameterError as err:
                raise CheckpointError(f"{where}: {err}") from None
            assignments.append((rule, name, _as_set(value)))
    return assignments


def _checked_params(checkpoint: dict[str, Any]) -> dict[str, Any]:
    saved = checkpoint["params"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint entry 'params': expected a dict by path, got {_shown(saved)}")
    for path, entry in saved.items():
        where = f"checkpoint entry 'params' for {_shown(path)}"
        if not isinstance(path, str):
            raise CheckpointError(f"{where}: paths are strings")
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise CheckpointError(
                f"{where}: expected {{'shape': [...], 'dtype': '...'}}, got {_shown(entry)}"
            )
        shape = entry["shape"]
        if not isinstance(shape, (list, tuple)) or not all(_count(n) for n in shape):
            raise CheckpointError(
                f"{where}: the shape must be a list of non-negative integers, got {_shown(shape)}"
            )
        if not isinstance(entry["dtype"], str):
            raise CheckpointError(f"{where}: the dtype must be a name, got {_shown(entry['dtype'])}")
    return saved


def _checked_states(checkpoint: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    states = checkpoint["states"]
    if not isinstance(states, dict):
        raise CheckpointError(
            f"checkpoint entry 'states': expected a dict of states by path, got {_shown(states)}"
        )
    for path in states:
        if path not in saved:
            raise CheckpointError(
                f"checkpoint entry 'states' has a state for {_shown(path)}, which is not in its 'params'"
            )
    return states


def _checked_frozen(checkpoint: dict[str, Any], saved: dict[str, Any]) -> set[str]:
    frozen = checkpoint["frozen"]
    if not isinstance(frozen, list):
        raise CheckpointError(f"checkpoint entry 'frozen': expected a list of paths, got {_shown(frozen)}")
    for path in frozen:
        if not isinstance(path, str) or path not in saved:
            raise CheckpointError(
                f"checkpoint entry 'frozen' names {_shown(path)}, which is not in its 'params'"
            )
    if len(set(frozen)) != len(frozen):
        raise CheckpointError("checkpoint entry 'frozen' names a path twice")
    return set(frozen)


def _checked(
    opt: Rule,
    params: Any,
    checkpoint: Any,
    strict: bool,
    read: ReadArray,
    copy: bool,
    before_reading: Callable[[dict[str, Any]], None] | None = None,
) -> _Load:
    step = _checked_header(checkpoint, opt)
    assignments = _checked_hyperparameters(checkpoint, opt)
    saved = _checked_params(checkpoint)
    states = _checked_states(checkpoint, saved)
    frozen = _checked_frozen(checkpoint, saved)
    leaves = _distinct_leaves(params)
    missing = [path for path in leaves if path not in saved]
    unexpected = [path for path in saved if path not in leaves]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"parameters missing from the checkpoint: {missing}; unexpected in it: {unexpected}"
        )
    for path, (_, x) in leaves.items():
        if path in saved:
            shape, dtype = tuple(saved[path]["shape"]), saved[path]["dtype"]
            if shape != tuple(x.shape) or dtype != _dtype_name(x.dtype):
                raise CheckpointError(
                    f"{path}: checkpoint has shape {shape} and dtype {dtype}, the parameter "
                    f"has shape {tuple(x.shape)} and dtype {_dtype_name(x.dtype)}"
                )
    loaded = [path for path in leaves if path in states]
    if before_reading is not None:
        before_reading(states)
    fresh, group_states = _fresh_states(opt, [leaves[path] for path in loaded])
    restorer = _Restorer(read=read, copy=copy, group_states=group_states)
    restored = []
    for index, path in enumerate(loaded):
        restorer.path = path
        restored.append((leaves[path][1], restorer.restore(states[path], fresh[index])))
        # Let the comparison's arrays go once they have served.  (The ids in group_states stay
        # unambiguous: every fresh state was alive when they were recorded.)
        fresh[index] = None
    return _Load(
        step=step,
        assignments=assignments,
        states=restored,
        without_state=[x for path, (_, x) in leaves.items() if path in saved and path not in states],
        frozen=[(x, path in frozen) for path, (_, x) in leaves.items() if path in saved],
    )


def _commit(opt: Rule, load: _Load) -> Rule:
    restore = keep_hyperparameters(opt)
    try:
        for rule, name, value in load.assignments:
            setattr(rule, name, value)
        if load.step >= 1:  # as after that step; before any step, schedules read their first step's value
            for rule in walk_rules(opt):
                follow_schedules(rule, load.step)
    except HyperparameterError as err:
        restore()
        raise CheckpointError(
            f"checkpoint entry 'step': a schedule cannot be followed to step {load.step}: {err}"
        ) from None
    except BaseException:
        restore()
        raise
    store = state_store(opt)
    store.step = load.step
    for x, state in load.states:
        store.set(x, state)
    for x in load.without_state:
        store.discard(x)
    for x, is_frozen in load.frozen:
        if is_frozen:
            store.frozen.set(x, True)
        else:
            store.frozen.discard(x)
    return opt


# --- public API -------------------------------------------------------------------


def state_dict(opt: Rule, params: Any) -> dict[str, Any]:
    """The optimiser's state as plain data: dicts, lists, numbers, strings and NumPy arrays.

    Keys: `format`, `version`, `optimiser` (its `repr`), `structure`,
    `groups` (each [Groups][composeopt.Groups]' selectors, as text),
    `step` (optimiser steps taken), `hyperparameters` (per rule, depth
    first; scheduled ones are left out, as the step count determines them),
    `params` (each path's shape and dtype), `states` (each path's state)
    and `frozen` (paths).
    """
    store = state_store(opt)
    described, states, frozen = {}, {}, []
    for path, (_, x) in _distinct_leaves(params).items():
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
        "groups": _groupings(opt),
        "step": store.step,
        "hyperparameters": _stored_hyperparameters(opt),
        "params": described,
        "states": states,
        "frozen": frozen,
    }


def load_state_dict(opt: Rule, params: Any, checkpoint: dict[str, Any], strict: bool = True) -> Rule:
    """Restore a [state_dict][composeopt.state_dict] onto `opt` for the arrays of `params`.

    Everything is checked before anything changes: each entry's type and range (the step is an
    integer in `[0, MAX_STEP]`), each hyperparameter by its rule's own check (only declared
    hyperparameters load), each state against the state `opt` would make for that parameter now
    (the same records, fields, lengths, array shapes and dtypes, kinds of numbers, and group of a
    [Groups][composeopt.Groups]), and the groups' selectors.  Raises
    [CheckpointError][composeopt.errors.CheckpointError] naming the entry, changing nothing,
    when anything does not fit; with `strict` (the default) also when parameters are missing
    from it or it has unexpected ones (`strict=False` loads the parameters that match).

    State arrays are copied onto each parameter's own device.  A parameter that had no state in
    the checkpoint has none afterwards.  Scheduled hyperparameters read their value at the loaded
    step, as they did when the checkpoint was taken; before any step, their first step's value,
    as in a new optimiser.  Returns `opt`.
    """
    return _commit(opt, _checked(opt, params, checkpoint, strict, _inline_array, copy=True))


# --- files ------------------------------------------------------------------------


def _member_part(text: str) -> str:
    """`text` as one part of a zip member name: `/`, `\\`, `%` and control characters are
    %-escaped (so parts never split or escape a folder), and so are parts all of dots."""
    escaped = "".join(
        f"%{ord(c):02X}"
        if c in "%/\\" or ord(c) < 32 or ord(c) == 127
        else f"%u{ord(c):04X}"
        if 0xD800 <= ord(c) <= 0xDFFF  # a lone surrogate cannot be written as UTF-8
        else c
        for c in text
    )
    if not escaped:
        return "%"
    if escaped.strip(".") == "":
        return "%2E" * len(escaped)
    return escaped


def _split_arrays(plain: Any, arrays: dict[str, np.ndarray], name: str) -> Any:
    """`plain` with each array replaced by a reference to the member `name/field/...` of `arrays`."""
    if isinstance(plain, np.ndarray):
        arrays[name] = plain
        return {"__array__": name}
    if isinstance(plain, dict):
        ((kind, content),) = plain.items()
        if kind == "__tuple__":
            return {kind: [_split_arrays(item, arrays, f"{name}/{i}") for i, item in enumerate(content)]}
        return {
            kind: {
                key: _split_arrays(value, arrays, f"{name}/{_member_part(key)}")
                for key, value in content.items()
            }
        }
    if isinstance(plain, list):
        return [_split_arrays(item, arrays, f"{name}/{i}") for i, item in enumerate(plain)]
    return plain


def save(file: str | os.PathLike[str], opt: Rule, params: Any) -> None:
    """Write [state_dict][composeopt.state_dict] to `file` as `.npz`, atomically.

    Each state array is a member named by its parameter's path and its place in the state
    (`params['W']/mu`, `params['W']/2/nu` in a chain), so `np.load` alone can inspect it; the
    rest is JSON in the member `__composeopt__`, which names them.  The archive is written to
    a temporary file beside `file`, then renamed over it.
    """
    write_checkpoint(file, state_dict(opt, params))


def write_checkpoint(file: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint dict as [state_dict][composeopt.state_dict] makes it to `file`, as
    [save][composeopt.save] does (also for checkpoints assembled elsewhere, from shards)."""
    arrays: dict[str, np.ndarray] = {}
    checkpoint = dict(checkpoint)
    checkpoint["states"] = {
        path: _split_arrays(state, arrays, _member_part(path)) for path, state in checkpoint["states"].items()
    }
    meta = json.dumps(checkpoint)
    if len(meta) > MAX_MANIFEST_CHARS:
        raise CheckpointError(
            f"the checkpoint's manifest has {len(meta)} characters, more than {MAX_MANIFEST_CHARS}"
        )
    write_atomically(
        file,
        lambda stream: np.savez(stream, **{META: np.array(meta)}, **arrays),  # type: ignore[arg-type]
    )


def write_atomically(file: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Have `write` fill a temporary file beside `file`, flushed to disk, then rename it to `file`:
    a crash at any point leaves either the old file or the whole new one, never part of one."""
    target = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".composeopt-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load(file: str | os.PathLike[str], opt: Rule, params: Any, strict: bool = True) -> Rule:
    """Read a checkpoint written by [save][composeopt.save] and load it onto `opt`.

    Nothing is unpickled, and only what the manifest names is read: each member after its
    header shows the shape and dtype that the manifest and the parameter call for, and the
    manifest itself only up to `MAX_MANIFEST_CHARS`.
    A file that is not such a checkpoint, a manifest that is not valid JSON, missing, renamed
    or extra members, and everything [load_state_dict][composeopt.load_state_dict] refuses raise
    [CheckpointError][composeopt.errors.CheckpointError], naming the file and the entry, and
    change nothing.  A file that cannot be opened raises the `OSError` that `open` raises.
    """
    name = os.fspath(file)
    with open(name, "rb") as stream:
        try:
            try:
                archive = zipfile.ZipFile(stream)
            except ARCHIVE_ERRORS as err:
                raise CheckpointError(f"not a composeopt checkpoint: not a .npz archive ({err})") from None
            with archive:
                members = Archive(archive)
                checkpoint = members.manifest()
                load_ = _checked(
                    opt,
                    params,
                    checkpoint,
                    strict,
                    members.read,
                    copy=False,
                    before_reading=members.references,
                )
        except CheckpointError as err:
            raise CheckpointError(f"{name}: {err}") from None
    return _commit(opt, load_)
