"""Reading a `.npz` checkpoint without trusting it.

An archive is untrusted input.  Its members are read only when the manifest names
them, each only after its `.npy` header shows the shape and dtype expected (so that no
member is read past its expected size, whatever the archive claims), never unpickled,
and every fault of the file (a bad zip, a cut member, a wrong checksum, a malformed
header) becomes a [CheckpointError][composeopt.errors.CheckpointError] naming the member.
"""

from __future__ import annotations

import io
import json
import math
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from .errors import CheckpointError

__all__ = ["META", "MAX_MANIFEST_CHARS", "Archive", "Refused", "shown", "ARCHIVE_ERRORS"]

META = "__composeopt__"
"""The member that holds the manifest: the checkpoint as JSON, naming the other members."""

MAX_MANIFEST_CHARS = 2**25
"""The longest JSON manifest `load` reads (about 60 000 parameters' worth); `save` refuses longer."""

_MAX_HEADER = 10_000  # NumPy's own limit on an .npy header


class Refused(Exception):
    """What is wrong with one value of a state; the restorer adds where it is."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 60
_short.maxlevel = 2


def shown(value: Any) -> str:
    """A short description of a checkpoint value for a message (hostile ones can be huge)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _short.repr(value)
    except ValueError:  # an integer too long to print, deep inside
        return f"a {type(value).__name__}"


# What a damaged archive can raise from zipfile, zlib, bz2 and lzma, and NumPy's views of
# its bytes: once the file is open, an OSError too is the archive's fault, not the disk's.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    struct.error,
    zlib.error,
)


