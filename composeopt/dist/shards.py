"""The buffers of a sharded step: gradients packed and reduce-scattered, parameters gathered.

For one `ShardLayout` and one rank, the leaves are split by dtype into
groups.  Each group has, in rank-major order of the layout's pieces (rank 0's
pieces of that dtype, then rank 1's, ...):

* `send`: every leaf's gradient, packed (in the dtype the sums are made in);
* `recv`: this rank's part of the sum over the ranks (`reduce_scatter_sum`);
* `grads`: this rank's part of the mean, in the parameters' dtype;
* `params`: this rank's part of the parameters, which the inner rule updates;
* `gathered`: every rank's `params`, one after another (`allgather_`), from
  which every leaf is written back.

The parameters travel as raw bytes (`uint8`), so that the gather is exact for
every dtype, those without an MPI type (float16, bfloat16) too.  The groups
come in the order of the leaves' dtypes in the tree, which every rank agreed
on, so every rank makes the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .comm import Comm
from .layout import Piece, ShardLayout

__all__ = ["ShardBuffers"]


class _Group:
    """The leaves of one dtype: where each piece sits in the group's buffers."""

    def __init__(self, dtype: Any, reduce_dtype: Any, ranks: int) -> None:
        self.dtype = dtype
        self.reduce_dtype = reduce_dtype
        self.counts = [0] * ranks
        self.placed: list[tuple[Piece, int]] = []  # every rank's pieces, with their offset in `send`
        self.send: Any = None
        self.recv: Any = None
        self.grads: Any = None
        self.params: Any = None
        self.gathered: Any = None

    def place(self, piece: Piece) -> None:
        self.placed.append((piece, sum(self.counts)))
        self.counts[piece.rank] += piece.size

    def allocate(self, xp: Any, rank: int) -> None:
        total, mine = sum(self.counts), self.counts[rank]
        self.send = xp.empty(total, dtype=self.reduce_dtype)
        self.recv = xp.empty(mine, dtype=self.reduce_dtype)
        self.grads = self.recv if self.reduce_dtype == self.dtype else xp.empty(mine, dtype=self.dtype)
        self.params = xp.empty(mine, dtype=self.dtype)
        self.gathered = xp.empty(total, dtype=self.dtype)


class ShardBuffers:
    """The buffers of `layout` on rank `rank`, in `comm`'s array module.

    `reduce_dtype_of(dtype)` is the dtype the gradients of `dtype` are summed in.
    `mine` lists this rank's pieces with their group and their offset in its buffers.
    """

    def __init__(
        self,
        layout: ShardLayout,
        dtypes: Sequence[Any],
        comm: Comm,
        reduce_dtype_of: Callable[[Any], Any],
    ) -> None:
        self.layout = layout
        self.comm = comm
        rank = comm.rank
        groups: dict[Any, _Group] = {}
        self.group_of_leaf: list[_Group] = []
        for dtype in dtypes:
            key = np.dtype(dtype)
            if key not in groups:
                groups[key] = _Group(key, np.dtype(reduce_dtype_of(key)), layout.ranks)
            self.group_of_leaf.append(groups[key])
        for piece in layout.pieces:  # by rank, then by leaf: the rank-major order of the buffers
            self.group_of_leaf[piece.leaf].place(piece)
        self.groups = list(groups.values())
        for group in self.groups:
            group.allocate(comm.xp, rank)
        self.mine: list[tuple[Piece, _Group, int]] = []
        for group in self.groups:
            first = sum(group.counts[:rank])
            for piece, offset in group.placed:
                if piece.rank == rank:
                    self.mine.append((piece, group, offset - first))
        self.mine.sort(key=lambda item: item[0].leaf)

    def param_view(self, piece: Piece, group: _Group, offset: int) -> Any:
        return group.params[offset : offset + piece.size]

    def grad_view(self, piece: Piece, group: _Group, offset: int) -> Any:
        return group.grads[offset : offset + piece.size]

    def scatter_mean(self, gradients: Sequence[Any]) -> None:
        """This rank's part of the mean over the ranks of `gradients` (one per leaf, shaped as
        the leaf, of any strides) into the groups' `grads`."""
        ranks = self.comm.size
        for group in self.groups:
            for piece, offset in group.placed:
                flat = gradients[piece.leaf].reshape(-1)  # a copy where the gradient is not contiguous
                group.send[offset : offset + piece.size] = flat[piece.start : piece.stop]
            self.comm.reduce_scatter_sum(group.send, group.recv, group.counts)
            if group.grads is group.recv:
                group.recv /= ranks
            else:
                group.grads[...] = group.recv / ranks

    def load_params(self, params: Sequence[Any]) -> None:
        """Copy this rank's pieces of `params` (one per leaf) into the groups' `params`."""
        for piece, group, offset in self.mine:
            flat = params[piece.leaf].reshape(-1)
            group.params[offset : offset + piece.size] = flat[piece.start : piece.stop]

    def gather_into(self, params: Sequence[Any]) -> None:
        """Every rank's updated pieces, gathered, written into `params` (one per leaf)."""
        for group in self.groups:
            itemsize = group.dtype.itemsize
            counts = [count * itemsize for count in group.counts]
            self.comm.allgather_(_bytes(group.params), _bytes(group.gathered), counts)
        xp = self.comm.xp
        for leaf, x in enumerate(params):
            group = self.group_of_leaf[leaf]
            parts = [(piece, offset) for piece, offset in group.placed if piece.leaf == leaf]
            parts.sort(key=lambda part: part[0].start)
            pieces = [group.gathered[offset : offset + piece.size] for piece, offset in parts]
            whole = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces)
            x[...] = whole.reshape(x.shape)


def _bytes(buffer: Any) -> Any:
    """A 1-d buffer seen as its bytes."""
    return buffer.view(np.uint8)
