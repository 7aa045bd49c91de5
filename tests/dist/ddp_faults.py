"""A rank that fails, under AllReduceMean: `ddp_faults.py raise|kill|check`.

* `raise`: rank 1 raises, uncaught, at the third step (python -m mpi4py aborts the job);
* `kill`: rank 1 kills itself with SIGKILL at the third step (the MPI runtime ends the job);
* `check`: rank 1's gradient has the wrong shape, then rank 1 has an extra leaf; every rank
  must raise, say `rank R raised TYPE: message`, and find nothing changed.
"""

import os
import signal
import sys

from ranks import world
from steps import dyadic_grads, params, say, snapshot

import composeopt as co
from composeopt import dist
from composeopt.errors import DistributedError, ShapeMismatchError

comm = world()
mode = sys.argv[1]
opt = co.Optimiser(dist.AllReduceMean(comm), co.ClipGlobalNorm(1.0), co.AdamW(1e-2))
tree = params()
for step in range(2):
    co.update_(opt, tree, dyadic_grads(step, comm.rank))
say(f"rank {comm.rank} took 2 steps")

if mode in ("raise", "kill"):
    for step in range(2, 10):
        if comm.rank == 1 and step == 3:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 fails mid-run")
        co.update_(opt, tree, dyadic_grads(step, comm.rank))
    raise SystemExit("unreachable: the job went on without rank 1")


def step_that_raises(grads, expected):
    before = snapshot(opt, tree)
    try:
        co.update_(opt, tree, grads)
    except Exception as err:
        say(f"rank {comm.rank} raised {type(err).__name__}: {err}")
        assert type(err) is expected, err
        assert snapshot(opt, tree) == before, "a failed step changed something"
        return err
    raise AssertionError(f"rank {comm.rank}: the step did not raise")


grads = dyadic_grads(2, comm.rank)
if comm.rank == 1:
    grads["w"] = grads["w"][:, :4]
err = step_that_raises(grads, ShapeMismatchError if comm.rank == 1 else DistributedError)
if comm.rank != 1:
    assert f"rank 1 of {comm.size}" in str(err) and "params['w']" in str(err), err

grads = dyadic_grads(2, comm.rank)
if comm.rank == 1:
    tree["extra"] = params()["b"]
    grads["extra"] = grads["b"].copy()
step_that_raises(grads, DistributedError)
tree.pop("extra", None)

# The ranks go on together after both failures.
co.update_(opt, tree, dyadic_grads(2, comm.rank))
mine = snapshot(opt, tree)
assert all(other == mine for other in comm.allgather_bytes(mine))
say(f"rank {comm.rank} went on")
