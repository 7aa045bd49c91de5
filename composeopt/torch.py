"""composeopt for PyTorch: a `torch.optim.Optimizer` whose step is a composeopt rule.

```python
import composeopt as co
from composeopt.torch import Optimizer

opt = Optimizer(model.named_parameters(), co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-3)))
loss.backward(); opt.step(); opt.zero_grad()
```

torch computes the gradients; the rule updates the model's tensors in place
through views that share their memory (NumPy on the CPU, CuPy on CUDA), made
once and made again only when a tensor's storage changes.  `param_groups`
drive the rule's hyperparameters, so `torch.optim.lr_scheduler` works on it,
and `state_dict` is plain tensors and Python data for `torch.save`.

This module imports torch; `import composeopt` does not.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from typing import Any, overload

import numpy as np

try:
    import torch
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        "composeopt.torch needs PyTorch: pip install 'composeopt[torch]'", name="torch"
    ) from err

from ._dispatch import is_array, namespace
from .chain import Optimiser
from .checkpoint import load_state_dict as _load_checkpoint
from .checkpoint import state_dict as _checkpoint
from .engine import state_store, update_
from .errors import CheckpointError, HyperparameterError, ShapeMismatchError, UnsupportedArrayError
from .groups import Groups
from .hyper import Hyper, is_scheduled
from .rule import Rule, State, keep_hyperparameters, walk_rules
from .rules.muon import Muon
from .rules.sgd import Momentum, Nesterov
from .tree import Path

__all__ = ["Optimizer"]

FORMAT = "composeopt.torch.Optimizer"
"""The `format` entry of [Optimizer.state_dict][composeopt.torch.Optimizer.state_dict]."""
VERSION = 1

KEYS = {"lr": "eta", "betas": "beta", "momentum": "rho", "weight_decay": "lambda_", "eps": "epsilon"}
"""The keys of a param group that drive a hyperparameter, and the composeopt name each sets."""

_MOMENTUM_RULES = (Momentum, Nesterov, Muon)  # the rules whose `rho` is torch's `momentum`
_MISSING: Any = object()
_increment_version = getattr(torch.autograd.graph, "increment_version", None)  # torch 2.2 and later


# --- views ------------------------------------------------------------------------


def _cupy(what: str) -> Any:
    try:
        import cupy
    except ImportError as err:
        raise UnsupportedArrayError(
            f"{what} is a CUDA tensor: composeopt updates CUDA tensors through CuPy, which is not "
            "installed (pip install 'composeopt[cuda12]', or '[cuda13]')"
        ) from err
    return cupy


def _bfloat16(what: str) -> Any:
    try:
        import ml_dtypes
    except ImportError as err:
        raise UnsupportedArrayError(
            f"{what} is a bfloat16 tensor: NumPy's bfloat16 comes from ml_dtypes, which is not "
            "installed (pip install ml_dtypes)"
        ) from err
    return ml_dtypes.bfloat16


def _view(tensor: torch.Tensor, what: str) -> Any:
    """An array that shares `tensor`'s memory: NumPy for a CPU tensor, CuPy for a CUDA one."""
    tensor = tensor.detach()
    if tensor.layout is not torch.strided:
        raise UnsupportedArrayError(f"{what} is a {tensor.layout} tensor; only dense tensors can be updated")
    kind = tensor.device.type
    if kind == "cpu":
        if tensor.dtype is torch.bfloat16:  # NumPy has no bfloat16: the same 16 bits, read as ml_dtypes'
            return tensor.view(torch.int16).numpy().view(_bfloat16(what))
        try:
            return tensor.numpy()
        except (TypeError, RuntimeError) as err:
            raise UnsupportedArrayError(f"{what}: NumPy cannot view it ({err})") from err
    if kind == "cuda":
        cupy = _cupy(what)
        if tensor.dtype is torch.bfloat16:
            raise UnsupportedArrayError(f"{what} is a bfloat16 CUDA tensor, and CuPy has no bfloat16")
        return cupy.from_dlpack(tensor)
    raise UnsupportedArrayError(
        f"{what} is on device {tensor.device}; composeopt updates CPU tensors (through NumPy) "
        "and CUDA tensors (through CuPy)"
    )


