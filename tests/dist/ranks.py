"""What every script under tests/dist starts with: the world, checked to be as large as asked.

A launcher and an MPI library that do not match start N processes that each see
a world of one; `world()` refuses to go on then, instead of passing trivially.
"""

from __future__ import annotations

import os

from mpi4py import MPI

from composeopt import dist


def world() -> dist.MPIComm:
    expected = int(os.environ["COMPOSEOPT_TEST_RANKS"])
    size = MPI.COMM_WORLD.Get_size()
    if size != expected:
        raise SystemExit(f"the world has {size} ranks, expected {expected}: mpiexec and mpi4py do not match")
    return dist.MPIComm(MPI.COMM_WORLD)
