"""Parameter groups: different rules for different parts of the params tree.

`Groups(("*/bias", Adam(1e-3)), ("encoder/*", Adam(1e-4)), default=AdamW(1e-3, lambda_=1e-2))`
gives biases no weight decay and the encoder a smaller learning rate, as
torch's `param_groups`, MindSpore's `group_params` and optax's
`multi_transform` do.  Each group's rule is a full rule (a chain, with its
own schedules); `Groups` is itself a rule, so it can sit inside a chain:
`Optimiser(ClipGlobalNorm(1.0), Groups(...))` clips all gradients together first.
"""

from __future__ import annotations

import fnmatch
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Union

from ._collective import combine_powers, current
from .errors import TreeStructureError
from .rule import Rule
from .tree import Path

__all__ = ["Groups", "Selector", "matches"]

Selector = Union[str, Sequence[str], "re.Pattern[str]", Callable[[Path, Any], bool]]
"""Which parameters a group (or [freeze_][composeopt.freeze_]) takes:

* a glob pattern matched against the parameter's whole key path, in which `/`
  and `.` both separate keys: `"layer1/W"` and `"layer1.W"` are the same
  pattern, and match `params["layer1"]["W"]` of a nested dict as well as
  torch's dotted name `"layer1.W"` (a key of `dict(model.named_parameters())`);
  `"*/bias"` and `"*.bias"` take every bias of either; `*` also crosses separators;
* a list or tuple of such patterns (any of them);
* a compiled regular expression, searched in the key path as written (keys
  joined by `/`, so `r"\\.bias$"` for torch's names, `r"/bias$"` for nested dicts);
* a predicate `f(path, x) -> bool` on the [Path][composeopt.tree.Path] and the array.
"""


def _separated(text: str) -> str:
    """Keys joined by `.` (torch's names) read as keys joined by `/`, for globs."""
    return text.replace(".", "/")


def matches(selector: Selector, path: Path, x: Any) -> bool:
    """Whether `selector` takes the parameter `x` at `path`.

    Examples:
        >>> from composeopt.tree import Path
        >>> torch_name = Path("params['layer1.bias']", ("layer1.bias",))
        >>> matches("*/bias", torch_name, None), matches("layer1.*", torch_name, None)
        (True, True)
    """
    key = path.key if isinstance(path, Path) else str(path)
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(_separated(key), _separated(selector))
    if isinstance(selector, re.Pattern):
        return selector.search(key) is not None
    if callable(selector):
        return bool(selector(path, x))
    return any(matches(pattern, path, x) for pattern in selector)


_assigned: weakref.WeakValueDictionary[int, Groups] = weakref.WeakValueDictionary()
"""The `Groups` that have been given parameters (by a step, or by a checkpoint comparing its
states): only the first parameters are checked against every selector.  Kept outside the
rules, whose attributes are their settings (a copy of a rule has not been given any)."""


