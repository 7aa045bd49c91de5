"""The fused fast path of update_ equals the generic path, for every registry case it takes.

Each test runs on the CPU backends: numba (skipped where numba is missing) and
the blocked NumPy fallback; CuPy tests skip without a GPU.  "Generic" is the
same code with the fast path switched off (``composeopt._fused.MODE = "off"``).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt._fused import threads
from composeopt._fused.kernel import Kernel, KernelError
from composeopt.registry import CASES, RULES

HAS_NUMBA = importlib.util.find_spec("numba") is not None

GENERIC_ONLY = {
    # Rules that decide per step whether (and how) a parameter changes.
    "AccumGrad(2)": "skips steps",
    "Optimiser(AccumGrad(3), Adam)": "skips steps",
    "Optimiser(ClipValue, AccumGrad(2), ClipGlobalNorm, Momentum)": "skips steps",
    "MixedPrecision(Adam)": "master copy",
    "MixedPrecision(Optimiser(WeightDecay, Momentum), float64)": "master copy",
    # The kernel language has no power function: FTRL's fast path is lr_power = -1/2 (a sqrt).
    "FTRL(lr_power=-0.7)": "FTRL with a power other than -1/2",
    # Layer-wise and factored rules reduce over each array between reading dx and writing.
    "GradCentralization()": "per-array reduction",
    "Optimiser(GradCentralization, Adam)": "per-array reduction",
    "SM3()": "per-array reduction",
    "SM3(momentum=0.0)": "per-array reduction",
    # Lookahead wraps another rule and sets parameters to its slow weights (Replace) every k steps.
    "Lookahead(Adam)": "wrapper returning Replace",
    "Lookahead(Optimiser(ClipGlobalNorm, Momentum(rho=Linear)), k=3)": "wrapper returning Replace",
    "Groups(W: Lookahead(Momentum), default: Descent)": "wrapper returning Replace",
    # Muon: a Frobenius norm and matrix products per array (Newton-Schulz), not elementwise.
    "Muon()": "reductions and matrix products",
    "Muon(nesterov=False, lambda_, match_rms_adamw, fallback=Optimiser)": "reductions and matrix products",
    # LBFGS: dot products over the whole tree (two-loop recursion), not elementwise.
    "LBFGS()": "tree-wide dot products",
    "LBFGS(0.5, memory=2)": "tree-wide dot products",
    "Optimiser(WeightDecay, LBFGS)": "tree-wide dot products",
}
"""Registry cases without a fast path, and why.  A new elementwise rule must get a ``fused``
kernel or be listed here (with its reason): the first test fails otherwise."""

FAST_CASES = [case for case in CASES if case not in GENERIC_ONLY]
STEPS = 7  # RAdam leaves its warm-up at t = 5; ExpDecay(0.1, 0.5, 2) decays three times


@pytest.fixture(params=["numba", "numpy"])
def mode(request, monkeypatch):
    """Each test runs with numba and with the NumPy fallback."""
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


def tree(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W": rng.uniform(-2, 2, (3, 4)).astype(dtype),
        "b": rng.uniform(-2, 2, 5).astype(dtype),
        "s": np.asarray(rng.uniform(-2, 2), dtype=dtype),
        "empty": np.zeros((2, 0), dtype=dtype),
    }


def gradients(params, step):
    return {k: np.asarray(np.sin(3 * v + step) + 0.1 * step, dtype=v.dtype) for k, v in params.items()}


def generic_steps(make, params, steps, grads=gradients):
    opt = make()
    saved = _fused.MODE
    _fused.MODE = "off"
    try:
        for step in range(steps):
            co.update_(opt, params, grads(params, step))
    finally:
        _fused.MODE = saved
    return params


def assert_close(actual, expected):
    """float64: 1e-12 relative; float32: a few ulps of the values' scale."""
    for key in expected:
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        assert a.dtype == e.dtype
        if e.dtype == np.float64:
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-300, err_msg=key)
        else:
            scale = float(np.max(np.abs(e), initial=1.0))
            np.testing.assert_allclose(
                a, e, rtol=4 * np.finfo(e.dtype).eps, atol=4 * np.finfo(e.dtype).eps * scale, err_msg=key
            )


