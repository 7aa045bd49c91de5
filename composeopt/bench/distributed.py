"""The data-parallel rows of the benchmark: the all-reduce, the ZeRO-1 step, state per rank.

* `AllReduceMean` alone on one rank beside `Adam` alone: the rule is the
  identity there, and the step should cost what Adam's does (target ≤ 1.15×).
* The bucketed all-reduce of `AllReduceMean` (packing, one non-blocking call
  per bucket, the mean) beside one raw mpi4py `Allreduce` of a buffer of the
  same bytes, on 2 ranks: GB/s of gradient averaged.
* The ZeRO-1 step, `ShardedOptimiser(Adam())`, on 1, 2 and 4 ranks, and the
  optimiser state each rank keeps (its bytes, against Adam's in one process).

The multi-rank rows run in a job of their own, `mpiexec -n N python -m mpi4py
-m composeopt.bench.distributed ...`, whose rank 0 prints its figures as JSON;
without mpi4py or mpiexec they are left out with the reason.  The ranks share
this machine's cores and memory bandwidth, so what they show is the cost of
the communication and of the shard bookkeeping, not a cluster's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["distributed_report", "distributed_table"]

_ELEMENTS = 1 << 22  # float32 elements at scale 1 (16 MiB of gradient), in 64 arrays
_ARRAYS = 64


def _tree(elements: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = max(1, elements // _ARRAYS)
    return [rng.standard_normal(size).astype(np.float32) for _ in range(_ARRAYS)]


def _median_ms(step: Any, reps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times))


def _nbytes(state: Any) -> int:
    """The bytes of the arrays in one parameter's state (a chain's is a tuple of states)."""
    if isinstance(state, np.ndarray):
        return int(state.nbytes)
    if isinstance(state, (tuple, list)):
        return sum(_nbytes(part) for part in state)
    if hasattr(state, "__dict__"):
        return sum(_nbytes(part) for part in vars(state).values())
    return 0


def _state_bytes(opt: Any, arrays: Any) -> int:
    from ..engine import state_store

    store = state_store(opt)
    return sum(_nbytes(store.get(x)) for x in arrays)


def _one_rank_row(scale: float, reps: int) -> dict[str, Any]:
    import composeopt as co
    from composeopt import dist

    params, grads = _tree(int(_ELEMENTS * scale), 0), _tree(int(_ELEMENTS * scale), 1)
    plain, chained = co.Adam(1e-3), co.Optimiser(dist.AllReduceMean(dist.LocalComm()), co.Adam(1e-3))
    ms: dict[str, list[float]] = {"chain": [], "adam": []}
    for _ in range(3):  # side by side, alternately, on a noisy machine
        ms["chain"].append(_median_ms(lambda: co.update_(chained, params, grads), reps))
        ms["adam"].append(_median_ms(lambda: co.update_(plain, params, grads), reps))
    chain, adam = min(ms["chain"]), min(ms["adam"])
    return {
        "row": "Optimiser(AllReduceMean(comm), Adam()) on 1 rank / Adam()",
        "composeopt_ms": chain,
        "reference_ms": adam,
        "ratio": chain / adam,
        "target": "≤ 1.15×",
        "met": chain / adam <= 1.15,
    }


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _job(ranks: int, scale: float, reps: int) -> dict[str, Any]:
    command = [_mpiexec() or "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", __name__]
    env = {**os.environ, "MPIEXEC_TIMEOUT": "280", "COMPOSEOPT_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(scale), str(reps)], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"mpiexec -n {ranks} exited {done.returncode}: {done.stderr[-500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def distributed_report(scale: float, reps: int) -> dict[str, Any]:
    """Every data-parallel row (the multi-rank ones only where MPI runs)."""
    report: dict[str, Any] = {"scale": scale, "one_rank": _one_rank_row(scale, reps)}
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None or _mpiexec() is None:
        report["skipped"] = "mpi4py or mpiexec is missing: no multi-rank rows"
        return report
    try:
        report["ranks"] = {str(ranks): _job(ranks, scale, reps) for ranks in (1, 2, 4)}
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
        report["skipped"] = f"the MPI job failed: {err}"
    return report


def distributed_table(report: dict[str, Any]) -> str:
    one = report["one_rank"]
    lines = [
        f"Data parallel, float32, {_ARRAYS} arrays (scale {report['scale']:g}); ranks share this machine",
        f"* {one['row']}: {one['composeopt_ms']:.2f} / {one['reference_ms']:.2f} ms = {one['ratio']:.2f}× "
        f"(target {one['target']}: {'met' if one['met'] else 'not met'})",
    ]
    if "skipped" in report:
        lines.append(f"* {report['skipped']}")
        return "\n".join(lines)
    lines += [
        "| ranks | AllReduceMean GB/s | raw Allreduce GB/s | ZeRO-1 Adam ms | state per rank MiB | "
        "Adam state in one process MiB |",
        "|---|---|---|---|---|---|",
    ]
    for ranks, row in report["ranks"].items():
        lines.append(
            f"| {ranks} | {row['bucketed_GBps']:.2f} | {row['raw_GBps']:.2f} | {row['zero_ms']:.2f} | "
            f"{row['state_MiB']:.2f} | {row['adam_state_MiB']:.2f} |"
        )
    return "\n".join(lines)


def _rank_main(scale: float, reps: int) -> None:
    """One rank of the multi-rank job: rank 0 prints the figures as one JSON line."""
    from mpi4py import MPI

    import composeopt as co
    from composeopt import dist

    comm = dist.MPIComm(MPI.COMM_WORLD)
    elements = int(_ELEMENTS * scale)
    grads = _tree(elements, 1 + comm.rank)
    nbytes = sum(g.nbytes for g in grads)
    rule = dist.AllReduceMean(comm)

    def bucketed() -> None:
        comm.barrier()
        rule.apply_tree_([None] * len(grads), grads, [g.copy() for g in grads], [""] * len(grads))

    flat = np.concatenate(grads)

    def raw() -> None:
        comm.barrier()
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, flat.copy(), op=MPI.SUM)

    bucketed_ms, raw_ms = _median_ms(bucketed, reps), _median_ms(raw, reps)
    params = _tree(elements, 0)
    zopt = dist.ShardedOptimiser(co.Adam(1e-3), comm)

    def zero() -> None:
        comm.barrier()
        co.update_(zopt, params, grads)

    zero_ms = _median_ms(zero, reps)
    state = np.array([_state_bytes(zopt.rule, zopt.local_tree().values())], dtype=np.float64)
    comm.allreduce_(state, "max")
    if comm.rank == 0:
        row = {
            "bucketed_GBps": nbytes / bucketed_ms / 1e6,
            "raw_GBps": nbytes / raw_ms / 1e6,
            "zero_ms": zero_ms,
            "state_MiB": float(state[0]) / 2**20,
            "adam_state_MiB": 2 * nbytes / 2**20,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    _rank_main(float(sys.argv[1]), int(sys.argv[2]))
