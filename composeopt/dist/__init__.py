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
"""

from __future__ import annotations

from .allreduce import AllReduceMean
from .checkpoint import consolidate, load, save
from .comm import Comm, LocalComm, MPIComm
from .sharded import ShardedOptimiser

__all__ = [
    "AllReduceMean",
    "Comm",
    "LocalComm",
    "MPIComm",
    "ShardedOptimiser",
    "consolidate",
    "load",
    "save",
]
