"""Train both shard modes for a few steps and save them: `ckpt_save.py FOLDER`.

Writes FOLDER/MODE (the sharded checkpoint) and FOLDER/MODE-params.npz (rank 0's params)."""

import sys

import ckpt_cases as cases
import numpy as np
from ranks import world

import composeopt as co
from composeopt import dist

comm = world()
folder = sys.argv[1]
for mode in cases.MODES:
    zopt = dist.ShardedOptimiser(cases.rule(mode), comm, mode=mode)
    tree = cases.params()
    for step in range(cases.STEPS_BEFORE):
        co.update_(zopt, tree, cases.grads(step))
    dist.save(f"{folder}/{mode}", zopt, tree)
    if comm.rank == 0:
        np.savez(f"{folder}/{mode}-params.npz", **cases.flat(tree))
print("saved", comm.rank, flush=True)
