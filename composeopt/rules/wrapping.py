"""`Wrapper`: the base of rules that hold another rule (or chain) and change how it runs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ..rule import Rule
from ..tree import Path

__all__ = ["Wrapper"]


class Wrapper(Rule):
    """A rule around an `inner` rule, given first to the constructor: `Wrapper(inner, *hyperparameters)`.

    The inner rule is not a hyperparameter (it is a rule, with its own); it is
    reached as `wrapper.inner` and through [children][composeopt.Rule.children],
    so schedules, [adjust_][composeopt.adjust_] and checkpoints see it.  A
    subclass overrides `init_tree_` and `apply_tree_`; the per-parameter
    `init` and `apply_` call them with one parameter.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inner = inspect.Parameter("inner", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inner,
                *(
                    inspect.Parameter(
                        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(cls, name).default
                    )
                    for name in cls._hyper_names
                ),
            ]
        )

    def __init__(self, inner: Rule, *args: Any, **kwargs: Any) -> None:
        if not isinstance(inner, Rule):
            raise TypeError(
                f"{type(self).__name__}: inner is a {type(inner).__name__}, not a composeopt Rule"
            )
        self.inner = inner
        super().__init__(*args, **kwargs)

    @property
    def fallible(self) -> bool:  # type: ignore[override]
        return self.inner.fallible

    @property
    def assigns(self) -> bool:  # type: ignore[override]
        return self.inner.assigns

    def init(self, x: Any) -> Any:
        return self.init_tree_([x], [Path()])[0]

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.apply_tree_([state], [x], [dx], [Path()])[0]

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        return self.inner.init_tree_(xs, paths)

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        return self.inner.apply_tree_(states, xs, dxs, paths)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def children(self) -> tuple[Rule, ...]:
        return (self.inner,)

    def __repr__(self) -> str:
        hypers = super().__repr__().partition("(")[2]
        return f"{type(self).__name__}({self.inner!r}{', ' if hypers != ')' else ''}{hypers}"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Wrapper)
        return self.inner == other.inner and self.settings() == other.settings()

    __hash__ = None
