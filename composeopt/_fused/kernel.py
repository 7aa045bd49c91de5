"""What the fused paths compile: the kernel language, re-exported for the backends.

The language itself lives beside the rule protocol, in
[composeopt.kernel][composeopt.kernel] (rules never import the machinery that
runs them).  A rule whose update needs a reduction (a norm) describes its
fast path in stages instead (`.reduce.Staged`); a rule with neither takes
the generic path.
"""

from __future__ import annotations

from ..kernel import FUNCTIONS, Kernel, KernelError

__all__ = ["Kernel", "KernelError", "FUNCTIONS"]
