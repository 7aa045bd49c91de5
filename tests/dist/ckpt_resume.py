"""Resume the runs of ckpt_save.py on this number of ranks: `ckpt_resume.py FOLDER`.

Writes FOLDER/MODE-resumed-N.npz (and FOLDER/plain-MODE-resumed-N.npz when the folder has
an ordinary checkpoint FOLDER/plain-MODE.npz to resume from).  With FOLDER/damage present,
also loads damaged copies of the flat checkpoint and writes, into FOLDER/refused-RANK.txt,
a line `refused CASE | MESSAGE` for each that the rank refuses with its state and params
unchanged (files, not stdout, whose lines the ranks would interleave)."""

import hashlib
import json
import os
import shutil
import sys

import ckpt_cases as cases
import numpy as np
from ranks import world

import composeopt as co
from composeopt import dist
from composeopt.errors import CheckpointError

comm = world()
folder = sys.argv[1]


def resumed(source, mode):
    with np.load(f"{folder}/{mode}-params.npz", allow_pickle=False) as saved:
        tree = cases.unflat(saved)
    zopt = dist.ShardedOptimiser(cases.rule(mode), comm, mode=mode)
    dist.load(source, zopt, tree)
    for step in range(cases.STEPS_BEFORE, cases.STEPS_BEFORE + cases.STEPS_AFTER):
        co.update_(zopt, tree, cases.grads(step))
    return zopt, tree


for mode in cases.MODES:
    for source, name in ((f"{folder}/{mode}", mode), (f"{folder}/plain-{mode}.npz", f"plain-{mode}")):
        if os.path.exists(source):
            zopt, tree = resumed(source, mode)
            if comm.rank == 0:
                np.savez(f"{folder}/{name}-resumed-{comm.size}.npz", **cases.flat(tree))


def flip_byte(bad, manifest):
    file = f"{bad}/{manifest['files'][-1]['name']}"  # the last rank's: read by the last rank only
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(file, "wb").write(bytes(data))


def missing_file(bad, manifest):
    os.unlink(f"{bad}/{manifest['files'][0]['name']}")  # read by rank 0 only


def overlap(bad, manifest):
    manifest["layout"]["pieces"].append(dict(manifest["layout"]["pieces"][-1], rank=0))


def wrong_fingerprint(bad, manifest):
    manifest["fingerprint"] = hashlib.sha256(b"another tree").hexdigest()


HARMS = {"flipped-byte": flip_byte, "missing-file": missing_file, "overlap": overlap}
HARMS["fingerprint"] = wrong_fingerprint

if os.path.exists(f"{folder}/damage"):
    refused = []
    zopt, tree = resumed(f"{folder}/flat", "flat")
    for case, harm in HARMS.items():
        bad = f"{folder}/bad-{case}"
        if comm.rank == 0:
            shutil.copytree(f"{folder}/flat", bad)
            with open(f"{bad}/manifest.json") as stream:
                manifest = json.load(stream)
            harm(bad, manifest)
            with open(f"{bad}/manifest.json", "w") as stream:
                json.dump(manifest, stream)
        comm.barrier()
        before = cases.snapshot(zopt, tree)
        try:
            dist.load(bad, zopt, tree)
        except CheckpointError as err:
            if cases.snapshot(zopt, tree) == before:
                refused.append(f"refused {case} | {err}")
    other = cases.params()
    other["layer"]["W"] = np.zeros((3, 4))
    before = cases.snapshot(zopt, tree)
    try:
        dist.load(f"{folder}/flat", zopt, other)
    except CheckpointError as err:
        if cases.snapshot(zopt, tree) == before:
            refused.append(f"refused other-params | {err}")
    with open(f"{folder}/refused-{comm.rank}.txt", "w") as stream:
        stream.write("\n".join(refused) + "\n")
