"""From an optimiser to a fused plan: the chain flattened, cut into stages at reductions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chain import Optimiser
from ..rule import Rule
from .kernel import Kernel, NormClip

__all__ = ["Entry", "Stage", "Plan", "make_plan"]

_PROTOCOL = ("init", "apply_", "apply_tree_", "begin_step", "children")


@dataclass(frozen=True)
class Entry:
    """One elementwise rule of a stage and where its state sits in the chain's state."""

    rule: Rule
    kernel: Kernel
    path: tuple[int, ...]


@dataclass(frozen=True)
class Stage:
    """Consecutive elementwise rules, fused into one pass (possibly none of them)."""

    entries: tuple[Entry, ...]

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(id(entry.kernel) for entry in self.entries)


@dataclass(frozen=True)
class Plan:
    """`stages[0]`, then `clips[0]`, `stages[1]`, ... `stages[-1]` (which writes `x`)."""

    stages: tuple[Stage, ...]
    clips: tuple[tuple[Rule, NormClip], ...]

    @property
    def entries(self) -> list[Entry]:
        """Every stage's entries, in chain order."""
        return [entry for stage in self.stages for entry in stage.entries]


def make_plan(opt: Rule) -> Plan | None:
    """The fused plan of `opt`, or `None` when some rule has no fast path this step."""
    stages: list[Stage] = []
    clips: list[tuple[Rule, NormClip]] = []
    current: list[Entry] = []
    for rule, path in _flatten(opt, ()):
        if rule is None or rule.fallible:
            return None
        fused = _fast_path(rule)
        if isinstance(fused, Kernel):
            current.append(Entry(rule, fused, path))
        elif isinstance(fused, NormClip):
            stages.append(Stage(tuple(current)))
            clips.append((rule, fused))
            current = []
        else:
            return None
    stages.append(Stage(tuple(current)))
    return Plan(tuple(stages), tuple(clips))


def _flatten(rule: Rule, path: tuple[int, ...]) -> Any:
    """`(rule, path of its state)` for every leaf rule of a chain, in order; `(None, ...)` for a
    chain whose behaviour was overridden."""
    if isinstance(rule, Optimiser):
        if not _unchanged(type(rule), Optimiser):
            yield None, path
            return
        for index, child in enumerate(rule.rules):
            yield from _flatten(child, (*path, index))
    else:
        yield rule, path


_accepted: dict[type, bool] = {}


def _fast_path(rule: Rule) -> Any:
    """The rule's `_kernel` description, unless a subclass changed the behaviour it describes."""
    cls = type(rule)
    accepted = _accepted.get(cls)
    if accepted is None:
        owner = next((klass for klass in cls.__mro__ if "_kernel" in vars(klass)), None)
        accepted = _accepted[cls] = owner is not None and _unchanged(cls, owner)
    return getattr(rule, "_kernel", None) if accepted else None


def _unchanged(cls: type, owner: type) -> bool:
    return all(getattr(cls, name) is getattr(owner, name) for name in _PROTOCOL)
