"""How a rule describes its fast path: its elementwise math, written once.

A rule that works element by element sets a class attribute `_kernel` to a
`Kernel`: a few lines of arithmetic on one element, and a host function
that computes the step's scalars from the rule's hyperparameters.  The same
lines are compiled by every backend (numba loops on the CPU, blocked NumPy
`out=` calls without a compiler, a CuPy `ElementwiseKernel` on the GPU), and
the kernels of consecutive rules of a chain are pasted into one loop, so a
chain costs one pass over memory.

The math is a small subset of Python, on purpose:

* `dx` is the gradient as it reaches the rule, `x` the parameter
  (read-only), the names listed in `state` are the rule's state arrays (read
  and assigned); every other name read before it is assigned is a scalar that
  the host function provides, cast to the array's dtype;
* statements are plain assignments `name = expression`, and the last one is
  `return expression`: the update that leaves the rule;
* expressions use `+ - * /`, unary `-`, `sqrt`, `abs`, `sign` (-1, 0 or
  +1, NaN for NaN, as NumPy's), `maximum`, `minimum` (NaN-propagating, as
  NumPy's) and `a if flag else b` with a scalar `flag`;
* there are no numeric literals: a constant is a scalar from the host, so that
  every operation happens in the array's dtype, in the order written, as the
  rule's generic `apply_` does it.  This is what makes the fast path equal to
  the generic one to the last bit, not only approximately.

A rule whose update needs a reduction (a norm) sets `_kernel` to a
`NormClip` instead; the planner splits a chain into stages there.  A rule
that sets it to `None` (or inherits none) takes the generic path.  The
leading underscore keeps it out of `help()`, which lists what the user of a
rule may set.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Kernel", "NormClip", "FUNCTIONS"]

FUNCTIONS = {"sqrt": 1, "abs": 1, "sign": 1, "maximum": 2, "minimum": 2}
"""The functions kernel math may call, with their number of arguments."""

_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div)

Scalars = Callable[[Any, Any, Any], Mapping[str, float]]


class KernelError(ValueError):
    """Kernel math outside the supported subset (a bug in a rule, raised at import)."""


@dataclass(frozen=True, eq=False)
class Kernel:
    """The elementwise fast path of a rule.

    Args:
        math: the per-element statements (see the module docstring).
        scalars: `scalars(rule, state, dtype) -> {name: value}`, called once
            per step with the rule as it is after `begin_step` and the
            state after `counter` was advanced; returns every scalar that
            `math` reads, as Python numbers.
        state: names of the state arrays (attributes of the rule's
            `State`) that `math` reads and assigns.
        counter: name of an integer state attribute to add 1 to each step
            (Adam's `t`), before `scalars` is called.
    """

    math: str
    scalars: Scalars
    state: tuple[str, ...] = ()
    counter: str | None = None
    body: tuple[ast.stmt, ...] = field(init=False, repr=False)
    scalar_names: tuple[str, ...] = field(init=False, repr=False)
    reads_x: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        body, scalar_names, reads_x = _parse(self.math, self.state)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "scalar_names", scalar_names)
        object.__setattr__(self, "reads_x", reads_x)


@dataclass(frozen=True, eq=False)
class NormClip:
    """The fast path of a norm-clipping rule (it reads `omega` and `p` from the rule).

    `scope="array"`: each array is scaled by its own norm (ClipNorm);
    `scope="tree"`: every array by the joint norm of all of them (ClipGlobalNorm).
    """

    scope: str


def _parse(math: str, state: tuple[str, ...]) -> tuple[tuple[ast.stmt, ...], tuple[str, ...], bool]:
    tree = ast.parse(textwrap.dedent(math))
    body = tuple(tree.body)
    if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        raise KernelError("kernel math must end with 'return <update>'")
    arrays = {"dx", "x", *state}
    assigned: set[str] = set()
    scalars: list[str] = []
    reads_x = False

    def read(node: ast.expr, *, scalar_only: bool = False) -> None:
        nonlocal reads_x
        if isinstance(node, ast.Name):
            name = node.id
            if name in arrays or name in assigned:
                if scalar_only:
                    raise KernelError(f"condition {name!r} must be a scalar")
                reads_x = reads_x or name == "x"
            elif name not in scalars:
                scalars.append(name)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, _OPERATORS):
            read(node.left)
            read(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            read(node.operand)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if FUNCTIONS.get(node.func.id) != len(node.args):
                raise KernelError(f"unsupported call {ast.unparse(node)!r}")
            for arg in node.args:
                read(arg)
        elif isinstance(node, ast.IfExp):
            read(node.test, scalar_only=True)
            if not isinstance(node.test, ast.Name):
                raise KernelError("the condition of 'a if flag else b' must be a scalar name")
            read(node.body)
            read(node.orelse)
        elif isinstance(node, ast.Constant):
            raise KernelError(
                f"literal {node.value!r}: pass constants as scalars so they take the array's dtype"
            )
        else:
            raise KernelError(f"unsupported expression {ast.unparse(node)!r}")

    for statement in body[:-1]:
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            raise KernelError(f"unsupported statement {ast.unparse(statement)!r}")
        read(statement.value)
        target = statement.targets[0].id
        if target in ("dx", "x") or target in scalars:
            raise KernelError(f"kernel math may not assign {target!r}")
        assigned.add(target)
    last = body[-1]
    assert isinstance(last, ast.Return) and last.value is not None
    read(last.value)
    return body, tuple(scalars), reads_x
