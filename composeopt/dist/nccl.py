"""`NCCLComm`: the collectives of CuPy arrays over NCCL, one GPU per rank.

NCCL moves GPU buffers between GPUs without a trip through the host, which
MPI (`MPIComm`) cannot do for CuPy arrays.  The ranks find each other through
a host communicator (MPI): rank 0 makes NCCL's unique id and broadcasts it,
and every small host-side message (the ranks' agreement on each step, error
texts, host-side numbers) keeps going through that communicator.

Which communicator to pick:

* `MPIComm`: NumPy arrays, launched by `mpiexec`.
* `NCCLComm`: CuPy arrays on GPUs, launched by `mpiexec` (one process per GPU).
* `TorchComm` (`composeopt.dist.torch_comm`): processes that `torchrun` launched,
  with `torch.distributed` already initialised (gloo for NumPy, NCCL for CuPy).

Streams.  Every collective is enqueued on CuPy's current stream and returns
at once, as CuPy's own kernels do: what the stream runs afterwards sees its
result, and nothing waits on the host.  `iallreduce_sum_` is the same call;
`wait` makes the stream current at the time wait on the one the operation
was started on, if it is another (never a host synchronisation).

Unequal counts.  NCCL's reduce-scatter and all-gather move equal parts only;
with unequal `counts` they become one NCCL group of reductions to each rank
(`ncclReduce`, root `r` receiving its part) or of broadcasts from each rank
(`ncclBroadcast` into `recv`'s slices), which needs no padded copies.

This module imports CuPy only when an `NCCLComm` is made, so that composeopt
imports without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import UnsupportedArrayError
from .comm import Comm, MPIComm, Pending, _offsets

__all__ = ["NCCLComm"]

_NCCL_TYPES = {
    "float16": "NCCL_FLOAT16",
    "float32": "NCCL_FLOAT32",
    "float64": "NCCL_FLOAT64",
    "int32": "NCCL_INT32",
    "int64": "NCCL_INT64",
    "uint8": "NCCL_UINT8",
}
_NCCL_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}


def _cupy_and_nccl() -> tuple[Any, Any]:
    """CuPy and its NCCL binding, or an error that says what to install."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as err:
        raise ModuleNotFoundError(
            "NCCLComm needs CuPy with NCCL (e.g. `pip install cupy-cuda12x`, whose wheels load "
            "the NCCL of `pip install nvidia-nccl-cu12`); for NumPy arrays use MPIComm"
        ) from err
    if not getattr(nccl, "available", True):
        raise ModuleNotFoundError(
            "NCCLComm: CuPy is installed but could not load the NCCL library "
            "(e.g. `pip install nvidia-nccl-cu12`, or `python -m cupyx.tools.install_library --library nccl`)"
        )
    return cupy, nccl


def _host_comm(mpi_comm: Any) -> Comm:
    """The communicator of the host-side messages: an `MPIComm` of `mpi_comm` (of
    `COMM_WORLD` for `None`), or a host `Comm` given as it is (`LocalComm` for one rank)."""
    if mpi_comm is None:
        return MPIComm()
    if isinstance(mpi_comm, Comm):
        if mpi_comm.xp is not np:
            raise TypeError(
                f"NCCLComm: the host communicator must work on NumPy buffers, got a {type(mpi_comm).__name__}"
            )
        return mpi_comm
    return MPIComm(mpi_comm)


def _node_rank(host: Comm) -> int:
    """This rank's number among the ranks on its own node (its rank where that cannot be known)."""
    mpi = getattr(host, "_MPI", None)
    comm = getattr(host, "comm", None)
    if mpi is None or comm is None:
        return host.rank
    node = comm.Split_type(mpi.COMM_TYPE_SHARED, key=host.rank)
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


def _unique_id_bytes(unique_id: Any) -> bytes:
    # CuPy 14 returns bytes; older CuPy a tuple of 128 signed chars.
    if isinstance(unique_id, bytes):
        return unique_id
    return bytes(int(value) % 256 for value in unique_id)


