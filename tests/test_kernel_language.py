"""The public kernel language: literals, user rules that fuse, parser errors, the generic interpreter.

A rule declared with `kernel = Kernel(...)` gets its generic `apply_` from the
interpreter in ``composeopt._fused.xp_backend`` and its fast paths from the
numba / blocked NumPy / CuPy backends.  These tests check the language's
promises against hand-computed values, the fused paths against the generic
one (``composeopt._fused.MODE = "off"``), and the interpreter on other array
modules against NumPy's.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt._fused import numpy_backend, xp_backend
from composeopt._fused.plan import make_plan
from composeopt.errors import UnknownHyperparameterError
from composeopt.kernel import Kernel, KernelError
from composeopt.registry import CASES

HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(params=["numba", "numpy"])
def mode(request, monkeypatch):
    """The fused CPU backend a test runs on: numba, or the blocked NumPy fallback."""
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_fused, "MODE", "auto" if request.param == "numba" else "numpy")
    return request.param


@pytest.fixture
def taken(monkeypatch):
    """The results of every fused step_ call: True where the fast path did the step."""
    results = []
    original = _fused.step_

    def spy(*args):
        results.append(original(*args))
        return results[-1]

    monkeypatch.setattr(_fused, "step_", spy)
    return results


def generic(monkeypatch):
    monkeypatch.setattr(_fused, "MODE", "off")


class SoftClip(co.Rule):
    """`dx / (1 + |dx| / limit)`: close to dx for small gradients, never beyond `limit`."""

    limit = co.Hyper(1.0)
    kernel = Kernel("return dx / (1 + abs(dx) / limit)")


class Signum(co.Rule):
    """Sign descent with momentum, its state and step counter declared by the kernel."""

    eta = co.Hyper(0.01)
    beta = co.Hyper(0.9)
    kernel = Kernel(
        """
        m = beta * m + (1 - beta) * dx
        return eta * sign(m)
        """,
        state=("m",),
    )


class Scale(co.Rule):
    """`dx` times a literal: the rule of the literal tests."""

    kernel = Kernel("return dx * 0.1")


class Keep(co.Rule):
    """`(1 - b1) * dx`: arithmetic on scalars alone, done on the host in double precision."""

    b1 = co.Hyper(0.9)
    kernel = Kernel("return (1 - b1) * dx")


# --- literals -----------------------------------------------------------------------


def test_a_literal_becomes_a_named_scalar_with_its_value():
    kernel = Kernel("return 2 * dx - 0.5 * x")
    assert kernel.scalar_names == ("lit0", "lit1")
    assert kernel.scalars(None, None, np.float32) == {"lit0": 2.0, "lit1": 0.5}
    assert kernel.reads_x


def test_equal_literals_share_one_name_and_generated_names_avoid_the_rules_names():
    kernel = Kernel("a = lit0 * dx + 1\nreturn a * 1.0", lambda rule, state, dtype: {"lit0": 3.0})
    assert sorted(kernel.scalar_names) == ["lit0", "lit1"]
    assert kernel.scalars(None, None, np.float64) == {"lit0": 3.0, "lit1": 1.0}


@pytest.mark.parametrize("path", ["generic", "numba", "numpy"])
def test_a_literal_is_cast_to_float32(path, monkeypatch):
    if path == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_fused, "MODE", {"generic": "off", "numba": "auto", "numpy": "numpy"}[path])
    x = np.ones(3, dtype=np.float32)
    co.update_(Scale(), x, np.array([1.0, 3.0, 7.0], dtype=np.float32))
    assert x.dtype == np.float32
    # float32(0.1) = 0.100000001490116...; 1 - 3 * float32(0.1) rounds to 0.69999999 in float32.
    expected = np.float32(1) - np.array([1.0, 3.0, 7.0], dtype=np.float32) * np.float32(0.1)
    np.testing.assert_array_equal(x, expected)
    assert float(x[0]) == 0.8999999761581421  # the float32 nearest 0.9


@pytest.mark.parametrize("path", ["generic", "numba", "numpy"])
def test_arithmetic_on_scalars_alone_is_done_in_double_precision(path, monkeypatch):
    if path == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_fused, "MODE", {"generic": "off", "numba": "auto", "numpy": "numpy"}[path])
    x = np.zeros(1, dtype=np.float32)
    co.update_(Keep(0.9), x, np.ones(1, dtype=np.float32))
    # 1 - 0.9 in float64 is 0.09999999999999998, whose float32 is 0.1 (0.100000001...);
    # the same subtraction in float32 would give 1 - float32(0.9) = 0.10000002384.
    assert float(-x[0]) == float(np.float32(0.1))
    assert float(np.float32(1) - np.float32(0.9)) != float(np.float32(0.1))


def test_the_backends_see_only_named_scalars():
    kernel = Kernel("return dx * 2.5")
    source, _ = numpy_backend.stage_source((kernel,), False, True)
    assert "k0_lit0" in source and "2.5" not in source
    if HAS_NUMBA:
        from composeopt._fused import numba_backend

        source = numba_backend.stage_source((kernel,), False, True)
        assert "k0_lit0" in source and "2.5" not in source


def test_the_cupy_kernel_takes_literals_as_parameters(monkeypatch):
    class Captured:
        def __init__(self, in_params, out_params, operation, name, preamble=""):
            self.in_params, self.operation = in_params, operation

    fake = types.ModuleType("cupy")
    fake.ElementwiseKernel = Captured
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "composeopt._fused.cupy_backend", raising=False)
    try:
        module = importlib.import_module("composeopt._fused.cupy_backend")
        captured = module.stage_kernel((Kernel("return dx * 2.5"),), False, True)
    finally:
        sys.modules.pop("composeopt._fused.cupy_backend", None)
    assert "T k0_lit0" in captured.in_params and "2.5" not in captured.operation


# --- a user's rule fuses with Adam --------------------------------------------------


def reference_soft_clip_adam(x, grads, limit, eta, b1, b2, eps):
    """SoftClip then Adam, in float64 NumPy, written out from the formulas."""
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        d = g / (1 + np.abs(g) / limit)
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x = x - eta * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


def soft_clip_adam_steps(dtype):
    rng = np.random.default_rng(3)
    params = {"W": rng.uniform(-1, 1, (4, 5)).astype(dtype), "b": rng.uniform(-1, 1, 7).astype(dtype)}
    grads = [
        {k: (5 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()} for _ in range(6)
    ]
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_user_kernel_rule_chained_with_adam_fuses_and_equals_the_generic_path(
    mode, taken, dtype, monkeypatch
):
    def make():
        return co.Optimiser(SoftClip(0.5), co.Adam(0.01))

    assert _fused.plan(make()) is not None
    assert [type(entry.rule) for entry in _fused.plan(make()).entries] == [SoftClip, co.Adam]
    params, grads = soft_clip_adam_steps(dtype)
    start = {k: v.copy() for k, v in params.items()}
    fused = {k: v.copy() for k, v in params.items()}
    opt = make()
    for g in grads:
        co.update_(opt, fused, g)
    assert taken and all(taken)
    assert _fused.backend_name(fused["W"]) == mode

    generic(monkeypatch)
    plain = {k: v.copy() for k, v in params.items()}
    opt = make()
    for g in grads:
        co.update_(opt, plain, g)
    for key in params:
        np.testing.assert_array_equal(fused[key], plain[key], err_msg=key)  # to the last bit

    for key in params:
        expected = reference_soft_clip_adam(
            start[key].astype(np.float64),
            [g[key].astype(np.float64) for g in grads],
            0.5,
            0.01,
            0.9,
            0.999,
            1e-8,
        )
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(fused[key], expected, rtol=tolerance, atol=tolerance, err_msg=key)


def test_a_user_rule_with_state_fuses_and_follows_its_formula(mode, taken):
    x, m = np.array([1.0, -2.0, 0.5]), np.zeros(3)
    opt = co.Optimiser(co.WeightDecay(0.1), Signum(0.1, 0.5))
    expected = x.copy()
    for g in (np.array([1.0, 2.0, 0.0]), np.array([-3.0, 1.0, 0.0]), np.array([0.5, -4.0, 0.0])):
        m = 0.5 * m + 0.5 * (g + 0.1 * expected)
        expected = expected - 0.1 * np.sign(m)
        co.update_(opt, x, g)
        np.testing.assert_allclose(x, expected, rtol=1e-15)
    assert taken == [True, True, True]
    assert np.all(co.state_store(opt).get(x)[1].m == m)


# --- what the class makes of its kernel --------------------------------------------------


def test_a_kernel_gives_init_apply_and_infallibility_and_is_no_attribute():
    rule = Signum()
    assert Signum.fallible is False
    state = rule.init(np.ones(3, dtype=np.float32))
    assert state.m.dtype == np.float32 and np.all(state.m == 0)
    assert co.Adam().init(np.ones(2)).t == 0
    assert "kernel" not in Signum._hyper_names and not hasattr(Signum, "kernel")
    with pytest.raises(UnknownHyperparameterError, match="Signum has no hyperparameter 'kernel'"):
        rule.kernel = Kernel("return dx")
    assert repr(rule) == "Signum(eta=0.01, beta=0.9)"


def test_a_class_that_writes_apply_keeps_it_and_a_subclass_with_a_kernel_takes_its_math():
    class Written(co.Rule):
        kernel = Kernel("return 2 * dx")

        def apply_(self, state, x, dx):
            return 3 * dx

    class Rewritten(Written):
        kernel = Kernel("return 4 * dx")

    dx = np.ones(2)
    assert Written.fallible is True  # its own apply_ made no promise
    assert Written().apply_(None, dx, dx)[0] == 3.0
    assert Rewritten().apply_(None, dx, dx)[0] == 4.0 and Rewritten.fallible is False


def test_kernel_none_turns_the_kernel_off_and_a_hyperparameter_named_kernel_stays_one():
    class Plain(SoftClip):
        kernel = None

    assert _fused.plan(Plain()) is None
    with pytest.raises(NotImplementedError, match="Plain has no kernel"):
        Plain().apply_(None, np.ones(1), np.ones(1))

    class Blur(co.Rule):
        kernel = co.Hyper(3)

        def apply_(self, state, x, dx):
            return dx

    assert Blur(5).kernel == 5 and Blur._hyper_names == ("kernel",)


def test_a_kernel_that_is_not_a_kernel_is_refused():
    with pytest.raises(TypeError, match="Bad.kernel must be a composeopt.kernel.Kernel"):

        class Bad(co.Rule):
            kernel = "return dx"


def test_the_public_names():
    assert co.Kernel is Kernel
    assert _fused.Kernel is Kernel
    from composeopt._fused.kernel import KernelError as private_error

    assert private_error is KernelError
    assert issubclass(KernelError, co.errors.ComposeoptError) and issubclass(KernelError, ValueError)


# --- the parser's errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "math_, message",
    [
        ("return exp(dx)", r"unsupported call 'exp\(dx\)'"),
        ("return maximum(dx)", r"unsupported call 'maximum\(dx\)'"),
        ("return sqrt(dx, out=dx)", "unsupported call"),
        ("dx = dx * a\nreturn dx", "may not assign 'dx'"),
        ("x = dx\nreturn dx", "may not assign 'x'"),
        ("b = a * dx\na = dx\nreturn a", "may not assign 'a'"),
        ("y = a * dx", "must end with 'return <update>'"),
        ("", "must end with 'return <update>'"),
        ("return dx if mu else x", "condition 'mu' must be a scalar"),
        ("return dx ** a", r"unsupported expression 'dx \*\* a'"),
        ("return dx > a", "unsupported expression"),
        ("return dx * 'a'", "literal 'a' is not a real number"),
        ("return dx * True", "literal True is not a real number"),
        ("return dx * 1j", "literal 1j is not a real number"),
        ("return eta", "the update 'eta' reads no array"),
        ("return 2 * eta", "reads no array"),
        ("mu = 2 * eta\nreturn mu", "state 'mu' must be assigned an array expression, got '2 \\* eta'"),
        ("a, b = dx, dx\nreturn a", "unsupported statement"),
        ("return dx\nreturn dx", "unsupported statement 'return dx'"),
        ("mu //= dx\nreturn mu", "unsupported statement"),
        ("return dx +", "kernel math is not Python"),
    ],
)
def test_kernel_math_outside_the_language_is_refused_naming_the_problem(math_, message):
    with pytest.raises(KernelError, match=message):
        Kernel(math_, lambda rule, state, dtype: {}, state=("mu",))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"state": ("dx",)}, "state names must be identifiers other than 'dx' and 'x'"),
        ({"state": ("mu", "mu")}, "state names repeat"),
        ({"state": ("mu",), "counter": "mu"}, "counter 'mu' is also the name of an array"),
        ({"counter": "2t"}, "counter must be an identifier"),
        ({"scalars": 3}, "scalars must be a function"),
    ],
)
def test_a_kernel_with_impossible_state_or_scalars_is_refused(arguments, message):
    with pytest.raises(KernelError, match=message):
        Kernel("return dx", **arguments)


def test_a_local_of_scalars_alone_stands_for_its_arithmetic_and_augmented_assignment_works():
    kernel = Kernel("keep = 1 - b\ns += keep * dx\ns *= b\nreturn s / 2", state=("s",))
    assert [ast.unparse(line) for line in kernel.body] == [
        "s = s + fold0 * dx",
        "s = s * b",
        "return s / lit0",
    ]
    assert kernel.scalars(types.SimpleNamespace(b=0.25), None, np.float64) == {
        "b": 0.25,
        "fold0": 0.75,
        "lit0": 2.0,
    }


# --- the interpreter's arithmetic ---------------------------------------------------------

SPECIAL = [-0.0, 0.0, math.nan, -3.0, 2.5, math.inf, -math.inf, 1e-30, -1e-30]


def namespaces():
    """(name, to_array, to_numpy) of the array modules installed, NumPy first."""
    found = [("numpy", np.asarray, np.asarray)]
    try:
        import array_api_strict

        found.append(("array_api_strict", array_api_strict.asarray, np.asarray))
    except ImportError:
        pass
    try:
        import torch

        found.append(("torch", torch.asarray, lambda a: a.numpy()))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        found.append(("jax", jnp.asarray, np.asarray))
    except ImportError:
        pass
    return found


def run_generic(kernel, values, to_array, to_numpy, dtype="float32"):
    class Rule(co.Rule):
        pass

    Rule._kernel = kernel
    a = to_array(np.asarray(values, dtype=dtype))
    return to_numpy(xp_backend.apply_kernel(kernel, Rule(), None, a, a))


@pytest.mark.parametrize("name, to_array, to_numpy", namespaces(), ids=[n[0] for n in namespaces()])
def test_sign_is_numpys_and_maximum_minimum_propagate_nan_in_every_namespace(name, to_array, to_numpy):
    g = np.asarray(SPECIAL, dtype=np.float32)
    sign = run_generic(Kernel("return sign(dx)"), SPECIAL, to_array, to_numpy)
    np.testing.assert_array_equal(sign, np.sign(g))
    np.testing.assert_array_equal(np.signbit(sign), np.signbit(np.sign(g)))  # +0 for -0
    largest = run_generic(Kernel("return maximum(dx, 1)"), SPECIAL, to_array, to_numpy)
    np.testing.assert_array_equal(largest, np.maximum(g, np.float32(1)))
    smallest = run_generic(Kernel("return minimum(-1, dx)"), SPECIAL, to_array, to_numpy)
    np.testing.assert_array_equal(smallest, np.minimum(np.float32(-1), g))


def test_a_flag_picks_a_branch_and_only_it_runs():
    kernel = Kernel("return sqrt(dx) if flag else -dx", lambda rule, state, dtype: {"flag": rule})
    a = np.array([-4.0, 9.0])
    with np.errstate(invalid="raise"):  # the sqrt branch would raise on -4
        np.testing.assert_array_equal(xp_backend.apply_kernel(kernel, 0.0, None, a, a), [4.0, -9.0])
    np.testing.assert_array_equal(xp_backend.apply_kernel(kernel, math.nan, None, a[1:], a[1:]), [3.0])


def test_host_arithmetic_has_ieee_results_where_python_would_raise():
    kernel = Kernel("return dx * (a / b) + dx * sqrt(c)")
    values = kernel.scalars(types.SimpleNamespace(a=1.0, b=0.0, c=-1.0), None, np.float64)
    assert values["fold0"] == math.inf and math.isnan(values["fold1"])
    values = kernel.scalars(types.SimpleNamespace(a=-1.0, b=-0.0, c=4.0), None, np.float64)
    assert values["fold0"] == math.inf and values["fold1"] == 2.0


def test_new_state_never_shares_memory_with_the_gradient_parameter_or_update():
    kernel = Kernel("previous = dx\nmu = nu\nv = 2 * v\nreturn v", state=("previous", "mu", "nu", "v"))

    class Rule(co.Rule):
        pass

    Rule._kernel = kernel
    x, dx = np.ones(3), np.full(3, 2.0)
    state = Rule().init(x)
    old_nu = state.nu
    update = xp_backend.apply_kernel(kernel, Rule(), state, x, dx)
    assert state.previous is not dx and np.all(state.previous == dx)
    assert state.mu is not old_nu and state.nu is old_nu
    assert update is not state.v and np.all(update == state.v)


def test_the_counter_is_advanced_before_the_scalars_and_put_back_if_they_fail():
    seen = []

    def scalars(rule, state, dtype):
        seen.append(state.t)
        if rule.fail:
            raise RuntimeError("scalars failed")
        return {}

    class Counting(co.Rule):
        fail = False
        kernel = Kernel("mu = mu + dx\nreturn mu", scalars, state=("mu",), counter="t")

    rule = Counting()
    state = rule.init(np.zeros(2))
    rule.apply_(state, np.zeros(2), np.ones(2))
    assert seen == [1] and state.t == 1
    rule.fail = True
    with pytest.raises(RuntimeError):
        rule.apply_(state, np.zeros(2), np.ones(2))
    assert seen == [1, 2] and state.t == 1


# --- the interpreter on other array modules equals NumPy's ------------------------------------

KERNEL_CASES = [
    case for case, make in CASES.items() if make_plan(make()) is not None and "Groups" not in case
]
"""The registry cases that the fast paths take (but groups, whose selectors name parameters of
another tree than this test's one array)."""


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_generic_path_on_array_api_strict_equals_numpys_to_the_last_bit(case, dtype, monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    generic(monkeypatch)
    rng = np.random.default_rng(7)
    start = rng.uniform(-2, 2, (3, 4)).astype(dtype)
    grads = [
        (rng.standard_normal((3, 4)) * 10.0 ** rng.integers(-2, 2, (3, 4))).astype(dtype) for _ in range(7)
    ]
    for g in grads:
        g.flat[::5] = 0  # zeros and sign changes reach every branch of Rprop and the sign rules
    on_numpy, opt = {"w": start.copy()}, CASES[case]()
    for g in grads:
        co.update_(opt, on_numpy, {"w": g})
    on_strict, opt = {"w": strict.asarray(start)}, CASES[case]()
    for g in grads:
        co.update_(opt, on_strict, {"w": strict.asarray(g)})
    np.testing.assert_array_equal(np.asarray(on_strict["w"]), on_numpy["w"])
