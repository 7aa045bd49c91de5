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
import io
import json
import math
import os
import re
import secrets
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._npz import ARCHIVE_ERRORS, MAX_MANIFEST_CHARS, Archive, Refused, shown
from ..checkpoint import (
    _ENTRIES,
    _checked,
    _checked_frozen,
    _checked_params,
    _checked_states,
    _commit,
    _count,
    _distinct_leaves,
    _dtype_name,
    _inline_array,
    _Load,
    state_dict,
    write_checkpoint,
)
from ..checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..errors import CheckpointError
from ..tree import Path
from .layout import MODES, Piece, ShardLayout

__all__ = ["FORMAT", "VERSION", "MANIFEST", "save", "load", "consolidate"]

FORMAT = "composeopt-dist-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
"""The manifest's name in a checkpoint folder."""

_ENTRIES_V1 = {"format", "version", "ranks", "mode", "layout", "fingerprint", "step", "rule", "files"}
_RULE_ENTRIES = ("format", "version", "optimiser", "structure", "groups", "step", "hyperparameters")
_RANK_FILE = re.compile(r"rank-\d{5}-of-\d{5}\.[0-9a-f]{16}\.npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_RANKS = 2**20
_MAX_DEPTH = 64  # how deep a state may nest (records in tuples in groups ...)
_OK, _FAILED = b"\x00", b"\x01"
_MISSING: Any = object()


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


def _piece_shape(layout: ShardLayout, piece: Piece) -> tuple[int, ...]:
    return (piece.size,) if layout.mode == "flat" else layout.shapes[piece.leaf]


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


def _write_atomically(file: str, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(file), prefix=".composeopt-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, file)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


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
            _write_atomically(os.path.join(target, MANIFEST), json.dumps(manifest, indent=1))
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


# --- reading untrusted files -------------------------------------------------------------


def _inline(plain: Any, members: Archive, budget: list[int], depth: int = 0) -> Any:
    """`plain` with each array reference replaced by the array, read within `budget` bytes."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"a state nests deeper than {_MAX_DEPTH} levels")
    if isinstance(plain, dict) and "__array__" in plain:
        try:
            array = members.read_numeric(plain, budget[0])
        except Refused as err:
            raise CheckpointError(str(err)) from None
        budget[0] -= array.nbytes
        return array
    if isinstance(plain, dict):
        return {key: _inline(value, members, budget, depth + 1) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_inline(item, members, budget, depth + 1) for item in plain]
    return plain


def _read_checkpoint(data: bytes, name: str) -> dict[str, Any]:
    """An ordinary checkpoint file's contents, checked as far as they can be without a rule:
    its entries, their types, and its arrays (numbers only, no more than the file holds)."""
    try:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except ARCHIVE_ERRORS as err:
            raise CheckpointError(f"not a composeopt checkpoint: not a .npz archive ({err})") from None
        with archive:
            members = Archive(archive)
            checkpoint: dict[str, Any] = members.manifest()
            if checkpoint.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"not a composeopt checkpoint: its 'format' is {shown(checkpoint.get('format'))}"
                )
            version = checkpoint.get("version")
            if type(version) is not int or version not in _ENTRIES:
                raise CheckpointError(
                    f"checkpoint entry 'version': no checkpoint format version {shown(version)}"
                )
            if set(checkpoint) != _ENTRIES[version]:
                missing = sorted(_ENTRIES[version] - set(checkpoint))
                unexpected = sorted(str(key) for key in set(checkpoint) - _ENTRIES[version])
                raise CheckpointError(f"checkpoint entries missing: {missing}; unexpected: {unexpected}")
            if not _count(checkpoint["step"]):
                raise CheckpointError(f"checkpoint entry 'step' cannot be {shown(checkpoint['step'])}")
            saved = _checked_params(checkpoint)
            states = _checked_states(checkpoint, saved)
            _checked_frozen(checkpoint, saved)
            members.references(states)
            budget = [len(data)]
            checkpoint["states"] = {path: _inline(state, members, budget) for path, state in states.items()}
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: the checkpoint nests too deep") from None
    return checkpoint


def _read_bytes(file: str, expected_size: int | None = None) -> bytes:
    try:
        size = os.path.getsize(file)
        if expected_size is not None and size != expected_size:
            raise CheckpointError(f"{file}: has {size} bytes, the manifest says {expected_size}")
        with open(file, "rb") as stream:
            return stream.read()
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read: {err.strerror or err}") from None


# --- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Manifest:
    folder: str
    layout: ShardLayout
    rule: dict[str, Any]
    files: list[dict[str, Any]]
    digest: bytes


def _fail(problem: str) -> CheckpointError:
    return CheckpointError(f"manifest: {problem}")


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(_count(n) for n in value):
        raise _fail(f"{where} must be a list of non-negative integers, got {shown(value)}")
    return value


def _checked_layout(entry: Any, ranks: int, mode: str) -> ShardLayout:
    if not isinstance(entry, dict) or set(entry) != {"paths", "shapes", "dtypes", "pieces"}:
        raise _fail(f"'layout' must have the entries paths, shapes, dtypes and pieces, got {shown(entry)}")
    paths, shapes, dtypes, pieces = entry["paths"], entry["shapes"], entry["dtypes"], entry["pieces"]
    for what, value in (("paths", paths), ("dtypes", dtypes)):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise _fail(f"'layout' entry {what!r} must be a list of strings, got {shown(value)}")
    if not isinstance(shapes, list) or len(shapes) != len(paths) or len(dtypes) != len(paths):
        raise _fail("'layout' must have as many shapes and dtypes as paths")
    if len(set(paths)) != len(paths):
        raise _fail("'layout' names a path twice")
    fixed = [tuple(_int_list(shape, f"'layout' shape of {path}")) for path, shape in zip(paths, shapes)]
    sizes = [math.prod(shape) for shape in fixed]
    if not isinstance(pieces, list):
        raise _fail(f"'layout' entry 'pieces' must be a list, got {shown(pieces)}")
    parsed: list[Piece] = []
    for index, piece in enumerate(pieces):
        where = f"'layout' piece {index}"
        if not isinstance(piece, dict) or set(piece) != {"rank", "leaf", "start", "stop"}:
            raise _fail(f"{where} must have the entries rank, leaf, start and stop, got {shown(piece)}")
        if not all(_count(piece[key]) for key in piece):
            raise _fail(f"{where}: its entries must be non-negative integers, got {shown(piece)}")
        rank, leaf, start, stop = piece["rank"], piece["leaf"], piece["start"], piece["stop"]
        if rank >= ranks or leaf >= len(paths):
            raise _fail(f"{where}: there is no rank {rank} of {ranks} or no leaf {leaf} of {len(paths)}")
        if not start <= stop <= sizes[leaf] or (start == stop and sizes[leaf] > 0):
            raise _fail(
                f"{where}: elements {start}:{stop} are not a range of {paths[leaf]}, of {sizes[leaf]}"
            )
        parsed.append(Piece(rank, leaf, start, stop))
    for leaf, path in enumerate(paths):
        mine = sorted((piece for piece in parsed if piece.leaf == leaf), key=lambda piece: piece.start)
        reached = 0
        for piece in mine:
            if piece.start != reached:
                kind = "overlap" if piece.start < reached else "leave a gap"
                raise _fail(f"'layout': the pieces of {path} {kind} at element {min(piece.start, reached)}")
            reached = piece.stop
        if not mine or reached != sizes[leaf] or (sizes[leaf] == 0 and len(mine) != 1):
            raise _fail(f"'layout': the pieces of {path} do not cover its {sizes[leaf]} elements once")
        if len({piece.rank for piece in mine}) != len(mine):
            raise _fail(f"'layout': a rank has two pieces of {path}")
        if mode == "whole" and len(mine) != 1:
            raise _fail(f"'layout': in 'whole' mode {path} must be one piece")
    return ShardLayout(
        tuple(paths),
        tuple(fixed),
        tuple(dtypes),
        mode,
        ranks,
        tuple(sorted(parsed, key=lambda piece: (piece.rank, piece.leaf))),
    )


def _checked_manifest(folder: str, file: str) -> _Manifest:
    data = _read_bytes(file)
    if len(data) > MAX_MANIFEST_CHARS:
        raise CheckpointError(f"{file}: the manifest has more than {MAX_MANIFEST_CHARS} bytes")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{file}: not valid JSON: {shown(str(err))}") from None
    try:
        return _checked_entries(folder, manifest, hashlib.sha256(data).digest())
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}") from None


def _checked_entries(folder: str, manifest: Any, digest: bytes) -> _Manifest:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise _fail(f"not a composeopt sharded checkpoint: its 'format' is {shown(got)}")
    version = manifest.get("version")
    if type(version) is not int or version < 1:
        raise _fail(f"'version' must be a positive integer, got {shown(version)}")
    if version > VERSION:
        raise _fail(f"format version {version} is newer than {VERSION}, the newest this composeopt reads")
    if set(manifest) != _ENTRIES_V1:
        missing = sorted(_ENTRIES_V1 - set(manifest))
        unexpected = sorted(str(key) for key in set(manifest) - _ENTRIES_V1)
        raise _fail(f"entries missing: {missing}; unexpected: {unexpected}")
    ranks, mode = manifest["ranks"], manifest["mode"]
    if type(ranks) is not int or not 1 <= ranks <= _MAX_RANKS:
        raise _fail(f"'ranks' must be an integer from 1 to {_MAX_RANKS}, got {shown(ranks)}")
    if mode not in MODES:
        raise _fail(f"'mode' must be one of {MODES}, got {shown(mode)}")
    layout = _checked_layout(manifest["layout"], ranks, mode)
    fingerprint = manifest["fingerprint"]
    if fingerprint != layout.fingerprint.hex():
        raise _fail(f"'fingerprint' {shown(fingerprint)} is not the fingerprint of its layout")
    rule = manifest["rule"]
    if not isinstance(rule, dict) or set(rule) != set(_RULE_ENTRIES):
        raise _fail(f"'rule' must have the entries {list(_RULE_ENTRIES)}, got {shown(rule)}")
    if (
        rule["format"] != CHECKPOINT_FORMAT
        or type(rule["version"]) is not int
        or rule["version"] not in _ENTRIES
    ):
        raise _fail(f"'rule' is not described by a known checkpoint format: {shown(rule)}")
    step = manifest["step"]
    if not _count(step) or step != rule["step"]:
        raise _fail(f"'step' must be the rule's step count, a non-negative integer, got {shown(step)}")
    files = manifest["files"]
    if not isinstance(files, list) or len(files) != ranks:
        raise _fail(f"'files' must list one file per rank ({ranks}), got {shown(files)}")
    for rank, entry in enumerate(files):
        if not isinstance(entry, dict) or set(entry) != {"rank", "name", "sha256", "bytes"}:
            raise _fail(
                f"'files'[{rank}] must have the entries rank, name, sha256 and bytes, got {shown(entry)}"
            )
        if entry["rank"] != rank or type(entry["rank"]) is not int:
            raise _fail(f"'files'[{rank}] is for rank {shown(entry['rank'])}")
        if not isinstance(entry["name"], str) or not _RANK_FILE.fullmatch(entry["name"]):
            raise _fail(f"'files'[{rank}]: {shown(entry['name'])} is not the name of a rank file")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise _fail(
                f"'files'[{rank}]: 'sha256' must be 64 hexadecimal digits, got {shown(entry['sha256'])}"
            )
        if not _count(entry["bytes"]):
            raise _fail(
                f"'files'[{rank}]: 'bytes' must be a non-negative integer, got {shown(entry['bytes'])}"
            )
    if len({entry["name"] for entry in files}) != ranks:
        raise _fail("'files' names a file twice")
    return _Manifest(folder, layout, rule, files, digest)


# --- joining pieces into leaves and cutting leaves into pieces -----------------------------


def _equal(values: Sequence[Any]) -> bool:
    first = values[0]
    if isinstance(first, np.ndarray):
        return all(
            isinstance(value, np.ndarray)
            and value.dtype == first.dtype
            and value.shape == first.shape
            and value.tobytes() == first.tobytes()
            for value in values
        )
    return all(
        type(value) is type(first) and (value == first or value != value and first != first)
        for value in values
    )


def _join(plains: Sequence[Any], sizes: Sequence[int], shape: tuple[int, ...], where: str) -> Any:
    """One leaf's state from its flat pieces' states (in element order)."""
    first = plains[0]
    if isinstance(first, np.ndarray):
        if all(
            isinstance(plain, np.ndarray) and plain.dtype == first.dtype and plain.shape == (size,)
            for plain, size in zip(plains, sizes)
        ):
            return np.concatenate(plains).reshape(shape)
        if _equal(plains):
            return first
        raise CheckpointError(
            f"{where}: the pieces' arrays are neither the pieces' elements nor all the same"
        )
    if isinstance(first, dict):
        if not all(isinstance(plain, dict) and plain.keys() == first.keys() for plain in plains):
            raise CheckpointError(f"{where}: the pieces' states are not records of the same fields")
        return {key: _join([plain[key] for plain in plains], sizes, shape, f"{where}.{key}") for key in first}
    if isinstance(first, list):
        if not all(isinstance(plain, list) and len(plain) == len(first) for plain in plains):
            raise CheckpointError(f"{where}: the pieces' states are lists of different lengths")
        return [
            _join([plain[i] for plain in plains], sizes, shape, f"{where}[{i}]") for i in range(len(first))
        ]
    if not _equal(plains):
        raise CheckpointError(f"{where}: the pieces' states differ: {shown(plains[0])} and others")
    return first


def _cut(plain: Any, shape: tuple[int, ...], start: int, stop: int) -> Any:
    """A flat piece's state from its leaf's whole state: the leaf-shaped arrays are cut."""
    if isinstance(plain, np.ndarray):
        return plain.reshape(-1)[start:stop].copy() if plain.shape == shape else plain
    if isinstance(plain, dict):
        return {key: _cut(value, shape, start, stop) for key, value in plain.items()}
    if isinstance(plain, list):
        return [_cut(item, shape, start, stop) for item in plain]
    return plain


@dataclass
class _Leaves:
    """Whole leaves' states (absent for a leaf without state) and frozen flags, from a source."""

    layout: ShardLayout
    rule: dict[str, Any]
    states: dict[int, Any]
    frozen: dict[int, bool]


def _rank_file(manifest: _Manifest, rank: int) -> dict[str, Any]:
    entry = manifest.files[rank]
    file = os.path.join(manifest.folder, entry["name"])
    data = _read_bytes(file, entry["bytes"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{file}: its SHA-256 is not the one in the manifest: the file is damaged")
    checkpoint = _read_checkpoint(data, file)
    for key in _RULE_ENTRIES:
        if checkpoint[key] != manifest.rule[key]:
            raise CheckpointError(f"{file}: its entry {key!r} is not the manifest's")
    layout = manifest.layout
    expected = {
        layout.paths[piece.leaf]: {
            "shape": list(_piece_shape(layout, piece)),
            "dtype": layout.dtypes[piece.leaf],
        }
        for piece in layout.pieces_of(rank)
    }
    if checkpoint["params"] != expected:
        raise CheckpointError(
            f"{file}: its parameters are not the pieces that the manifest gives rank {rank}"
        )
    return checkpoint


def _leaves_of_folder(manifest: _Manifest, wanted: set[int]) -> _Leaves:
    layout = manifest.layout
    files = {
        rank: _rank_file(manifest, rank)
        for rank in sorted({p.rank for p in layout.pieces if p.leaf in wanted})
    }
    states: dict[int, Any] = {}
    frozen: dict[int, bool] = {}
    for leaf in sorted(wanted):
        path = layout.paths[leaf]
        key = path
        pieces = sorted((p for p in layout.pieces if p.leaf == leaf), key=lambda piece: piece.start)
        plains = [files[piece.rank]["states"].get(key, _MISSING) for piece in pieces]
        flags = {key in files[piece.rank]["frozen"] for piece in pieces}
        if len(flags) != 1:
            raise CheckpointError(f"{path}: some of its pieces are frozen and others not")
        frozen[leaf] = flags.pop()
        if all(plain is _MISSING for plain in plains):
            continue
        if any(plain is _MISSING for plain in plains):
            raise CheckpointError(f"{path}: some of its pieces have a state and others not")
        if layout.mode == "whole":
            states[leaf] = plains[0]
        else:
            states[leaf] = _join(
                plains, [piece.size for piece in pieces], layout.shapes[leaf], f"{path}: state"
            )
    return _Leaves(layout, manifest.rule, states, frozen)


def _leaves_of_file(file: str) -> tuple[_Leaves, bytes]:
    """The leaves of an ordinary checkpoint file, and the file's SHA-256."""
    data = _read_bytes(file)
    checkpoint = _read_checkpoint(data, file)
    saved = checkpoint["params"]
    shapes = [entry["shape"] for entry in saved.values()]
    layout = ShardLayout.build(list(saved), shapes, [entry["dtype"] for entry in saved.values()], 1, "whole")
    index = {path: leaf for leaf, path in enumerate(layout.paths)}
    leaves = _Leaves(
        layout,
        {key: checkpoint[key] for key in _RULE_ENTRIES if key in checkpoint},
        {index[path]: state for path, state in checkpoint["states"].items()},
        {leaf: path in checkpoint["frozen"] for path, leaf in index.items()},
    )
    return leaves, hashlib.sha256(data).digest()


def _source(source: str) -> tuple[_Manifest | None, str]:
    """The checked manifest of a folder (or of a manifest file), or None for an ordinary file."""
    if os.path.isdir(source):
        return _checked_manifest(source, os.path.join(source, MANIFEST)), source
    if os.path.basename(source) == MANIFEST:
        return _checked_manifest(os.path.dirname(source) or ".", source), source
    return None, source


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
