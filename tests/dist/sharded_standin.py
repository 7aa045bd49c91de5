"""A sharded optimiser for the checkpoint tests: `dist.ShardedOptimiser` where the package
has it, else a small stand-in with its public API (rule, comm, mode, layout, prepare,
local_tree), which steps each rank's pieces with the inner rule.

The stand-in's tree-level rules see only the rank's pieces, so the tests keep the global
gradient norm under the clipping threshold, where both agree with the unsharded chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import composeopt as co
from composeopt import dist
from composeopt.dist.layout import ShardLayout
from composeopt.tree import array_leaves


class StandIn:
    def __init__(self, rule: Any, comm: Any, mode: str) -> None:
        self.rule, self.comm, self.mode = rule, comm, mode
        self.layout: ShardLayout | None = None
        self._local: dict[str, Any] = {}
        self._keys: dict[str, tuple[Any, ...]] = {}

    def prepare(self, params: Any) -> ShardLayout:
        leaves = list(array_leaves(params))
        paths = [str(path) for path, _ in leaves]
        layout = ShardLayout.build(
            paths, [x.shape for _, x in leaves], [x.dtype for _, x in leaves], self.comm.size, self.mode
        )
        if layout != self.layout:
            co.reset_(self.rule)
            self.layout, self._keys = layout, {str(path): path.keys for path, _ in leaves}
            self._local = {}
            for piece in layout.pieces_of(self.comm.rank):
                x = leaves[piece.leaf][1]
                self._local[paths[piece.leaf]] = (
                    x.reshape(-1)[piece.start : piece.stop].copy() if self.mode == "flat" else x.copy()
                )
        for piece in layout.pieces_of(self.comm.rank):
            x = leaves[piece.leaf][1]
            self._local[paths[piece.leaf]][...] = (
                x.reshape(-1)[piece.start : piece.stop] if self.mode == "flat" else x
            )
        return layout

    def local_tree(self) -> dict[str, Any]:
        return dict(self._local)

    def _nested(self, local: dict[str, Any]) -> Any:
        tree: dict[Any, Any] = {}
        for name, array in local.items():
            node = tree
            for key in self._keys[name][:-1]:
                node = node.setdefault(key, {})
            node[self._keys[name][-1]] = array
        return tree

    def step(self, params: Any, grads: Any) -> None:
        """`grads` are the mean gradients, the same on every rank."""
        layout = self.prepare(params)
        xs = [x for _, x in array_leaves(params)]
        dxs = [dx for _, dx in array_leaves(grads)]
        pieces = layout.pieces_of(self.comm.rank)
        local_grads = {
            layout.paths[p.leaf]: (
                dxs[p.leaf].reshape(-1)[p.start : p.stop].copy()
                if self.mode == "flat"
                else dxs[p.leaf].copy()
            )
            for p in pieces
        }
        co.update_(self.rule, self._nested(self._local), self._nested(local_grads))  # a step on every rank
        mine = b"".join(np.ascontiguousarray(self._local[layout.paths[p.leaf]]).tobytes() for p in pieces)
        everyone = self.comm.allgather_bytes(mine)
        for rank, data in enumerate(everyone):
            offset = 0
            for p in layout.pieces_of(rank):
                x = xs[p.leaf]
                n = p.size * x.itemsize
                values = np.frombuffer(data[offset : offset + n], dtype=x.dtype)
                offset += n
                x.reshape(-1)[p.start : p.stop] = values


def make(rule: Any, comm: Any, mode: str) -> Any:
    if hasattr(dist, "ShardedOptimiser"):
        return dist.ShardedOptimiser(rule, comm, mode=mode)
    return StandIn(rule, comm, mode)


def step_(zopt: Any, params: Any, grads: Any) -> None:
    if isinstance(zopt, StandIn):
        zopt.step(params, grads)
    else:
        co.update_(zopt, params, grads)
