"""`AllReduceMean`: the gradients averaged over the ranks, as a rule of the chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._fused.reduce import Outcome, Reduce, Staged
from ..errors import HyperparameterError, UnsupportedArrayError
from ..hyper import Hyper, positive_int
from ..kernel import Kernel
from ..rule import Rule
from .buckets import mean_over_ranks, reduce_dtype_of
from .comm import Comm

__all__ = ["AllReduceMean"]


def _dtype_or_none(value: Any) -> str | None:
    if value is None:
        return None
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise HyperparameterError(f"expected a floating dtype or None, got {value!r}") from None
    if dtype.kind != "f":
        raise HyperparameterError(f"expected a floating dtype or None, got {dtype}")
    return str(dtype.name)


def _exchange(
    rule: AllReduceMean, sources: Sequence[Any], dtypes: Sequence[Any], paths: Sequence[str]
) -> list[Any]:
    """The fast path's reduction: the sum over the ranks of the updates as they reach the
    rule, in the rule's buckets (divided by the ranks where the buckets' dtype is not the
    arrays': see `_finish`)."""
    return mean_over_ranks(rule, sources, divide=False)


def _finish(rule: AllReduceMean, states: Any, values: Any, dtypes: Sequence[Any], paths: Any) -> Outcome:
    return Outcome([{"ranks": float(rule._divisor(dtype))} for dtype in dtypes])


_ACROSS = Staged(
    Reduce(lambda rule: (), _finish, scope="tree", exchange=_exchange),
    Kernel("return dx / ranks"),
)
_ALONE = Kernel("return dx")


class AllReduceMean(Rule):
    r"""Average the gradients over the ranks of a communicator: `AllReduceMean(comm)`.

    $$\Delta = \frac{1}{N} \sum_{r=1}^{N} dx^{(r)}$$

    where $dx^{(r)}$ is the gradient on rank $r$ as it reaches the rule and
    $N$ = `comm.size`.  A tree-level rule: the gradients of the step are packed
    into contiguous buckets of at most `bucket_bytes` (an array larger than that
    is a bucket of its own), one non-blocking all-reduce is started per bucket
    as soon as it is packed, and the mean is read from the buckets.  The rules
    after it see the same gradients on every rank, so that every rank takes the
    same step: plain data parallelism (PyTorch's `DistributedDataParallel`).

    It can sit anywhere in a chain: after `AccumGrad(n)` it communicates only
    on the `n`-th step, when the accumulated mean reaches it; after a
    per-rank `ClipNorm` it averages clipped gradients.  On one rank it is the
    identity and communicates nothing.

    Args:
        comm: the ranks, a [Comm][composeopt.dist.Comm] (`MPIComm`, `NCCLComm`, `TorchComm`).
        bucket_bytes: the most bytes per bucket (25 MiB, as PyTorch's DDP).
        reduce_dtype: the dtype the sums are made in; `None` for the gradients'
            own, except float16 and bfloat16 (which MPI has no type for), which are
            summed in float32 and cast back once divided.

    Every rank must call `update_` with the same tree (paths, shapes and dtypes):
    the engine checks that the ranks agree before the step, and raises on all of
    them when they do not.
    """

    fallible = False
    bucket_bytes: Hyper[int] = Hyper(default=25 * 2**20, check=positive_int)
    reduce_dtype: Hyper[str | None] = Hyper(default=None, check=_dtype_or_none)

    @property
    def _kernel(self) -> Any:
        # One rank has nothing to average: the rule is then the identity, which fuses
        # into its neighbours' pass (and lets the step take the one-call batched path).
        return _ALONE if self._comm.size == 1 else _ACROSS

    def __init__(self, comm: Comm, bucket_bytes: int = 25 * 2**20, reduce_dtype: Any = None) -> None:
        if not isinstance(comm, Comm):
            raise TypeError(f"AllReduceMean: expected a composeopt.dist.Comm, got a {type(comm).__name__}")
        self._comm = comm
        self._buffers: dict[Any, Any] = {}
        self.bucket_bytes = bucket_bytes
        self.reduce_dtype = reduce_dtype

    @property
    def comm(self) -> Comm:
        return self._comm

    @property
    def ranks(self) -> int:
        return self._comm.size

    def _divisor(self, dtype: Any) -> int:
        """What the kernel after the reduction divides by: the ranks, unless the sums were
        made in another dtype and already divided there."""
        return self._comm.size if reduce_dtype_of(self, dtype) == np.dtype(dtype) else 1

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.apply_tree_([state], [x], [dx], ["params"])[0]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        if not dxs:
            return []
        for dx, path in zip(dxs, paths):
            if not self._comm.accepts(dx):
                raise UnsupportedArrayError(
                    f"{path}: {type(self._comm).__name__} takes {self._comm.xp.__name__} arrays, "
                    f"got a {type(dx).__name__}"
                )
        return mean_over_ranks(self, list(dxs), divide=True)

    def __repr__(self) -> str:
        settings = f"bucket_bytes={self.bucket_bytes}, reduce_dtype={self.reduce_dtype!r}"
        return f"AllReduceMean({self._comm!r}, {settings})"