# --- coverage ------------------------------------------------------------------


def test_every_case_has_a_fast_path_unless_listed_generic_only():
    for case, make in CASES.items():
        has_plan = _fused.plan(make()) is not None
        assert has_plan == (case not in GENERIC_ONLY), case
    for name, cls in RULES.items():
        if name not in ("Optimiser", "Groups"):  # containers of other rules
            assert "_kernel" in {attr for klass in cls.__mro__ for attr in vars(klass)}, name


def test_a_rule_without_a_fast_path_is_noticed():
    class Lion(co.Rule):  # stands for a new built-in rule added without a kernel
        fallible = False

        def apply_(self, state, x, dx):
            return 0.1 * np.sign(dx)

    assert _fused.plan(Lion()) is None
    assert _fused.plan(co.Optimiser(co.Adam(), Lion())) is None


# --- parity -------------------------------------------------------------------


@pytest.mark.parametrize("case", FAST_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_equals_generic_path(mode, taken, case, dtype):
    params = tree(dtype)
    opt = CASES[case]()
    for step in range(STEPS):
        co.update_(opt, params, gradients(params, step))
    assert taken and all(taken), "the fast path did not take the step"
    assert_close(params, generic_steps(CASES[case], tree(dtype), STEPS))
    store = co.state_store(opt)
    assert store.step == STEPS


def test_state_layout_is_what_init_makes(mode):
    x = np.ones(4, dtype=np.float32)
    opt = co.Optimiser(co.WeightDecay(), co.Adam(), co.Momentum())
    co.update_(opt, x, np.ones(4, dtype=np.float32))
    state = co.state_store(opt).get(x)
    assert state[0] is None and state[1].t == 1 and set(vars(state[1])) == {"mu", "nu", "t"}
    assert state[1].mu.dtype == np.float32 and set(vars(state[2])) == {"v"}


@pytest.mark.parametrize(
    "make",
    [
        co.Adam,
        lambda: co.Optimiser(co.ClipValue(1.0), co.WeightDecay(1e-2), co.Adam(1e-2)),
        lambda: co.Optimiser(
            co.Momentum(0.05), co.ClipGlobalNorm(1.0), co.ClipNorm(0.1, throw=False), co.AdaGrad()
        ),
    ],
    ids=["Adam", "ClipValue-WeightDecay-Adam", "Momentum-ClipGlobalNorm-ClipNorm-AdaGrad"],
)
def test_many_arrays_and_arrays_split_between_threads(mode, taken, monkeypatch, make):
    monkeypatch.setattr(threads, "PARALLEL_MIN", 1000)
    monkeypatch.setattr(threads, "BIG_JOB", 700)
    monkeypatch.setenv("COMPOSEOPT_NUM_THREADS", "3")
    rng = np.random.default_rng(1)

    def arrays():
        sizes = [int(n) for n in rng.integers(1, 1500, 40)] + [5000]
        return [np.asarray(rng.standard_normal(n), dtype=np.float32) for n in sizes]

    params = arrays()
    expected = [x.copy() for x in params]
    grads = lambda params, step: [np.cos(x + step) for x in params]  # noqa: E731
    opt = make()
    for step in range(4):
        co.update_(opt, params, grads(params, step))
    assert all(taken)
    generic_steps(make, expected, 4, grads)
    assert_close(dict(enumerate(params)), dict(enumerate(expected)))


@pytest.mark.parametrize(
    "case", ["Adam()", "RMSProp(centred=True)", "Optimiser(Momentum, ClipGlobalNorm, InvDecay)"]
)
def test_fast_and_generic_steps_can_alternate(mode, case):
    params = tree(np.float64)
    opt = CASES[case]()
    for step in range(6):
        _fused.MODE, saved = ("off" if step % 2 else _fused.MODE), _fused.MODE
        co.update_(opt, params, gradients(params, step))
        _fused.MODE = saved
    assert_close(params, generic_steps(CASES[case], tree(np.float64), 6))


def test_hyperparameters_are_read_at_every_step(mode):
    opt, reference = co.Adam(0.1), co.Adam(0.1)
    x, y = np.ones(3), np.ones(3)
    co.update_(opt, x, np.ones(3))
    opt.eta, opt.beta = 0.01, (0.5, 0.9)
    co.update_(opt, x, np.ones(3))
    generic_steps(lambda: reference, y, 1, lambda p, s: np.ones(3))
    reference.eta, reference.beta = 0.01, (0.5, 0.9)
    generic_steps(lambda: reference, y, 1, lambda p, s: np.ones(3))
    np.testing.assert_array_equal(x, y)


# --- what the fast path must not do ---------------------------------------------


def test_caller_gradients_are_not_written(mode, taken):
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    grad = np.cos(x)
    before = grad.copy()
    grad.flags.writeable = False  # a write would raise
    opt = co.Optimiser(co.ClipGlobalNorm(0.1), co.Momentum())
    for _ in range(3):
        co.update_(opt, x, grad)
    assert all(taken)
    np.testing.assert_array_equal(grad, before)


@pytest.mark.parametrize(
    "make_grad",
    [
        lambda x: x,  # the parameter itself (a quadratic loss)
        lambda x: x.T.copy().T,  # not C-contiguous
        lambda x: x.astype(np.float64),  # another dtype
        lambda x: np.broadcast_to(x[:1], x.shape),  # a broadcast view
    ],
    ids=["same-array", "fortran", "float64", "broadcast"],
)
def test_unusual_gradients(mode, make_grad):
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    y = x.copy()
    co.update_(co.Adam(0.1), x, make_grad(x))
    generic_steps(lambda: co.Adam(0.1), y, 1, lambda p, s: make_grad(p))
    np.testing.assert_array_equal(x, y)


def test_tied_parameters_get_the_summed_gradient(mode):
    shared = np.array([10.0, 10.0])
    co.update_(
        co.Adam(0.1), {"a": shared, "b": shared}, {"a": np.array([1.0, 2.0]), "b": np.array([3.0, -2.0])}
    )
    np.testing.assert_allclose(shared, [9.9, 10.0])


def test_steps_the_fast_path_does_not_know_take_the_generic_path(mode, taken):
    x = np.ones((4, 4), dtype=np.float32)
    co.update_(co.Adam(), x, np.ones((4, 4), dtype=np.float32))  # taken
    opt = co.Adam()
    half = np.ones(3, dtype=np.float16)
    co.update_(opt, half, np.ones(3, dtype=np.float16))  # float16: generic
    strided = np.ones((4, 4))[:, ::2]
    co.update_(co.Adam(), strided, np.ones((4, 2)))  # non-contiguous parameter: generic
    opt = co.Adam()
    y = np.ones(4)
    co.update_(opt, y, np.ones(4))
    co.state_store(opt).get(y).mu = np.ones((4, 2))[:, 0]  # a state init does not make
    co.update_(opt, y, np.ones(4))
    assert taken == [True, False, False, True, False]


def test_subclasses_that_change_a_rule_take_the_generic_path():
    class Halved(co.Adam):
        def apply_(self, state, x, dx):
            return super().apply_(state, x, dx) / 2

    class Renamed(co.Adam):
        """Same behaviour, new name: keeps the fast path."""

    assert _fused.plan(Halved()) is None
    assert _fused.plan(Renamed()) is not None
    assert _fused.plan(co.Optimiser(co.Descent(), Halved())) is None


def test_a_kernel_change_made_by_begin_step_falls_back(mode, taken):
    class Switch(co.RMSProp):
        def begin_step(self, step):  # changes which kernel applies
            self.centred = True

    Switch._kernel = co.RMSProp.__dict__["_kernel"]  # claims the fast path all the same
    x, y = np.ones(3), np.ones(3)
    co.update_(Switch(), x, np.full(3, 0.5))
    assert taken == [False]
    generic_steps(lambda: co.RMSProp(centred=True), y, 1, lambda p, s: np.full(3, 0.5))
    np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize(
    "make",
    [
        co.Adam,
        lambda: co.Optimiser(co.ClipValue(1.0), co.WeightDecay(1e-4), co.Adam()),
        lambda: co.Optimiser(co.Momentum(), co.ClipGlobalNorm(1.0), co.Adam()),
    ],
    ids=["Adam", "elementwise-chain", "chain-with-a-clip"],
)
def test_no_allocation_per_step(taken, make):
    x = np.ones(1 << 20, dtype=np.float32)
    g = np.full(1 << 20, 0.5, dtype=np.float32)
    opt = make()
    for _ in range(2):  # the first step makes the state, the scratch and compiles
        co.update_(opt, x, g)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            co.update_(opt, x, g)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(taken)
    assert peak - base < 64 * 1024, f"a step allocated {peak - base} bytes (the array is {x.nbytes})"
    assert current - base < 4 * 1024


def test_without_numba_the_numpy_path_runs(monkeypatch):
    monkeypatch.setattr(_fused, "MODE", "auto")
    monkeypatch.setattr(_fused, "_numba_available", lambda: False)
    assert _fused.backend_name(np.ones(2)) == "numpy"
    monkeypatch.setattr(_fused, "MODE", "off")
    assert _fused.backend_name(np.ones(2)) is None
    assert _fused.plan(co.Adam()) is None


def test_importing_composeopt_does_not_import_numba():
    code = "import sys, composeopt; print('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- kernel math --------------------------------------------------------------


@pytest.mark.parametrize(
    "math_, message",
    [
        ("return dx * 'a'", "not a real number"),
        ("return eta", "reads no array"),
        ("return exp(dx)", "unsupported call"),
        ("dx = dx * a\nreturn dx", "may not assign 'dx'"),
        ("y = a * dx", "must end with 'return"),
        ("return dx if mu else x", "must be a scalar"),
        ("return dx ** a", "unsupported expression"),
    ],
)
def test_kernel_math_outside_the_subset_is_refused(math_, message):
    with pytest.raises(KernelError, match=message):
        Kernel(math_, lambda rule, state, dtype: {}, state=("mu",))


def test_kernel_scalars_are_the_names_it_reads():
    kernel = co.Adam._kernel
    # `1 - b1` and `1 - b2` are arithmetic on scalars alone: each is one generated scalar.
    assert set(kernel.scalar_names) == {"b1", "fold0", "b2", "fold1", "eta", "r1", "r2", "eps"}
    assert not kernel.reads_x and co.WeightDecay._kernel.reads_x


SIGNS = [-0.0, 0.0, math.nan, -3.0, 2.5, math.inf, -math.inf, 1e-30, -1e-30]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_sign_is_numpys_sign(mode, dtype):
    """-1, 0 or 1, NaN for NaN, and +0 for -0 (numba's own sign keeps -0)."""
    kernel = Kernel("return sign(dx) * one", lambda rule, state, dtype: {"one": 1.0})
    g = np.array(SIGNS, dtype=dtype)
    out = np.empty_like(g)
    backend = _fused._backend(g)
    backend.run_stage(
        (kernel,), False, False, [(g, np.zeros_like(g), out, backend.vector([1.0], None, dtype))]
    )
    np.testing.assert_array_equal(out, np.sign(g))
    np.testing.assert_array_equal(np.signbit(out), np.signbit(np.sign(g)))


# --- flat buffers ---------------------------------------------------------------


def test_flatten_makes_views_of_one_buffer():
    params = {"w": np.ones((2, 3)), "layers": [np.arange(4.0), None], "name": "mlp"}
    params["tied"] = params["w"]
    flat = co.flatten(params)
    assert flat.data.shape == (10,)
    assert flat.tree["tied"] is flat.tree["w"] and flat.tree["name"] == "mlp"
    flat.tree["layers"][0][1] = 7.0
    assert flat.data[7] == 7.0
    grads = flat.zeros_like()
    grads.tree["w"][...] = 1.0
    np.testing.assert_array_equal(grads.data, [1.0] * 6 + [0.0] * 4)
    with pytest.raises(co.errors.UnsupportedArrayError, match="dtype"):
        co.flatten([np.ones(2), np.ones(2, dtype=np.float32)])


def test_flat_update_equals_the_tree_update(mode):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n) for n in (3, 50, 1, 200)]
    flat = co.flatten([x.copy() for x in params])
    grads = flat.zeros_like()
    opt, flat_opt = (
        co.Optimiser(co.WeightDecay(1e-2), co.Adam(0.1)),
        co.Optimiser(co.WeightDecay(1e-2), co.Adam(0.1)),
    )
    for step in range(3):
        for view, x in zip(grads.tree, params):
            view[...] = np.cos(x + step)
        co.update_(opt, params, [np.cos(x + step) for x in params])
        co.update_(flat_opt, flat.data, grads.data)
    for view, x in zip(flat.tree, params):
        np.testing.assert_array_equal(view, x)


