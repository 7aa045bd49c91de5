"""Naming shared by the code generators: a stage's rules pasted into one loop body.

Each rule `j` of a stage gets its own names (`r{j}_mu` for its locals and
state values, `k{j}_eta` for its scalars); `d` carries the update from one
rule to the next and `xv` is the parameter's element.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator
from dataclasses import dataclass

from .kernel import Kernel

__all__ = ["RuleNames", "rule_names", "renamed"]


@dataclass(frozen=True)
class RuleNames:
    """The generated names of one rule of a stage."""

    index: int
    kernel: Kernel
    scalar_offset: int  # where its scalars start in the stage's scalar vector

    def local(self, name: str) -> str:
        if name == "dx":
            return "d"
        if name == "x":
            return "xv"
        if name in self.kernel.scalar_names:
            return f"k{self.index}_{name}"
        return f"r{self.index}_{name}"

    def array(self, name: str) -> str:
        """The argument holding state array `name`."""
        return f"s{self.index}_{name}"


def rule_names(kernels: tuple[Kernel, ...]) -> Iterator[RuleNames]:
    offset = 0
    for index, kernel in enumerate(kernels):
        yield RuleNames(index, kernel, offset)
        offset += len(kernel.scalar_names)


def scalar_count(kernels: tuple[Kernel, ...]) -> int:
    return sum(len(kernel.scalar_names) for kernel in kernels)


class _Renamer(ast.NodeTransformer):
    def __init__(self, names: RuleNames) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(self.names.local(node.id), node.ctx), node)

    def visit_Call(self, node: ast.Call) -> ast.Call:
        node.args = [self.visit(arg) for arg in node.args]  # the function's own name stays
        return node


def renamed(node: ast.AST, names: RuleNames) -> ast.AST:
    """A copy of `node` with the rule's names replaced by their generated names."""
    result: ast.AST = _Renamer(names).visit(copy.deepcopy(node))
    return result
