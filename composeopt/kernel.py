"""The kernel language: a rule's elementwise math, written once for every path.

A rule that works element by element declares its math as a class attribute
`kernel = Kernel(...)`: a few lines of arithmetic on one element of the
gradient, and the scalars they need.  From those lines the rule gets its
generic `apply_` (the whole-array code that runs on NumPy, CuPy, PyTorch,
JAX and any array-API array) and its fast paths (a numba loop on the CPU,
blocked NumPy `out=` calls without a compiler, a CuPy `ElementwiseKernel` on
the GPU).  On the fast paths the kernels of consecutive rules of a chain are
pasted into one loop, so a chain costs one pass over memory.

```python
class SoftClip(co.Rule):
    limit = co.Hyper(1.0)
    kernel = Kernel("return dx / (1 + abs(dx) / limit)")
```

The language is a small subset of Python, on purpose:

* **Names.** `dx` is the gradient as it reaches the rule and `x` the
  parameter (read-only).  The names in `state` are the rule's state arrays
  (attributes of its [State][composeopt.State]): read, and assigned by
  plain assignment.  A name assigned in the math is a local.  Every other
  name is a *scalar*, one number per step, which the `scalars` function
  gives (by default, the rule's attribute of that name: its hyperparameter).
* **Statements.** `name = expression` (also `+=`, `-=`, `*=`, `/=`, which
  mean `name = name + ...`), and last `return expression`: the update that
  leaves the rule, which the engine subtracts from `x`.
* **Expressions.** `+ - * /`, unary `-`, numbers (`2`, `0.5`, `1e-3`),
  and the functions `sqrt`, `abs`, `sign` (-1, 0 or +1, +0 for -0, NaN for
  NaN, as NumPy's), `maximum` and `minimum` (NaN if either argument is NaN,
  as NumPy's).  `a if flag else b` takes `a` where the scalar `flag` is
  nonzero, else `b`; only the branch taken is computed.

**Arithmetic and dtypes.**  Every operation that involves an array is done
element by element in the array's dtype, in the order written, without
reassociation or fused multiply-adds; scalars are cast to the array's dtype
first.  Arithmetic on scalars and numbers alone (`1 - b1`, `2 * l2`,
`-limit`) is done once per step on the host, in double precision, and only
its result is cast.  That is how NumPy evaluates the same line written with
Python floats, `(1 - b1) * dx`, so a kernel equals a rule's NumPy code to
the last bit, on every path.  What the language cannot say (powers such as
Adam's bias corrections `1 / (1 - b1**t)`, flags computed from the step) the
`scalars` function computes.

A mistake in the math raises [KernelError][composeopt.kernel.KernelError]
when the rule's class is defined, naming the problem.

Examples:
    >>> import numpy as np, composeopt as co
    >>> from composeopt.kernel import Kernel
    >>> class SoftClip(co.Rule):
    ...     limit = co.Hyper(1.0)
    ...     kernel = Kernel("return dx / (1 + abs(dx) / limit)")
    >>> x = np.zeros(2)
    >>> _ = co.update_(SoftClip(), x, np.array([1.0, -3.0]))
    >>> print(x)
    [-0.5   0.75]

    A number in the math becomes a scalar of its own (here `lit0`), cast to the
    array's dtype as every scalar is:

    >>> kernel = Kernel("return 2 * dx")
    >>> kernel.scalar_names, kernel.scalars(None, None, np.float32)
    (('lit0',), {'lit0': 2.0})
"""

from __future__ import annotations

import ast
import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ComposeoptError

__all__ = ["Kernel", "KernelError", "FUNCTIONS"]

FUNCTIONS = {"sqrt": 1, "abs": 1, "sign": 1, "maximum": 2, "minimum": 2}
"""The functions kernel math may call, with their number of arguments."""

_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div)

Scalars = Callable[[Any, Any, Any], Mapping[str, float]]
"""`scalars(rule, state, dtype) -> {name: number}`."""


class KernelError(ComposeoptError, ValueError):
    """Kernel math outside the language (a bug in a rule, raised where the rule's class is defined).

    The message names what is wrong: `unsupported call 'exp(dx)'`,
    `kernel math may not assign 'dx'`, `kernel math must end with 'return <update>'`.
    """


def rule_attributes(rule: Any, state: Any, dtype: Any) -> Mapping[str, float]:
    """The default `scalars` of a [Kernel][composeopt.kernel.Kernel]: each scalar is the rule's
    attribute of the same name (a [Kernel][composeopt.kernel.Kernel] replaces it by the names its
    math reads)."""
    raise TypeError("rule_attributes stands for the names of a kernel's math; call the kernel's scalars")