# --- CuPy (skipped without a GPU) ----------------------------------------------


@pytest.mark.parametrize("case", FAST_CASES)
def test_cupy_fast_path_equals_numpy_generic_path(cupy_backend, case, taken, monkeypatch):
    cupy = cupy_backend.xp
    monkeypatch.setattr(_fused, "MODE", "auto")
    host = {k: v for k, v in tree(np.float64).items()}
    device = {k: cupy.asarray(v) for k, v in host.items()}
    opt = CASES[case]()
    for step in range(STEPS):
        co.update_(opt, device, {k: cupy.asarray(v) for k, v in gradients(host, step).items()})
        host = {k: cupy.asnumpy(v) for k, v in device.items()}  # the next gradient depends on x
    assert all(taken)
    expected = generic_steps(CASES[case], tree(np.float64), STEPS)
    for key in expected:
        np.testing.assert_allclose(cupy.asnumpy(device[key]), expected[key], rtol=1e-12, atol=1e-14)


def test_cupy_flat_buffer_is_one_array(cupy_backend):
    cupy = cupy_backend.xp
    flat = co.flatten([cupy.ones(n, dtype=cupy.float32) for n in (3, 1000, 7)])
    grads = flat.zeros_like()
    grads.data[...] = 1.0
    co.update_(co.Adam(0.1), flat.data, grads.data)
    np.testing.assert_allclose(cupy.asnumpy(flat.tree[1]), 0.9, rtol=1e-6)
    assert math.isclose(float(flat.tree[0][0]), 0.9, rel_tol=1e-6)


