"""Checkpoints of a sharded optimiser: one file per rank and a manifest, re-sharded at load.

`save(folder, zopt, params)` writes, into `folder`:

* one file per rank, `rank-RRRRR-of-NNNNN.TOKEN.npz`: an ordinary composeopt checkpoint
  (`composeopt.save`) of the inner rule over that rank's local tree, whose keys are the
  leaves' paths and whose arrays are the rank's pieces;
* `manifest.json`, written by rank 0 once every rank file is on disk: the format and its
  version, the number of ranks, the mode, the layout (paths, shapes, dtypes and every piece's
  element range), its fingerprint, the step count, the inner rule's description (as
  `composeopt.save` stores it) and each rank file's name, size and SHA-256.

Every file is written to a temporary name and renamed, and each save's rank files have a
name of their own (the token), so that a crash at any moment leaves the previous manifest
pointing at the previous, complete files; the files that no manifest names any more are
removed once the new manifest is in place.

`load(source, zopt, params)` reads such a folder on any number of ranks, or an ordinary
checkpoint file of the unsharded chain.  Each rank reads only the rank files that hold
pieces of the leaves it will own, checks them against the manifest (size, digest, header,
pieces), joins each leaf's pieces into the leaf's whole state and cuts that state again
along the new layout.  The ranks then agree: when anything is wrong on any rank, every rank
raises `CheckpointError` and none has changed.  `consolidate(folder, file)` joins every leaf
in one process and writes the ordinary checkpoint that `composeopt.load` reads.

Joining relies on what a sharded optimiser's inner rule keeps: in `"flat"` mode, every state
array of a piece has the piece's shape (elementwise rules), so the pieces' arrays are laid
end to end and take the leaf's shape, and every other value is the same in every piece; in
`"whole"` mode a leaf is one piece, kept as it is.  What the loaded state must look like is
then checked, as for any checkpoint, against what the inner rule's `init` makes for each new
piece.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint import (
    _checked,
    _commit,
    _distinct_leaves,
    _dtype_name,
    _inline_array,
    _Load,
    state_dict,
    write_atomically,
    write_checkpoint,
)
from ..errors import CheckpointError
from ..tree import Path
from .layout import ShardLayout
from .shardfiles import (
    _RANK_FILE,
    _RULE_ENTRIES,
    FORMAT,
    MANIFEST,
    VERSION,
    _cut,
    _Leaves,
    _leaves_of_file,
    _leaves_of_folder,
    _piece_shape,
    _source,
)

__all__ = ["FORMAT", "VERSION", "MANIFEST", "save", "load", "consolidate"]

_OK, _FAILED = b"\x00", b"\x01"


# --- agreement ------------------------------------------------------------------------


def _agree(comm: Any, error: BaseException | None, token: bytes, what: str) -> None:
    """Collective: return on every rank if none failed and every `token` is the same; else
    raise on every rank (its own error on a rank that failed, a CheckpointError naming it on
    the others)."""
    mine = _OK + token if error is None else _FAILED + str(error).encode(errors="replace")
    everyone = comm.allgather_bytes(mine)
    failed = [
        (rank, said[1:].decode(errors="replace")) for rank, said in enumerate(everyone) if said[:1] != _OK
    ]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise CheckpointError(f"{what}: rank {rank} of {comm.size} failed: {message}")
    if any(said != everyone[0] for said in everyone):
        raise CheckpointError(f"{what}: the ranks did not read the same manifest (is it being rewritten?)")


def _as_checkpoint_error(err: BaseException, where: str) -> BaseException:
    if isinstance(err, CheckpointError):
        return err
    if isinstance(err, OSError):
        return CheckpointError(f"{where}: cannot be read: {err}")
    return err


# --- the tree and its layout ------------------------------------------------------------


def _tree_layout(params: Any, ranks: int, mode: str) -> tuple[ShardLayout, dict[str, Path]]:
    """The layout of `params` over `ranks` in `mode`, and each leaf's path by its string."""
    leaves = _distinct_leaves(params)
    layout = ShardLayout.build(
        list(leaves),
        [tuple(int(n) for n in x.shape) for _, x in leaves.values()],
        [_dtype_name(x.dtype) for _, x in leaves.values()],
        ranks,
        mode,
    )
    return layout, {name: path for name, (path, _) in leaves.items()}