@dataclass(frozen=True, eq=False)
class Kernel:
    """The elementwise math of a rule (see [composeopt.kernel][composeopt.kernel] for the language).

    Args:
        math: the per-element statements, ending in `return <update>`.
        scalars: `scalars(rule, state, dtype) -> {name: number}`, called once
            per step with the rule as it is after `begin_step`, its state
            after `counter` was advanced, and the parameter's dtype (for
            float16's floor on epsilon, `composeopt._dispatch.eps_for`); it
            returns every scalar name that `math` reads.  Without it, each
            scalar is the rule's attribute of the same name.
        state: the names of the state arrays that `math` reads and assigns.
            A rule that writes no `init` of its own starts each at zeros
            shaped like `x`.
        counter: the name of an integer state attribute (Adam's `t`) that
            each step adds 1 to before `scalars` is called; it starts at 0.

    Attributes:
        scalar_names: the scalars the compiled math reads, each once: the
            names that `scalars` gives and that it reads where an array is
            involved, and `lit0`, `lit1`, ... (its numbers) and `fold0`,
            `fold1`, ... (its arithmetic on scalars alone), none of which
            clash with a name of the math.  `scalars`, as stored here,
            returns them all.
        reads_x: whether the math reads the parameter.
    """

    math: str
    scalars: Scalars = rule_attributes
    state: tuple[str, ...] = ()
    counter: str | None = None
    body: tuple[ast.stmt, ...] = field(init=False, repr=False)
    scalar_names: tuple[str, ...] = field(init=False, repr=False)
    reads_x: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.math, str):
            raise KernelError(f"kernel math must be a string, got {self.math!r}")
        state = (self.state,) if isinstance(self.state, str) else tuple(self.state)
        _check_names(state, self.counter)
        parsed = _Parser(state).parse(self.math)
        if not callable(self.scalars):
            raise KernelError(
                f"scalars must be a function (rule, state, dtype) -> mapping, got {self.scalars!r}"
            )
        given = None if self.scalars is rule_attributes else self.scalars
        object.__setattr__(self, "state", state)
        if given is None or parsed.derived:
            object.__setattr__(self, "scalars", StepScalars(given, parsed.host_names, parsed.derived))
        object.__setattr__(self, "body", parsed.body)
        object.__setattr__(self, "scalar_names", parsed.scalar_names)
        object.__setattr__(self, "reads_x", parsed.reads_x)


@dataclass(frozen=True)
class StepScalars:
    """A kernel's `scalars`: the rule's own values, then those of its numbers and folded arithmetic."""

    given: Scalars | None
    host_names: tuple[str, ...]
    derived: tuple[tuple[str, ast.expr], ...]

    def __repr__(self) -> str:
        given = (
            "rule_attributes" if self.given is None else getattr(self.given, "__qualname__", repr(self.given))
        )
        derived = ", ".join(f"{name}={ast.unparse(expression)}" for name, expression in self.derived)
        return f"StepScalars({given}{', ' if derived else ''}{derived})"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(name for name, _ in self.derived))
        object.__setattr__(self, "_compute", _host_arithmetic(self.derived))

    def __call__(self, rule: Any, state: Any, dtype: Any) -> Mapping[str, float]:
        if self.given is None:
            values: dict[str, Any] = {name: getattr(rule, name) for name in self.host_names}
        elif not self.derived:
            return self.given(rule, state, dtype)
        else:
            values = dict(self.given(rule, state, dtype))
        values.update(zip(self._names, self._compute(values)))  # type: ignore[attr-defined]
        return values


def _check_names(state: tuple[str, ...], counter: str | None) -> None:
    for name in state:
        if not (isinstance(name, str) and name.isidentifier()) or name in ("dx", "x"):
            raise KernelError(f"state names must be identifiers other than 'dx' and 'x', got {name!r}")
    if len(set(state)) != len(state):
        raise KernelError(f"state names repeat: {state!r}")
    if counter is not None and not (isinstance(counter, str) and counter.isidentifier()):
        raise KernelError(f"counter must be an identifier, got {counter!r}")
    if counter in (*state, "dx", "x"):
        raise KernelError(f"counter {counter!r} is also the name of an array")


@dataclass(frozen=True)
class _Parsed:
    body: tuple[ast.stmt, ...]
    scalar_names: tuple[str, ...]
    host_names: tuple[str, ...]
    derived: tuple[tuple[str, ast.expr], ...]
    reads_x: bool