def _grad_view(grad: torch.Tensor, what: str) -> Any:
    """`_view` of a gradient, with the common case first (a gradient is viewed at every step)."""
    if grad.is_cpu and not grad.requires_grad and grad.dtype is not torch.bfloat16:
        try:
            return grad.numpy()
        except (TypeError, RuntimeError):
            pass  # sparse, or a dtype NumPy lacks: `_view` says what is wrong
    return _view(grad, what)


def _storage(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What a view of `tensor` depends on: another value means the view must be made again.
    (A tensor moved to another device has another address.)"""
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)


class _Parameter:
    """One tensor of the optimizer: its name, its view, and the storage the view was made of."""

    __slots__ = ("name", "path", "tensor", "array", "storage")

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self.path = Path().child(name)  # as the engine names it, for the state store
        self.tensor = tensor
        self.array = _view(tensor, name)
        self.storage = _storage(tensor)


def _recast(state: Any, new: Any, old_dtype: Any) -> Any:
    """`state` for the new view `new` of a tensor: arrays moved to its module and device, and
    those of the tensor's old dtype cast to its new one."""
    if is_array(state):
        xp = namespace(new)
        if namespace(state) is not xp:
            if type(new) is np.ndarray:
                state = np.asarray(state.get())  # a CUDA tensor moved to the CPU
            else:
                with new.device:
                    state = sys.modules["cupy"].asarray(state)
        elif type(new) is not np.ndarray and state.device != new.device:
            with new.device:
                state = state.copy()
        if state.dtype == old_dtype and new.dtype != old_dtype:
            state = state.astype(new.dtype)
        return state
    if isinstance(state, State):
        return State(**{name: _recast(value, new, old_dtype) for name, value in vars(state).items()})
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(_recast(item, new, old_dtype) for item in state)
    if isinstance(state, list):
        return [_recast(item, new, old_dtype) for item in state]
    if isinstance(state, dict):
        return {key: _recast(value, new, old_dtype) for key, value in state.items()}
    return state


# --- param groups and hyperparameters ------------------------------------------------


def _plain(value: Any) -> Any:
    """A group's value as a rule takes it: tensors as numbers, lists as tuples."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return value


class _Binding:
    """How the keys of one param group (`lr`, `betas`, ...) reach the rules of its rule.

    A key sets every rule that has its hyperparameter, as `co.adjust_` does.  `lr` is
    the exception when the rules' learning rates differ (`Muon` and its fallback, the
    groups of a `Groups`): the group's `lr` is the largest, and each `eta` keeps its
    ratio to it.  Another key whose rules differ is left out of the group (setting it
    in a group sets them all).
    """

    def __init__(self, rule: Rule) -> None:
        self.holders: dict[str, list[Any]] = {}  # rules, with the hyperparameter of the key
        for key, name in KEYS.items():
            found: dict[int, Rule] = {}
            for inner in walk_rules(rule):
                if name in type(inner)._hyper_names and (
                    key != "momentum" or isinstance(inner, _MOMENTUM_RULES)
                ):
                    found.setdefault(id(inner), inner)
            if found:
                self.holders[key] = list(found.values())
        # `lr` is the largest learning rate, which no rule scales from 0.
        self.base_etas = [holder.eta for holder in self.holders.get("lr", [])]
        self.base_lr = max(self.base_etas, default=0.0)

    def read(self) -> dict[str, Any]:
        """The group values of the rules now: every key whose rules agree, and `lr`."""
        values = {}
        for key, holders in self.holders.items():
            name = KEYS[key]
            current = [getattr(holder, name) for holder in holders]
            if key == "lr":
                values[key] = max(current)
            elif all(value == current[0] for value in current):
                values[key] = current[0]
        return values

    def scheduled(self, key: str) -> bool:
        name = KEYS[key]
        return any(is_scheduled(holder.settings()[name]) for holder in self.holders[key])

    def write(self, key: str, value: Any) -> None:
        name = KEYS[key]
        if key == "lr" and len(set(self.base_etas)) > 1:
            for holder, base in zip(self.holders[key], self.base_etas):
                holder.eta = value if base == self.base_lr else base * (value / self.base_lr)
            return
        for holder in self.holders[key]:
            setattr(holder, name, value)

    def validate(self, key: str, value: Any) -> None:
        """Raise as `write` would, changing nothing."""
        name = KEYS[key]
        for holder in self.holders[key]:
            descriptor = getattr(type(holder), name)
            if isinstance(descriptor, Hyper) and not is_scheduled(value):
                descriptor.validate(holder, value)


class _Members:
    """The selector of one param group in the `Groups` that holds several: its parameters' names."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, path: Path, x: Any) -> bool:
        return bool(path.keys) and path.keys[-1] in self.names

    def __repr__(self) -> str:
        return f"<param group of {len(self.names)} parameters>"