def _as_params(local: dict[str, Any], paths: dict[str, Path]) -> Any:
    """A local tree (arrays by their leaf's path) nested as the params are, so that the inner
    rule sees each piece at its leaf's path, as it does in a step (groups select by path)."""
    if len(local) == 1 and paths[next(iter(local))].keys == ():
        return next(iter(local.values()))  # the params are one array
    tree: dict[Any, Any] = {}
    for name, array in local.items():
        keys = paths[name].keys
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = array
    return tree


def _same_tree(layout: ShardLayout, current: ShardLayout) -> str | None:
    """Why the checkpoint's tree is not the current params' tree, or None."""
    if layout.fingerprint == current.fingerprint:
        return None
    if layout.paths != current.paths:
        missing = [path for path in current.paths if path not in layout.paths]
        unexpected = [path for path in layout.paths if path not in current.paths]
        if missing or unexpected:
            return f"parameters missing from the checkpoint: {missing}; unexpected in it: {unexpected}"
        return "the checkpoint has the parameters in another order"
    for path, saved, now, saved_dtype, dtype in zip(
        layout.paths, layout.shapes, current.shapes, layout.dtypes, current.dtypes
    ):
        if saved != now or saved_dtype != dtype:
            return (
                f"{path}: checkpoint has shape {saved} and dtype {saved_dtype}, the parameter has "
                f"shape {now} and dtype {dtype}"
            )
    return "the checkpoint's layout fingerprint does not match the parameters"


# --- save -------------------------------------------------------------------------------


