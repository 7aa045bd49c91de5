"""How a parameter tree is cut into shards, one per rank (ZeRO stage 1).

A `ShardLayout` lists the tree's leaves (paths, shapes, dtypes) and the
`Piece` s each rank owns: a piece is a range of one leaf's elements, in C
order.  Every element of every leaf is in exactly one piece.

* `"flat"`: the leaves are laid end to end, in tree order, and the line is cut
  into `ranks` contiguous runs as equal as possible (the first
  `total % ranks` runs one element longer).  For chains of elementwise rules,
  whose update of an element needs nothing but that element.
* `"whole"`: each leaf goes whole to one rank, largest first, to the rank with
  the fewest elements so far (the lowest such rank on a tie).  For rules that
  need whole arrays (per-array norms, matrices, factored moments).

The layout depends only on what it is built from, so every rank builds the
same one, and a checkpoint can build the layout of another number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .agree import fingerprint

__all__ = ["Piece", "ShardLayout", "MODES"]

MODES = ("flat", "whole")


@dataclass(frozen=True)
class Piece:
    """Elements `start:stop` (of the flattened leaf number `leaf`) kept by rank `rank`."""

    rank: int
    leaf: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardLayout:
    """The leaves of a tree and the pieces of it that each of `ranks` ranks owns."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    mode: str
    ranks: int
    pieces: tuple[Piece, ...]  # by rank, then by leaf

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[Any],
        ranks: int,
        mode: str,
    ) -> ShardLayout:
        if mode not in MODES:
            raise ValueError(f"a shard layout is 'flat' or 'whole', not {mode!r}")
        if ranks < 1:
            raise ValueError(f"a shard layout needs at least one rank, got {ranks}")
        fixed = [tuple(int(n) for n in shape) for shape in shapes]
        sizes = [math.prod(shape) for shape in fixed]
        pieces = _flat(sizes, ranks) if mode == "flat" else _whole(sizes, ranks)
        return cls(
            tuple(str(path) for path in paths),
            tuple(fixed),
            tuple(str(dtype) for dtype in dtypes),
            mode,
            ranks,
            tuple(sorted(pieces, key=lambda piece: (piece.rank, piece.leaf))),
        )

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def fingerprint(self) -> bytes:
        """A digest of the tree the layout cuts (its paths, shapes and dtypes)."""
        return fingerprint(self.paths, self.shapes, self.dtypes)

    def pieces_of(self, rank: int) -> list[Piece]:
        return [piece for piece in self.pieces if piece.rank == rank]

    def counts(self) -> list[int]:
        """The number of elements each rank owns."""
        counts = [0] * self.ranks
        for piece in self.pieces:
            counts[piece.rank] += piece.size
        return counts


def _flat(sizes: Sequence[int], ranks: int) -> list[Piece]:
    total = sum(sizes)
    base, extra = divmod(total, ranks)
    bounds = [0]
    for rank in range(ranks):
        bounds.append(bounds[-1] + base + (1 if rank < extra else 0))
    pieces = []
    offset = 0
    for leaf, size in enumerate(sizes):
        for rank in range(ranks):
            start, stop = max(bounds[rank], offset), min(bounds[rank + 1], offset + size)
            if start < stop or (size == 0 and bounds[rank] <= offset < bounds[rank + 1]):
                pieces.append(Piece(rank, leaf, start - offset, stop - offset))
        if size == 0 and not any(piece.leaf == leaf for piece in pieces):
            pieces.append(Piece(ranks - 1, leaf, 0, 0))  # an empty leaf after the last run
        offset += size
    return pieces


def _whole(sizes: Sequence[int], ranks: int) -> list[Piece]:
    loads = [0] * ranks
    pieces = []
    for leaf in sorted(range(len(sizes)), key=lambda leaf: (-sizes[leaf], leaf)):
        rank = min(range(ranks), key=lambda rank: (loads[rank], rank))
        loads[rank] += sizes[leaf]
        pieces.append(Piece(rank, leaf, 0, sizes[leaf]))
    return pieces
