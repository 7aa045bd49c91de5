"""Communicators: the collective operations a data-parallel step needs, over one library.

A `Comm` is the only thing the data-parallel rules know about the processes
they run on.  Each method is collective: every rank of the communicator
calls it, in the same order, with buffers of the same sizes and dtypes, and
it returns on a rank once that rank's part is done.  Array buffers are 1-d
and C-contiguous, of the array module the communicator works in (NumPy for
MPI and gloo, CuPy for NCCL), and are reduced in place: no copy is made on
the way to the library.  Small host-side messages (the agreement of the
ranks, error texts) travel as `bytes`, never pickled.

`MPIComm` wraps an `mpi4py` communicator; `NCCLComm` (CuPy) and `TorchComm`
(`torch.distributed`) are in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Comm", "LocalComm", "MPIComm", "Pending"]


class Pending:
    """A non-blocking operation that has been started: `Comm.wait` finishes it."""

    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = handle


class Comm:
    """What every communicator does.  `rank` is this process's number, `size` how many
    processes there are; `xp` is the array module of the buffers it takes."""

    rank: int = 0
    size: int = 1
    xp: Any = np

    def accepts(self, array: Any) -> bool:
        """Whether `array` is of the array module this communicator works in."""
        return isinstance(array, np.ndarray)

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        """Start summing `buffer` over the ranks, in place; `wait` for the result."""
        raise NotImplementedError

    def wait(self, pending: Sequence[Pending]) -> None:
        """Finish operations that `iallreduce_sum_` started."""
        raise NotImplementedError

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        """Reduce `buffer` over the ranks, in place: `op` is `"sum"`, `"max"` or `"min"`."""
        raise NotImplementedError

    def reduce_scatter_sum(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        """Sum `send` (of `sum(counts)` elements) over the ranks and put this rank's part,
        the `counts[rank]` elements after the first `sum(counts[:rank])`, into `recv`."""
        raise NotImplementedError

    def allgather_(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        """Put every rank's `send` (of `counts[rank]` elements) into `recv`, one after
        another in rank order."""
        raise NotImplementedError

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order (on the host; the lengths may differ)."""
        raise NotImplementedError

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """`root`'s `data` on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank has called it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _offsets(counts: Sequence[int]) -> list[int]:
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += int(count)
    return offsets


class MPIComm(Comm):
    """A communicator over MPI, through `mpi4py`: `MPIComm(MPI.COMM_WORLD)`.

    NumPy buffers go to MPI as they are (zero-copy); their dtype must have an
    MPI type (float32, float64 and the integers do; float16 and bfloat16 do
    not, which is why the data-parallel rules reduce those in float32).

    Args:
        comm: an `mpi4py.MPI.Comm` (an intracommunicator); `None` for `COMM_WORLD`.
    """

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        return Pending(self.comm.Iallreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM))

    def wait(self, pending: Sequence[Pending]) -> None:
        if pending:
            self._MPI.Request.Waitall([item.handle for item in pending])

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._ops[op])

    def reduce_scatter_sum(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        self.comm.Reduce_scatter(send, recv, [int(count) for count in counts], op=self._MPI.SUM)

    def allgather_(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        counts = [int(count) for count in counts]
        self.comm.Allgatherv(send, [recv, (counts, _offsets(counts))])

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        lengths = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([len(data)], dtype=np.int64), lengths)
        sizes = [int(n) for n in lengths]
        gathered = np.empty(sum(sizes), dtype=np.uint8)
        self.comm.Allgatherv(
            np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, dtype=np.uint8),
            [gathered, (sizes, _offsets(sizes))],
        )
        return [gathered[a : a + n].tobytes() for a, n in zip(_offsets(sizes), sizes)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        length = np.array([len(data) if self.rank == root and data is not None else 0], dtype=np.int64)
        self.comm.Bcast(length, root=root)
        buffer = np.empty(int(length[0]), dtype=np.uint8)
        if self.rank == root and data:
            buffer[:] = np.frombuffer(data, dtype=np.uint8)
        self.comm.Bcast(buffer, root=root)
        return buffer.tobytes()

    def barrier(self) -> None:
        self.comm.Barrier()


class LocalComm(Comm):
    """One process alone: every collective is the identity.  What `AllReduceMean` and
    `ShardedOptimiser` get without MPI, for tests and single-process runs."""

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        return Pending(None)

    def wait(self, pending: Sequence[Pending]) -> None:
        pass

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        pass

    def reduce_scatter_sum(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        recv[...] = send[: int(counts[0])]

    def allgather_(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        recv[: int(counts[0])] = send

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(data)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return b"" if data is None else bytes(data)

    def barrier(self) -> None:
        pass
