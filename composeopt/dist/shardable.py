"""Which chains a `ShardedOptimiser` can run, and how it cuts their parameters.

A chain of elementwise rules (its fused plan has no parameter groups, no
whole-array kernel and no per-array reduction) updates each element from that
element alone, and from numbers over the whole tree that its tree-level rules
combine over the ranks (`ClipGlobalNorm`, `SkipNonFinite`): it can take any
contiguous run of elements, so its shards are `"flat"`.  Every other chain
(per-array norms, trust ratios, matrices, factored moments, groups, rules
without a fast path) gets whole arrays: `"whole"`.

A tree-level rule communicates in the middle of the inner step, so every rank
must reach it.  That is refused where it cannot be promised (`check_rule`):

* a communicating rule (`ClipGlobalNorm`, `SkipNonFinite`, `LBFGS`) inside
  `Groups`: a rank may have no parameter of that group;
* a rule that may raise (`fallible`) before a communicating rule: it may
  raise on one rank only, and the others would wait for it;
* a rule of its own that communicates (`AllReduceMean`: the sharded
  optimiser averages the gradients itself), and a user-defined tree-level rule
  (one that overrides `apply_tree_`), which would see only a shard's arrays.
"""

from __future__ import annotations

from .._fused.plan import Boundary, Branch, Whole, make_plan
from ..chain import Optimiser
from ..errors import HyperparameterError
from ..groups import Groups
from ..rule import Rule, walk_rules
from ..rules.clip import ClipGlobalNorm
from ..rules.lbfgs import LBFGS
from ..rules.steps import SkipNonFinite
from ..rules.wrappers import Wrapper

__all__ = ["elementwise", "check_rule", "COMMUNICATING"]

COMMUNICATING = (ClipGlobalNorm, SkipNonFinite, LBFGS)
"""The rules whose step combines numbers over the ranks of a sharded step."""


def elementwise(rule: Rule) -> bool:
    """Whether `rule`'s fused plan updates each element from that element alone (and numbers
    over the whole tree): no groups, no whole-array kernel, no per-array reduction."""
    plan = make_plan(rule)
    if plan is None:
        return False
    for part in plan.program:
        if isinstance(part, (Branch, Whole)):
            return False
        if isinstance(part, Boundary) and part.reduce.scope != "tree":
            return False
    return True


def check_rule(rule: Rule) -> None:
    """Raise `HyperparameterError` if a sharded step of `rule` could leave ranks waiting for
    each other, or would compute over a shard what needs the whole tree (see the module)."""
    if any(vars(inner).get("_comm") is not None for inner in walk_rules(rule)):
        raise HyperparameterError(
            f"ShardedOptimiser: {rule!r} communicates itself (AllReduceMean); the sharded "
            "optimiser averages the gradients over the ranks already: leave it out"
        )
    for inner in walk_rules(rule):
        if isinstance(inner, Groups):
            nested = [r for r in walk_rules(inner) if isinstance(r, COMMUNICATING)]
            if nested:
                raise HyperparameterError(
                    f"ShardedOptimiser: {nested[0]!r} inside Groups would wait for ranks that "
                    "have no parameter of its group: put tree-level rules outside the Groups"
                )
        elif _user_tree_rule(inner):
            raise HyperparameterError(
                f"ShardedOptimiser: {type(inner).__name__} overrides apply_tree_, so it would see "
                "only this rank's shard of the tree; it cannot be sharded"
            )
    _fallible_before(rule, None)


def _user_tree_rule(rule: Rule) -> bool:
    cls = type(rule)
    owner = next(klass for klass in cls.__mro__ if "apply_tree_" in vars(klass))
    return not owner.__module__.startswith("composeopt.")


def _fallible_before(rule: Rule, fallible: Rule | None) -> Rule | None:
    """Walk `rule` in the order its step runs; raise at a communicating rule that a fallible
    rule runs before.  Returns the last fallible rule seen (or `fallible`)."""
    if isinstance(rule, COMMUNICATING) and fallible is not None:
        raise HyperparameterError(
            f"ShardedOptimiser: {fallible!r} may raise on one rank before {rule!r} communicates, "
            "which would leave the other ranks waiting; put it after, or make it not raise "
            "(ClipNorm(throw=False))"
        )
    if isinstance(rule, Optimiser):
        for child in rule.rules:
            fallible = _fallible_before(child, fallible)
        return fallible
    if isinstance(rule, SkipNonFinite):  # its own error is decided on every rank at once
        return _fallible_before(rule.inner, fallible)
    if isinstance(rule, Wrapper):
        return _fallible_before(rule.inner, fallible)
    if any(inner.fallible for inner in walk_rules(rule)):
        return rule
    return fallible