def _drives(rule: Rule) -> bool:
    """Whether some key of a param group sets a hyperparameter of `rule` (or of a rule in it)."""
    return bool(_Binding(rule).holders)


def _fresh_copy(rule: Rule) -> Rule:
    """A deep copy of `rule` without the state of any optimiser it was used as."""
    memo: dict[int, Any] = {}
    for inner in walk_rules(rule):
        store = vars(inner).get("_composeopt_state")
        if store is not None:
            memo[id(store)] = None
    fresh: Rule = copy.deepcopy(rule, memo)
    return fresh


class _Split:
    """A rule split for several param groups: the leading rules of a chain that no group key
    reaches (clipping, say) are shared, so they see every gradient; the rest, `tail`, is the
    rule of the first group, and each other group gets a copy of it, in a `Groups`."""

    def __init__(self, rule: Rule) -> None:
        chain = list(rule.rules) if type(rule) is Optimiser else [rule]
        first = next((i for i, inner in enumerate(chain) if _drives(inner)), len(chain))
        self.shared = chain[:first]
        self.whole = first == 0  # the tail is `rule` itself
        self.size = len(chain) - first
        tail = chain[first:]
        self.tail: Rule = rule if self.whole else tail[0] if len(tail) == 1 else Optimiser(*tail)

    def compose(self, groups: Groups) -> Rule:
        return Optimiser(*self.shared, groups) if self.shared else groups

    def regrouped(self, state: Any) -> Any:
        """The state of a parameter of the first group, from its state under the unsplit rule."""
        if self.whole:
            return (0, state)
        first = len(self.shared)
        tail = state[first] if self.size == 1 else tuple(state[first:])
        return (*state[:first], (0, tail))


class _Adopted:
    """A param group checked and ready to join the optimizer (see `Optimizer._prepare`)."""

    __slots__ = ("names", "parameters", "rule", "binding", "synced", "changes")

    def __init__(
        self,
        names: list[str],
        parameters: list[_Parameter],
        rule: Rule,
        binding: _Binding,
        synced: dict[str, Any],
        changes: list[tuple[str, Any]],
    ) -> None:
        self.names = names
        self.parameters = parameters
        self.rule = rule
        self.binding = binding
        self.synced = synced
        self.changes = changes


# --- the optimizer ----------------------------------------------------------------


