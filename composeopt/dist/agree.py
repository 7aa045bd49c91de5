"""The ranks agree on a step before any of them changes anything.

Each rank checks its own inputs (the engine's check phase).  A rank whose
check failed must not simply raise: the others would wait for it in the
next collective forever.  So every rank, failed or not, calls `agree` with
what it found, and `agree` raises on every rank when any of them failed, or
when their parameter trees differ (their `fingerprint`s, a hash of every
leaf's path, shape and dtype, are not all the same).  The rank that failed
raises its own error; the others raise a `DistributedError` that names it
and repeats its message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ..errors import DistributedError

__all__ = ["fingerprint", "agree"]

_OK, _FAILED = b"\x00", b"\x01"


def fingerprint(paths: Sequence[str], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[Any]) -> bytes:
    """A digest of a tree's layout: its leaves' paths, shapes and dtypes, in order."""
    digest = hashlib.sha256()
    for path, shape, dtype in zip(paths, shapes, dtypes):
        digest.update(f"{path}\x1f{tuple(shape)}\x1f{dtype}\x1e".encode())
    return digest.digest()


def agree(comm: Any, error: BaseException | None, layout: bytes) -> None:
    """Collective: return on every rank if no rank failed and every `layout` is the same;
    else raise on every rank (`error` itself on a rank that passed one)."""
    if error is None:
        mine = _OK + layout
    else:
        mine = _FAILED + f"{type(error).__name__}: {error}".encode(errors="replace")
    everyone = comm.allgather_bytes(mine)
    failed = [
        (rank, said[1:].decode(errors="replace")) for rank, said in enumerate(everyone) if said[:1] == _FAILED
    ]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        others = (
            f" (and {len(failed) - 1} other rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        )
        raise DistributedError(f"rank {rank} of {comm.size} failed its check{others}: {message}")
    layouts = [said[1:] for said in everyone]
    if any(other != layouts[0] for other in layouts):
        differing = [rank for rank, other in enumerate(layouts) if other != layouts[0]]
        raise DistributedError(
            f"the ranks' parameter trees differ (paths, shapes or dtypes): rank {differing[0]} "
            f"of {comm.size} has another tree than rank 0"
        )
