"""Steering an optimiser between steps: adjust hyperparameters, freeze parameters, log values."""

from __future__ import annotations

from typing import Any, TypeVar

from .engine import state_store
from .errors import HyperparameterError, TreeStructureError
from .groups import Selector, matches
from .rule import Rule, keep_hyperparameters, walk_rules
from .tree import array_leaves

__all__ = ["adjust_", "freeze_", "thaw_", "hyperparameters"]

R = TypeVar("R", bound=Rule)
_MISSING: Any = object()


def adjust_(opt: R, eta: Any = _MISSING, /, **hyper: Any) -> R:
    """Set hyperparameters on every rule of `opt` that has them, keeping all state.

    `adjust_(opt, 1e-4)` sets every `eta`;
    `adjust_(opt, beta=(0.9, 0.99), lambda_=1e-3)` sets those on each rule that
    has them, a schedule as well as a number.  A name that no rule of `opt` has is an error, and so is an
    invalid value; either way no rule is changed.  Optimisers.jl's `adjust!`.
    Returns `opt`.
    """
    if eta is not _MISSING:
        hyper = {"eta": eta, **hyper}
    rules = list(walk_rules(opt))
    restore = keep_hyperparameters(opt)
    try:
        for name, value in hyper.items():
            holders = [rule for rule in rules if name in type(rule)._hyper_names]
            if not holders:
                raise HyperparameterError(f"adjust_: no rule of {opt!r} has a hyperparameter {name!r}")
            for rule in holders:
                setattr(rule, name, value)
    except BaseException:
        restore()
        raise
    return opt


def hyperparameters(opt: Rule) -> dict[str, Any]:
    """The current value of every hyperparameter of `opt`, for logging.

    Keys follow indexing: `"eta"` for a single rule, `"[1].eta"` for
    `opt[1].eta` in a chain, `"[1][0].rho"` in nested chains.  A
    hyperparameter that follows a schedule shows its value at the last step.
    """
    values: dict[str, Any] = {}

    def visit(rule: Rule, prefix: str) -> None:
        for name, value in rule.hyperparameters().items():
            values[f"{prefix}.{name}" if prefix else name] = value
        for index, child in enumerate(rule.children()):
            visit(child, f"{prefix}[{index}]")

    visit(opt, "")
    return values


def freeze_(opt: R, params: Any, where: Selector | None = None) -> R:
    """Freeze parameters of `params`: `update_` leaves them and their state alone.

    `where` chooses which (a glob pattern on the key path, patterns, a regex,
    or a predicate `f(path, x)`; see [Selector][composeopt.groups.Selector]);
    without it, every array of `params` is frozen, so
    `freeze_(opt, model["encoder"])` freezes a whole sub-network.  A `where`
    that takes no array of `params` is an error
    ([TreeStructureError][composeopt.errors.TreeStructureError]), and then
    nothing is frozen.  Optimisers.jl's `freeze!`.  Returns `opt`.
    """
    frozen = state_store(opt).frozen
    for x in _chosen("freeze_", params, where):
        frozen.set(x, True)
    return opt


def thaw_(opt: R, params: Any, where: Selector | None = None) -> R:
    """Undo [freeze_][composeopt.freeze_] for the chosen parameters of `params`; returns `opt`.

    As for `freeze_`, a `where` that takes no array of `params` is an error.
    """
    frozen = state_store(opt).frozen
    for x in _chosen("thaw_", params, where):
        frozen.discard(x)
    return opt


def _chosen(caller: str, params: Any, where: Selector | None) -> list[Any]:
    """The arrays of `params` that `where` takes; a selector that takes none is a mistake."""
    leaves = list(array_leaves(params))
    if where is None:
        return [x for _, x in leaves]
    chosen = [x for path, x in leaves if matches(where, path, x)]
    if leaves and not chosen:
        shown = ", ".join(str(path) for path, _ in leaves[:3]) + (", ..." if len(leaves) > 3 else "")
        raise TreeStructureError(
            f"{caller}: the selector {where!r} takes none of the {len(leaves)} arrays of params "
            f"({shown}); a glob matches the whole key path, with '/' or '.' between keys "
            "('encoder/*', 'encoder.*', '*.bias')"
        )
    return chosen
