"""TorchComm over two gloo processes: each collective against NumPy, and data-parallel Adam
against a single-process Adam on the mean gradient.

The test launches this file twice as a plain script (rank 0 and rank 1, meeting through
a rendezvous file), in a process group of its own that is killed at its deadline.  Each
rank runs every check, writes what it found to a JSON file and its final parameters to
`.npy` files; the tests read them.  The reference Adam runs here, without torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import composeopt as co  # noqa: E402
from composeopt import dist  # noqa: E402
from composeopt.errors import DistributedError, UnsupportedArrayError  # noqa: E402

RANKS = 2
STEPS = 3
DEADLINE_S = 90
COLLECTIVE_TIMEOUT_S = 20
SHAPES = {"b": (5,), "w": (3, 4)}


def _gradients(step: int, rank: int) -> dict[str, np.ndarray]:
    """Multiples of 1/1024, so that their sum over the ranks and its halving are exact."""
    rng = np.random.default_rng(100 * step + rank)
    return {name: rng.integers(-2048, 2048, size=shape) / 1024.0 for name, shape in SHAPES.items()}


def _initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: rng.integers(-512, 512, size=shape) / 256.0 for name, shape in SHAPES.items()}


def _values(rank: int, size: int, dtype: str) -> np.ndarray:
    """What rank `rank` sends: known to every rank, so that each can compute the answer."""
    return ((np.arange(size) * (rank + 2)) % 7 - 3 + rank).astype(dtype)


# --- The checks, run on every rank ------------------------------------------------------------
#
# A check never raises between two collectives: a rank that stopped early would leave the
# other waiting in the next one.  What differs from the answer is noted, and the check
# raises once all its collectives are done.


class Findings:
    def __init__(self) -> None:
        self.wrong: list[str] = []

    def same(self, got: Any, expected: Any, what: str) -> None:
        if not (np.shape(got) == np.shape(expected) and np.array_equal(got, expected)):
            self.wrong.append(f"{what}: got {got!r}, expected {expected!r}")

    def true(self, condition: bool, what: str) -> None:
        if not condition:
            self.wrong.append(what)

    def raises(self, error: type[BaseException], call: Any, what: str) -> None:
        try:
            call()
        except error:
            return
        except Exception as other:
            self.wrong.append(f"{what}: raised {type(other).__name__}: {other}, not {error.__name__}")
            return
        self.wrong.append(f"{what}: did not raise {error.__name__}")


def check_accepts(comm: Any, found: Findings) -> None:
    found.true(comm.xp is np and comm.rank in range(RANKS) and comm.size == RANKS, repr(comm))
    found.true(comm.accepts(np.zeros(2)) and not comm.accepts([0.0, 1.0]), "accepts")


def check_allreduce(comm: Any, found: Findings) -> None:
    for dtype in ("float64", "float32", "float16", "int64", "int32"):
        everyone = np.stack([_values(rank, 6, dtype) for rank in range(RANKS)])
        for op, reduce in (("sum", np.sum), ("max", np.max), ("min", np.min)):
            buffer = _values(comm.rank, 6, dtype)
            comm.allreduce_(buffer, op)
            found.true(buffer.dtype == np.dtype(dtype), f"{op} {dtype}: became {buffer.dtype}")
            found.same(buffer, reduce(everyone, axis=0).astype(dtype), f"{op} {dtype}")


def check_iallreduce(comm: Any, found: Findings) -> None:
    first, second = _values(comm.rank, 5, "float64"), _values(comm.rank, 9, "float32") * 2
    pending = [comm.iallreduce_sum_(first), comm.iallreduce_sum_(second)]
    comm.wait(pending)
    found.same(first, sum(_values(rank, 5, "float64") for rank in range(RANKS)), "first")
    found.same(second, sum(_values(rank, 9, "float32") * 2 for rank in range(RANKS)), "second")


def check_reduce_scatter(comm: Any, found: Findings) -> None:
    for counts in ([3, 3], [4, 1], [0, 3], [2, 0]):
        total = sum(counts)
        send = _values(comm.rank, total, "float64")
        before = send.copy()
        recv = np.full(counts[comm.rank], np.nan)
        comm.reduce_scatter_sum(send, recv, counts)
        summed = sum(_values(rank, total, "float64") for rank in range(RANKS))
        start = sum(counts[: comm.rank])
        found.same(recv, summed[start : start + counts[comm.rank]], f"counts {counts}")
        found.same(send, before, f"send of counts {counts}")


def check_allgather(comm: Any, found: Findings) -> None:
    for counts in ([2, 2], [3, 1], [0, 2], [1, 0], [0, 0]):
        send = _values(comm.rank, counts[comm.rank], "int64")
        recv = np.full(sum(counts), -99, dtype=np.int64)
        comm.allgather_(send, recv, counts)
        expected = np.concatenate([_values(rank, counts[rank], "int64") for rank in range(RANKS)])
        found.same(recv, expected, f"counts {counts}")


def check_bytes(comm: Any, found: Findings) -> None:
    said = [b"", b"abc\x00\xff\n"]
    found.same(comm.allgather_bytes(said[comm.rank]), said, "allgather_bytes")
    found.same(comm.allgather_bytes(b""), [b""] * RANKS, "allgather_bytes of nothing")
    found.same(comm.allgather_bytes(bytes([comm.rank]) * 3), [b"\x00" * 3, b"\x01" * 3], "rank bytes")
    for root in range(RANKS):
        message = f"from {root}".encode() * 50
        got = comm.broadcast_bytes(message if comm.rank == root else None, root=root)
        found.same(got, message, f"broadcast_bytes from {root}")
    got = comm.broadcast_bytes(b"" if comm.rank == 1 else b"ignored", root=1)
    found.same(got, b"", "broadcast_bytes of nothing")
    comm.barrier()


def check_refusals(comm: Any, found: Findings) -> None:
    """Refused on the rank itself, before any collective starts."""
    import ml_dtypes

    found.raises(UnsupportedArrayError, lambda: comm.allreduce_([1.0, 2.0]), "a list")
    bfloat16 = np.zeros(2, dtype=ml_dtypes.bfloat16)
    found.raises(UnsupportedArrayError, lambda: comm.allreduce_(bfloat16), "bfloat16")
    found.raises(ValueError, lambda: comm.allreduce_(np.zeros((4, 2))[:, 0]), "a strided buffer")
    found.raises(ValueError, lambda: comm.allreduce_(np.zeros(2), "prod"), "an unknown op")
    mismatched = (np.zeros(2), np.zeros(3), [2, 2])
    found.raises(ValueError, lambda: comm.allgather_(*mismatched), "buffers that miss the counts")


def check_trees_that_differ_raise_everywhere(comm: Any, found: Findings) -> None:
    params = {"w": np.ones(2 + comm.rank)}
    before = params["w"].copy()
    opt = co.Optimiser(dist.AllReduceMean(comm), co.Adam())
    step = lambda: co.update_(opt, params, {"w": np.ones(2 + comm.rank)})  # noqa: E731
    found.raises(DistributedError, step, "a step over trees that differ")
    found.same(params["w"], before, "the parameter after the refused step")


CHECKS = {
    name[len("check_") :]: value for name, value in dict(globals()).items() if name.startswith("check_")
}


RULES = {"adam": lambda: co.Adam(1e-2), "momentum": lambda: co.Momentum(1e-2, 0.9)}
"""Adam is nearly blind to the scale of the gradients (a sum taken for the mean would
pass), Momentum is not."""


def _train(comm: Any, out: Path) -> None:
    for label, rule in RULES.items():
        params = _initial_params()
        # Small buckets, so that a step is several non-blocking all-reduces in flight at once.
        opt = co.Optimiser(dist.AllReduceMean(comm, bucket_bytes=64), rule())
        for step in range(STEPS):
            co.update_(opt, params, _gradients(step, comm.rank))
        for name, value in params.items():
            np.save(out / f"{label}_{name}_rank{comm.rank}.npy", value, allow_pickle=False)


def _worker(rank: int, rendezvous: str, out: Path) -> None:
    import datetime

    import torch.distributed as torch_dist

    torch_dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=RANKS,
        # A collective that the other rank never joins fails here, well before the deadline.
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        comm = dist.TorchComm()
        _train(comm, out)
        results = {name: "not run: an earlier check failed inside a collective" for name in CHECKS}
        for name, check in CHECKS.items():
            found = Findings()
            try:
                check(comm, found)
            except Exception as err:
                # Raised between collectives: the ranks are out of step, so stop here.
                results[name] = f"raised {type(err).__name__}: {err}"
                break
            results[name] = "; ".join(found.wrong) or "ok"
        (out / f"results_rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch_dist.destroy_process_group()


# --- The tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gloo_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both ranks run to the end (or are killed at the deadline, failing every test here)."""
    out = tmp_path_factory.mktemp("gloo")
    rendezvous = str(out / "rendezvous")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), rendezvous, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for rank in range(RANKS)
    ]
    deadline = time.monotonic() + DEADLINE_S
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {RANKS} gloo ranks ran past {DEADLINE_S} s and were killed")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        if process.returncode != 0:
            pytest.fail(f"gloo rank {rank} exited {process.returncode}:\n{output}")
    return out


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_each_collective_matches_numpy_on_every_rank(gloo_job: Path, check: str) -> None:
    for rank in range(RANKS):
        results = json.loads((gloo_job / f"results_rank{rank}.json").read_text())
        assert results[check] == "ok", f"rank {rank}: {results[check]}"


@pytest.mark.parametrize("label", sorted(RULES))
def test_data_parallel_steps_are_single_process_steps_on_the_mean_gradient(
    gloo_job: Path, label: str
) -> None:
    params = _initial_params()
    opt = RULES[label]()
    for step in range(STEPS):
        mean = {name: sum(_gradients(step, rank)[name] for rank in range(RANKS)) / RANKS for name in SHAPES}
        co.update_(opt, params, mean)
    for rank in range(RANKS):
        for name in SHAPES:
            got = np.load(gloo_job / f"{label}_{name}_rank{rank}.npy", allow_pickle=False)
            np.testing.assert_array_equal(got, params[name], err_msg=f"{name} on rank {rank}")
    assert not np.array_equal(params["w"], _initial_params()["w"])


def test_an_uninitialised_process_group_is_refused() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised; call"):
        dist.TorchComm()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
