"""What the fused paths compile: a rule's `Kernel`, or a `NormClip` between stages.

The kernel language itself lives beside the rule protocol, in
[composeopt.kernel][composeopt.kernel] (rules never import the machinery that
runs them); it is re-exported here for the backends.  A rule whose update
needs a reduction (a norm) sets its private `_kernel` to a `NormClip`
instead of a `Kernel`: the planner splits a chain into stages there.  A rule
with neither takes the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernel import FUNCTIONS, Kernel, KernelError

__all__ = ["Kernel", "KernelError", "NormClip", "FUNCTIONS"]


@dataclass(frozen=True, eq=False)
class NormClip:
    """The fast path of a norm-clipping rule (it reads `omega` and `p` from the rule).

    `scope="array"`: each array is scaled by its own norm (ClipNorm);
    `scope="tree"`: every array by the joint norm of all of them (ClipGlobalNorm).
    """

    scope: str
