"""The CPU fallback without a compiler: each stage as blocked, in-place NumPy calls.

The same kernel math, compiled to a Python function of NumPy ufunc calls with
`out=` that updates one block of a few thousand elements: the block's
temporaries stay in the CPU cache, so main memory is read and written once
per stage, as with the numba loop, and nothing is allocated per step.  Each
operation writes into a spare temporary or straight into its destination
(a state array), never into the gradient or `x` before the end.
"""

from __future__ import annotations

import ast
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from .codegen import RuleNames, rule_names, scalar_count
from .kernel import Kernel
from .reduce import FINITE
from .threads import run_chunks

__all__ = ["BLOCK_BYTES", "stage_program", "run_stage", "powers"]

BLOCK_BYTES = 1 << 18
"""Bytes per array per block: the block's few temporaries and arrays stay in the L2 cache, and
each NumPy call has enough elements to hide its overhead (and to let the threads run outside
the GIL)."""

_UFUNCS = {ast.Add: "np.add", ast.Sub: "np.subtract", ast.Mult: "np.multiply", ast.Div: "np.divide"}
_CALLS = {
    "sqrt": "np.sqrt",
    "abs": "np.absolute",
    "sign": "np.sign",
    "maximum": "np.maximum",
    "minimum": "np.minimum",
}


@dataclass(frozen=True)
class Program:
    """A stage as a function over one block, and how many temporary blocks it needs."""

    function: Callable[..., None]
    temporaries: int
    source: str


class _Writer:
    """Three-address code for one stage, with temporaries allocated as registers."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.indent = 1
        self.free: list[str] = []
        self.count = 0
        self.bound: dict[str, str] = {}  # kernel name -> operand (a buffer or a scalar)
        self.scalars: set[str] = set()

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def temporary(self) -> str:
        if self.free:
            return self.free.pop()
        self.count += 1
        return f"t{self.count - 1}"

    def release(self, operand: str) -> None:
        """Give a temporary back once no name holds it."""
        if operand.startswith("t") and operand not in self.bound.values() and operand not in self.free:
            self.free.append(operand)

    def spare(self, operand: str) -> bool:
        return operand.startswith("t") and operand not in self.bound.values()

    def expression(self, node: ast.expr, names: RuleNames, target: str | None = None) -> str:
        """Emit `node`; its operand is `target` when given and written (else a buffer or scalar)."""
        if isinstance(node, ast.Name):
            return self.bound[names.local(node.id)]
        if isinstance(node, ast.IfExp):
            assert isinstance(node.test, ast.Name)
            out = target or self.temporary()
            self.emit(f"if {self.bound[names.local(node.test.id)]}:")
            self.indent += 1
            self.into(node.body, names, out)
            self.indent -= 1
            self.emit("else:")
            self.indent += 1
            self.into(node.orelse, names, out)
            self.indent -= 1
            return out
        if isinstance(node, ast.BinOp):
            operands = [self.expression(node.left, names), self.expression(node.right, names)]
            function = _UFUNCS[type(node.op)]
        elif isinstance(node, ast.UnaryOp):
            operands = [self.expression(node.operand, names)]
            function = "np.negative"
        else:
            assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            operands = [self.expression(argument, names) for argument in node.args]
            function = _CALLS[node.func.id]
        if all(operand in self.scalars for operand in operands):
            raise ValueError(f"scalar-only arithmetic belongs in the host function: {ast.unparse(node)}")
        out = (
            target or next((operand for operand in operands if self.spare(operand)), None) or self.temporary()
        )
        self.emit(f"{function}({', '.join(operands)}, out={out})")
        for operand in operands:
            if operand != out:
                self.release(operand)
        return out

    def into(self, node: ast.expr, names: RuleNames, target: str) -> None:
        operand = self.expression(node, names, target)
        if operand != target:
            self.emit(f"np.copyto({target}, {operand})")
            self.release(operand)

    def rule(self, names: RuleNames, incoming: str) -> str:
        """Emit one rule of the stage; returns the operand holding its update."""
        kernel = names.kernel
        self.bound[names.local("dx")] = incoming
        homes = {names.local(state): names.array(state) for state in kernel.state}
        for local, home in homes.items():
            self.bound[local] = home
        for statement in kernel.body[:-1]:
            assert isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
            name = names.local(statement.targets[0].id)
            destination = homes.get(name)
            # Write straight into the state array unless another name still holds its old value;
            # the old value stays bound (and its temporary unused) until the new one is made.
            others = [operand for bound_name, operand in self.bound.items() if bound_name != name]
            target = destination if destination is not None and destination not in others else None
            previous = self.bound.get(name)
            operand = self.expression(statement.value, names, target)
            self.bound[name] = operand
            if previous is not None and previous != operand:
                self.release(previous)
        result = kernel.body[-1]
        assert isinstance(result, ast.Return) and result.value is not None
        update = self.expression(result.value, names)
        self.bound["__update__"] = update
        for local, home in homes.items():
            if self.bound[local] != home:
                self.emit(f"np.copyto({home}, {self.bound[local]})")
        for name in [name for name in self.bound if name.startswith(f"r{names.index}_") or name == "d"]:
            operand = self.bound.pop(name)
            self.release(operand)
        del self.bound["__update__"]
        return update


def stage_source(kernels: tuple[Kernel, ...], scaled: bool, to_x: bool) -> tuple[str, int]:
    writer = _Writer()
    all_names = list(rule_names(kernels))
    for names in all_names:
        for scalar in names.kernel.scalar_names:
            writer.bound[names.local(scalar)] = names.local(scalar)
            writer.scalars.add(names.local(scalar))
    writer.bound["xv"] = "x"
    if scaled:
        update = writer.temporary()
        writer.emit(f"np.multiply(g, k[{scalar_count(kernels)}], out={update})")
    else:
        update = "g"
    for names in all_names:
        writer.bound["__update__"] = update
        update = writer.rule(names, update)
    if to_x:
        writer.emit(f"np.subtract(x, {update}, out=x)")
    else:
        writer.emit(f"np.copyto(out, {update})")
    arrays = [names.array(state) for names in all_names for state in names.kernel.state]
    header = [f"def block(g, x, out, k, t{''.join(', ' + array for array in arrays)}):"]
    for names in all_names:
        for position, scalar in enumerate(names.kernel.scalar_names):
            header.append(f"    {names.local(scalar)} = k[{names.scalar_offset + position}]")
    for number in range(writer.count):
        header.append(f"    t{number} = t[{number}]")
    return "\n".join(header + writer.lines) + "\n", writer.count


@cache
def stage_program(kernels: tuple[Kernel, ...], scaled: bool, to_x: bool) -> Program:
    source, temporaries = stage_source(kernels, scaled, to_x)
    namespace: dict[str, Any] = {"np": np}
    exec(compile(source, "<composeopt blocked stage>", "exec"), namespace)
    return Program(namespace["block"], temporaries, source)


_local = threading.local()


def _temporaries(count: int, dtype: Any) -> list[Any]:
    """This thread's temporary blocks (made once per thread and dtype)."""
    pool: dict[Any, list[Any]] = _local.__dict__.setdefault("pool", {})
    blocks = pool.setdefault((np.dtype(dtype), _block(dtype)), [])
    while len(blocks) < count:
        blocks.append(np.empty(_block(dtype), dtype=dtype))
    return blocks


