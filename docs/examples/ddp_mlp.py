"""The two-spirals MLP trained data-parallel: each rank takes its share of the points, and
`dist.AllReduceMean` averages the gradients, so every rank takes the same step.

Run it with `mpiexec -n 2 python -m mpi4py docs/examples/ddp_mlp.py` (any number of
ranks that divides the 400 points; `python -m mpi4py` ends the whole job when a rank
raises).  Rank 0 prints the loss; at the end every rank checks that its parameters are
those of rank 0, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

import numpy as np
from mpi4py import MPI
from numpy_mlp import accuracy, init_params, loss_and_grads, two_spirals

import composeopt as co
from composeopt import dist


def mean_over_ranks(comm: dist.MPIComm, value: float) -> float:
    buffer = np.array([value])
    comm.allreduce_(buffer, "sum")
    return float(buffer[0]) / comm.size


def train(comm: dist.MPIComm, steps: int = 1500, seed: int = 0, log_every: int = 0) -> dict[str, Any]:
    """Train on this rank's share of the points; returns what `numpy_mlp.train` returns."""
    points, labels = two_spirals(seed=seed)
    if len(points) % comm.size:
        raise SystemExit(f"{len(points)} points do not split evenly over {comm.size} ranks")
    # Every rank makes the same data and the same initial parameters (same seeds) and keeps
    # every size-th point: equal shares, so the mean of the ranks' mean gradients is the
    # full batch's gradient.
    X, y = points[comm.rank :: comm.size], labels[comm.rank :: comm.size]
    params = init_params(np, seed)
    opt = co.Optimiser(dist.AllReduceMean(comm), co.ClipGlobalNorm(5.0), co.AdamW(0.01, lambda_=1e-4))
    losses = []
    for step in range(1, steps + 1):
        loss, grads = loss_and_grads(np, params, X, y)  # this rank's points only
        co.update_(opt, params, grads)  # the same step on every rank
        losses.append(mean_over_ranks(comm, float(loss)))
        if log_every and step % log_every == 0 and comm.rank == 0:
            print(f"step {step:5d}  loss {losses[-1]:.4f}", flush=True)
    return {"params": params, "losses": losses, "accuracy": accuracy(np, params, points, labels)}


def ranks_agree(comm: dist.MPIComm, params: dict[str, Any]) -> bool:
    """Whether every rank's parameters are rank 0's, bit for bit."""
    digest = hashlib.sha256(b"".join(params[name].tobytes() for name in sorted(params))).digest()
    return all(other == digest for other in comm.allgather_bytes(digest))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    comm = dist.MPIComm(MPI.COMM_WORLD)
    result = train(comm, steps=args.steps, log_every=max(1, args.steps // 5))
    agree = ranks_agree(comm, result["params"])
    if comm.rank == 0:
        print(f"{comm.size} ranks, final loss {result['losses'][-1]:.4f}, accuracy {result['accuracy']:.3f}")
        print(f"ranks agree: {agree}")
    if not agree:
        raise SystemExit(f"rank {comm.rank}: the parameters differ from rank 0's")


if __name__ == "__main__":
    main()
