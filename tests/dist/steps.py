"""What the scripts under tests/dist share: seeded trees and gradients that every rank can
rebuild for every other rank (so that each rank computes the single-process reference
itself), a counting communicator, and a byte-for-byte snapshot of a step's effect."""

from __future__ import annotations

import numpy as np

import composeopt as co
from composeopt import dist

SHAPES = {"w": (7, 5), "b": (5,), "layers": [(3, 4), (11,), (1,), (2,)]}


def say(text: str) -> None:
    """Print `text` as `<<text>>`: the launcher forwards the ranks' output to one pipe, where
    their lines may interleave, so the test reads what is between the marks."""
    print(f"<<{text}>>", flush=True)


def tree_of(make, shapes=SHAPES):
    """`shapes` with each shape replaced by `make(path, shape)`."""
    if isinstance(shapes, dict):
        return {
            key: tree_of(make, value) if not isinstance(value, tuple) else make(key, value)
            for key, value in shapes.items()
        }
    return [
        tree_of(make, value) if not isinstance(value, tuple) else make(str(i), value)
        for i, value in enumerate(shapes)
    ]


def leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, list):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def params(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return tree_of(lambda path, shape: (rng.integers(-1024, 1024, shape) / 256).astype(dtype))


def dyadic_grads(step, rank, dtype="float64"):
    """A rank's gradients at a step: multiples of 1/1024 in [-2, 2), whose sums over a few
    ranks and whose halves and quarters are exact in float64."""
    rng = np.random.default_rng([step, rank, 7])
    return tree_of(lambda path, shape: (rng.integers(-2048, 2048, shape) / 1024).astype(dtype))


def random_grads(step, rank, dtype="float32"):
    rng = np.random.default_rng([step, rank, 11])
    return tree_of(lambda path, shape: rng.standard_normal(shape).astype(dtype))


def mean_over(trees, dtype=None):
    """The elementwise mean of `trees` (one per rank), summed in rank order in `dtype`
    (their own by default) and cast back to their dtype."""
    flat = [leaves(tree) for tree in trees]
    means = []
    for column in zip(*flat):
        work = np.dtype(dtype or column[0].dtype)
        total = column[0].astype(work)
        for other in column[1:]:
            total = total + other.astype(work)
        means.append((total / work.type(len(column))).astype(column[0].dtype))
    it = iter(means)
    return tree_of(lambda path, shape: next(it), shapes_of(trees[0]))


def shapes_of(tree):
    if isinstance(tree, dict):
        return {key: shapes_of(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [shapes_of(item) for item in tree]
    return tuple(tree.shape)


def copy(tree):
    if isinstance(tree, dict):
        return {key: copy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [copy(item) for item in tree]
    return tree.copy()


def same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(leaves(a), leaves(b)))


def _state_bytes(state) -> bytes:
    if isinstance(state, np.ndarray):
        return state.tobytes() + str(state.dtype).encode()
    if isinstance(state, co.State):
        return b"".join(name.encode() + _state_bytes(value) for name, value in sorted(vars(state).items()))
    if isinstance(state, (tuple, list)):
        return b"(" + b",".join(_state_bytes(item) for item in state) + b")"
    return repr(state).encode()


def snapshot(opt, tree) -> bytes:
    """Every parameter's bytes, its state's bytes and the step count, in tree order."""
    store = co.state_store(opt)
    return repr(store.step).encode() + b"".join(
        x.tobytes() + _state_bytes(store.get(x)) for x in leaves(tree)
    )


class CountingComm(dist.MPIComm):
    """An `MPIComm` that counts the all-reduces `AllReduceMean` starts."""

    def __init__(self, comm=None):
        super().__init__(comm)
        self.started = 0

    def iallreduce_sum_(self, buffer):
        self.started += 1
        return super().iallreduce_sum_(buffer)
