"""The generic path of a kernel: its math on whole arrays, in any array-API namespace.

A rule that declares a `kernel` and writes no `apply_` of its own gets
[Rule.apply_][composeopt.Rule.apply_] from here: the kernel's statements,
compiled once into a Python function of `xp` calls, run in order on the
arrays of `namespace(x)` (NumPy, CuPy, PyTorch, JAX, array-api-strict...).
This is the reference that the fast paths are tested against, so it keeps
their rules of arithmetic:

* each scalar is cast to `x`'s dtype before it meets an array: for NumPy
  and CuPy arrays as the blocked NumPy backend casts its scalar vector
  (`np.array(values, dtype=x.dtype)`); other libraries get Python floats,
  which they cast to the array's dtype themselves (torch keeps them in
  float32 for a 16-bit array, as in its own arithmetic), so that no scalar
  becomes a host-to-device copy;
* a flag of `a if flag else b` is read on the host, and only its branch runs;
* `sign` is NumPy's (+0 for -0, NaN for NaN) and `maximum` / `minimum`
  propagate NaN, in every namespace.

State arrays are never written in place: each assigned one is a new array
bound to the rule's `State` (JAX arrays cannot be written), and one that
would share memory with the gradient, the parameter, another state or the
update is copied.
"""

from __future__ import annotations

import ast
import weakref
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from .._dispatch import copy, namespace
from ..kernel import Kernel

__all__ = ["apply_kernel", "kernel_source"]

_CALLS = {
    "sqrt": "xp.sqrt",
    "abs": "xp.abs",
    "sign": "sign",
    "maximum": "xp.maximum",
    "minimum": "xp.minimum",
}

Program = Callable[..., tuple[tuple[Any, ...], Any]]

_programs: weakref.WeakKeyDictionary[Kernel, Program] = weakref.WeakKeyDictionary()


def apply_kernel(kernel: Kernel, rule: Any, state: Any, x: Any, dx: Any) -> Any:
    """One step of `rule` on one parameter: advance the counter, compute the scalars, run the
    math, bind the new state arrays to `state`, and return the update."""
    xp = namespace(x)
    counter = kernel.counter
    if counter is not None:
        setattr(state, counter, getattr(state, counter) + 1)
    try:
        named = kernel.scalars(rule, state, x.dtype)
        values = [float(named[name]) for name in kernel.scalar_names]
    except BaseException:
        if counter is not None:  # as it was: nothing of this step happened
            setattr(state, counter, getattr(state, counter) - 1)
        raise
    old = [getattr(state, name) for name in kernel.state]
    program = _programs.get(kernel)
    if program is None:
        program = _programs[kernel] = _compile(kernel)
    new, update = program(xp, _sign_for(xp), _cast(values, x), values, dx, x, *old)
    # Identities, not values: an array the math did not compute (dx, x, a state as it was, or one
    # already bound to another state) must not become a state too.
    taken = {id(dx), id(x), *map(id, old)}
    for name, before, after in zip(kernel.state, old, new):
        if after is not before:
            if id(after) in taken:
                after = copy(xp, after)
            setattr(state, name, after)
        taken.add(id(after))
    if update is x or any(update is array for array in new) or any(update is array for array in old):
        update = copy(xp, update)  # a later rule of a chain may write into its input
    return update


def _cast(values: list[float], x: Any) -> tuple[Any, ...]:
    if type(x) is np.ndarray or array_api_compat.is_numpy_array(x) or array_api_compat.is_cupy_array(x):
        return tuple(np.array(values, dtype=x.dtype))
    return tuple(values)


def _sign_for(xp: Any) -> Callable[[Any], Any]:
    if (
        array_api_compat.is_numpy_namespace(xp)
        or array_api_compat.is_cupy_namespace(xp)
        or array_api_compat.is_array_api_strict_namespace(xp)
    ):
        return xp.sign  # type: ignore[no-any-return]

    def sign(a: Any) -> Any:
        # JAX's sign keeps -0; adding +0 makes it +0 and changes nothing else.
        return xp.where(xp.isnan(a), a, xp.sign(a) + 0.0)

    return sign


def kernel_source(kernel: Kernel) -> str:
    """The Python function that `apply_kernel` runs for `kernel`.

    Every name of the math is renamed (`v_` arrays and locals, `k_` scalars, `f_` flags), so
    that none can shadow `xp` or a function.
    """
    arrays = ("dx", "x", *kernel.state)
    flags = {
        node.test.id
        for statement in kernel.body
        for node in ast.walk(statement)
        if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Name)  # the parser named each test
    }
    renamer = _Renamer(set(kernel.scalar_names))
    lines = [f"def step(xp, sign, k, flags, {', '.join('v_' + name for name in arrays)}):"]
    if kernel.scalar_names:
        lines.append(f"    ({''.join('k_' + name + ', ' for name in kernel.scalar_names)}) = k")
    for position, name in enumerate(kernel.scalar_names):
        if name in flags:
            lines.append(f"    f_{name} = flags[{position}]")
    # A fresh tree (the kernel's own is shared with the other backends), renamed.
    *statements, result = ast.parse("\n".join(ast.unparse(node) for node in kernel.body)).body
    for statement in statements:
        lines.append("    " + ast.unparse(renamer.visit(statement)))
    assert isinstance(result, ast.Return) and result.value is not None
    update = ast.unparse(renamer.visit(result.value))
    states = "".join(f"v_{name}, " for name in kernel.state)
    lines.append(f"    return ({states}), {update}")
    return "\n".join(lines) + "\n"


def _compile(kernel: Kernel) -> Program:
    scope: dict[str, Any] = {}
    exec(compile(kernel_source(kernel), "<composeopt kernel>", "exec"), scope)
    program: Program = scope["step"]
    return program


class _Renamer(ast.NodeTransformer):
    def __init__(self, scalars: set[str]) -> None:
        self.scalars = scalars

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(("k_" if node.id in self.scalars else "v_") + node.id, node.ctx)

    def visit_Call(self, node: ast.Call) -> ast.Call:
        assert isinstance(node.func, ast.Name)
        node.args = [self.visit(argument) for argument in node.args]
        node.func = ast.parse(_CALLS[node.func.id], mode="eval").body
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.IfExp:
        assert isinstance(node.test, ast.Name)
        node.test = ast.Name("f_" + node.test.id, ast.Load())
        node.body = self.visit(node.body)
        node.orelse = self.visit(node.orelse)
        return node
