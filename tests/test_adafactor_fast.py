"""Adafactor's whole-rule fast path (`composeopt._fused.factored.FactoredKernel`).

References: the rule's generic `apply_` (its own tests check it against the paper's
formulas and optax), run here on copies of the same arrays; and optax's `adafactor` run in
JAX with x64 (its decay taken in float64, as in tests/test_layerwise.py).  Each case runs
the numba loops and the NumPy fallback.

Tolerances: the fast path rounds the second moments as the generic path does but sums in
another order (and in float64 where the generic path sums in float32), and computes the
update with reciprocals.  Differences are measured against the largest entry of each
array: float64 to 1e-12 of it; float32 to a few units in the last place of it (`x` 8, the
states and the momentum 64: the generic path's own float32 sums err by that much).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt._fused import factored
from composeopt._fused.factored import FactoredKernel

KERNEL = co.Adafactor._kernel
HAS_NUMBA = importlib.util.find_spec("numba") is not None

SHAPES = [
    (),
    (0,),
    (2, 0),
    (1,),
    (7,),
    (3, 5),
    (127, 300),  # one axis below min_dim_size_to_factor: one moment per entry
    (128, 128),  # both at it: factored
    (130, 129),
    (129, 300),  # wide
    (300, 129),  # tall
    (128, 128, 3, 3),  # a 3x3 conv: factored along (out, in), 9 entries per pair
    (256, 128, 1, 1),
    (64, 3, 7, 7),  # a conv too small to factor
    (4, 130, 5, 140),  # axes before and between the two largest
    (140, 2, 130),
    (3, 129, 2, 131, 2),
]

OPTIONS = {
    "default": {},
    "momentum-decay": {"momentum": 0.9, "lambda_": 0.01},
    "clipped": {"eta": 1.0, "clipping_threshold": 0.05},  # rms(u) is above d at every step
    "no-clipping-no-scale": {"clipping_threshold": None, "multiply_by_parameter_scale": False},
    "not-factored": {"factored": False, "momentum": 0.5},
    "offset-small-factors": {"decay_offset": 3, "min_dim_size_to_factor": 2, "decay_rate": 0.5},
    "no-decay-exponent": {"decay_rate": 0.0, "epsilon": 1e-3, "lambda_": 0.1},
}

STEPS = 4


@pytest.fixture(params=["numba", "numpy"])
def implementation(request, monkeypatch):
    """Each test runs with the numba loops and with the NumPy fallback."""
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_fused, "MODE", "auto" if request.param == "numba" else "numpy")
    assert factored.implementation() == request.param
    return request.param


def arrays(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.normal(size=shape), dtype=dtype) for shape in shapes]


def gradients(shapes, dtype, step):
    # The scale moves from step to step, so that the moments change and the decay matters.
    rng = np.random.default_rng(100 + step)
    return [np.asarray(rng.normal(size=shape) * (1 + step) ** 0.5, dtype=dtype) for shape in shapes]


def generic_step(rule, states, xs, dxs):
    for state, x, dx in zip(states, xs, dxs):
        x -= rule.apply_(state, x, dx.copy())


def assert_close(actual, expected, dtype, units, what):
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if dtype == np.float64:
        tolerance = 1e-12 * scale
    else:
        tolerance = units * float(np.finfo(np.float32).eps) * scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance, err_msg=what)


def assert_same_states(fast, generic, dtype, label):
    assert fast.t == generic.t
    for name in ("v_row", "v_col", "v", "m"):
        a, b = getattr(fast, name), getattr(generic, name)
        assert (a is None) == (b is None), f"{label}: {name}"
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_close(a, b, dtype, 64, f"{label}: {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_equals_the_generic_path(implementation, dtype, options):
    rule = co.Adafactor(**options)
    fast_xs = arrays(SHAPES, dtype, seed=1)
    generic_xs = [x.copy() for x in fast_xs]
    fast_states = [rule.init(x) for x in fast_xs]
    generic_states = [rule.init(x) for x in generic_xs]
    for step in range(1, STEPS + 1):
        dxs = gradients(SHAPES, dtype, step)
        kept = [dx.copy() for dx in dxs]
        rule.begin_step(step)
        assert all(KERNEL.accepts(rule, s, x) for s, x in zip(fast_states, fast_xs))
        KERNEL.run_(rule, fast_states, fast_xs, dxs)
        generic_step(rule, generic_states, generic_xs, dxs)
        for i, shape in enumerate(SHAPES):
            label = f"step {step}, shape {shape}"
            np.testing.assert_array_equal(dxs[i], kept[i], err_msg=f"{label}: the gradient was written")
            assert fast_xs[i].dtype == dtype
            assert_close(fast_xs[i], generic_xs[i], dtype, 8, f"{label}: x")
            assert_same_states(fast_states[i], generic_states[i], dtype, label)
    # the run moved every parameter that has elements
    start = arrays(SHAPES, dtype, seed=1)
    for x, x0 in zip(fast_xs, start):
        if x.size:
            assert not np.array_equal(x, x0)


def test_clipping_is_active_in_the_clipped_case():
    """The "clipped" case must clip: its first update has RMS eta * d * rms(x), not more."""
    rule = co.Adafactor(**OPTIONS["clipped"])
    x = arrays([(300, 129)], np.float64, seed=1)[0]
    update = rule.apply_(rule.init(x), x, gradients([(300, 129)], np.float64, 1)[0])
    rms = np.sqrt(np.mean(update**2))
    assert rms == pytest.approx(1.0 * 0.05 * np.sqrt(np.mean(x**2)), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_one_call_over_both_dtypes_and_several_threads(implementation, monkeypatch, dtype):
    """Big enough to be split between two threads; float32 and float64 arrays in one call."""
    monkeypatch.setenv("COMPOSEOPT_NUM_THREADS", "2")
    shapes = [(600, 500), (500, 300, 2), (700,), (129, 129)]
    other = np.float32 if dtype == np.float64 else np.float64
    rule = co.Adafactor(momentum=0.8)
    xs = arrays(shapes, dtype, seed=2) + arrays(shapes, other, seed=3)
    references = [x.copy() for x in xs]
    states = [rule.init(x) for x in xs]
    reference_states = [rule.init(x) for x in references]
    for step in range(1, 3):
        dxs = gradients(shapes, dtype, step) + gradients(shapes, other, step)
        KERNEL.run_(rule, states, xs, dxs)
        generic_step(rule, reference_states, references, dxs)
    for x, reference, state, reference_state in zip(xs, references, states, reference_states):
        assert_close(x, reference, x.dtype.type, 8, "x")
        assert_same_states(state, reference_state, x.dtype.type, str(x.shape))


def test_counters_advance_each_on_its_own(implementation):
    rule = co.Adafactor(decay_offset=1, min_dim_size_to_factor=4)
    shapes = [(5, 6), (0, 3), (4,)]
    xs = arrays(shapes, np.float64, seed=4)
    references = [x.copy() for x in xs]
    states = [rule.init(x) for x in xs]
    reference_states = [rule.init(x) for x in references]
    for s in (states, reference_states):  # a parameter that has taken three steps already
        s[0].t = 3
    dxs = gradients(shapes, np.float64, 1)
    KERNEL.run_(rule, states, xs, dxs)
    generic_step(rule, reference_states, references, dxs)
    assert [s.t for s in states] == [4, 1, 1]
    for x, reference in zip(xs, references):
        assert_close(x, reference, np.float64, 0, "x")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ["nan", "inf", "zero-rows-without-epsilon", "infinite-x"])
def test_non_finite_values_as_the_generic_path(implementation, dtype, case):
    rule = co.Adafactor(epsilon=0.0 if case == "zero-rows-without-epsilon" else 1e-30, momentum=0.5)
    shapes = [(130, 129), (6,), (128, 128, 1, 2)]
    xs = arrays(shapes, dtype, seed=5)
    dxs = gradients(shapes, dtype, 1)
    if case == "nan":
        dxs[0][3, 4] = dxs[1][2] = np.nan
    elif case == "inf":
        dxs[0][3, 4] = dxs[2][5, 6, 0, 1] = np.inf
    elif case == "zero-rows-without-epsilon":
        dxs[0][7] = dxs[2][:, 3] = 0.0
        dxs[1][:] = 0.0
    else:
        xs[0][1, 2] = np.inf
    references = [x.copy() for x in xs]
    states = [rule.init(x) for x in xs]
    reference_states = [rule.init(x) for x in references]
    with np.errstate(all="ignore"):
        KERNEL.run_(rule, states, xs, dxs)
        generic_step(rule, reference_states, references, dxs)
    for x, reference, state, reference_state in zip(xs, references, states, reference_states):
        np.testing.assert_array_equal(np.isnan(x), np.isnan(reference))
        np.testing.assert_array_equal(np.isinf(x), np.isinf(reference))
        finite = np.isfinite(reference)
        assert_close(x[finite], reference[finite], dtype, 8, "x")
        for name in ("v_row", "v_col", "v", "m"):
            a, b = getattr(state, name), getattr(reference_state, name)
            if b is not None:
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)


def test_a_scalar_that_cannot_be_computed_changes_nothing(implementation):
    """The decay of a step past what a float holds raises, before anything is written."""
    rule = co.Adafactor(min_dim_size_to_factor=2)
    xs = arrays([(4, 5), (3,)], np.float64, seed=6)
    states = [rule.init(x) for x in xs]
    states[1].t = 10**400
    before = [x.copy() for x in xs]
    with pytest.raises(OverflowError):  # as the generic path raises
        rule.apply_(_change(rule.init(xs[1]), t=10**400), xs[1].copy(), np.ones(3))
    with pytest.raises(OverflowError):
        KERNEL.run_(rule, states, xs, [np.ones((4, 5)), np.ones(3)])
    for x, x0 in zip(xs, before):
        np.testing.assert_array_equal(x, x0)
    assert states[0].t == 0 and not np.any(states[0].v_row)


def test_the_fallback_without_numba(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(_fused, "MODE", "auto")
    monkeypatch.setattr(
        factored.importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a)
    )
    assert factored.implementation() == "numpy"


def test_importing_it_does_not_import_numba():
    code = (
        "import sys, composeopt, composeopt._fused.factored; "
        "assert isinstance(composeopt.Adafactor._kernel, composeopt._fused.factored.FactoredKernel); "
        "assert 'numba' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kernel_is_shared_by_the_class():
    assert isinstance(KERNEL, FactoredKernel)
    assert co.Adafactor()._kernel is co.Adafactor(0.5)._kernel is KERNEL


# --------------------------------------------------------------------------
# accepts
# --------------------------------------------------------------------------


def fresh(rule=None, shape=(130, 129), dtype=np.float32):
    rule = rule or co.Adafactor(momentum=0.9)
    x = np.zeros(shape, dtype=dtype)
    return rule, rule.init(x), x


def test_accepts_what_init_makes():
    for shape in [(130, 129), (5,), (), (0, 4), (128, 128, 3, 3)]:
        for dtype in (np.float32, np.float64):
            for rule in (co.Adafactor(), co.Adafactor(momentum=0.5, factored=False)):
                r, state, x = fresh(rule, shape, dtype)
                assert KERNEL.accepts(r, state, x)


def _change(state, **fields):
    for name, value in fields.items():
        setattr(state, name, value)
    return state


REFUSED = {
    "float16": lambda r, s, x: (r, r.init(x.astype(np.float16)), x.astype(np.float16)),
    "integer x": lambda r, s, x: (r, s, x.astype(np.int32)),
    "a list": lambda r, s, x: (r, s, x.tolist()),
    "an ndarray subclass": lambda r, s, x: (r, s, x.view(np.matrix)),
    "a non-contiguous x": lambda r, s, x: (r, r.init(x.T), x.T),
    "a read-only x": lambda r, s, x: (r, s, np.lib.stride_tricks.as_strided(x, writeable=False)),
    "a missing field": lambda r, s, x: (r, co.State(v_row=s.v_row, v_col=s.v_col, v=None, t=0), x),
    "an extra field": lambda r, s, x: (r, _change(s, extra=1), x),
    "a float counter": lambda r, s, x: (r, _change(s, t=1.0), x),
    "a numpy counter": lambda r, s, x: (r, _change(s, t=np.int64(1)), x),
    "a bool counter": lambda r, s, x: (r, _change(s, t=True), x),
    "a v_row of the wrong shape": lambda r, s, x: (r, _change(s, v_row=np.zeros(130, np.float32)), x),
    "a v_col of the wrong dtype": lambda r, s, x: (r, _change(s, v_col=s.v_col.astype(np.float64)), x),
    "a non-contiguous state": lambda r, s, x: (r, _change(s, v_col=np.zeros((260,), np.float32)[::2]), x),
    "a read-only state": lambda r, s, x: (
        r,
        _change(s, m=np.lib.stride_tricks.as_strided(s.m, writeable=False)),
        x,
    ),
    "a list state": lambda r, s, x: (r, _change(s, v_row=s.v_row.tolist()), x),
    "no momentum state": lambda r, s, x: (r, _change(s, m=None), x),
    "a momentum state without momentum": lambda r, s, x: (co.Adafactor(), s, x),
    "factored=False since init": lambda r, s, x: (co.Adafactor(momentum=0.9, factored=False), s, x),
    "a larger min_dim_size_to_factor": lambda r, s, x: (
        co.Adafactor(momentum=0.9, min_dim_size_to_factor=200),
        s,
        x,
    ),
    "a v for a factored shape": lambda r, s, x: (r, _change(s, v=np.zeros_like(x)), x),
    "a dict": lambda r, s, x: (r, dict(vars(s)), x),
    "None": lambda r, s, x: (r, None, x),
}


@pytest.mark.parametrize("make", list(REFUSED.values()), ids=list(REFUSED))
def test_accepts_refuses(make):
    rule, state, x = make(*fresh())
    assert not KERNEL.accepts(rule, state, x)


def test_accepts_refuses_a_factored_state_for_an_unfactored_rule():
    rule, state, x = fresh(co.Adafactor(min_dim_size_to_factor=2), (4, 5))
    assert KERNEL.accepts(rule, state, x)
    assert not KERNEL.accepts(co.Adafactor(min_dim_size_to_factor=5), state, x)
    unfactored = co.Adafactor(min_dim_size_to_factor=5)
    assert not KERNEL.accepts(rule, unfactored.init(x), x)


# --------------------------------------------------------------------------
# optax
# --------------------------------------------------------------------------


@pytest.fixture
def optax_float64_decay(monkeypatch):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import functools

    import jax.numpy as jnp
    from optax._src import factorized

    def decay_in_float64(step, exponent):  # optax takes it in float32
        return 1.0 - (jnp.asarray(step, jnp.float64) + 1.0) ** (-exponent)

    monkeypatch.setattr(
        factorized,
        "scale_by_factored_rms",
        functools.partial(factorized.scale_by_factored_rms, decay_rate_fn=decay_in_float64),
    )
    return optax, jnp


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            {"eta": 0.05, "min_dim_size_to_factor": 3},
            {"learning_rate": 0.05, "min_dim_size_to_factor": 3},
        ),
        (
            {
                "eta": 0.05,
                "momentum": 0.9,
                "lambda_": 0.01,
                "clipping_threshold": 0.5,
                "min_dim_size_to_factor": 2,
            },
            {
                "learning_rate": 0.05,
                "momentum": 0.9,
                "dtype_momentum": np.float64,
                "weight_decay_rate": 0.01,
                "clipping_threshold": 0.5,
                "min_dim_size_to_factor": 2,
            },
        ),
    ],
    ids=["factored", "momentum-decay-clipping"],
)
def test_matches_optax(implementation, optax_float64_decay, ours, theirs):
    optax, jnp = optax_float64_decay
    shapes = {"w": (3, 4), "k": (3, 2, 3, 4), "b": (5,), "t": (6, 7, 2)}
    rule, tx = co.Adafactor(**ours), optax.adafactor(**theirs)
    params = dict(zip(shapes, arrays(shapes.values(), np.float64, seed=7)))
    states = [rule.init(x) for x in params.values()]
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    opt_state = tx.init(jparams)
    for step in range(1, 6):
        grads = dict(zip(shapes, gradients(shapes.values(), np.float64, step)))
        KERNEL.run_(rule, states, list(params.values()), list(grads.values()))
        updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, opt_state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        for k in shapes:
            np.testing.assert_allclose(
                params[k], np.asarray(jparams[k]), rtol=1e-10, atol=1e-12, err_msg=f"{step} {k}"
            )
