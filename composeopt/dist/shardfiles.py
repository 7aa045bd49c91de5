"""The files of a sharded checkpoint, read as untrusted input: the manifest checked entry
by entry (types, ranges, pieces that cover every element once, the fingerprint of its
layout), each rank file checked against it (size, SHA-256, header, pieces) and read without
pickle, and the pieces' states joined into their leaves' states or cut out of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._npz import ARCHIVE_ERRORS, MAX_MANIFEST_CHARS, Archive, Refused, shown
from ..checkpoint import _ENTRIES, _checked_frozen, _checked_params, _checked_states, _count
from ..checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..errors import CheckpointError
from .layout import MODES, Piece, ShardLayout

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
_MISSING: Any = object()


def _piece_shape(layout: ShardLayout, piece: Piece) -> tuple[int, ...]:
    return (piece.size,) if layout.mode == "flat" else layout.shapes[piece.leaf]


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