def _described(selector: Selector) -> list[Any]:
    if isinstance(selector, str):
        return ["glob", selector]
    if isinstance(selector, re.Pattern):
        pattern = selector.pattern
        return ["regex", pattern if isinstance(pattern, str) else repr(pattern), selector.flags]
    if callable(selector):
        named = selector if hasattr(selector, "__qualname__") else type(selector)
        return ["predicate", f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"]
    return ["any", [_described(pattern) for pattern in selector]]


class Groups(Rule):
    """Route each parameter to the rule of the first group whose selector takes it.

    Args:
        *groups: `(selector, rule)` pairs (see [Selector][composeopt.groups.Selector]), tried in order.
        default: the rule for parameters no selector takes; without one, such
            a parameter is an error naming its path.
        allow_empty: let a group take no parameter.  Otherwise the first step
            that gives this `Groups` parameters raises
            [TreeStructureError][composeopt.errors.TreeStructureError] naming
            each selector that takes none of them, so that a pattern written for
            other names (`"*/bias"` where there is no bias) is not silently a
            group of nothing.  Only that step's parameters count: frozen ones
            and those with a `None` gradient are not given to it.

    A parameter's group is decided when its state is created (its first step)
    and kept in its state `(group_index, rule_state)`.  `opt[k]` is the
    rule of group `k`; `opt.default` the default rule.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> params = {"0.weight": np.ones(2), "0.bias": np.ones(1)}  # torch's names
        >>> opt = co.Groups(("*/bias", co.Descent(0.0)), default=co.Descent(0.5))
        >>> _ = co.update_(opt, params, {"0.weight": np.ones(2), "0.bias": np.ones(1)})
        >>> print(params["0.weight"], params["0.bias"])
        [0.5 0.5] [1.]
    """

    fallible = False

    def __init__(
        self, *groups: tuple[Selector, Rule], default: Rule | None = None, allow_empty: bool = False
    ) -> None:
        for position, group in enumerate(groups):
            if not (isinstance(group, tuple) and len(group) == 2 and isinstance(group[1], Rule)):
                raise TypeError(f"Groups: argument {position} must be a (selector, rule) pair, got {group!r}")
        if default is not None and not isinstance(default, Rule):
            raise TypeError(f"Groups: default must be a composeopt Rule, got {type(default).__name__}")
        self.groups: tuple[tuple[Selector, Rule], ...] = groups
        self.default = default
        self.allow_empty = bool(allow_empty)

    @property
    def assigns(self) -> bool:  # type: ignore[override]
        return any(rule.assigns for rule in self._rules())

    def _rules(self) -> list[Rule]:
        rules = [rule for _, rule in self.groups]
        return rules + [self.default] if self.default is not None else rules

    def _group_of(self, x: Any, path: Path) -> int:
        for index, (selector, _) in enumerate(self.groups):
            if matches(selector, path, x):
                return index
        if self.default is None:
            raise TreeStructureError(f"{path}: no group of Groups takes it and there is no default")
        return len(self.groups)

    def init(self, x: Any) -> tuple[int, Any]:
        # One array is not the tree: the other groups are empty here, and that is no error.
        state: tuple[int, Any] = self._assign([x], [Path()], check=False)[0]
        return state

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        first = _assigned.get(id(self)) is not self
        states = self._assign(xs, paths, check=first and not self.allow_empty)
        if first and xs:
            _assigned[id(self)] = self
        return states

    def _assign(self, xs: Sequence[Any], paths: Sequence[str], check: bool) -> list[Any]:
        named = [path if isinstance(path, Path) else Path(path) for path in paths]
        sharded = check and current() is not None
        try:
            indices = [self._group_of(x, path) for x, path in zip(xs, named)]
        except TreeStructureError:
            if sharded:  # the other ranks wait for this rank's groups in the check: tell them
                combine_powers([1.0] + [0.0] * len(self._rules()), 1)
            raise
        if check and (xs or sharded):
            self._check_every_group_takes_some(set(indices), named)
        states: list[Any] = [None] * len(xs)
        rules = self._rules()
        for index in set(indices):
            members = [i for i, k in enumerate(indices) if k == index]
            inner = rules[index].init_tree_([xs[i] for i in members], [named[i] for i in members])
            for i, state in zip(members, inner):
                states[i] = (index, state)
        return states

    def _check_every_group_takes_some(self, taken: set[int], paths: Sequence[Path]) -> None:
        if current() is not None:
            # A sharded step (composeopt.dist.ShardedOptimiser): each rank holds a part of the
            # tree, and a group is empty only if it takes none of any rank's parameters.
            told = combine_powers([0.0] + [1.0 if k in taken else 0.0 for k in range(len(self._rules()))], 1)
            if told[0] > 0:
                raise TreeStructureError("Groups: another rank has a parameter that no group takes")
            taken = {k for k, count in enumerate(told[1:]) if count > 0}
        empty = [index for index in range(len(self.groups)) if index not in taken]
        if not empty:
            return
        named = [f"{self.groups[index][0]!r} of group {index}" for index in empty]
        if len(named) == 1:
            which = f"the selector {named[0]} takes"
        else:
            which = f"the selectors {', '.join(named)} take"
        shown = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
        raise TreeStructureError(
            f"Groups: {which} none of the {len(paths)} parameters of the first step "
            f"({shown}). A glob matches the whole key path, with '/' or '.' between keys "
            "('layer1/W', 'layer1.weight', '*.bias'); pass allow_empty=True to allow a group that "
            "takes nothing (frozen parameters and those with a None gradient do not count)"
        )

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        index, inner = state
        return self._rules()[index].apply_(inner, x, dx)

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        updates: list[Any] = [None] * len(xs)
        rules = self._rules()
        for index in sorted({state[0] for state in states}):
            members = [i for i, state in enumerate(states) if state[0] == index]
            inner = rules[index].apply_tree_(
                [states[i][1] for i in members],
                [xs[i] for i in members],
                [dxs[i] for i in members],
                [paths[i] for i in members],
            )
            for i, update in zip(members, inner):
                updates[i] = update
        return updates

    def describe_selectors(self) -> list[Any]:
        """The grouping as plain data, for checkpoints to recognise it: each group's selector
        (patterns as text, predicates by qualified name) and whether there is a default.

        Examples:
            >>> import composeopt as co
            >>> co.Groups(("*/bias", co.Adam()), default=co.Descent()).describe_selectors()
            [[['glob', '*/bias']], True]
        """
        return [[_described(selector) for selector, _ in self.groups], self.default is not None]

    def begin_step(self, step: int) -> None:
        for rule in self._rules():
            rule.begin_step(step)

    def children(self) -> tuple[Rule, ...]:
        return tuple(self._rules())

    def __getitem__(self, index: int) -> Rule:
        return self.groups[index][1]

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        parts = [f"({selector!r}, {rule!r})" for selector, rule in self.groups]
        if self.default is not None:
            parts.append(f"default={self.default!r}")
        if self.allow_empty:
            parts.append("allow_empty=True")
        return f"Groups({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Groups)
        return (
            self.groups == other.groups
            and self.default == other.default
            and self.allow_empty == other.allow_empty
        )
