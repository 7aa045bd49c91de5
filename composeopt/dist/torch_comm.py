"""`TorchComm`: the collectives over `torch.distributed`, for processes that `torchrun` launched.

The process group must already be initialised (`torchrun` sets the
environment, the script calls `torch.distributed.init_process_group`).  The
buffers stay composeopt's arrays and are shared with torch without a copy:

* a CPU backend (gloo, or MPI): NumPy buffers, seen as tensors by `torch.from_numpy`;
* NCCL: CuPy buffers on the GPU of the rank (`torch.cuda.current_device()`),
  seen as tensors through DLPack (`torch.from_dlpack`), and the collectives
  run in the order of CuPy's current stream.

Which communicator to pick:

* `MPIComm`: NumPy arrays, launched by `mpiexec`.
* `NCCLComm` (`composeopt.dist.nccl`): CuPy arrays, launched by `mpiexec`.
* `TorchComm`: launched by `torchrun`, or whenever the program already has a
  `torch.distributed` process group (gloo for NumPy, NCCL for CuPy).

What torch lacks, and what is done instead:

* reduce-scatter: gloo has none in some torch versions, so on a CPU backend it
  is an all-reduce of a copy of `send` of which each rank keeps its part
  (twice the traffic of a reduce-scatter, in exchange for working on every
  version); on NCCL, `torch.distributed.reduce_scatter`, with the parts
  padded to the largest count when the counts differ.
* all-gather of unequal counts: `torch.distributed.all_gather` moves parts
  of one size, so each rank's part is padded to the largest count and cut
  out of the gathered parts afterwards; equal counts are gathered straight
  into `recv`.
* host bytes (`allgather_bytes`, `broadcast_bytes`) travel as uint8 tensors,
  their lengths first, never pickled (not `all_gather_object`).

This module imports torch only when a `TorchComm` is made, so that composeopt
imports without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import UnsupportedArrayError
from .comm import Comm, Pending, _offsets

__all__ = ["TorchComm"]


def _torch_distributed() -> tuple[Any, Any]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise ModuleNotFoundError("TorchComm needs PyTorch (`pip install torch`)") from err
    if not dist.is_available():
        raise RuntimeError("TorchComm: this build of PyTorch has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            "TorchComm: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (under torchrun, "
            'init_process_group("gloo") or ("nccl") reads the ranks from the environment)'
        )
    return torch, dist


class TorchComm(Comm):
    """A communicator over an initialised `torch.distributed` process group: `TorchComm()`.

    Args:
        group: the process group; `None` for the default (world) group.
        device: `"cpu"` (NumPy buffers) or `"cuda"` (CuPy buffers on the current CUDA
            device); `None` for `"cuda"` where the group's backend is NCCL, else `"cpu"`.

    Buffers are 1-d C-contiguous arrays of a dtype torch has (float16, float32,
    float64, the integers; not bfloat16, which composeopt sums in float32
    itself).  On `"cuda"`, `allreduce_` also takes small NumPy arrays (the
    host-side numbers of a sharded step), copied to the GPU and back where
    the backend has no CPU side.
    """

    def __init__(self, group: Any = None, device: str | None = None) -> None:
        torch, dist = _torch_distributed()
        self._torch = torch
        self._dist = dist
        self.group = group
        self.backend = str(dist.get_backend(group))
        self.rank = int(dist.get_rank(group))
        self.size = int(dist.get_world_size(group))
        if self.rank < 0:
            raise RuntimeError("TorchComm: this process is not a member of the group")
        has_nccl = "nccl" in self.backend
        device = device if device is not None else ("cuda" if has_nccl else "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"TorchComm: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if device == "cuda":
            try:
                import cupy
            except ImportError as err:
                raise ModuleNotFoundError(
                    "TorchComm: a CUDA backend takes CuPy arrays; install CuPy"
                ) from err
            self._cupy = cupy
            self.xp = cupy
            self._gpu = int(torch.cuda.current_device())
            cupy.cuda.Device(self._gpu).use()
            self._tensors_on = torch.device("cuda", self._gpu)
        else:
            self.xp = np
            self._tensors_on = torch.device("cpu")
        # Where host bytes and host numbers are exchanged: the CPU if the backend has a CPU side.
        cpu_side = device == "cpu" or any(name in self.backend for name in ("gloo", "mpi", "cpu:"))
        self._host_on = torch.device("cpu") if cpu_side else self._tensors_on

    def accepts(self, array: Any) -> bool:
        if self.device == "cpu":
            return isinstance(array, np.ndarray)
        return isinstance(array, self._cupy.ndarray) and int(array.device.id) == self._gpu

    def _tensor(self, buffer: Any, what: str) -> Any:
        """`buffer` as a tensor sharing its memory, once checked."""
        if not self.accepts(buffer):
            place = "numpy arrays" if self.device == "cpu" else f"cupy arrays on GPU {self._gpu}"
            raise UnsupportedArrayError(f"TorchComm.{what}: takes {place}, got a {type(buffer).__name__}")
        if not buffer.flags.c_contiguous:
            raise ValueError(f"TorchComm.{what}: the buffer must be C-contiguous")
        if np.dtype(buffer.dtype).name == "bfloat16":
            raise UnsupportedArrayError(
                f"TorchComm.{what}: bfloat16 buffers are not reduced here; composeopt sums bfloat16 "
                "gradients in float32 (AllReduceMean's reduce_dtype)"
            )
        if self.device == "cpu":
            return self._torch.from_numpy(buffer)
        return self._torch.from_dlpack(buffer)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """On CUDA, CuPy's current stream as torch's current stream, so that the collectives
        are ordered after the kernels that wrote their buffers and before those that read them."""
        if self.device == "cpu":
            yield
            return
        torch = self._torch
        pointer = int(self._cupy.cuda.get_current_stream().ptr)
        stream = torch.cuda.default_stream(self._gpu) if pointer == 0 else torch.cuda.ExternalStream(pointer)
        with torch.cuda.stream(stream):
            yield

    def _global(self, rank: int) -> int:
        return rank if self.group is None else int(self._dist.get_global_rank(self.group, rank))

    def _counts(self, counts: Sequence[int], total: int, own: int) -> list[int]:
        counts = [int(count) for count in counts]
        if len(counts) != self.size:
            raise ValueError(f"TorchComm: {len(counts)} counts for {self.size} ranks")
        if total != sum(counts) or own != counts[self.rank]:
            raise ValueError(
                f"TorchComm: buffers of {total} and {own} elements for counts {counts} on rank {self.rank}"
            )
        return counts

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        tensor = self._tensor(buffer, "iallreduce_sum_")
        with self._on_stream():
            work = self._dist.all_reduce(tensor, op=self._ops["sum"], group=self.group, async_op=True)
        # The tensor is kept with its work: its memory is the buffer's until the wait.
        return Pending((work, tensor))

    def wait(self, pending: Sequence[Pending]) -> None:
        with self._on_stream():
            for item in pending:
                item.handle[0].wait()

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        if op not in self._ops:
            raise ValueError(f"TorchComm.allreduce_: op must be one of {sorted(self._ops)}, got {op!r}")
        if self.device == "cuda" and isinstance(buffer, np.ndarray) and not self.accepts(buffer):
            self._allreduce_host(buffer, op)
            return
        tensor = self._tensor(buffer, "allreduce_")
        with self._on_stream():
            self._dist.all_reduce(tensor, op=self._ops[op], group=self.group)

    def _allreduce_host(self, buffer: np.ndarray, op: str) -> None:
        host = self._torch.from_numpy(buffer)
        moved = host.to(self._host_on)
        self._dist.all_reduce(moved, op=self._ops[op], group=self.group)
        if moved.data_ptr() != host.data_ptr():
            host.copy_(moved.cpu())

    def reduce_scatter_sum(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        source = self._tensor(send, "reduce_scatter_sum")
        target = self._tensor(recv, "reduce_scatter_sum")
        counts = self._counts(counts, source.numel(), target.numel())
        start = _offsets(counts)[self.rank]
        with self._on_stream():
            if self.device == "cpu":
                summed = source.clone()
                self._dist.all_reduce(summed, op=self._ops["sum"], group=self.group)
                target.copy_(summed[start : start + counts[self.rank]])
                return
            largest = max(counts)
            if largest == 0:
                return
            if all(count == largest for count in counts):
                self._dist.reduce_scatter(target, list(source.split(largest)), group=self.group)
                return
            parts = [source.new_zeros(largest) for _ in counts]
            for part, offset, count in zip(parts, _offsets(counts), counts):
                part[:count].copy_(source[offset : offset + count])
            mine = source.new_empty(largest)
            self._dist.reduce_scatter(mine, parts, group=self.group)
            target.copy_(mine[: counts[self.rank]])

    def allgather_(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        source = self._tensor(send, "allgather_")
        target = self._tensor(recv, "allgather_")
        counts = self._counts(counts, target.numel(), source.numel())
        largest = max(counts)
        if largest == 0:
            return
        with self._on_stream():
            if all(count == largest for count in counts):
                self._dist.all_gather(list(target.split(largest)), source, group=self.group)
                return
            padded = source.new_zeros(largest)
            padded[: source.numel()].copy_(source)
            parts = [source.new_empty(largest) for _ in counts]
            self._dist.all_gather(parts, padded, group=self.group)
            for part, offset, count in zip(parts, _offsets(counts), counts):
                target[offset : offset + count].copy_(part[:count])

    def _host_tensor(self, values: np.ndarray) -> Any:
        return self._torch.from_numpy(values).to(self._host_on)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        torch = self._torch
        length = self._host_tensor(np.array([len(data)], dtype=np.int64))
        lengths = [torch.empty_like(length) for _ in range(self.size)]
        self._dist.all_gather(lengths, length, group=self.group)
        sizes = [int(item.item()) for item in lengths]
        largest = max(sizes)
        if largest == 0:
            return [b""] * self.size
        mine = np.zeros(largest, dtype=np.uint8)
        mine[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        padded = self._host_tensor(mine)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._dist.all_gather(parts, padded, group=self.group)
        return [part[:size].cpu().numpy().tobytes() for part, size in zip(parts, sizes)]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        mine = data if self.rank == root and data is not None else b""
        length = self._host_tensor(np.array([len(mine)], dtype=np.int64))
        self._dist.broadcast(length, src=self._global(root), group=self.group)
        size = int(length.item())
        if size == 0:
            return b""
        values = np.zeros(size, dtype=np.uint8)
        if self.rank == root:
            values[:] = np.frombuffer(mine, dtype=np.uint8)
        buffer = self._host_tensor(values)
        self._dist.broadcast(buffer, src=self._global(root), group=self.group)
        return bytes(buffer.cpu().numpy().tobytes())

    def barrier(self) -> None:
        if self._host_on.type == "cuda":
            self._dist.barrier(group=self.group, device_ids=[self._gpu])
        else:
            self._dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"TorchComm(rank={self.rank}, size={self.size}, backend={self.backend!r})"
