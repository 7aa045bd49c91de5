"""Gradients packed into buckets and summed over the ranks, one non-blocking call per bucket.

The arrays of a step are laid out, in order, into contiguous buckets of one
dtype (the dtype the sums are made in) and at most `bucket_bytes` each; an
array never spans two buckets, so one larger than a bucket is a bucket of its
own.  The layout depends only on the arrays' sizes and dtypes, which every
rank agreed on in the step's check, so every rank makes the same calls in
the same order, whichever path (generic or fused) it takes.  The buffers of
the last layout are kept by the rule and reused at the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["reduce_dtype_of", "mean_over_ranks"]


def reduce_dtype_of(rule: Any, dtype: Any) -> np.dtype[Any]:
    """The dtype `rule` sums arrays of `dtype` in: its `reduce_dtype`, else the arrays' own,
    but float32 for the 2-byte floats (float16, bfloat16), which MPI has no type for."""
    if rule.reduce_dtype is not None:
        return np.dtype(str(rule.reduce_dtype))
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


class _Bucket:
    __slots__ = ("dtype", "members", "buffer")

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.members: list[tuple[int, int, int]] = []  # (array index, offset, size)
        self.buffer: Any = None

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.members)


def _layout(rule: Any, arrays: Sequence[Any]) -> list[_Bucket]:
    buckets: list[_Bucket] = []
    for index, array in enumerate(arrays):
        dtype = reduce_dtype_of(rule, array.dtype)
        size = int(array.size)
        last = buckets[-1] if buckets else None
        if last is None or last.dtype != dtype or (last.size + size) * dtype.itemsize > rule.bucket_bytes:
            if last is None or last.members:
                last = _Bucket(dtype)
                buckets.append(last)
        last.members.append((index, last.size, size))
    xp = rule.comm.xp
    for bucket in buckets:
        bucket.buffer = xp.empty(bucket.size, dtype=bucket.dtype)
    return buckets


def mean_over_ranks(rule: Any, arrays: Sequence[Any], divide: bool) -> list[Any]:
    """The mean over the ranks of each of `arrays` (shaped as they are).

    Where the sums are made in the arrays' own dtype and `divide` is false, the sums
    themselves are returned, as 1-d views of the buckets, for a kernel to divide.
    """
    comm = rule.comm
    ranks = comm.size
    if ranks == 1 or not arrays:
        return list(arrays)
    key = tuple((int(array.size), np.dtype(array.dtype)) for array in arrays)
    buckets = rule._buffers.get(key)
    if buckets is None:
        buckets = _layout(rule, arrays)
        rule._buffers = {key: buckets}  # only the last layout: a new tree frees the old buffers
    pending = []
    for bucket in buckets:
        for index, offset, size in bucket.members:
            bucket.buffer[offset : offset + size] = arrays[index].reshape(-1)
        pending.append(comm.iallreduce_sum_(bucket.buffer))
    comm.wait(pending)
    means: list[Any] = [None] * len(arrays)
    for bucket in buckets:
        for index, offset, size in bucket.members:
            array = arrays[index]
            summed = bucket.buffer[offset : offset + size]
            if bucket.dtype != np.dtype(array.dtype):
                mean = (summed / ranks).astype(array.dtype)
            elif divide:
                mean = summed / ranks
            else:
                mean = summed
            means[index] = mean.reshape(array.shape)
    return means