def test_the_fast_path_keeps_no_parameter_alive(mode):
    import gc
    import weakref

    opt = co.Optimiser(co.Momentum(), co.ClipGlobalNorm(1.0), co.Adam())  # uses scratch buffers too
    x = np.ones(10)
    co.update_(opt, {"w": x}, {"w": np.ones(10)})
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None
    assert len(co.state_store(opt)) == 0


_FAIL = [False]


def _fragile_scalars(rule, state, dtype):
    if _FAIL[0]:
        raise RuntimeError("scalars failed")
    return co.Adam._kernel.scalars(rule, state, dtype)


class _FragileAdam(co.Adam):
    """Adam whose fast path's scalars fail on demand (a bug in a user's kernel)."""

    _kernel = Kernel(co.Adam._kernel.math, _fragile_scalars, state=("mu", "nu"), counter="t")


def test_a_step_whose_scalars_fail_changes_nothing(mode, taken):
    params = [np.linspace(-1, 1, 5) + i for i in range(3)]
    opt = co.Optimiser(co.WeightDecay(0.1), _FragileAdam(0.1))
    co.update_(opt, params, [np.cos(x) for x in params])
    before = [x.copy() for x in params]
    states = [repr(co.state_store(opt).get(x)) for x in params]
    _FAIL[0] = True
    try:
        with pytest.raises(RuntimeError, match="scalars failed"):
            co.update_(opt, params, [np.cos(x) for x in params])
    finally:
        _FAIL[0] = False
    assert taken == [True]  # the failing step raised inside the fast path
    for x, y in zip(params, before):
        np.testing.assert_array_equal(x, y)
    assert [repr(co.state_store(opt).get(x)) for x in params] == states  # t, mu, nu as they were
    assert co.state_store(opt).step == 1
