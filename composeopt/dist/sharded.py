"""`ShardedOptimiser`: the optimiser state split over the ranks (ZeRO stage 1)."""

from __future__ import annotations

import threading
from typing import Any

from .. import _collective
from ..check import MISSING, Leaf, collect
from ..engine import state_store, update_
from ..errors import HyperparameterError, UnsupportedArrayError
from ..rule import Rule, keep_hyperparameters, walk_rules
from ..store import StateStore, copy_state
from .agree import agree, fingerprint
from .allreduce import _dtype_or_none
from .buckets import reduce_dtype_of
from .comm import Comm
from .layout import MODES, ShardLayout
from .shardable import check_rule, elementwise
from .shards import ShardBuffers

__all__ = ["ShardedOptimiser"]


class ShardedOptimiser:
    r"""Data parallelism with the optimiser state sharded over the ranks:
    `ShardedOptimiser(rule, comm, mode=None, reduce_dtype=None)`.

    ZeRO stage 1 ([Rajbhandari et al. 2020](https://arxiv.org/abs/1910.02054)):
    each of the $N$ ranks keeps the state of `rule` for its shard, about $1/N$
    of the parameters, and `co.update_(zopt, params, local_grads)` takes one step:

    1. check the inputs (the engine's check) and agree over the ranks: if the
       check fails on any rank, or the ranks' trees (paths, shapes, dtypes)
       differ, every rank raises (the failing one its own error) and nothing
       changes;
    2. on the first step over a tree, cut it into shards (a
       `composeopt.dist.layout.ShardLayout`);
    3. reduce-scatter the gradients: this rank gets its shard of
       $\frac{1}{N}\sum_r dx^{(r)}$;
    4. update its shard of the parameters with `rule` (`co.update_` over the
       [local_tree][composeopt.dist.ShardedOptimiser.local_tree]), where the
       tree-level rules combine their numbers over the ranks: the global norm of
       `ClipGlobalNorm`, the finite flag of `SkipNonFinite`, the dot products
       of `LBFGS`, the group check of `Groups`;
    5. agree again, then all-gather the shards into `params` on every rank.

    The result is that of `rule` on one process given the mean gradient (bit
    for bit in flat mode and for per-array rules; sums over the tree, such as
    the global norm, are added in another order, so they may differ in the
    last bits).

    Args:
        rule: the rule or chain to run on the shards.
        comm: the ranks, a [Comm][composeopt.dist.Comm].
        mode: how the parameters are cut (`None`: chosen from `rule`):
            `"flat"`, the leaves laid end to end and cut into $N$ equal runs,
            for chains of elementwise rules (their fused plan has no groups,
            no whole-array kernel and no per-array reduction; `ClipGlobalNorm`
            and `SkipNonFinite` are fine); `"whole"`, each leaf whole to one
            rank, largest first to the least loaded, for every other chain
            (`ClipNorm`, `Lamb`, `Lars`, `Adafactor`, `Muon`, `LBFGS`,
            `Groups`, rules without a fast path).  `"flat"` for a chain that
            needs whole arrays is refused.
        reduce_dtype: the dtype the gradients are summed in; `None` for the
            parameters' own, except float16 and bfloat16 (which MPI has no type
            for), summed in float32.  The parameters are gathered as raw bytes.

    Refused, with a `HyperparameterError` when the step begins (see
    `composeopt.dist.shardable`): `ClipGlobalNorm`, `SkipNonFinite` or `LBFGS`
    inside `Groups` (a rank without a parameter of the group would not take
    part in its reduction, and the others would wait), a rule that may raise
    (`ClipNorm(throw=True)`) before one of those, `AllReduceMean` inside, and
    user-defined tree-level rules (overriding `apply_tree_`).

    On failure: if the inner step raises on any rank (say `ClipNorm` finds an
    infinite norm in one rank's shard), every rank raises (that rank its own
    error, the others a `DistributedError` naming it) and no rank's parameters
    or states change: the ranks that had finished put their inner states, step
    count and hyperparameters back.  Failures that no rule can foresee (out of
    memory mid-step) in a chain that cannot raise are not undone.

    A step over another tree than the last (other paths, shapes or dtypes; a
    `None` gradient leaves its leaf out of the step) cuts a new layout, and
    the inner rule's state starts afresh.  `co.update` (not in place) is not
    supported.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> from composeopt import dist
        >>> chain = co.Optimiser(co.ClipGlobalNorm(1.0), co.Descent(0.5))
        >>> zopt = dist.ShardedOptimiser(chain, dist.LocalComm())
        >>> params = {"a": np.zeros(2), "b": np.zeros(2)}
        >>> _ = co.update_(zopt, params, {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 4.0])})
        >>> print(params["a"], params["b"], zopt.mode)
        [-0.3  0. ] [ 0.  -0.4] flat
    """

    def __init__(self, rule: Rule, comm: Comm, mode: str | None = None, reduce_dtype: Any = None) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"ShardedOptimiser: expected a composeopt Rule, got a {type(rule).__name__}")
        if not isinstance(comm, Comm):
            raise TypeError(f"ShardedOptimiser: expected a composeopt.dist.Comm, got a {type(comm).__name__}")
        if mode is not None and mode not in MODES:
            raise HyperparameterError(f"ShardedOptimiser: mode is None, 'flat' or 'whole', not {mode!r}")
        check_rule(rule)
        fits_flat = elementwise(rule)
        if mode == "flat" and not fits_flat:
            raise HyperparameterError(
                f"ShardedOptimiser: {rule!r} needs whole arrays (per-array norms, matrices, groups "
                "or rules without an elementwise fast path): use mode='whole' or None"
            )
        self._rule = rule
        self._comm = comm
        self._mode = mode if mode is not None else ("flat" if fits_flat else "whole")
        self.reduce_dtype = _dtype_or_none(reduce_dtype)
        self._lock = threading.RLock()
        self._layout: ShardLayout | None = None
        self._buffers: ShardBuffers | None = None
        self._local: dict[str, Any] = {}
        self._inner_params: Any = None
        self._inner_grads: Any = None

    @property
    def rule(self) -> Rule:
        """The inner rule; its state (`co.state_store(zopt.rule)`) is keyed by `local_tree()`'s arrays."""
        return self._rule

    @property
    def comm(self) -> Comm:
        return self._comm

    @property
    def mode(self) -> str:
        """`"flat"` or `"whole"` (see the class)."""
        return self._mode

    @property
    def layout(self) -> ShardLayout | None:
        """The layout of the last tree, or `None` before the first step."""
        return self._layout

    def local_tree(self) -> dict[str, Any]:
        """This rank's pieces of the parameters as the inner rule updates them, by the leaf's
        path (`str` of its [Path][composeopt.tree.Path]): 1-d in flat mode, shaped as the
        leaf in whole mode.  The same array objects from step to step, until the tree changes."""
        return dict(self._local)

    def prepare(self, params: Any) -> ShardLayout:
        """Collective: cut `params` into shards as a step would (without stepping) and
        return the layout; the local tree then holds this rank's pieces of `params`."""
        with self._lock:
            leaves = self._agreed(params, params)
            assert self._buffers is not None
            self._buffers.load_params([leaf.x for leaf in leaves])
            assert self._layout is not None
            return self._layout

    def _composeopt_update_(self, params: Any, grads: Any) -> None:
        """The step of `co.update_(zopt, params, grads)` (see the class)."""
        with self._lock:
            leaves = self._agreed(params, grads)
            buffers = self._buffers
            assert buffers is not None
            buffers.scatter_mean([leaf.dx for leaf in leaves])
            buffers.load_params([leaf.x for leaf in leaves])
            undo = self._undo()
            error: BaseException | None = None
            try:
                with _collective.across(self._comm):
                    update_(self._rule, self._inner_params, self._inner_grads)
            except Exception as err:  # every rank must hear of it before any goes on
                error = err
            try:
                agree(self._comm, error, b"")
            except BaseException:
                if error is None:
                    undo()
                buffers.load_params([leaf.x for leaf in leaves])
                raise
            buffers.gather_into([leaf.x for leaf in leaves])

    def _agreed(self, params: Any, grads: Any) -> list[Leaf]:
        """The checked leaves, once every rank has passed its check with the same tree; the
        layout and buffers for that tree."""
        leaves: list[Leaf] = []
        error: BaseException | None = None
        try:
            check_rule(self._rule)  # hyperparameters (ClipNorm.throw) may have changed
            # A store of its own each step: it holds no state, and no path is owned by an array
            # (the params may be new arrays every step: the inner state is keyed by the shards).
            leaves = collect(StateStore(), params, grads, copy=False, in_place=True)
            for leaf in leaves:
                if not self._comm.accepts(leaf.x):
                    raise UnsupportedArrayError(
                        f"{leaf.path}: {type(self._comm).__name__} takes {self._comm.xp.__name__} "
                        f"arrays, got a {type(leaf.x).__name__}"
                    )
        except Exception as err:
            error = err
        paths = [str(leaf.path) for leaf in leaves]
        shapes = [tuple(leaf.x.shape) for leaf in leaves]
        dtypes = [leaf.x.dtype for leaf in leaves]
        digest = fingerprint(paths, shapes, dtypes) if error is None else b""
        agree(self._comm, error, digest)
        if self._layout is None or self._layout.fingerprint != digest:
            self._build(leaves, ShardLayout.build(paths, shapes, dtypes, self._comm.size, self._mode))
        return leaves

    def _build(self, leaves: list[Leaf], layout: ShardLayout) -> None:
        """The buffers of `layout` and the trees of views that the inner rule steps over."""
        from ..engine import reset_

        buffers = ShardBuffers(layout, [leaf.x.dtype for leaf in leaves], self._comm, self._reduce_dtype)
        whole = layout.mode == "whole"
        local: dict[str, Any] = {}
        entries: list[tuple[tuple[Any, ...], Any, Any]] = []
        for piece, group, offset in buffers.mine:
            x, dx = buffers.param_view(piece, group, offset), buffers.grad_view(piece, group, offset)
            if whole:
                x, dx = x.reshape(layout.shapes[piece.leaf]), dx.reshape(layout.shapes[piece.leaf])
            local[layout.paths[piece.leaf]] = x
            entries.append((leaves[piece.leaf].path.keys, x, dx))
        if not entries and leaves:
            # A rank without a piece still takes part in the inner rule's reductions: an empty
            # placeholder at the first leaf's path (so that groups take it), not in local_tree.
            xp, dtype = self._comm.xp, leaves[0].x.dtype
            entries.append((leaves[0].path.keys, xp.empty(0, dtype=dtype), xp.zeros(0, dtype=dtype)))
        reset_(self._rule)  # a new tree: the states of the old views go
        self._layout, self._buffers, self._local = layout, buffers, local
        self._inner_params = _nest([(keys, x) for keys, x, _ in entries])
        self._inner_grads = _nest([(keys, dx) for keys, _, dx in entries])

    def _reduce_dtype(self, dtype: Any) -> Any:
        return reduce_dtype_of(self, dtype)

    def _undo(self) -> Any:
        """A function that puts the inner rule back as it is now (its states, step count and
        hyperparameters), for a step that another rank failed; copies only where it can fail."""
        store = state_store(self._rule)
        step, restore = store.step, keep_hyperparameters(self._rule)
        arrays = _leaves_of(self._inner_params)
        fallible = any(inner.fallible for inner in walk_rules(self._rule))
        kept = [(x, store.get(x, MISSING)) for x in arrays]
        if fallible:
            kept = [(x, state if state is MISSING else copy_state(state)) for x, state in kept]

        def undo() -> None:
            restore()
            store.step = step
            for x, state in kept:
                if state is MISSING:
                    store.discard(x)
                else:
                    store.set(x, state)

        return undo

    def __repr__(self) -> str:
        return f"ShardedOptimiser({self._rule!r}, {self._comm!r}, mode={self._mode!r})"


def _nest(entries: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """The tree of `(keys, array)` entries as nested dicts, so that the inner rule sees each
    piece at its leaf's key path (what groups match); a root array alone is itself."""
    if len(entries) == 1 and entries[0][0] == ():
        return entries[0][1]
    tree: dict[Any, Any] = {}
    for keys, array in entries:
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = array
    return tree


def _leaves_of(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves_of(value)]
    return [] if tree is None else [tree]
