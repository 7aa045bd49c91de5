"""The GPU fast path: each stage of a chain as one `cupy.ElementwiseKernel`.

The kernel math is printed as CUDA C: one launch per stage and array reads
the gradient, `x` and the state once and writes them once, generic over the
dtype `T` (float32 or float64), built lazily and cached (CuPy also caches the
compiled binary on disk).  A clip's norm stays a 0-d device array that the next
stage reads, so a step never waits for the GPU.  For many small arrays, keep the
parameters as views of one buffer (`flatten`) and update the
buffer: one launch per stage for all of them.

The project's CI has no GPU: there, tests/test_fused_cuda_source.py compiles
each generated body as C++ on the CPU and compares it with the NumPy program
of the same stage; tests/test_fused.py checks the whole path against the
generic one wherever CuPy and a GPU are present.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import cupy

from .codegen import RuleNames, renamed, rule_names
from .kernel import Kernel
from .reduce import FINITE, Measure

__all__ = ["CupyBackend", "stage_kernel", "cuda_expression"]

_PREAMBLE = """
template <typename T> __device__ T co_maximum(T a, T b) { return (a > b || a != a) ? a : b; }
template <typename T> __device__ T co_minimum(T a, T b) { return (a < b || a != a) ? a : b; }
template <typename T> __device__ T co_sign(T a) {
    return a > T(0) ? T(1) : (a < T(0) ? T(-1) : (a == T(0) ? T(0) : a));
}
"""
_CALLS = {
    "sqrt": "sqrt",
    "abs": "fabs",
    "sign": "co_sign",
    "maximum": "co_maximum",
    "minimum": "co_minimum",
}
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def cuda_expression(node: ast.expr) -> str:
    """A (renamed) kernel expression as C."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.BinOp):
        return f"({cuda_expression(node.left)} {_OPERATORS[type(node.op)]} {cuda_expression(node.right)})"
    if isinstance(node, ast.UnaryOp):
        return f"(-{cuda_expression(node.operand)})"
    if isinstance(node, ast.IfExp):
        test, body, orelse = (cuda_expression(part) for part in (node.test, node.body, node.orelse))
        return f"(({test} != T(0)) ? {body} : {orelse})"
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return f"{_CALLS[node.func.id]}({', '.join(cuda_expression(argument) for argument in node.args)})"


def _statements(names: RuleNames) -> list[str]:
    lines = [f"T {names.local(state)} = {names.array(state)};" for state in names.kernel.state]
    declared = {names.local(state) for state in names.kernel.state}
    for statement in names.kernel.body[:-1]:
        assert isinstance(statement, ast.Assign)
        target = names.local(statement.targets[0].id)  # type: ignore[attr-defined]
        value = renamed(statement.value, names)
        assert isinstance(value, ast.expr)
        lines.append(f"{'' if target in declared else 'T '}{target} = {cuda_expression(value)};")
        declared.add(target)
    result = names.kernel.body[-1]
    assert isinstance(result, ast.Return) and result.value is not None
    value = renamed(result.value, names)
    assert isinstance(value, ast.expr)
    lines.append(f"d = {cuda_expression(value)};")
    lines.extend(f"{names.array(state)} = {names.local(state)};" for state in names.kernel.state)
    return lines


@cache
def stage_kernel(kernels: tuple[Kernel, ...], scaled: bool, to_x: bool) -> Any:
    """The stage's `ElementwiseKernel`: in `g, [scale], scalars...`; out `x, [out], state...`."""
    all_names = list(rule_names(kernels))
    scalars = [names.local(s) for names in all_names for s in names.kernel.scalar_names]
    arrays = [names.array(s) for names in all_names for s in names.kernel.state]
    inputs = ["T g", *(["T scale"] if scaled else []), *(f"T {scalar}" for scalar in scalars)]
    outputs = ["T x", *([] if to_x else ["T out"]), *(f"T {array}" for array in arrays)]
    body = ["T d = g * scale;" if scaled else "T d = g;", "const T xv = x;"]
    for names in all_names:
        body.extend(_statements(names))
    body.append("x = xv - d;" if to_x else "out = d;")
    return cupy.ElementwiseKernel(
        ", ".join(inputs),
        ", ".join(outputs),
        "\n".join(body),
        f"composeopt_stage_{abs(hash((tuple(id(k) for k in kernels), scaled, to_x)))}",
        preamble=_PREAMBLE,
    )


class CupyBackend:
    name = "cupy"

    def accepts(self, x: Any) -> bool:
        return x.dtype in (cupy.float32, cupy.float64) and x.flags.c_contiguous

    def flat(self, a: Any) -> Any:
        return a.reshape(-1)

    def gradient(self, x: Any, dx: Any) -> Any:
        if not (dx.flags.c_contiguous and dx.dtype == x.dtype):
            dx = cupy.array(dx, dtype=x.dtype, order="C")
        return dx.reshape(-1)

    def state_array(self, a: Any, x: Any) -> Any:
        if (
            isinstance(a, cupy.ndarray)
            and a.dtype == x.dtype
            and a.shape == x.shape
            and a.flags.c_contiguous
            and a.device == x.device
        ):
            return a.reshape(-1)
        return None

    def scratch(self, x: Any) -> Any:
        return cupy.empty(x.size, dtype=x.dtype)

    def vector(self, values: list[float], scale: Any, dtype: Any) -> Any:
        """The scalars as NumPy scalars of the dtype (CuPy passes them by value), then the scale."""
        cast = cupy.dtype(dtype).type
        return ([cast(value) for value in values], scale)

    def run_stage(
        self,
        kernels: tuple[Kernel, ...],
        scaled: bool,
        to_x: bool,
        jobs: list[Any],
        measures: Sequence[Measure] = (),
    ) -> list[list[float]]:
        kernel = stage_kernel(kernels, scaled, to_x)
        for g, x, out, (scalars, scale), *states in jobs:
            inputs = [g, *([scale] if scaled else []), *scalars]
            outputs = [x, *([] if to_x else [out]), *states]
            kernel(*inputs, *outputs)
        columns = [self.measure([job[2] if m.of == "d" else job[1] for job in jobs], m.p) for m in measures]
        return [list(row) for row in zip(*columns)] if columns else [[] for _ in jobs]

    def measure(self, arrays: Sequence[Any], p: float | str) -> list[float]:
        """Each array's measure on the device, stacked and read by the host once."""
        if not arrays:
            return []
        if p == FINITE:
            parts = [cupy.sum(a.astype(cupy.float64) * 0.0) for a in arrays]
        elif p == math.inf:
            parts = [
                cupy.max(cupy.abs(a)).astype(cupy.float64) if a.size else cupy.zeros((), cupy.float64)
                for a in arrays
            ]
        else:
            parts = [cupy.sum(cupy.abs(a.astype(cupy.float64)) ** float(p)) for a in arrays]
        return [float(value) for value in cupy.stack(parts).get()]