def _block(dtype: Any) -> int:
    return max(1, BLOCK_BYTES // int(np.dtype(dtype).itemsize))


def run_stage(program: Program, jobs: Sequence[tuple[Any, ...]]) -> None:
    """The program over every job `(g, x, out, k, *state)`, block by block."""
    scalars = [tuple(job[3]) for job in jobs]  # NumPy scalars of the arrays' dtype

    def work(index: int, lo: int, hi: int) -> None:
        g, x, out, _, *states = jobs[index]
        blocks = _temporaries(program.temporaries, x.dtype)
        k = scalars[index]
        step = _block(x.dtype)
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            size = stop - start
            program.function(
                g[start:stop],
                x[start:stop],
                out[start:stop],
                k,
                [block[:size] for block in blocks[: program.temporaries]],
                *[state[start:stop] for state in states],
            )

    run_chunks(work, [len(job[0]) for job in jobs])


def powers(sources: Sequence[Any], p: float | str) -> list[float]:
    """`sum |a|^p` (`max |a|` for `p = inf`, the finite flag for `FINITE`) of each array,
    summed in float64."""

    def work(index: int, lo: int, hi: int) -> float:
        a = sources[index]
        block = _temporaries(1, a.dtype)[0]
        step = _block(a.dtype)
        total = 0.0
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            if p == FINITE:
                part = np.multiply(a[start:stop], 0, out=block[: stop - start])
                total += float(np.sum(part, dtype=np.float64))
                continue
            part = np.absolute(a[start:stop], out=block[: stop - start])
            if p == math.inf:
                largest = float(np.max(part)) if part.size else 0.0  # NaN if any is NaN
                total = math.nan if math.isnan(largest) or math.isnan(total) else max(total, largest)
            else:
                if p == 2:
                    np.multiply(part, part, out=part)
                elif p != 1:
                    np.power(part, p, out=part)
                total += float(np.sum(part, dtype=np.float64))
        return total

    chunks = run_chunks(work, [len(source) for source in sources])
    if p == math.inf:
        return [math.nan if any(v != v for v in parts) else max(parts, default=0.0) for parts in chunks]
    return [float(sum(parts)) for parts in chunks]