class _Parser:
    """Checks the math and rewrites it so that every backend sees arrays and named scalars only.

    Each maximal piece of arithmetic on scalars and numbers alone becomes one generated scalar
    (`lit0` for a bare number, `fold0` for anything else), evaluated on the host; a local
    assigned such a piece stands for it where it is read.
    """

    def __init__(self, state: tuple[str, ...]) -> None:
        self.arrays = {"dx", "x", *state}
        self.state = set(state)
        self.locals: set[str] = set()  # locals that hold arrays
        self.scalar_locals: dict[str, ast.expr] = {}  # locals that hold host arithmetic
        self.host_names: list[str] = []  # the scalars the rule gives
        self.derived: dict[str, tuple[str, ast.expr]] = {}  # ast.dump -> (generated name, expression)
        self.used: set[str] = set()

    def parse(self, math_text: str) -> _Parsed:
        try:
            tree = ast.parse(textwrap.dedent(math_text))
        except SyntaxError as err:
            raise KernelError(f"kernel math is not Python: {err.msg} (line {err.lineno})") from None
        self.used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        statements = list(tree.body)
        if not statements or not isinstance(statements[-1], ast.Return) or statements[-1].value is None:
            raise KernelError("kernel math must end with 'return <update>'")
        body: list[ast.stmt] = []
        for statement in statements[:-1]:
            assigned = self.statement(statement)
            if assigned is not None:
                body.append(assigned)
        result = statements[-1]
        assert isinstance(result, ast.Return) and result.value is not None
        value, is_array = self.expression(result.value)
        if not is_array:
            raise KernelError(f"the update {ast.unparse(result.value)!r} reads no array (dx, x or a state)")
        body.append(ast.copy_location(ast.Return(value), result))
        final = tuple(ast.fix_missing_locations(node) for node in body)
        assigned_names = {
            node.targets[0].id
            for node in final
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        }
        read = [name for statement in final for name in _names_read(statement)]
        scalar_names = tuple(
            dict.fromkeys(name for name in read if name not in self.arrays and name not in assigned_names)
        )
        return _Parsed(
            body=final,
            scalar_names=scalar_names,
            host_names=tuple(self.host_names),
            derived=tuple(self.derived.values()),
            reads_x="x" in read,
        )

    def statement(self, statement: ast.stmt) -> ast.stmt | None:
        """The rewritten statement, or `None` for a local that holds host arithmetic."""
        if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
            if not isinstance(statement.op, _OPERATORS):
                raise KernelError(f"unsupported statement {ast.unparse(statement)!r}")
            value: ast.expr = ast.BinOp(
                ast.Name(statement.target.id, ast.Load()), statement.op, statement.value
            )
            target = statement.target.id
        elif (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            value, target = statement.value, statement.targets[0].id
        else:
            raise KernelError(f"unsupported statement {ast.unparse(statement)!r}")
        rewritten, is_array = self.expression(value)
        if target in ("dx", "x") or target in self.host_names:
            raise KernelError(f"kernel math may not assign {target!r}")
        if not is_array:
            if target in self.state:
                raise KernelError(
                    f"state {target!r} must be assigned an array expression, got {ast.unparse(value)!r}"
                )
            self.scalar_locals[target] = rewritten
            self.locals.discard(target)
            return None
        self.scalar_locals.pop(target, None)
        if target not in self.state:
            self.locals.add(target)
        return ast.copy_location(ast.Assign([ast.Name(target, ast.Store())], rewritten), statement)

    def expression(self, node: ast.expr) -> tuple[ast.expr, bool]:
        """`node` rewritten, and whether it is an array (else arithmetic for the host)."""
        if isinstance(node, ast.Name):
            name = node.id
            if name in self.arrays or name in self.locals:
                return ast.Name(name, ast.Load()), True
            if name in self.scalar_locals:
                return self.scalar_locals[name], False
            if name not in self.host_names:
                self.host_names.append(name)
            return ast.Name(name, ast.Load()), False
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise KernelError(f"literal {node.value!r} is not a real number")
            try:
                return ast.Constant(float(node.value)), False
            except OverflowError:
                raise KernelError(f"literal {node.value!r} is too large for a float") from None
        if isinstance(node, ast.BinOp) and isinstance(node.op, _OPERATORS):
            return self.combine(node, [node.left, node.right], lambda a: ast.BinOp(a[0], node.op, a[1]))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self.combine(node, [node.operand], lambda a: ast.UnaryOp(ast.USub(), a[0]))
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else ""
            if node.keywords or FUNCTIONS.get(name) != len(node.args):
                raise KernelError(
                    f"unsupported call {ast.unparse(node)!r}: the functions are "
                    + ", ".join(
                        f"{function}({', '.join('ab'[:count])})" for function, count in FUNCTIONS.items()
                    )
                )
            return self.combine(node, list(node.args), lambda a: ast.Call(ast.Name(name, ast.Load()), a, []))
        if isinstance(node, ast.IfExp):
            test, test_is_array = self.expression(node.test)
            if test_is_array:
                raise KernelError(f"condition {ast.unparse(node.test)!r} must be a scalar")
            (body, body_is_array), (orelse, orelse_is_array) = (
                self.expression(node.body),
                self.expression(node.orelse),
            )
            if not (body_is_array or orelse_is_array):
                return ast.IfExp(test, body, orelse), False
            return (
                ast.IfExp(
                    self.named(test),
                    body if body_is_array else self.named(body),
                    orelse if orelse_is_array else self.named(orelse),
                ),
                True,
            )
        raise KernelError(f"unsupported expression {ast.unparse(node)!r}")

    def combine(
        self, node: ast.expr, operands: list[ast.expr], make: Callable[[list[ast.expr]], ast.expr]
    ) -> tuple[ast.expr, bool]:
        parts = [self.expression(operand) for operand in operands]
        if not any(is_array for _, is_array in parts):
            return ast.copy_location(make([part for part, _ in parts]), node), False
        return ast.copy_location(
            make([self.named(part) if not is_array else part for part, is_array in parts]), node
        ), True

    def named(self, node: ast.expr) -> ast.expr:
        """A scalar as backends read it: a name (of the rule's, or generated for host arithmetic)."""
        if isinstance(node, ast.Name) and node.id in self.host_names:
            return node
        if isinstance(node, ast.Name) and (node.id in self.arrays or node.id in self.locals):
            return node
        key = ast.dump(node)
        if key not in self.derived:
            prefix = "lit" if isinstance(node, ast.Constant) else "fold"
            number = sum(1 for name, _ in self.derived.values() if name.startswith(prefix))
            while f"{prefix}{number}" in self.used:
                number += 1
            self.used.add(f"{prefix}{number}")
            self.derived[key] = (f"{prefix}{number}", node)
        return ast.Name(self.derived[key][0], ast.Load())


def _names_read(node: ast.AST) -> list[str]:
    """The names `node` reads, in order, leaving out the functions it calls."""
    functions = {id(call.func) for call in ast.walk(node) if isinstance(call, ast.Call)}
    return [
        child.id
        for child in ast.walk(node)
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and id(child) not in functions
    ]


def _divide(a: float, b: float) -> float:
    """`a / b` as IEEE arithmetic (NumPy's) has it, where Python raises for `b == 0`."""
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _sqrt(a: float) -> float:
    return math.nan if a < 0 else math.sqrt(a)


def _sign(a: float) -> float:
    return a if a != a else (1.0 if a > 0 else -1.0 if a < 0 else 0.0)


def _maximum(a: float, b: float) -> float:
    return a if (a > b or a != a) else b


def _minimum(a: float, b: float) -> float:
    return a if (a < b or a != a) else b


_HOST_CALLS = {"sqrt": "_sqrt", "abs": "abs", "sign": "_sign", "maximum": "_maximum", "minimum": "_minimum"}


class _HostNames(ast.NodeTransformer):
    """Kernel arithmetic on scalars as Python code: `b1` reads `float(values['b1'])`, `a / b`
    and the functions have IEEE results (NaN, infinities) where Python's would raise."""

    def visit_Name(self, node: ast.Name) -> ast.expr:
        read = ast.Subscript(ast.Name("values", ast.Load()), ast.Constant(node.id), ast.Load())
        return ast.Call(ast.Name("float", ast.Load()), [read], [])

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return ast.Call(ast.Name("_divide", ast.Load()), [node.left, node.right], [])
        return node

    def visit_Call(self, node: ast.Call) -> ast.expr:
        assert isinstance(node.func, ast.Name)
        arguments = [self.visit(argument) for argument in node.args]
        return ast.Call(ast.Name(_HOST_CALLS[node.func.id], ast.Load()), arguments, [])


def _host_arithmetic(
    derived: tuple[tuple[str, ast.expr], ...],
) -> Callable[[Mapping[str, Any]], tuple[float, ...]]:
    """One compiled function that computes every generated scalar from the rule's scalars, in
    double precision as Python (and NumPy) do it."""
    parts = [
        ast.unparse(_HostNames().visit(ast.parse(ast.unparse(node), mode="eval").body)) for _, node in derived
    ]
    source = f"lambda values: ({''.join(part + ', ' for part in parts)})"
    scope = {"_divide": _divide, "_sqrt": _sqrt, "_sign": _sign, "_maximum": _maximum, "_minimum": _minimum}
    function: Callable[[Mapping[str, Any]], tuple[float, ...]] = eval(
        compile(source, "<kernel scalars>", "eval"), scope
    )
    return function
