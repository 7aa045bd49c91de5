"""Data parallelism: `dist.AllReduceMean` in a chain, against the same chain in one process.

The MPI jobs (tests/dist/ddp_*.py, skipped where mpi4py or mpiexec is missing)
take the steps on 2 and 4 ranks and compare each rank's parameters with the
single-process chain without `AllReduceMean` on the mean gradient: bit for bit
in float64 (gradients that are multiples of 1/1024 make every sum exact), on
the fused and the generic path, with many buckets and with one.  The fault
jobs check that a failing rank ends the job or makes every rank raise.

In this process, a communicator of threads (`ThreadComm`, a real all-reduce
over threads) runs the same bucket and agreement code, so that it is tested,
and measured by coverage, where MPI is absent.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import composeopt as co
import composeopt._fused as fused
from composeopt import dist
from composeopt.dist.comm import Pending
from composeopt.errors import DistributedError, HyperparameterError, ShapeMismatchError, UnsupportedArrayError

# --------------------------------------------------------------------------
# Under MPI
# --------------------------------------------------------------------------


def said(stdout: str) -> list[str]:
    """What the ranks said (tests/dist/steps.py's `say`), whatever their lines' interleaving."""
    return re.findall(r"<<(.*?)>>", stdout)


PARITY_CHECKS = [
    "float64 bit for bit, fused=auto, clip=0.5",
    "float64 bit for bit, fused=auto, clip=1000000.0",
    "float64 bit for bit, fused=off, clip=0.5",
    "float64 bit for bit, fused=off, clip=1000000.0",
    "float32 within",
    "AccumGrad(4): 6 all-reduces in 8 steps, bit for bit",
    "float16 summed in float32",
    "strided params and gradients",
    "mixed dtypes in one tree",
    "collectives",
]


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_takes_the_single_process_step(mpirun, ranks):
    done = mpirun("ddp_parity.py", ranks, timeout=120)
    printed = said(done.stdout)
    for check in PARITY_CHECKS:
        assert any(line.startswith(f"ok {check}") for line in printed), (check, done.stdout)
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return
    assert "ok bfloat16 summed in float32" in printed


def test_a_failed_check_on_one_rank_raises_on_every_rank_and_changes_nothing(mpirun):
    done = mpirun("ddp_faults.py", 3, "check", timeout=60)
    printed = said(done.stdout)
    assert (
        "rank 1 raised ShapeMismatchError: params['w']: gradient shape (7, 4) != parameter shape (7, 5)"
        in (printed)
    )
    for rank in (0, 2):
        assert (
            f"rank {rank} raised DistributedError: rank 1 of 3 failed its check: ShapeMismatchError: "
            "params['w']: gradient shape (7, 4) != parameter shape (7, 5)"
        ) in printed
    trees = [line for line in printed if "the ranks' parameter trees differ" in line]
    assert sorted(line.split()[1] for line in trees) == ["0", "1", "2"]
    assert all("rank 1 of 3 has another tree than rank 0" in line for line in trees)
    assert sorted(line for line in printed if line.endswith("went on")) == [
        f"rank {r} went on" for r in range(3)
    ]


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_that_dies_ends_the_job(mpirun, how):
    began = time.monotonic()
    done = mpirun("ddp_faults.py", 2, how, timeout=60, check=False)
    took = time.monotonic() - began
    assert done.returncode != 0, done.stdout
    assert took < 30, f"the job took {took:.0f} s to end: the ranks left waited for the dead one"
    assert "rank 0 took 2 steps" in said(done.stdout) and "unreachable" not in done.stdout + done.stderr
    if how == "raise":
        assert "RuntimeError: rank 1 fails mid-run" in done.stderr


# --------------------------------------------------------------------------
# In this process: ranks as threads
# --------------------------------------------------------------------------


class ThreadWorld:
    """What the threads of one job share: a barrier and a slot per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)  # a hang fails the test, it does not block it
        self.slots: list[Any] = [None] * size


