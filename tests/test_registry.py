"""Generic contract tests: every registry case, on every backend and float dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases skip
    ml_dtypes = None

import composeopt as co
from composeopt.registry import ALIASES, CASES, RULES

CASE_IDS = list(CASES)

# Cases whose state holds reductions of x rather than arrays shaped like it: Novograd's second
# moment is one number per array, Adafactor's factored moments are a row and a column vector,
# SM3 keeps one vector per axis.  Their state must still have x's dtype and module.
REDUCED_STATE_CASES = {
    "Novograd()",
    "Novograd(lambda_=1e-3)",
    "Adafactor(factored, momentum, lambda_)",
    "SM3()",
    "SM3(momentum=0.0)",
}


# Accumulators that a 16-bit parameter would overflow or round away (FTRL's `linear` passes
# float16's 65504 within a few steps): kept in float32 for parameters narrower than that.
WIDENED_STATE = {
    "FTRL()": {"accum", "linear"},
    "FTRL(0.1, l1=0.01, l2=0.1)": {"accum", "linear"},
    "FTRL(lr_power=-0.7)": {"accum", "linear"},
}

LOW_PRECISION = ["float16", "bfloat16"]
ALL_DTYPES = [*LOW_PRECISION, "float32", "float64"]


def dtype_of(backend, name):
    """The backend's dtype called `name`, or a skip: bfloat16 is ml_dtypes', on NumPy only."""
    if name == "bfloat16":
        if backend.name != "numpy" or ml_dtypes is None:
            pytest.skip(f"{backend.name} has no bfloat16")
        return np.dtype(ml_dtypes.bfloat16)
    if name not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {name}")
    return getattr(backend.xp, name)


def bits(backend, dtype):
    return backend.xp.finfo(dtype).bits


def make_params(backend, dtype):
    rng = np.random.default_rng(0)
    return {
        "W": backend.asarray(rng.uniform(-2, 2, (3, 4)), dtype),
        "b": backend.asarray(rng.uniform(-2, 2, (4,)), dtype),
        "s": backend.asarray(rng.uniform(-2, 2, ()), dtype),  # 0-d: NumPy likes to turn these into scalars
    }


def quadratic_grads(backend, params):
    """Gradient of ``0.5 * sum(x**2)`` over the tree: ``x`` itself, as fresh arrays."""
    return {k: backend.copy(v) for k, v in params.items()}


def loss(backend, params):
    return sum(float(np.sum(backend.to_numpy(v).astype(np.float64) ** 2)) for v in params.values())


def state_dtype(backend, case, opt, x, field):
    """The dtype of the state array `field`: x's, except under MixedPrecision, which keeps
    the state of narrower parameters in its master dtype, and for the accumulators of
    `WIDENED_STATE`, which are float32 for parameters narrower than that."""
    if isinstance(opt, co.MixedPrecision):
        master = getattr(backend.xp, opt.dtype)
        if bits(backend, master) > bits(backend, x.dtype):
            return master
    if field in WIDENED_STATE.get(case, ()) and bits(backend, x.dtype) < 32:
        return backend.xp.float32
    return x.dtype


def state_fields(state, name=None):
    """Every array in a (nested) state, as (field name, array)."""
    if isinstance(state, co.State):
        for field, value in vars(state).items():
            yield from state_fields(value, field)
    elif isinstance(state, (tuple, list)):
        for item in state:
            yield from state_fields(item, name)
    elif hasattr(state, "shape") and hasattr(state, "dtype"):
        yield name, state


def state_arrays(state):
    return [array for _, array in state_fields(state)]


def test_registry_and_public_names_list_the_same_rules():
    public_rules = {
        name
        for name in co.__all__
        if isinstance(getattr(co, name), type)
        and issubclass(getattr(co, name), co.Rule)
        and name != "Rule"
        and name not in ALIASES
    }
    assert public_rules == set(RULES)
    for alias, cls in ALIASES.items():
        assert getattr(co, alias) is cls
        assert alias in co.__all__


def test_every_rule_class_has_a_case_and_a_docstring():
    covered = {type(factory()).__name__ for factory in CASES.values()}
    assert covered == set(RULES)
    for cls in RULES.values():
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, cls


@pytest.mark.parametrize("case", CASE_IDS)
def test_repr_round_trips(case):
    rule = CASES[case]()
    namespace = {name: getattr(co, name) for name in co.__all__}
    assert eval(repr(rule), namespace) == rule


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_step_keeps_arrays_shape_dtype_module_and_grads(backend, case, dtype):
    expected = dtype_of(backend, dtype)
    opt = CASES[case]()
    params = make_params(backend, dtype)
    originals = dict(params)
    grads = quadratic_grads(backend, params)
    grads_before = {k: backend.to_numpy(v).copy() for k, v in grads.items()}
    for _ in range(3):
        assert co.update_(opt, params, grads) is params
    for key, x in params.items():
        assert x is originals[key]
        assert x.dtype == expected
        assert x.shape == originals[key].shape
        assert co.namespace(x) is co.namespace(backend.asarray([1.0], dtype))
        np.testing.assert_array_equal(backend.to_numpy(grads[key]), grads_before[key])
        for field, array in state_fields(co.state_store(opt).get(x)):
            assert array.dtype == state_dtype(backend, case, opt, x, field), field
            # LBFGS keeps its (s, y) history as arrays of shape (memory, *x.shape).
            assert x.shape in (array.shape, array.shape[1:]) or case in REDUCED_STATE_CASES
            assert co.namespace(array) is co.namespace(x)


# Cases whose default steps are below bfloat16's resolution (a relative change under 2^-9 rounds
# away): ExpDecay's eta 1e-3 times x, AdaDelta's first steps ~sqrt(epsilon), RAdam's momentum
# steps of eta 1e-3 and then its rectified steps, which start near 0.  In bfloat16 they may leave
# the parameters as they are.
BELOW_BFLOAT16_RESOLUTION = {"ExpDecay()", "AdaDelta()", "RAdam()"}


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_case_decreases_a_quadratic(backend, case, dtype):
    dtype_of(backend, dtype)
    opt = CASES[case]()
    params = make_params(backend, dtype)
    before = loss(backend, params)
    for _ in range(30):
        co.update_(opt, params, quadratic_grads(backend, params))
    after = loss(backend, params)
    assert math.isfinite(after)
    if dtype == "bfloat16" and case in BELOW_BFLOAT16_RESOLUTION:
        assert after <= before
    else:
        assert after < before


# Steps in float16 or bfloat16 against the same steps in float32, rounded: each step rounds
# the parameter to the dtype, and the gradient feeds that back.  The gap allowed after
# LOW_STEPS, in units of the dtype's epsilon (relative, and absolute below 1): most cases stay
# within 1; AdaDelta in float16 is at 3.5, its epsilon floored to 1.2e-7 there (1e-8 in float32).
LOW_STEPS = 5
LOW_TOLERANCE_EPS = 6


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_steps_track_the_float32_steps(backend, case, dtype):
    low = dtype_of(backend, dtype)
    params = make_params(backend, dtype)
    wide = {k: backend.asarray(backend.to_numpy(v).astype(np.float32), "float32") for k, v in params.items()}
    opt, reference = CASES[case](), CASES[case]()
    for _ in range(LOW_STEPS):
        co.update_(opt, params, quadratic_grads(backend, params))
        co.update_(reference, wide, quadratic_grads(backend, wide))
    tolerance = LOW_TOLERANCE_EPS * float(backend.xp.finfo(low).eps)
    for key, x in params.items():
        assert x.dtype == low
        got = backend.to_numpy(x).astype(np.float64)
        assert np.all(np.isfinite(got)), key
        want = backend.to_numpy(wide[key]).astype(low).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=key)


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_zero_d_leaf_steps_as_the_same_value_of_shape_1(backend, case, dtype):
    """NumPy computes on 0-d arrays as on scalars and returns scalars: an in-place update
    of such a result changes a temporary, not the array it came from."""
    zero_d = make_params(backend, dtype)
    one = dict(make_params(backend, dtype))
    one["s"] = backend.asarray(backend.to_numpy(one["s"]).reshape(1), dtype)
    opt_zero_d, opt_one = CASES[case](), CASES[case]()
    for _ in range(4):
        co.update_(opt_zero_d, zero_d, quadratic_grads(backend, zero_d))
        co.update_(opt_one, one, quadratic_grads(backend, one))
    assert zero_d["s"].shape == ()
    # NumPy 1.x computes float32 0-d values as float64 scalars (value-based casting), so there
    # the two drift apart by rounding (LBFGS compounds it); a lost update is off by far more.
    old_numpy = np.lib.NumpyVersion(np.__version__) < "2.0.0" and dtype == "float32"
    ulps = 1e-3 if old_numpy else 0
    for key in zero_d:
        got = backend.to_numpy(zero_d[key]).reshape(one[key].shape)
        np.testing.assert_allclose(got, backend.to_numpy(one[key]), rtol=ulps, atol=ulps / 100, err_msg=key)
    ours_all = state_arrays(co.state_store(opt_zero_d).get(zero_d["s"]))
    theirs_all = state_arrays(co.state_store(opt_one).get(one["s"]))
    assert len(ours_all) == len(theirs_all)
    for ours, theirs in zip(ours_all, theirs_all):
        assert ours.dtype == theirs.dtype
        np.testing.assert_allclose(
            backend.to_numpy(ours).reshape(-1),
            backend.to_numpy(theirs).reshape(-1),
            rtol=ulps,
            atol=ulps / 100,
        )


@pytest.mark.parametrize("case", CASE_IDS)
def test_functional_update_equals_in_place_and_leaves_input(backend, case):
    in_place_opt, functional_opt = CASES[case](), CASES[case]()
    params = make_params(backend, "float64")
    frozen = make_params(backend, "float64")
    for _ in range(4):
        grads = quadratic_grads(backend, params)
        co.update_(in_place_opt, params, grads)
        before = {k: backend.to_numpy(v).copy() for k, v in frozen.items()}
        new = co.update(functional_opt, frozen, quadratic_grads(backend, frozen))
        for key in frozen:
            np.testing.assert_array_equal(backend.to_numpy(frozen[key]), before[key])
        frozen = new
    for key in params:
        np.testing.assert_allclose(backend.to_numpy(frozen[key]), backend.to_numpy(params[key]), rtol=1e-12)


# --- no host reads ---------------------------------------------------------------------

READS_ON_THE_HOST = {
    # Deciding needs a value on the host: whether to raise, or whether to take the step.
    "ClipNorm()": "throw=True checks the norm",
    "Optimiser(ClipNorm, WeightDecay, Adam)": "throw=True checks the norm",
    "SkipNonFinite(Adam)": "one flag per step",
    "SkipNonFinite(Optimiser(ClipGlobalNorm, Momentum), max_consecutive=3)": "one flag per step",
}
"""Registry cases that read an array value on the host (a GPU sync), and why; every other
case must keep its scalars (norms, trust ratios, means) as 0-d device arrays."""


@pytest.fixture
def no_host_reads(monkeypatch):
    """array_api_strict arrays that raise when Python asks for their values (bool, float, NumPy)."""
    strict = pytest.importorskip("array_api_strict")

    def refuse(self, *args, **kwargs):
        raise AssertionError("a rule read an array's value on the host")

    for method in ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__"):
        monkeypatch.setattr(type(strict.asarray(0.0)), method, refuse)
    return strict


def _strict_params(strict):
    rng = np.random.default_rng(0)
    return {
        "W": strict.asarray(rng.uniform(-2, 2, (3, 4)).tolist()),
        "b": strict.asarray(rng.uniform(-2, 2, 4).tolist()),
        "z": strict.zeros((2, 2)),  # zero norms: the trust ratios' where branch
    }


@pytest.mark.parametrize("case", CASE_IDS)
def test_no_array_value_is_read_on_the_host(no_host_reads, case):
    params = _strict_params(no_host_reads)
    opt = CASES[case]()
    grads = {k: v * 1.5 for k, v in params.items()}
    if case in READS_ON_THE_HOST:
        with pytest.raises(AssertionError, match="on the host"):
            co.update_(opt, params, grads)
        return
    for _ in range(3):
        co.update_(opt, params, {k: v * 1.5 for k, v in params.items()})
