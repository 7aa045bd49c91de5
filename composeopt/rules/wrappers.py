"""Rules that wrap another rule (or chain): the `Wrapper` base, and Lookahead."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from .._dispatch import copy, namespace
from ..hyper import Hyper, decay_factor, positive_int
from ..rule import Replace, Rule, State
from ..tree import Path

__all__ = ["Wrapper", "Lookahead"]


class Wrapper(Rule):
    """A rule around an `inner` rule, given first to the constructor: `Wrapper(inner, *hyperparameters)`.

    The inner rule is not a hyperparameter (it is a rule, with its own); it is
    reached as `wrapper.inner` and through [children][composeopt.Rule.children],
    so schedules, [adjust_][composeopt.adjust_] and checkpoints see it.  A
    subclass overrides `init_tree_` and `apply_tree_`; the per-parameter
    `init` and `apply_` call them with one parameter.
    """

    # For type checkers, the first field of every subclass's constructor (see Rule); at run
    # time __init__ below takes it, and it is no hyperparameter.
    inner: Rule

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


class Lookahead(Wrapper):
    r"""Lookahead: `Lookahead(inner, k=5, alpha=0.5)`.

    The parameter takes the steps of `inner` (the *fast* weights); every
    `k`-th step the *slow* weights $\phi$, kept in the state, move a fraction
    $\alpha$ of the way to the fast weights and the parameter restarts from
    them:

    $$x \leftarrow x - \Delta_{\text{inner}}; \qquad
    \text{every } k \text{ steps: }\;
    \phi \leftarrow \phi + \alpha\,(x - \phi), \quad x \leftarrow \phi$$

    $\phi$ starts at the parameter's value before its first step.  On a sync
    step the rule returns [Replace][composeopt.Replace], so it must be the
    last rule of a chain: to clip first, put the clipper inside,
    `Lookahead(Optimiser(ClipNorm(1.0), Adam()))`.

    Args:
        inner: the fast rule, any rule or chain; its hyperparameters and
            schedules stay reachable (`opt.inner.eta`,
            [adjust_][composeopt.adjust_]).
        k: synchronisation period, an integer $\ge 1$.
        alpha: slow step size $\alpha \in (0, 1]$.

    State: `inner` (the inner rule's state), `slow` ($\phi$) and `t`, the
    steps this parameter has taken.

    Same as `optax.lookahead(inner, sync_period=k, slow_step_size=alpha)`
    (with `reset_state=False`, the default), where the parameter here is
    optax's `LookaheadParams.fast`.  optax keeps the slow weights in the
    params tree and expects the user to evaluate with them; here they live in
    the optimiser state, and after a sync step the parameter equals them.
    torch has no Lookahead.

    Reference: [Zhang et al. (2019)](https://arxiv.org/abs/1907.08610)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt = co.Lookahead(co.Descent(0.1), k=2, alpha=0.5)
        >>> x = np.array([1.0])
        >>> _ = co.update_(opt, x, np.array([1.0]))  # fast step: 0.9
        >>> _ = co.update_(opt, x, np.array([1.0]))  # fast 0.8, then 1 + 0.5 (0.8 - 1)
        >>> print(x)
        [0.9]
    """

    assigns = True
    _kernel = None  # it sets parameters to its slow weights: the generic path only
    k: Hyper[int] = Hyper(default=5, check=positive_int)
    alpha: Hyper[float] = Hyper(default=0.5, check=decay_factor)

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        inner = self.inner.init_tree_(xs, paths)
        return [State(inner=state, slow=copy(namespace(x), x), t=0) for state, x in zip(inner, xs)]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        updates = self.inner.apply_tree_([state.inner for state in states], xs, dxs, paths)
        return [self._look(state, x, update) for state, x, update in zip(states, xs, updates)]

    def _look(self, state: State, x: Any, update: Any) -> Any:
        """The fast step `update`, or on every k-th step the move to the new slow weights."""
        if update is None:  # the inner rule skipped this parameter: no step to count
            return None
        state.t += 1
        if state.t % self.k:
            return update
        xp = namespace(x)
        fast = update.value if type(update) is Replace else x - update
        state.slow = state.slow + self.alpha * (xp.astype(fast, x.dtype) - state.slow)
        return Replace(copy(xp, state.slow))  # a copy: the state must not alias the parameter
