"""NCCLComm: a clear error without CuPy; its calls into NCCL (pointers, counts, groups of
reductions and broadcasts for unequal counts) on two ranks of a NumPy stand-in for CuPy's
NCCL binding, run in two threads; and, where CuPy and a GPU are, a real one-rank NCCL
communicator under `AllReduceMean` against Adam alone."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import composeopt as co
from composeopt import dist
from composeopt.dist.comm import Comm
from composeopt.errors import UnsupportedArrayError


def test_composeopt_imports_neither_cupy_nor_torch() -> None:
    code = (
        "import sys, composeopt, composeopt.dist, composeopt.dist.nccl, composeopt.dist.torch_comm; "
        "print(sorted(name for name in ('cupy', 'torch', 'mpi4py') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


def test_without_cupy_nccl_comm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail, as without CuPy
    with pytest.raises(
        ModuleNotFoundError, match=r"NCCLComm needs CuPy with NCCL \(e\.g\. `pip install cupy"
    ):
        dist.NCCLComm(dist.LocalComm())


def test_cupy_without_its_nccl_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_cupy(monkeypatch, available=False)
    with pytest.raises(ModuleNotFoundError, match="CuPy is installed but could not load the NCCL library"):
        dist.NCCLComm(dist.LocalComm())


# --- A stand-in for CuPy's NCCL binding, over NumPy memory ----------------------------------------

_TYPES = {0: "int8", 1: "uint8", 2: "int32", 3: "uint32", 4: "int64", 5: "uint64", 6: "float16", 7: "float32"}
_TYPES[8] = "float64"
_REDUCE = {0: np.sum, 2: np.max, 3: np.min}


class _DeviceArray(np.ndarray):
    """A NumPy array that answers as a CuPy array does: `.data.ptr`, `.device.id`."""

    @property
    def data(self) -> Any:  # type: ignore[override]
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self) -> Any:
        return types.SimpleNamespace(id=0)


def _on_device(values: Any, dtype: Any = None) -> _DeviceArray:
    return np.array(values, dtype=dtype).view(_DeviceArray)


def _memory(pointer: int, count: int, kind: int) -> np.ndarray:
    dtype = np.dtype(_TYPES[kind])
    if count == 0:
        return np.empty(0, dtype=dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(raw, dtype=dtype)


class _Rendezvous:
    """What the ranks of one stand-in communicator put down and read back at each call."""

    def __init__(self, ranks: int) -> None:
        self.slots: list[Any] = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=20)

    def exchange(self, rank: int, payload: Any) -> list[Any]:
        self.slots[rank] = payload
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone


class _FakeNcclCommunicator:
    worlds: dict[bytes, _Rendezvous] = {}
    lock = threading.Lock()

    def __init__(self, ranks: int, unique_id: bytes, rank: int) -> None:
        assert isinstance(unique_id, bytes) and len(unique_id) == 128
        with self.lock:
            self.world = self.worlds.setdefault(unique_id, _Rendezvous(ranks))
        self.rank, self.ranks = rank, ranks
        self.calls: list[str] = []

    def _all(self, what: str, pointer: int, count: int, kind: int, mine: bool = True) -> list[Any]:
        self.calls.append(what)
        sent = _memory(pointer, count, kind).copy() if mine else None
        return self.world.exchange(self.rank, sent)

    def allReduce(self, send: int, recv: int, count: int, kind: int, op: int, stream: int) -> None:
        everyone = self._all("allReduce", send, count, kind)
        _memory(recv, count, kind)[:] = _REDUCE[op](np.stack(everyone), axis=0)

    def reduceScatter(self, send: int, recv: int, count: int, kind: int, op: int, stream: int) -> None:
        total = _REDUCE[op](np.stack(self._all("reduceScatter", send, count * self.ranks, kind)), axis=0)
        _memory(recv, count, kind)[:] = total[self.rank * count : (self.rank + 1) * count]

    def allGather(self, send: int, recv: int, count: int, kind: int, stream: int) -> None:
        everyone = self._all("allGather", send, count, kind)
        _memory(recv, count * self.ranks, kind)[:] = np.concatenate(everyone)

    def reduce(self, send: int, recv: int, count: int, kind: int, op: int, root: int, stream: int) -> None:
        everyone = self._all("reduce", send, count, kind)
        if self.rank == root:
            _memory(recv, count, kind)[:] = _REDUCE[op](np.stack(everyone), axis=0)

    def broadcast(self, send: int, recv: int, count: int, kind: int, root: int, stream: int) -> None:
        everyone = self._all("broadcast", send, count, kind, mine=self.rank == root)
        _memory(recv, count, kind)[:] = everyone[root]


def _install_fake_cupy(monkeypatch: pytest.MonkeyPatch, available: bool = True) -> None:
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = available  # type: ignore[attr-defined]
    if available:
        for code, name in _TYPES.items():
            setattr(nccl, f"NCCL_{name.upper()}", code)
        nccl.NCCL_SUM, nccl.NCCL_MAX, nccl.NCCL_MIN = 0, 2, 3  # type: ignore[attr-defined]
        nccl.NcclCommunicator = _FakeNcclCommunicator  # type: ignore[attr-defined]
        nccl.get_unique_id = lambda: bytes(range(128))  # type: ignore[attr-defined]
        nccl.groupStart = nccl.groupEnd = lambda: None  # type: ignore[attr-defined]
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl  # type: ignore[attr-defined]
    cuda.runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1)  # type: ignore[attr-defined]
    cuda.Device = lambda number: types.SimpleNamespace(use=lambda: None)  # type: ignore[attr-defined]
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)  # type: ignore[attr-defined]
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda  # type: ignore[attr-defined]
    cupy.ndarray = _DeviceArray  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)


class _ThreadComm(Comm):
    """The host side of one rank of the threads: bytes and NumPy buffers."""

    def __init__(self, world: _Rendezvous, rank: int, size: int) -> None:
        self.world, self.rank, self.size = world, rank, size

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        result = self.world.exchange(self.rank, data)[root]
        assert isinstance(result, bytes)
        return result

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        everyone = self.world.exchange(self.rank, buffer.copy())
        buffer[...] = {"sum": np.sum, "max": np.max, "min": np.min}[op](np.stack(everyone), axis=0)


def _on_two_ranks(monkeypatch: pytest.MonkeyPatch, check: Callable[[Any], None]) -> list[Any]:
    """`check(comm)` on two threads, each with the NCCLComm of its rank; their communicators."""
    _install_fake_cupy(monkeypatch)
    host = _Rendezvous(2)
    comms: list[Any] = [None, None]
    errors: list[BaseException] = []

    def rank_(rank: int) -> None:
        try:
            comms[rank] = comm = dist.NCCLComm(_ThreadComm(host, rank, 2))
            check(comm)
        except BaseException as err:  # reported by the test, not lost in the thread
            errors.append(err)
            host.barrier.abort()
            comm_world = getattr(comms[rank], "_comm", None)
            if comm_world is not None:
                comm_world.world.barrier.abort()

    threads = [threading.Thread(target=rank_, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank is still waiting"
    if errors:
        raise errors[0]
    return comms


def _values(rank: int, size: int, dtype: str) -> np.ndarray:
    return ((np.arange(size) * (rank + 2)) % 7 - 3 + rank).astype(dtype)


def _everyone(size: int, dtype: str) -> np.ndarray:
    return np.stack([_values(rank, size, dtype) for rank in range(2)])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "uint8"])
def test_allreduce_sums_maxes_and_mins_every_dtype(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    found: dict[tuple[int, str], np.ndarray] = {}

    def check(comm: Any) -> None:
        for op in ("sum", "max", "min"):
            buffer = _on_device(_values(comm.rank, 7, dtype))
            comm.allreduce_(buffer, op)
            found[comm.rank, op] = np.asarray(buffer).copy()

    _on_two_ranks(monkeypatch, check)
    for op, reduce in (("sum", np.sum), ("max", np.max), ("min", np.min)):
        for rank in range(2):
            np.testing.assert_array_equal(found[rank, op], reduce(_everyone(7, dtype), axis=0).astype(dtype))


def test_iallreduce_sums_in_place_and_host_numbers_go_through_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def check(comm: Any) -> None:
        buffer = _on_device(_values(comm.rank, 5, "float64"))
        comm.wait([comm.iallreduce_sum_(buffer)])
        host = np.array([1.0 + comm.rank])  # a NumPy array: the host communicator's
        comm.allreduce_(host, "max")
        found[comm.rank] = (np.asarray(buffer).copy(), host)

    comms = _on_two_ranks(monkeypatch, check)
    for rank in range(2):
        np.testing.assert_array_equal(found[rank][0], _everyone(5, "float64").sum(axis=0))
        np.testing.assert_array_equal(found[rank][1], [2.0])
        assert comms[rank]._comm.calls == ["allReduce"]


@pytest.mark.parametrize(
    ("counts", "calls"),
    [([3, 3], ["reduceScatter"]), ([4, 1], ["reduce", "reduce"]), ([0, 3], ["reduce"]), ([0, 0], [])],
)
def test_reduce_scatter_of_equal_and_unequal_counts(
    monkeypatch: pytest.MonkeyPatch, counts: Sequence[int], calls: list[str]
) -> None:
    found: dict[int, np.ndarray] = {}
    total = sum(counts)

    def check(comm: Any) -> None:
        send = _on_device(_values(comm.rank, total, "float32"))
        recv = _on_device(np.full(counts[comm.rank], np.nan, dtype=np.float32))
        comm.reduce_scatter_sum(send, recv, counts)
        np.testing.assert_array_equal(send, _values(comm.rank, total, "float32"))
        found[comm.rank] = np.asarray(recv).copy()

    comms = _on_two_ranks(monkeypatch, check)
    summed = _everyone(total, "float32").sum(axis=0)
    for rank in range(2):
        start = sum(counts[:rank])
        np.testing.assert_array_equal(found[rank], summed[start : start + counts[rank]])
        assert comms[rank]._comm.calls == calls


@pytest.mark.parametrize(
    ("counts", "calls"),
    [([2, 2], ["allGather"]), ([3, 1], ["broadcast", "broadcast"]), ([1, 0], ["broadcast"]), ([0, 0], [])],
)
def test_allgather_of_equal_and_unequal_counts(
    monkeypatch: pytest.MonkeyPatch, counts: Sequence[int], calls: list[str]
) -> None:
    found: dict[int, np.ndarray] = {}

    def check(comm: Any) -> None:
        send = _on_device(_values(comm.rank, counts[comm.rank], "int64"))
        recv = _on_device(np.full(sum(counts), -99, dtype=np.int64))
        comm.allgather_(send, recv, counts)
        found[comm.rank] = np.asarray(recv).copy()

    comms = _on_two_ranks(monkeypatch, check)
    expected = np.concatenate([_values(rank, counts[rank], "int64") for rank in range(2)])
    for rank in range(2):
        np.testing.assert_array_equal(found[rank], expected)
        assert comms[rank]._comm.calls == calls


def test_buffers_nccl_cannot_take_are_refused_before_any_call(monkeypatch: pytest.MonkeyPatch) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")

    def check(comm: Any) -> None:
        assert comm.accepts(_on_device([1.0])) and not comm.accepts(np.ones(1))
        with pytest.raises(
            UnsupportedArrayError, match="iallreduce_sum_: expected a cupy array, got a ndarray"
        ):
            comm.iallreduce_sum_(np.ones(2))
        with pytest.raises(UnsupportedArrayError, match="bfloat16 buffers are not reduced over NCCL"):
            comm.allreduce_(_on_device(np.zeros(2, dtype=ml_dtypes.bfloat16)))
        with pytest.raises(UnsupportedArrayError, match="no NCCL type for complex128"):
            comm.allreduce_(_on_device(np.zeros(2, dtype=np.complex128)))
        with pytest.raises(ValueError, match="C-contiguous"):
            comm.allreduce_(_on_device(np.zeros((3, 2)))[:, 0])
        with pytest.raises(ValueError, match="op must be one of"):
            comm.allreduce_(_on_device(np.zeros(2)), "prod")
        with pytest.raises(ValueError, match=r"buffers of 2 and 3 elements for counts \[2, 2\]"):
            comm.allgather_(_on_device(np.zeros(2)), _on_device(np.zeros(3)), [2, 2])

    comms = _on_two_ranks(monkeypatch, check)
    assert [comm._comm.calls for comm in comms] == [[], []]
    assert repr(comms[1]) == "NCCLComm(rank=1, size=2, device=0)"


# --- A real NCCL communicator of one rank (CuPy and a GPU) ------------------------------------------


@pytest.mark.cupy
def test_one_rank_nccl_collectives_are_the_identity(cupy_backend: Any) -> None:
    cupy = cupy_backend.xp
    comm = dist.NCCLComm(dist.LocalComm())
    assert (comm.rank, comm.size, comm.xp) == (0, 1, cupy)
    values = cupy.arange(6, dtype=cupy.float32)
    for op in ("sum", "max", "min"):
        buffer = values.copy()
        comm.allreduce_(buffer, op)
        cupy.testing.assert_array_equal(buffer, values)
    buffer = values.copy()
    comm.wait([comm.iallreduce_sum_(buffer)])
    cupy.testing.assert_array_equal(buffer, values)
    gathered = cupy.zeros(6, dtype=cupy.float32)
    comm.allgather_(values, gathered, [6])
    cupy.testing.assert_array_equal(gathered, values)
    part = cupy.zeros(6, dtype=cupy.float32)
    comm.reduce_scatter_sum(values, part, [6])
    cupy.testing.assert_array_equal(part, values)
    assert comm.allgather_bytes(b"ab") == [b"ab"] and comm.broadcast_bytes(b"cd") == b"cd"
    comm.barrier()


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_rank_nccl_allreduce_mean_then_adam_is_adam(cupy_backend: Any, dtype: str) -> None:
    cupy = cupy_backend.xp
    rng = np.random.default_rng(3)
    start = {"w": rng.integers(-64, 64, size=(4, 3)) / 64.0, "b": rng.integers(-64, 64, size=7) / 64.0}
    grads = [
        {k: rng.integers(-1024, 1024, size=v.shape) / 1024.0 for k, v in start.items()} for _ in range(3)
    ]

    def run(opt: Any) -> dict[str, np.ndarray]:
        params = {k: cupy.asarray(v, dtype=dtype) for k, v in start.items()}
        for grad in grads:
            co.update_(opt, params, {k: cupy.asarray(v, dtype=dtype) for k, v in grad.items()})
        return {k: cupy.asnumpy(v) for k, v in params.items()}

    comm = dist.NCCLComm(dist.LocalComm())
    ours = run(co.Optimiser(dist.AllReduceMean(comm), co.Adam()))
    alone = run(co.Adam())
    for name in start:
        np.testing.assert_array_equal(ours[name], alone[name])