class ThreadComm(dist.Comm):
    """A communicator whose ranks are threads: each collective puts this rank's data in its
    slot, waits for every rank, and reads all of them in rank order (as MPI sums them)."""

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.size
        self.started = 0

    def _everyone(self, data: Any) -> list[Any]:
        self.world.slots[self.rank] = data
        self.world.barrier.wait()
        everyone = list(self.world.slots)
        self.world.barrier.wait()  # nobody writes the next data before every rank has read this
        return everyone

    def iallreduce_sum_(self, buffer: Any) -> Pending:
        self.started += 1
        self.allreduce_(buffer, "sum")
        return Pending(None)

    def wait(self, pending: Sequence[Pending]) -> None:
        pass

    def allreduce_(self, buffer: Any, op: str = "sum") -> None:
        everyone = self._everyone(buffer.copy())
        combine = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
        total = everyone[0]
        for other in everyone[1:]:
            total = combine(total, other)
        buffer[...] = total

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return self._everyone(bytes(data))

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        result: bytes = self._everyone(data)[root]
        return result

    def barrier(self) -> None:
        self.world.barrier.wait()


def on_ranks(size: int, body: Callable[[ThreadComm], Any]) -> list[Any]:
    """`body(comm)` on `size` threads, one per rank; each rank's result or exception."""
    world = ThreadWorld(size)
    results: list[Any] = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = body(ThreadComm(world, rank))
        except BaseException as err:
            results[rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


SHAPES = {"w": (7, 5), "b": (5,), "u": (3, 4), "v": (11,), "s": (1,), "t": (2,)}


def dyadic_grads(step: int, rank: int, dtype: str = "float64") -> dict[str, np.ndarray]:
    """Multiples of 1/1024 in [-2, 2): their sums over a few ranks and their means are exact."""
    rng = np.random.default_rng([step, rank])
    return {k: (rng.integers(-2048, 2048, shape) / 1024).astype(dtype) for k, shape in SHAPES.items()}


def start(dtype: str = "float64") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.integers(-1024, 1024, shape) / 256).astype(dtype) for k, shape in SHAPES.items()}


def mean(trees: list[dict[str, np.ndarray]], dtype: str | None = None) -> dict[str, np.ndarray]:
    """The mean over the ranks' trees, summed in rank order in `dtype` (the leaves' own by default)."""
    out = {}
    for key, first in trees[0].items():
        work = np.dtype(dtype or first.dtype)
        total = sum((tree[key].astype(work) for tree in trees[1:]), first.astype(work))
        out[key] = (total / len(trees)).astype(first.dtype)
    return out


def chain(*first: co.Rule) -> co.Optimiser:
    return co.Optimiser(*first, co.ClipGlobalNorm(0.5), co.AdamW(1e-2, lambda_=1e-2))


def reference(ranks: int, steps: int, opt: co.Rule | None = None) -> dict[str, np.ndarray]:
    """One process: the chain without AllReduceMean on the mean gradient."""
    params = start()
    opt = chain() if opt is None else opt
    for step in range(steps):
        co.update_(opt, params, mean([dyadic_grads(step, r) for r in range(ranks)]))
    return params


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