def _communicator(nccl: Any, ranks: int, unique_id: bytes, rank: int) -> Any:
    try:
        return nccl.NcclCommunicator(ranks, unique_id, rank)
    except TypeError:
        # Before CuPy 14 the id is passed as the tuple of signed chars it was made as.
        signed = tuple(value - 256 if value > 127 else value for value in unique_id)
        return nccl.NcclCommunicator(ranks, signed, rank)


class NCCLComm(Comm):
    """A communicator of CuPy arrays over NCCL: `NCCLComm()` on every rank of an MPI job.

    Each rank drives one GPU: `device`, else the current device if it is not
    device 0 (set it before, as `cupy.cuda.Device(n).use()`), else its rank
    among the ranks of its node modulo the number of visible GPUs (which is
    device 0 when each rank sees one GPU only, as with a `CUDA_VISIBLE_DEVICES`
    per rank).  That device is made current, so that the buffers of the
    data-parallel rules are made on it; the arrays given must be on it.

    Buffers: 1-d C-contiguous CuPy arrays of float16, float32, float64,
    int32, int64 or uint8.  bfloat16 is refused: composeopt sums float16 and
    bfloat16 gradients in float32 itself (`AllReduceMean`'s `reduce_dtype`).
    `allreduce_` also takes small NumPy arrays (the host-side numbers of a
    sharded step), which go through the host communicator.

    Args:
        mpi_comm: the ranks, for the rendezvous and the host-side messages: an
            `mpi4py.MPI.Comm`, a host [Comm][composeopt.dist.Comm] (an `MPIComm`, or a
            `LocalComm` for one rank alone), or `None` for `MPI.COMM_WORLD`.
        device: the GPU of this rank; `None` to choose as above.
    """

    def __init__(self, mpi_comm: Any = None, device: int | None = None) -> None:
        cupy, nccl = _cupy_and_nccl()
        self._cupy = cupy
        self._nccl = nccl
        self._host = host = _host_comm(mpi_comm)
        self.xp = cupy
        self.rank = host.rank
        self.size = host.size
        if device is None:
            current = int(cupy.cuda.runtime.getDevice())
            device = current if current != 0 else _node_rank(host) % cupy.cuda.runtime.getDeviceCount()
        self.device = int(device)
        cupy.cuda.Device(self.device).use()
        unique_id = _unique_id_bytes(nccl.get_unique_id()) if host.rank == 0 else None
        unique_id = host.broadcast_bytes(unique_id, root=0)
        self._comm = _communicator(nccl, host.size, unique_id, host.rank)

    def accepts(self, array: Any) -> bool:
        return isinstance(array, self._cupy.ndarray) and int(array.device.id) == self.device

    def _described(self, buffer: Any, what: str) -> tuple[int, int, int, int]:
        """`buffer`'s device pointer, NCCL type, size and item size, once checked."""
        if not isinstance(buffer, self._cupy.ndarray):
            raise UnsupportedArrayError(
                f"NCCLComm.{what}: expected a cupy array, got a {type(buffer).__name__}"
            )
        if int(buffer.device.id) != self.device:
            raise UnsupportedArrayError(
                f"NCCLComm.{what}: the buffer is on GPU {buffer.device.id}, this rank's is GPU {self.device}"
            )
        if not buffer.flags.c_contiguous:
            raise ValueError(f"NCCLComm.{what}: the buffer must be C-contiguous")
        name = np.dtype(buffer.dtype).name
        if name == "bfloat16":
            raise UnsupportedArrayError(
                f"NCCLComm.{what}: bfloat16 buffers are not reduced over NCCL; composeopt sums "
                "bfloat16 gradients in float32 (AllReduceMean's reduce_dtype)"
            )
        if name not in _NCCL_TYPES:
            raise UnsupportedArrayError(
                f"NCCLComm.{what}: no NCCL type for {name} (float16, float32, float64, int32, int64 "
                "and uint8 have one)"
            )
        kind = getattr(self._nccl, _NCCL_TYPES[name])
        return int(buffer.data.ptr), kind, int(buffer.size), int(buffer.dtype.itemsize)

    def _stream(self) -> Any:
        return self._cupy.cuda.get_current_stream()

    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        """NCCL calls made in the block are one operation, launched at its end."""
        self._nccl.groupStart()
        try:
            yield
        finally:
            self._nccl.groupEnd()

    def _counts(self, counts: Sequence[int], send: int, recv: int, total_side: str) -> list[int]:
        counts = [int(count) for count in counts]
        if len(counts) != self.size:
            raise ValueError(f"NCCLComm: {len(counts)} counts for {self.size} ranks")
        total, own = (send, recv) if total_side == "send" else (recv, send)
        if total != sum(counts) or own != counts[self.rank]:
            raise ValueError(
                f"NCCLComm: buffers of {send} and {recv} elements for counts {counts} on rank {self.rank}"
            )
        return counts

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        stream = self._stream()
        self._allreduce(buffer, "sum", stream, "iallreduce_sum_")
        return Pending(stream)

    def wait(self, pending: Sequence[Pending]) -> None:
        current = self._stream()
        started = {int(item.handle.ptr): item.handle for item in pending}
        for ptr, stream in started.items():
            if ptr != int(current.ptr):
                current.wait_event(stream.record())

    def _allreduce(self, buffer: Any, op: str, stream: Any, what: str) -> None:
        if op not in _NCCL_OPS:
            raise ValueError(f"NCCLComm.{what}: op must be one of {sorted(_NCCL_OPS)}, got {op!r}")
        pointer, kind, count, _ = self._described(buffer, what)
        if count:
            nccl_op = getattr(self._nccl, _NCCL_OPS[op])
            self._comm.allReduce(pointer, pointer, count, kind, nccl_op, stream.ptr)

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        if isinstance(buffer, np.ndarray) and not isinstance(buffer, self._cupy.ndarray):
            self._host.allreduce_(buffer, op)
        else:
            self._allreduce(buffer, op, self._stream(), "allreduce_")

    def reduce_scatter_sum(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        sum_op = self._nccl.NCCL_SUM

        def even(source: int, target: int, count: int, kind: int, stream: int) -> None:
            self._comm.reduceScatter(source, target, count, kind, sum_op, stream)

        def part(
            root: int, source: int, target: int, offset: int, count: int, kind: int, stream: int
        ) -> None:
            # Only the root's receive buffer is written; the others pass their part.
            into = target if root == self.rank else source + offset
            self._comm.reduce(source + offset, into, count, kind, sum_op, root, stream)

        self._collective(send, recv, counts, "reduce_scatter_sum", "send", even, part)

    def allgather_(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        def even(source: int, target: int, count: int, kind: int, stream: int) -> None:
            self._comm.allGather(source, target, count, kind, stream)

        def part(
            root: int, source: int, target: int, offset: int, count: int, kind: int, stream: int
        ) -> None:
            # Only the root's send buffer is read; the others pass where it goes.
            into = target + offset
            self._comm.broadcast(source if root == self.rank else into, into, count, kind, root, stream)

        self._collective(send, recv, counts, "allgather_", "recv", even, part)

    def _collective(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        what: str,
        long_side: str,
        even: Callable[[int, int, int, int, int], None],
        part: Callable[[int, int, int, int, int, int, int], None],
    ) -> None:
        """A collective over per-rank `counts`: NCCL's own call when every count is the same,
        else one rooted call per rank in a group; `offset` is in bytes."""
        source, kind, send_size, itemsize = self._described(send, what)
        target, recv_kind, recv_size, _ = self._described(recv, what)
        if recv_kind != kind:
            raise UnsupportedArrayError(f"NCCLComm.{what}: send and recv differ in dtype")
        counts = self._counts(counts, send_size, recv_size, long_side)
        stream = self._stream().ptr
        if all(count == counts[0] for count in counts):
            if counts[0]:
                even(source, target, counts[0], kind, stream)
            return
        with self._group():
            for root, (offset, count) in enumerate(zip(_offsets(counts), counts)):
                if count:
                    part(root, source, target, offset * itemsize, count, kind, stream)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return self._host.allgather_bytes(data)

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return self._host.broadcast_bytes(data, root)

    def barrier(self) -> None:
        self._host.barrier()

    def __repr__(self) -> str:
        return f"NCCLComm(rank={self.rank}, size={self.size}, device={self.device})"
