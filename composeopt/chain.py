"""`Optimiser(a, b, c)`: rules composed in sequence."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .errors import ComposeoptError
from .rule import Replace, Rule

__all__ = ["Optimiser", "OptimiserChain"]


class Optimiser(Rule):
    r"""Rules in sequence: each rule's output is the next rule's gradient.

    `Optimiser(ClipNorm(1.0), WeightDecay(1e-4), Adam(1e-3))` clips each
    gradient, adds weight decay, then takes an Adam step:

    $$\Delta = r_k(\dots r_2(r_1(dx)))$$

    A chain is itself a rule, so chains nest; its state is the tuple of its
    rules' states.  With no rules it is the identity ($x \mathrel{-}= dx$).
    Tree-level rules inside see the whole gradient tree as it reaches them.
    A parameter for which a rule returns `None` (e.g. [AccumGrad][composeopt.AccumGrad]
    between its updates) leaves the chain there: later rules do not see it and
    it is not changed this step.
    Indexing and iteration reach the inner rules: `opt[2].eta = 1e-4`.  For
    type checkers they are `Any`, since which rule sits where is known only at
    run time; `opt.rules` is the same rules typed as `tuple[Rule, ...]`.

    Args:
        *rules: the rules, applied in order.

    Alias: `OptimiserChain` (Optimisers.jl's name).  Same as `optax.chain(...)`.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt = co.Optimiser(co.ClipValue(1.0), co.Descent(0.1))
        >>> x = np.zeros(2)
        >>> _ = co.update_(opt, x, np.array([5.0, -0.5]))
        >>> print(x)  # 0.1 * clamp(g, -1, 1)
        [-0.1   0.05]
        >>> opt[1].eta = 0.2
        >>> opt
        Optimiser(ClipValue(thresh=1.0), Descent(eta=0.2))
    """

    fallible = False

    def __init__(self, *rules: Rule) -> None:
        for position, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(
                    f"Optimiser: argument {position} is a {type(rule).__name__}, not a composeopt Rule"
                )
        for rule in rules[:-1]:
            if rule.assigns:
                raise ComposeoptError(_assigns_not_last(rule))
        self.rules: tuple[Rule, ...] = rules

    @property
    def assigns(self) -> bool:  # type: ignore[override]
        return bool(self.rules) and self.rules[-1].assigns

    def init(self, x: Any) -> tuple[Any, ...]:
        return tuple(rule.init(x) for rule in self.rules)

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        per_rule = [rule.init_tree_(xs, paths) for rule in self.rules]
        return [tuple(rule_states[i] for rule_states in per_rule) for i in range(len(xs))]

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        last = len(self.rules) - 1
        for k, (rule, rule_state) in enumerate(zip(self.rules, state)):
            dx = rule.apply_(rule_state, x, dx)
            if dx is None:
                return None
            if k < last and type(dx) is Replace:
                raise ComposeoptError(_assigns_not_last(rule))
        return dx

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        out = list(dxs)
        live: Sequence[int] = range(len(xs))  # the parameters still in the chain
        last = len(self.rules) - 1
        for k, rule in enumerate(self.rules):
            if len(live) == len(xs):  # the common case: no parameter has left
                out = rule.apply_tree_([state[k] for state in states], xs, out, paths)
            else:
                results = rule.apply_tree_(
                    [states[i][k] for i in live],
                    [xs[i] for i in live],
                    [out[i] for i in live],
                    [paths[i] for i in live],
                )
                for i, result in zip(live, results):
                    out[i] = result
            if k < last:
                if any(type(out[i]) is Replace for i in live):
                    raise ComposeoptError(_assigns_not_last(rule))
                if any(out[i] is None for i in live):
                    live = [i for i in live if out[i] is not None]
                    if not live:
                        break
        return out

    def begin_step(self, step: int) -> None:
        for rule in self.rules:
            rule.begin_step(step)

    def children(self) -> tuple[Rule, ...]:
        return self.rules

    # Any, not Rule: a checker would refuse `opt[1].eta`, as Rule declares no hyperparameters.
    def __getitem__(self, index: int) -> Any:
        return self.rules[index]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.rules))})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Optimiser)
        return self.rules == other.rules


OptimiserChain = Optimiser


def _assigns_not_last(rule: Rule) -> str:
    return (
        f"{rule!r} sets parameters directly (it returns Replace), so it must be the last rule "
        "of a chain; wrap the chain in it instead"
    )