@pytest.fixture(params=["auto", "off"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fused path (the default) and the generic one."""
    monkeypatch.setattr(fused, "MODE", request.param)
    return str(request.param)


@pytest.mark.parametrize("bucket_bytes, buckets", [(40, 5), (25 * 2**20, 1)])
def test_threads_take_the_single_process_steps(mode, bucket_bytes, buckets):
    steps = 6

    def body(comm: ThreadComm) -> dict[str, np.ndarray]:
        opt = chain(dist.AllReduceMean(comm, bucket_bytes=bucket_bytes))
        assert (fused.plan(opt) is not None) == (mode == "auto")
        params = start()
        for step in range(steps):
            co.update_(opt, params, dyadic_grads(step, comm.rank))
        assert comm.started == steps * buckets
        return params

    results = on_ranks(4, body)  # means over 4 ranks of multiples of 1/1024 are exact
    expected = reference(4, steps)
    for result in results:
        assert not isinstance(result, BaseException), result
        assert same_bits(result, expected)
    alone = start()
    opt = chain()
    for step in range(steps):
        co.update_(opt, alone, dyadic_grads(step, 0))
    assert not same_bits(alone, expected)  # the control: rank 0's own gradients give other params


def test_accumulated_gradients_are_sent_on_the_updates_only():
    def body(comm: ThreadComm) -> tuple[list[int], dict[str, np.ndarray]]:
        opt = co.Optimiser(co.AccumGrad(2), dist.AllReduceMean(comm), co.Adam(1e-2))
        params, sent = start(), []
        for step in range(6):
            co.update_(opt, params, dyadic_grads(step, comm.rank))
            sent.append(comm.started)
        return sent, params

    expected = reference(2, 6, co.Optimiser(co.AccumGrad(2), co.Adam(1e-2)))
    for sent, params in on_ranks(2, body):
        assert sent == [0, 1, 1, 2, 2, 3]
        assert same_bits(params, expected)


def test_reduce_dtype_is_the_dtype_of_the_sums():
    # On three ranks: float32 loses each 2**-24 added to 1, float64 keeps their sum.
    grads = [
        {"x": np.array(values, dtype=np.float32)} for values in ([1.0, 1.0], [2.0**-24, 3.0], [2.0**-24, 0.5])
    ]

    def body(comm: ThreadComm, reduce_dtype: Any) -> np.ndarray:
        params = {"x": np.zeros(2, dtype=np.float32)}
        co.update_(
            co.Optimiser(dist.AllReduceMean(comm, reduce_dtype=reduce_dtype), co.Descent(1.0)),
            params,
            grads[comm.rank],
        )
        return params["x"]

    in_float64 = -mean(grads, "float64")["x"]
    in_float32 = -mean(grads)["x"]
    assert not np.array_equal(in_float64, in_float32)  # the sums round differently
    for result in on_ranks(3, lambda comm: body(comm, "float64")):
        np.testing.assert_array_equal(result, in_float64)
    for result in on_ranks(3, lambda comm: body(comm, None)):
        np.testing.assert_array_equal(result, in_float32)


def test_float16_is_summed_in_float32_and_cast_back():
    grads = [{"x": np.full(3, 40000.0, np.float16)}, {"x": np.full(3, 50000.0, np.float16)}]

    def body(comm: ThreadComm) -> np.ndarray:
        params = {"x": np.zeros(3, dtype=np.float16)}
        co.update_(co.Optimiser(dist.AllReduceMean(comm), co.Descent(1.0)), params, grads[comm.rank])
        return params["x"]

    for result in on_ranks(2, body):
        assert result.dtype == np.float16
        np.testing.assert_array_equal(result, np.full(3, -45000.0, np.float16))  # float16 sums overflow


def test_a_failed_check_raises_on_every_thread_and_changes_nothing():
    def body(comm: ThreadComm) -> BaseException:
        opt = chain(dist.AllReduceMean(comm))
        params = start()
        co.update_(opt, params, dyadic_grads(0, comm.rank))
        before = {k: v.copy() for k, v in params.items()}
        states = {k: co.state_store(opt).get(v) for k, v in params.items()}
        grads = dyadic_grads(1, comm.rank)
        if comm.rank == 1:
            grads["b"] = grads["b"][:3]
        with pytest.raises(ShapeMismatchError if comm.rank == 1 else DistributedError) as caught:
            co.update_(opt, params, grads)
        assert same_bits(params, before) and co.state_store(opt).step == 1
        assert all(co.state_store(opt).get(v) is states[k] for k, v in params.items())
        return caught.value

    errors = on_ranks(3, body)
    assert isinstance(errors[1], ShapeMismatchError) and "params['b']" in str(errors[1])
    for rank in (0, 2):
        assert isinstance(errors[rank], DistributedError), errors[rank]
        assert str(errors[rank]).startswith("rank 1 of 3 failed its check: ShapeMismatchError: params['b']")


def test_failures_on_several_ranks_are_counted():
    def body(comm: ThreadComm) -> BaseException | None:
        grads = dyadic_grads(0, comm.rank)
        if comm.rank > 0:
            grads["w"] = grads["w"].T
        try:
            co.update_(chain(dist.AllReduceMean(comm)), start(), grads)
        except Exception as err:
            return err
        return None

    errors = on_ranks(4, body)
    assert "rank 1 of 4 failed its check (and 2 other ranks)" in str(errors[0])


def test_ranks_with_different_trees_all_raise():
    def body(comm: ThreadComm) -> None:
        params, grads = start(), dyadic_grads(0, comm.rank)
        if comm.rank == 1:
            params["extra"], grads["extra"] = np.zeros(3), np.ones(3)
        co.update_(chain(dist.AllReduceMean(comm)), params, grads)

    for error in on_ranks(2, body):
        assert isinstance(error, DistributedError)
        assert "rank 1 of 2 has another tree than rank 0" in str(error)


def test_arrays_of_another_module_are_refused_by_the_communicator():
    strict = pytest.importorskip("array_api_strict")
    opt = co.Optimiser(dist.AllReduceMean(dist.LocalComm()), co.Descent(0.1))
    x = strict.asarray([1.0, 2.0])
    with pytest.raises(UnsupportedArrayError, match=r"LocalComm takes numpy arrays"):
        co.update_(opt, x, strict.asarray([1.0, 1.0]))


# --------------------------------------------------------------------------
# One process, LocalComm
# --------------------------------------------------------------------------


def test_on_one_rank_it_is_the_identity(mode):
    ours, theirs = start(), start()
    opt, plain = chain(dist.AllReduceMean(dist.LocalComm(), bucket_bytes=8)), chain()
    for step in range(5):
        co.update_(opt, ours, dyadic_grads(step, 0))
        co.update_(plain, theirs, dyadic_grads(step, 0))
    assert same_bits(ours, theirs)


def test_local_comm_collectives_are_the_identity():
    comm = dist.LocalComm()
    buffer = np.arange(4.0)
    comm.wait([comm.iallreduce_sum_(buffer)])
    comm.allreduce_(buffer, "max")
    recv = np.empty(4)
    comm.reduce_scatter_sum(buffer, recv, [4])
    gathered = np.empty(4)
    comm.allgather_(recv, gathered, [4])
    comm.barrier()
    np.testing.assert_array_equal(gathered, np.arange(4.0))
    assert comm.allgather_bytes(b"ab") == [b"ab"] and comm.broadcast_bytes(b"cd") == b"cd"
    assert comm.broadcast_bytes(None) == b"" and repr(comm) == "LocalComm(rank=0, size=1)"


def test_settings_are_checked():
    comm = dist.LocalComm()
    with pytest.raises(TypeError, match="expected a composeopt.dist.Comm"):
        dist.AllReduceMean(object())  # type: ignore[arg-type]
    with pytest.raises(HyperparameterError):
        dist.AllReduceMean(comm, bucket_bytes=0)
    with pytest.raises(HyperparameterError, match="expected a floating dtype or None, got int32"):
        dist.AllReduceMean(comm, reduce_dtype="int32")
    with pytest.raises(HyperparameterError, match="expected a floating dtype or None"):
        dist.AllReduceMean(comm, reduce_dtype=object())
    rule = dist.AllReduceMean(comm, reduce_dtype=np.float64)
    assert rule.reduce_dtype == "float64" and rule.ranks == 1 and rule.comm is comm
    assert (
        repr(rule)
        == "AllReduceMean(LocalComm(rank=0, size=1), bucket_bytes=26214400, reduce_dtype='float64')"
    )


def test_the_base_comm_has_only_the_protocol():
    comm = dist.Comm()
    buffer = np.zeros(1)
    for call in (
        lambda: comm.iallreduce_sum_(buffer),
        lambda: comm.wait([]),
        lambda: comm.allreduce_(buffer),
        lambda: comm.reduce_scatter_sum(buffer, buffer, [1]),
        lambda: comm.allgather_(buffer, buffer, [1]),
        lambda: comm.allgather_bytes(b""),
        lambda: comm.broadcast_bytes(b""),
        lambda: comm.barrier(),
    ):
        with pytest.raises(NotImplementedError):
            call()
    assert comm.accepts(buffer) and not comm.accepts([0.0])