class Optimizer(torch.optim.Optimizer):  # type: ignore[misc,unused-ignore]
    """A `torch.optim.Optimizer` that takes its steps with a composeopt rule.

    `Optimizer(model.named_parameters(), co.AdamW(1e-3, lambda_=0.01))` is used as
    any torch optimizer: `loss.backward(); opt.step(); opt.zero_grad()`.

    Args:
        params: the tensors to optimise, as torch optimizers take them:
            `model.named_parameters()` (names become the parameters' paths, so
            [Groups][composeopt.Groups] selectors such as `"*.bias"` see torch's
            names), `model.parameters()` (named `"0"`, `"1"`, ... in order), or a
            list of param-group dicts, `{"params": ..., "lr": ..., ...}`.
        rule: the composeopt rule or chain.

    **Views.** Each tensor is updated in place through a view that shares its memory,
    made once: a NumPy array for a CPU tensor (bfloat16 read as `ml_dtypes.bfloat16`),
    a CuPy array for a CUDA one (through DLPack; without CuPy that is an error).
    When a tensor's storage changes (`model.to(torch.float64)`, `p.data = ...`)
    the next step makes its view again and moves its state to it (cast to the new
    dtype, on the new device), so nothing starts again; a new shape is an error.
    Parameters whose `.grad` is `None` are left alone, as torch does.

    **Param groups.** `param_groups` is a list of dicts with `"params"` and the
    group's hyperparameters under torch's names: `lr` (the rules' `eta`), `betas`
    (`beta`), `momentum` (the `rho` of `Momentum`, `Nesterov` and `Muon`),
    `weight_decay` (`lambda_`) and `eps` (`epsilon`), where the rule has them.
    Before each step every value that changed since the last step is set on the
    rule (as `co.adjust_` would), so `torch.optim.lr_scheduler` classes drive
    it; after a step, a value that follows a composeopt schedule is written back.
    With several groups, each has its own copy of the rule, in a
    [Groups][composeopt.Groups]; the leading rules of a chain that no group key
    reaches (`ClipGlobalNorm`, say) are shared and see every gradient.

    **Steps.** `step` runs `co.update_` over `{name: view}` inside
    `torch.no_grad()`; a step that raises (a non-finite check, a bad
    hyperparameter) leaves every tensor, state and hyperparameter as it was.

    Attributes:
        rule: the rule the steps run: `rule` itself with one param group; with
            several, the chain of the shared rules and the `Groups`.
            `co.state_store(opt.rule)` holds the parameters' states.

    Examples:
        >>> import torch, composeopt as co
        >>> from composeopt.torch import Optimizer
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = Optimizer(model.named_parameters(), co.Adam(1e-3))
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
        (0.001, (0.9, 0.999))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> co.state_store(opt.rule).step
        1
    """

    def __init__(self, params: Any, rule: Rule) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"Optimizer: expected a composeopt Rule, got a {type(rule).__name__}")
        binding = _Binding(rule)
        self._ready = False
        super().__init__(params, binding.read())
        self._parameters: dict[str, _Parameter] = {}
        self._arrays: dict[str, Any] = {}  # the tree of views every step passes: the same arrays
        self._names: list[list[str]] = []
        self._split: _Split | None = None
        self._groups: Groups | None = None
        self.rule: Rule = rule
        self._bindings: list[_Binding] = []
        self._synced: list[dict[str, Any]] = []
        if len(self.param_groups) > 1 and _drives(rule):
            self._split = _Split(rule)
            self._groups = Groups(allow_empty=True)
            self.rule = self._split.compose(self._groups)
        for group in self.param_groups:
            self._adopt(self._prepare(group))
        self._ready = True

    # -- groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as torch's `add_param_group` does (missing keys take the
        values of the first group's rule at construction).

        With a rule whose hyperparameters the groups set, the second group turns the
        optimizer's rule into the `Groups` of the class description; the states made
        so far move into it.  A group that cannot be added changes nothing."""
        super().add_param_group(param_group)
        if not getattr(self, "_ready", False):
            return  # the constructor adopts its groups itself
        try:
            adopted = self._prepare(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()
            raise
        if self._groups is None and _drives(self.rule):
            self._regroup()
        self._adopt(adopted)

    def _regroup(self) -> None:
        """From one rule to a `Groups` of one group, keeping every state, the step count and the
        frozen marks."""
        old = self.rule
        split = _Split(old)
        groups = Groups(allow_empty=True)
        groups.groups = ((_Members(self._names[0]), split.tail),)
        new = split.compose(groups)
        before, after = state_store(old), state_store(new)
        for parameter in self._parameters.values():
            state = before.get(parameter.array, _MISSING)
            if state is not _MISSING:
                after.set(parameter.array, split.regrouped(state))
            if parameter.array in before.frozen:
                after.frozen.set(parameter.array, True)
        after.step = before.step
        before.clear()
        self._split, self._groups, self.rule = split, groups, new

    def _prepare(self, group: dict[str, Any]) -> _Adopted:
        """Everything that can fail about a new group (names, views, keys, values), changing nothing."""
        index = len(self._names)
        tensors = group["params"]
        if "param_names" in group:
            names = [str(name) for name in group["param_names"]]
        else:
            start = sum(len(names) for names in self._names)
            names = [str(start + i) for i in range(len(tensors))]
        seen: set[str] = set()
        for name in names:
            if name in self._parameters or name in seen:
                raise ValueError(f"Optimizer: two parameters are named {name!r}")
            seen.add(name)
        parameters = [_Parameter(name, tensor) for name, tensor in zip(names, tensors)]
        rule = self.rule
        if self._split is not None:
            rule = self._split.tail if index == 0 else _fresh_copy(self._split.tail)
        elif index > 0 and _drives(self.rule):
            rule = _fresh_copy(_Split(self.rule).tail)
        binding = _Binding(rule)
        for key in group:
            if key in KEYS and key not in binding.holders:
                raise HyperparameterError(
                    f"param group {index} sets {key!r} (composeopt's {KEYS[key]!r}), but no rule of "
                    f"{rule!r} has it"
                )
        synced = binding.read()
        changes = []
        for key in binding.holders:
            if key in group:
                value = _plain(group[key])
                if key not in synced or value != synced[key]:
                    try:
                        binding.validate(key, value)
                    except HyperparameterError as err:
                        raise HyperparameterError(f"param_groups[{index}][{key!r}]: {err}") from None
                    changes.append((key, value))
        return _Adopted(names, parameters, rule, binding, synced, changes)

    def _adopt(self, adopted: _Adopted) -> None:
        """Take in a prepared group: its views, its rule, its values set on the rule."""
        if self._groups is not None:
            self._groups.groups = (*self._groups.groups, (_Members(adopted.names), adopted.rule))
        for parameter in adopted.parameters:
            self._parameters[parameter.name] = parameter
            self._arrays[parameter.name] = parameter.array
        for key, value in adopted.changes:
            adopted.binding.write(key, value)
            adopted.synced[key] = value
        self._names.append(adopted.names)
        self._bindings.append(adopted.binding)
        self._synced.append(adopted.synced)

    def _changes(self, indices: Iterable[int]) -> list[tuple[int, str, Any]]:
        """`(group, key, value)` for every value of these groups that changed since the last step."""
        changes = []
        for index in indices:
            group, binding, synced = self.param_groups[index], self._bindings[index], self._synced[index]
            for key in binding.holders:
                value = group.get(key, _MISSING)
                if value is not _MISSING:
                    value = _plain(value)
                    if key not in synced or value != synced[key]:
                        changes.append((index, key, value))
        return changes

    def _push(self, changes: list[tuple[int, str, Any]]) -> Callable[[], None] | None:
        """Set the changed values on the rules, all or none; returns what puts them back."""
        if not changes:
            return None
        restore = keep_hyperparameters(self.rule)
        try:
            for index, key, value in changes:
                try:
                    self._bindings[index].write(key, value)
                except HyperparameterError as err:
                    raise HyperparameterError(f"param_groups[{index}][{key!r}]: {err}") from None
        except BaseException:
            restore()
            raise
        return restore

    def _pull(self) -> None:
        """After a step: the values the rules now have are the groups' synced ones, and a value
        that follows a composeopt schedule shows in its group."""
        for group, binding, synced in zip(self.param_groups, self._bindings, self._synced):
            values = binding.read()
            for key, value in values.items():
                if key in group and binding.scheduled(key) and not isinstance(group[key], torch.Tensor):
                    group[key] = value
            synced.clear()
            synced.update(
                {key: _plain(group[key]) if key in group else value for key, value in values.items()}
            )

    # -- steps

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the rule over every parameter whose `.grad` is not `None`.

        Args:
            closure: re-evaluates the model and returns the loss (called with
                gradients enabled, before the step), as for torch's optimizers.

        Returns:
            The closure's loss, or `None`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        grads: dict[str, Any] = {}
        stepped = []
        for name, parameter in self._parameters.items():
            tensor = parameter.tensor
            if _storage(tensor) != parameter.storage:
                self._view_again(parameter)
            grad = tensor.grad
            if grad is None:
                grads[name] = None
            else:
                grads[name] = _grad_view(grad, f"{name}.grad")
                stepped.append(tensor)
        restore = self._push(self._changes(range(len(self.param_groups))))
        try:
            update_(self.rule, self._arrays, grads)
        except BaseException:
            if restore is not None:
                restore()
            raise
        self._pull()
        if stepped and _increment_version is not None:
            # The views wrote behind autograd's back: mark the tensors as changed in place, as
            # torch's own optimizers do, so that a graph that saved them refuses to backpropagate.
            _increment_version(stepped)

    def _refresh(self) -> None:
        """Views made again for the tensors whose storage changed since they were made."""
        for parameter in self._parameters.values():
            if _storage(parameter.tensor) != parameter.storage:
                self._view_again(parameter)

    def _view_again(self, parameter: _Parameter) -> None:
        """A new view of a tensor whose storage changed, and its state moved to it."""
        old = parameter.array
        new = _view(parameter.tensor, parameter.name)
        store = state_store(self.rule)
        state = store.get(old, _MISSING)
        if state is not _MISSING:
            if tuple(new.shape) != tuple(old.shape):
                raise ShapeMismatchError(
                    f"{parameter.path}: the tensor's shape changed from {tuple(old.shape)} to "
                    f"{tuple(new.shape)}, and its optimiser state was made for the old one; make a "
                    "new Optimizer for the new shapes"
                )
            store.set(old, _recast(state, new, old.dtype))
        frozen = old in store.frozen
        store.move(old, new, str(parameter.path))
        if frozen:
            store.frozen.discard(old)
            store.frozen.set(new, True)
        parameter.array = new
        parameter.storage = _storage(parameter.tensor)
        self._arrays[parameter.name] = new

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as tensors and Python data, for `torch.save`.

        `{"format", "version", "state", "param_groups"}`: `state` is
        [composeopt.state_dict][composeopt.state_dict] of the rule over the
        parameters' views, its arrays as CPU tensors; `param_groups` are the
        groups' values, each with its parameters' names under `"params"`.  It
        loads with `torch.load(path, weights_only=True)`.
        """
        self._refresh()
        checkpoint = _checkpoint(self.rule, self._arrays)
        groups = []
        for group, names in zip(self.param_groups, self._names):
            saved = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            saved["params"] = list(names)
            groups.append(saved)
        return {
            "format": FORMAT,
            "version": VERSION,
            "state": _to_tensors(checkpoint),
            "param_groups": groups,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a [state_dict][composeopt.torch.Optimizer.state_dict].

        Everything is checked before anything changes; a state dict of other groups,
        other parameter names, shapes or dtypes, another rule, or not of this class at
        all, raises [CheckpointError][composeopt.errors.CheckpointError].  The groups'
        values are restored too (as torch's optimizers do, so create an LR scheduler
        before loading: a new scheduler sets the groups' `lr`)."""
        self._refresh()
        saved_groups = self._checked(state_dict)
        checkpoint = _to_arrays(state_dict["state"])
        _load_checkpoint(self.rule, self._arrays, checkpoint)
        for group, saved in zip(self.param_groups, saved_groups):
            kept: dict[str, Any] = {key: group[key] for key in ("params", "param_names") if key in group}
            group.clear()
            group.update({key: value for key, value in saved.items() if key != "params"})
            group.update(kept)
        for binding, synced in zip(self._bindings, self._synced):
            synced.clear()
            synced.update(binding.read())

    def _checked(self, state_dict: Any) -> list[dict[str, Any]]:
        if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise CheckpointError(
                f"not a state dict of composeopt.torch.Optimizer (its 'format' is not {FORMAT!r}; "
                f"it has {keys}); a torch.optim optimizer's state does not load into a composeopt rule"
            )
        if set(state_dict) != {"format", "version", "state", "param_groups"}:
            raise CheckpointError(
                f"state dict entries: expected format, version, state, param_groups, got {sorted(state_dict)}"
            )
        if state_dict["version"] != VERSION:
            raise CheckpointError(
                f"state dict version {state_dict['version']!r}; this composeopt reads {VERSION}"
            )
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            count = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise CheckpointError(
                f"the state dict has {count} param groups, this optimizer {len(self.param_groups)}"
            )
        for index, (saved, names, binding) in enumerate(zip(groups, self._names, self._bindings)):
            if not isinstance(saved, dict) or saved.get("params") != names:
                theirs = saved.get("params") if isinstance(saved, dict) else saved
                raise CheckpointError(
                    f"param group {index}: the state dict's parameters are {_short(theirs)}, "
                    f"this optimizer's {_short(names)}"
                )
            for key in binding.holders:
                if key in saved:
                    try:
                        binding.validate(key, _plain(saved[key]))
                    except HyperparameterError as err:
                        raise CheckpointError(f"param group {index}: {key!r}: {err}") from None
        return groups

    def __getstate__(self) -> dict[str, Any]:
        # torch's would keep only the groups: a copy without views or rule could not step.
        raise TypeError(
            "a composeopt.torch.Optimizer cannot be pickled or copied; save opt.state_dict() "
            "(torch.save) and load it into a new Optimizer"
        )

    def __repr__(self) -> str:
        torch_repr = super().__repr__()
        return f"composeopt.torch.Optimizer({self.rule!r}){torch_repr[len(type(self).__name__) :]}"


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"{value[:3]!r} ... ({len(value)} names)"
    return repr(value)


def _to_tensors(plain: Any) -> Any:
    """A checkpoint's NumPy arrays as CPU tensors (bfloat16 through its 16 bits)."""
    if isinstance(plain, np.ndarray):
        if plain.dtype.name == "bfloat16":
            return torch.from_numpy(plain.view(np.int16)).view(torch.bfloat16)
        try:
            return torch.from_numpy(plain)
        except TypeError as err:
            raise CheckpointError(f"a state array of dtype {plain.dtype} has no torch dtype") from err
    if isinstance(plain, dict):
        return {key: _to_tensors(value) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_to_tensors(value) for value in plain]
    if isinstance(plain, tuple):
        return tuple(_to_tensors(value) for value in plain)
    return plain


def _to_arrays(plain: Any) -> Any:
    """The inverse of `_to_tensors`: tensors (on any device) as host NumPy arrays."""
    if isinstance(plain, torch.Tensor):
        tensor = plain.detach().cpu()
        if tensor.dtype is torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(_bfloat16("a state array"))
        try:
            return tensor.numpy()
        except TypeError as err:
            raise CheckpointError(f"a state tensor of dtype {tensor.dtype} has no NumPy dtype") from err
    if isinstance(plain, dict):
        return {key: _to_arrays(value) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_to_arrays(value) for value in plain]
    if isinstance(plain, tuple):
        return tuple(_to_arrays(value) for value in plain)
    return plain
