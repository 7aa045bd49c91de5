"""`Optimiser(a, b, c)`: rules composed in sequence."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .rule import Rule

__all__ = ["Optimiser", "OptimiserChain"]


class Optimiser(Rule):
    r"""Rules in sequence: each rule's output is the next rule's gradient.

    `Optimiser(ClipNorm(1.0), WeightDecay(1e-4), Adam(1e-3))` clips each
    gradient, adds weight decay, then takes an Adam step:

    $$\Delta = r_k(\dots r_2(r_1(dx)))$$

    A chain is itself a rule, so chains nest; its state is the tuple of its
    rules' states.  With no rules it is the identity ($x \mathrel{-}= dx$).
    Tree-level rules inside see the whole gradient tree as it reaches them.
    Indexing and iteration reach the inner rules: `opt[2].eta = 1e-4`.

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
        self.rules: tuple[Rule, ...] = rules

    def init(self, x: Any) -> tuple[Any, ...]:
        return tuple(rule.init(x) for rule in self.rules)

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        per_rule = [rule.init_tree_(xs, paths) for rule in self.rules]
        return [tuple(rule_states[i] for rule_states in per_rule) for i in range(len(xs))]

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        for rule, rule_state in zip(self.rules, state):
            dx = rule.apply_(rule_state, x, dx)
        return dx

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        dxs = list(dxs)
        for k, rule in enumerate(self.rules):
            dxs = rule.apply_tree_([state[k] for state in states], xs, dxs, paths)
        return dxs

    def begin_step(self, step: int) -> None:
        for rule in self.rules:
            rule.begin_step(step)

    def children(self) -> tuple[Rule, ...]:
        return self.rules

    def __getitem__(self, index: int) -> Rule:
        return self.rules[index]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.rules))})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Optimiser)
        return self.rules == other.rules


OptimiserChain = Optimiser
