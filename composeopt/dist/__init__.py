"""Data-parallel training across processes: the gradients averaged over the ranks
(`AllReduceMean`), or the optimiser state sharded over them (`ShardedOptimiser`,
ZeRO stage 1), over MPI (`MPIComm`), NCCL (`NCCLComm`) or `torch.distributed`
(`TorchComm`).

```python
from mpi4py import MPI
import composeopt as co
from composeopt import dist

comm = dist.MPIComm(MPI.COMM_WORLD)
opt = co.Optimiser(dist.AllReduceMean(comm), co.ClipGlobalNorm(1.0), co.AdamW(1e-3))
co.update_(opt, params, local_grads)   # every rank ends with the same params

zopt = dist.ShardedOptimiser(co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-3)), comm)
co.update_(zopt, params, local_grads)  # each rank keeps the AdamW moments of 1/N of params
```

Which communicator to pick:

* `MPIComm`: NumPy arrays, processes launched by `mpiexec`.
* `NCCLComm`: CuPy arrays, one GPU per process, launched by `mpiexec` (needs CuPy with NCCL).
* `TorchComm`: processes launched by `torchrun`, with `torch.distributed` initialised:
  NumPy arrays over gloo, CuPy arrays over NCCL (needs torch).
* `LocalComm`: one process alone (tests, single-process runs).

Importing this package imports neither CuPy nor torch: `NCCLComm` and `TorchComm` do,
when they are made.
"""

from __future__ import annotations

from .allreduce import AllReduceMean
from .checkpoint import consolidate, load, save
from .comm import Comm, LocalComm, MPIComm
from .nccl import NCCLComm
from .sharded import ShardedOptimiser
from .torch_comm import TorchComm

__all__ = [
    "AllReduceMean",
    "Comm",
    "LocalComm",
    "MPIComm",
    "NCCLComm",
    "ShardedOptimiser",
    "TorchComm",
    "consolidate",
    "load",
    "save",
]