def _digest(file: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _write_text(file: str, text: str) -> None:
    write_atomically(file, lambda stream: stream.write(text.encode("utf-8")))


def _layout_json(layout: ShardLayout) -> dict[str, Any]:
    return {
        "paths": list(layout.paths),
        "shapes": [list(shape) for shape in layout.shapes],
        "dtypes": list(layout.dtypes),
        "pieces": [
            {"rank": piece.rank, "leaf": piece.leaf, "start": piece.start, "stop": piece.stop}
            for piece in layout.pieces
        ],
    }


def save(folder: str | os.PathLike[str], zopt: Any, params: Any) -> None:
    """Collective: write the sharded optimiser's state into `folder` (created if need be).

    Every rank writes its shard as an ordinary checkpoint file; once all have, rank 0 writes
    `manifest.json`, which names them with their SHA-256 digests, and removes the files of
    earlier saves into the folder.  Raises on every rank, leaving the previous checkpoint in
    the folder as it was, when any rank fails; raises `CheckpointError` when `params` is not
    the tree the optimiser was prepared for.
    """
    comm = zopt.comm
    target = os.path.abspath(os.fspath(folder))
    token = comm.broadcast_bytes(secrets.token_hex(8).encode() if comm.rank == 0 else None).decode()
    if zopt.layout is None:
        zopt.prepare(params)
    layout: ShardLayout = zopt.layout
    written: str | None = None
    report: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        current, paths = _tree_layout(params, layout.ranks, layout.mode)
        problem = _same_tree(layout, current)
        if problem is not None:
            raise CheckpointError(f"the params are not the tree the optimiser was prepared for: {problem}")
        checkpoint = state_dict(zopt.rule, _as_params(zopt.local_tree(), paths))
        os.makedirs(target, exist_ok=True)
        name = f"rank-{comm.rank:05d}-of-{comm.size:05d}.{token}.npz"
        written = os.path.join(target, name)
        write_checkpoint(written, checkpoint)
        digest, size = _digest(written)
        rule = {key: checkpoint[key] for key in _RULE_ENTRIES}
        report = {"name": name, "sha256": digest, "bytes": size, "rule": rule}
    except Exception as err:
        error = err
    mine = (
        _OK + json.dumps(report).encode() if error is None else _FAILED + str(error).encode(errors="replace")
    )
    everyone = comm.allgather_bytes(mine)  # also the barrier: every rank file is on disk now
    failed = [
        (rank, said[1:].decode(errors="replace")) for rank, said in enumerate(everyone) if said[:1] != _OK
    ]
    reports = [] if failed else [json.loads(said[1:]) for said in everyone]
    differ = [rank for rank, other in enumerate(reports) if other["rule"] != reports[0]["rule"]]
    if differ:
        failed = [(differ[0], "its inner rule differs from rank 0's (step count, hyperparameters or chain)")]
    if failed:
        if written is not None and os.path.exists(written):
            os.unlink(written)
        if error is not None:
            raise error
        rank, message = failed[0]
        raise CheckpointError(f"dist.save: rank {rank} of {comm.size} failed: {message}")
    outcome = b""
    if comm.rank == 0:
        try:
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "ranks": comm.size,
                "mode": layout.mode,
                "layout": _layout_json(layout),
                "fingerprint": layout.fingerprint.hex(),
                "step": reports[0]["rule"]["step"],
                "rule": reports[0]["rule"],
                "files": [
                    {"rank": rank, "name": item["name"], "sha256": item["sha256"], "bytes": item["bytes"]}
                    for rank, item in enumerate(reports)
                ],
            }
            _write_text(os.path.join(target, MANIFEST), json.dumps(manifest, indent=1))
            named = {item["name"] for item in reports}
            for entry in os.listdir(target):
                if _RANK_FILE.fullmatch(entry) and entry not in named:
                    os.unlink(os.path.join(target, entry))
        except Exception as err:
            error = err
            outcome = f"rank 0 could not write the manifest: {err}".encode(errors="replace")
    outcome = comm.broadcast_bytes(outcome)
    if outcome:
        if error is not None:
            raise error
        raise CheckpointError(f"dist.save: {outcome.decode(errors='replace')}")


# --- load -------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What this rank will load: its local tree's checkpoint, checked."""

    layout: ShardLayout
    paths: dict[str, Path]
    checkpoint: dict[str, Any]
    checked: _Load | None  # None until checked against the optimiser's own local tree
    token: bytes


def _local_checkpoint(leaves: _Leaves, layout: ShardLayout, rank: int) -> dict[str, Any]:
    params: dict[str, Any] = {}
    states: dict[str, Any] = {}
    frozen: list[str] = []
    for piece in layout.pieces_of(rank):
        key = layout.paths[piece.leaf]
        params[key] = {"shape": list(_piece_shape(layout, piece)), "dtype": layout.dtypes[piece.leaf]}
        if piece.leaf in leaves.states:
            state = leaves.states[piece.leaf]
            if layout.mode == "flat":
                state = _cut(state, layout.shapes[piece.leaf], piece.start, piece.stop)
            states[key] = state
        if leaves.frozen[piece.leaf]:
            frozen.append(key)
    return {**leaves.rule, "params": params, "states": states, "frozen": frozen}