class Archive:
    """The members of an open `.npz`: each read at most once, and only after its header
    shows the shape and dtype expected, so that no member is read past its expected size."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            if info.filename in self.members:
                raise CheckpointError(f"the archive holds the member {info.filename!r} twice")
            self.members[info.filename] = info
        self.used: set[str] = set()

    def _open(self, name: str, check: Callable[[tuple[int, ...], np.dtype[Any]], str | None]) -> np.ndarray:
        info = self.members.get(name + ".npy")
        if info is None:
            raise CheckpointError(f"member {name!r} is not in the archive")
        try:
            with self.archive.open(info) as stream:
                prefix = _npy_header(stream, name)
                try:
                    probe = io.BytesIO(prefix)
                    major, _ = np.lib.format.read_magic(probe)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(probe, max_header_size=_MAX_HEADER)
                except Exception as err:  # NumPy parses the header with ast: any parse error
                    raise CheckpointError(f"member {name!r} has a malformed .npy header: {err}") from None
                problem = check(tuple(shape), dtype)
                if problem is not None:
                    raise CheckpointError(
                        f"member {name!r} holds a {dtype} array of shape {tuple(shape)}; {problem}"
                    )
                size = math.prod(shape) * dtype.itemsize
                if info.file_size != len(prefix) + size:
                    raise CheckpointError(
                        f"member {name!r} has {info.file_size} bytes, its header says {len(prefix) + size}"
                    )
                data = np.empty(size, np.uint8)
                view, filled = data.data, 0
                while filled < size:
                    got = cast(io.BufferedIOBase, stream).readinto(view[filled:])
                    if not got:
                        raise CheckpointError(f"member {name!r} ends after {filled} of {size} bytes")
                    filled += got
                if stream.read(1):  # also makes zipfile compare the checksum
                    raise CheckpointError(f"member {name!r} is longer than its header says")
            return data.view(dtype).reshape(shape, order="F" if fortran else "C")
        except CheckpointError:
            raise
        except ARCHIVE_ERRORS as err:
            raise CheckpointError(f"member {name!r} cannot be read: {err}") from None

    def manifest(self) -> Any:
        if META + ".npy" not in self.members:
            raise CheckpointError(f"not a composeopt checkpoint: the archive has no {META!r} member")

        def check(shape: tuple[int, ...], dtype: np.dtype[Any]) -> str | None:
            if shape != () or dtype.kind != "U":
                return "expected the manifest as one string"
            if dtype.itemsize // 4 > MAX_MANIFEST_CHARS:
                return f"that is {dtype.itemsize // 4} characters, more than {MAX_MANIFEST_CHARS}"
            return None

        self.used.add(META)
        try:
            text = str(self._open(META, check)[()])
            manifest = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except CheckpointError as err:
            raise CheckpointError(f"manifest: {err}") from None
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"manifest: not valid JSON: {shown(str(err))}") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"manifest: expected a JSON object, got {shown(manifest)}")
        return manifest

    def references(self, states: dict[str, Any]) -> None:
        """Check that the manifest's references and the archive's members are the same set."""
        named: set[str] = set()
        stack: list[Any] = list(states.values())
        while stack:  # not recursive: the manifest may be nested as deep as JSON allows
            plain = stack.pop()
            if isinstance(plain, dict) and "__array__" in plain:
                name = plain["__array__"]
                if len(plain) != 1 or not isinstance(name, str):
                    raise CheckpointError(
                        f"checkpoint entry 'states': malformed array reference {shown(plain)}"
                    )
                if name in named or name == META:
                    raise CheckpointError(f"checkpoint entry 'states' refers to member {name!r} twice")
                if name + ".npy" not in self.members:
                    raise CheckpointError(
                        f"checkpoint entry 'states' refers to member {name!r}, which is not in the archive"
                    )
                named.add(name)
            elif isinstance(plain, dict):
                stack.extend(plain.values())
            elif isinstance(plain, list):
                stack.extend(plain)
        named.add(META)
        extra = sorted(
            member for member in self.members if not member.endswith(".npy") or member[:-4] not in named
        )
        if extra:
            raise CheckpointError(f"the archive has members that its manifest does not name: {extra}")

    def read(self, plain: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        if not (
            isinstance(plain, dict) and set(plain) == {"__array__"} and isinstance(plain["__array__"], str)
        ):
            raise Refused(f"expected a reference to a {dtype} array of shape {shape}, got {shown(plain)}")
        name = plain["__array__"]
        if name in self.used:
            raise Refused(f"member {name!r} is used twice")
        self.used.add(name)
        expected = f"expected a {dtype} array of shape {shape}"

        def check(got_shape: tuple[int, ...], got_dtype: np.dtype[Any]) -> str | None:
            return None if (got_shape, got_dtype) == (shape, dtype) else expected

        try:
            return self._open(name, check)
        except CheckpointError as err:
            raise Refused(str(err)) from None

    def read_numeric(self, plain: Any, max_bytes: int) -> np.ndarray:
        """The array that `plain` refers to, whatever its shape, if it is a native numeric
        array of at most `max_bytes` (for readers that know no expected shape beforehand)."""
        if not (
            isinstance(plain, dict) and set(plain) == {"__array__"} and isinstance(plain["__array__"], str)
        ):
            raise Refused(f"expected a reference to an array, got {shown(plain)}")
        name = plain["__array__"]
        if name in self.used:
            raise Refused(f"member {name!r} is used twice")
        self.used.add(name)

        def check(shape: tuple[int, ...], dtype: np.dtype[Any]) -> str | None:
            if dtype.kind not in "biufc" or not dtype.isnative or dtype.hasobject:
                return "expected a number array in the machine's byte order"
            if math.prod(shape) * dtype.itemsize > max_bytes:
                return f"that is more than the {max_bytes} bytes left in the file"
            return None

        try:
            return self._open(name, check)
        except CheckpointError as err:
            raise Refused(str(err)) from None


def _npy_header(stream: Any, name: str) -> bytes:
    """The bytes of an .npy member's header, read no further than NumPy's limit on its length."""
    start = stream.read(8)
    if len(start) != 8 or start[:6] != b"\x93NUMPY" or start[6] not in (1, 2):
        raise CheckpointError(f"member {name!r} is not a version 1 or 2 .npy array")
    width = 2 if start[6] == 1 else 4
    length_bytes = stream.read(width)
    length = int.from_bytes(length_bytes, "little")
    if len(length_bytes) != width or length > _MAX_HEADER:
        raise CheckpointError(f"member {name!r} has a malformed or oversized .npy header")
    header = stream.read(length)
    if len(header) != length:
        raise CheckpointError(f"member {name!r} ends inside its .npy header")
    return bytes(start + length_bytes + header)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        raise CheckpointError(
            f"a JSON object names {shown(next(k for k in keys if keys.count(k) > 1))} twice"
        )
    return result