def _planned(source: str, zopt: Any, params: Any) -> _Plan:
    rank = zopt.comm.rank
    manifest, name = _source(source)
    current, paths = _tree_layout(params, zopt.comm.size, zopt.mode)
    if manifest is None:
        leaves, token = _leaves_of_file(name)
        problem = _same_tree(leaves.layout, current)
    else:
        token = manifest.digest
        problem = _same_tree(manifest.layout, current)
        if problem is None:
            leaves = _leaves_of_folder(manifest, {piece.leaf for piece in current.pieces_of(rank)})
    if problem is not None:
        raise CheckpointError(f"{name}: the checkpoint is not for these params: {problem}")
    checkpoint = _local_checkpoint(leaves, current, rank)
    own = zopt.layout == current
    # Before the optimiser is prepared for this layout, the states are checked against what
    # init makes for stand-ins of the new pieces: the same shapes and dtypes.
    local = (
        zopt.local_tree()
        if own
        else {
            current.paths[piece.leaf]: np.empty(_piece_shape(current, piece), current.dtypes[piece.leaf])
            for piece in current.pieces_of(rank)
        }
    )
    tree = _as_params(local, paths)
    try:
        checked = _checked(zopt.rule, tree, checkpoint, True, _inline_array, copy=True)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
    return _Plan(current, paths, checkpoint, checked if own else None, token)


def load(source: str | os.PathLike[str], zopt: Any, params: Any) -> Any:
    """Collective: load a checkpoint onto the sharded optimiser `zopt` for `params`.

    `source` is a folder written by [save][composeopt.dist.save] on any number of ranks (or
    its `manifest.json`), or an ordinary checkpoint file written by `composeopt.save` for the
    unsharded chain.  Each leaf's state is re-cut along the layout of `zopt.comm.size` ranks
    in `zopt.mode`.  Everything is checked on every rank before anything changes on any: the
    manifest's entries and types, that its pieces cover every element once, its fingerprint
    against its layout and against `params`, each rank file's size, SHA-256, header and
    pieces, and the loaded state against what the inner rule's `init` makes.  When anything is
    wrong on any rank, every rank raises `CheckpointError` and no rank's state changes.
    Returns `zopt`.
    """
    comm = zopt.comm
    name = os.fspath(source)
    plan: _Plan | None = None
    error: BaseException | None = None
    try:
        plan = _planned(name, zopt, params)
    except Exception as err:
        error = _as_checkpoint_error(err, name)
    _agree(comm, error, plan.token if plan is not None else b"", f"dist.load of {name}")
    assert plan is not None
    if plan.checked is None:
        zopt.prepare(params)
        try:
            if zopt.layout != plan.layout:
                raise CheckpointError(
                    f"{name}: the optimiser built another layout than the checkpoint's check"
                )
            tree = _as_params(zopt.local_tree(), plan.paths)
            plan.checked = _checked(zopt.rule, tree, plan.checkpoint, True, _inline_array, copy=True)
        except Exception as err:
            error = err
        _agree(comm, error, plan.token, f"dist.load of {name}")
    assert plan.checked is not None
    _commit(zopt.rule, plan.checked)
    return zopt


# --- consolidate -------------------------------------------------------------------------------


def consolidate(folder: str | os.PathLike[str], file: str | os.PathLike[str]) -> None:
    """Join a folder written by [save][composeopt.dist.save] into one ordinary checkpoint
    `file`, which `composeopt.load(file, rule, params)` reads into the unsharded chain.

    One process, no communicator.  Checks the folder as [load][composeopt.dist.load] does
    (without a rule to compare the states with, which `composeopt.load` then does) and
    raises `CheckpointError` naming what is wrong, writing nothing.
    """
    manifest, name = _source(os.fspath(folder))
    if manifest is None:
        raise CheckpointError(f"{name}: not a folder written by dist.save (it has no {MANIFEST})")
    layout = manifest.layout
    leaves = _leaves_of_folder(manifest, set(range(len(layout.paths))))
    checkpoint = {
        **manifest.rule,
        "params": {
            path: {"shape": list(shape), "dtype": dtype}
            for path, shape, dtype in zip(layout.paths, layout.shapes, layout.dtypes)
        },
        "states": {layout.paths[leaf]: state for leaf, state in sorted(leaves.states.items())},
        "frozen": [layout.paths[leaf] for leaf, frozen in sorted(leaves.frozen.items()) if frozen],
    }
    write_checkpoint(file, checkpoint)
