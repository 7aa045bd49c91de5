"""Layer-wise rules (Lamb, Lars, Novograd, Fromage, GradCentralization) and factored ones
(Adafactor, SM3): parity with optax, the papers' formulas in plain NumPy, the zero-norm cases,
float16, and no reading of array values on the host.

References: optax 0.2.x run in JAX with x64 enabled, through ``_run_parity`` of
tests/test_optax_parity.py (150 float64 steps, rtol 1e-10); and ``ref_*``
functions below, written from the papers' formulas in float64 NumPy.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import composeopt as co

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def parity():
    """tests/test_optax_parity.py as a module (its `_run_parity`, `optax`, `SHAPES`); skips without optax."""
    pytest.importorskip("optax")
    pytest.importorskip("jax")
    spec = importlib.util.spec_from_file_location("optax_parity_helpers", HERE / "test_optax_parity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------
# Parity with optax
# --------------------------------------------------------------------------

# (id, composeopt constructor, optax constructor taking the optax module)
OPTAX_CASES = [
    ("Lamb-default~lamb", lambda: co.Lamb(), lambda o: o.lamb(0.001)),
    (
        "Lamb~lamb",
        lambda: co.Lamb(0.01, (0.8, 0.95), 1e-8),
        lambda o: o.lamb(0.01, b1=0.8, b2=0.95, eps=1e-8),
    ),
    (
        "Lamb-decay~lamb(weight_decay)",
        lambda: co.Lamb(0.02, epsilon=1e-6, lambda_=0.1),
        lambda o: o.lamb(0.02, weight_decay=0.1),
    ),
    ("Lars-default~lars(1.0)", lambda: co.Lars(), lambda o: o.lars(1.0)),
    (
        "Lars-nesterov-decay-eps~lars",
        lambda: co.Lars(0.5, 0.01, 0.02, 1e-3, 0.8, True),
        lambda o: o.lars(
            0.5, weight_decay=0.01, trust_coefficient=0.02, eps=1e-3, momentum=0.8, nesterov=True
        ),
    ),
    (
        "Lars-decay~lars",
        lambda: co.Lars(0.3, lambda_=0.05, momentum=0.5),
        lambda o: o.lars(0.3, weight_decay=0.05, momentum=0.5),
    ),
    ("Novograd-default~novograd", lambda: co.Novograd(), lambda o: o.novograd(0.001)),
    (
        "Novograd-decay~novograd",
        lambda: co.Novograd(0.01, (0.8, 0.5), 1e-8, 0.01),
        lambda o: o.novograd(0.01, b1=0.8, b2=0.5, eps=1e-8, weight_decay=0.01),
    ),
    ("Fromage-default~fromage", lambda: co.Fromage(), lambda o: o.fromage(0.01)),
    ("Fromage~fromage(0.1)", lambda: co.Fromage(0.1), lambda o: o.fromage(0.1)),
    # norms below 4 are raised to 4: the min_norm branch is taken
    ("Fromage-min_norm~fromage(min_norm=4)", lambda: co.Fromage(0.05, 4.0), lambda o: o.fromage(0.05, 4.0)),
    ("SM3-default~sm3(0.1)", lambda: co.SM3(), lambda o: o.sm3(0.1)),
    ("SM3~sm3(momentum=0.5)", lambda: co.SM3(0.05, 0.5), lambda o: o.sm3(0.05, momentum=0.5)),
]


@pytest.mark.parametrize(
    "make_ours, make_theirs", [pytest.param(ours, theirs, id=name) for name, ours, theirs in OPTAX_CASES]
)
def test_parity_with_optax(parity, make_ours, make_theirs):
    parity._run_parity(make_ours(), make_theirs(parity.optax))


@pytest.mark.parametrize(
    "make_ours, make_theirs",
    [
        pytest.param(lambda: co.SM3(0.05), lambda o: o.sm3(0.05), id="SM3"),
        pytest.param(
            lambda: co.Lars(0.5, lambda_=0.01, nesterov=True),
            lambda o: o.lars(0.5, weight_decay=0.01, nesterov=True),
            id="Lars",
        ),
        pytest.param(lambda: co.Lamb(0.01), lambda o: o.lamb(0.01), id="Lamb"),
    ],
)
def test_parity_with_optax_on_three_and_four_axes(parity, monkeypatch, make_ours, make_theirs):
    monkeypatch.setattr(parity, "SHAPES", {"w": (2, 5, 3), "k": (3, 2, 2, 2)})
    parity._run_parity(make_ours(), make_theirs(parity.optax))


# Adafactor: optax computes the decay 1 - t^-0.8 in float32, which alone moves float64 results
# by about 1e-7.  The strict runs give optax's own adafactor the same decay in float64; the
# plain alias is checked at a tolerance that this float32 rounding fits in.


def _decay_in_float64(step, exponent):
    import jax.numpy as jnp

    return 1.0 - (jnp.asarray(step, jnp.float64) + 1.0) ** (-exponent)


@pytest.fixture
def adafactor_float64(parity, monkeypatch):
    from optax._src import factorized

    monkeypatch.setattr(
        factorized,
        "scale_by_factored_rms",
        functools.partial(factorized.scale_by_factored_rms, decay_rate_fn=_decay_in_float64),
    )
    return parity


ADAFACTOR_CASES = [
    # (id, composeopt constructor, optax constructor, shapes)
    # optax's learning_rate=None (its default) is eta=1; the paper's relative step is 1e-2
    ("default-unfactored", lambda: co.Adafactor(), lambda o: o.adafactor(0.01), None),
    (
        "eta=1~adafactor()",
        lambda: co.Adafactor(1.0, min_dim_size_to_factor=3),
        lambda o: o.adafactor(min_dim_size_to_factor=3),
        None,
    ),
    (
        "factored",  # (3, 4) factored, (5,) not
        lambda: co.Adafactor(0.05, min_dim_size_to_factor=3),
        lambda o: o.adafactor(0.05, min_dim_size_to_factor=3),
        None,
    ),
    (
        "factored-momentum-decay",
        lambda: co.Adafactor(0.05, 0.7, 1e-20, 2.0, momentum=0.9, lambda_=0.01, min_dim_size_to_factor=2),
        lambda o: o.adafactor(
            0.05,
            min_dim_size_to_factor=2,
            decay_rate=0.7,
            eps=1e-20,
            clipping_threshold=2.0,
            momentum=0.9,
            dtype_momentum=np.float64,
            weight_decay_rate=0.01,
        ),
        None,
    ),
    (
        "no-clipping-no-parameter-scale",
        lambda: co.Adafactor(0.01, clipping_threshold=None, multiply_by_parameter_scale=False),
        lambda o: o.adafactor(0.01, clipping_threshold=None, multiply_by_parameter_scale=False),
        None,
    ),
    (
        "factored=False",
        lambda: co.Adafactor(0.05, factored=False, min_dim_size_to_factor=2),
        lambda o: o.adafactor(0.05, factored=False, min_dim_size_to_factor=2),
        None,
    ),
    (
        "three-and-four-axes",  # the two largest axes, ties to the earlier one
        lambda: co.Adafactor(0.05, min_dim_size_to_factor=2),
        lambda o: o.adafactor(0.05, min_dim_size_to_factor=2),
        {"w": (2, 5, 3), "k": (3, 2, 3, 4), "b": (4, 4)},
    ),
]


@pytest.mark.parametrize(
    "make_ours, make_theirs, shapes",
    [pytest.param(ours, theirs, shapes, id=name) for name, ours, theirs, shapes in ADAFACTOR_CASES],
)
def test_adafactor_parity_with_optax(adafactor_float64, monkeypatch, make_ours, make_theirs, shapes):
    parity = adafactor_float64
    if shapes is not None:
        monkeypatch.setattr(parity, "SHAPES", shapes)
    parity._run_parity(make_ours(), make_theirs(parity.optax))


def test_adafactor_matches_the_plain_optax_alias_to_its_float32_decay(parity, monkeypatch):
    monkeypatch.setattr(parity, "RTOL", 1e-5)
    monkeypatch.setattr(parity, "ATOL", 1e-8)
    parity._run_parity(
        co.Adafactor(0.05, min_dim_size_to_factor=3), parity.optax.adafactor(0.05, min_dim_size_to_factor=3)
    )


# --------------------------------------------------------------------------
# The papers' formulas, in plain NumPy
# --------------------------------------------------------------------------

RNG = np.random.default_rng(5)
X0 = RNG.normal(size=(3, 4))
GRADS = [RNG.normal(size=(3, 4)) for _ in range(6)]
GRADS[2][1, :] = 0.0  # a zero row: SM3's 0/0 convention, Adafactor's epsilon


def run(opt, grads=GRADS, x0=X0):
    x = np.array(x0)
    history = []
    for g in grads:
        co.update_(opt, x, g.copy())
        history.append(x.copy())
    return history


def reference(x0, grads, update):
    """x after each step of x ← x - update(t, g, x), t = 1, 2, ..."""
    x, history = np.array(x0), []
    for t, g in enumerate(grads, start=1):
        x = x - update(t, g, x)
        history.append(x)
    return history


def assert_trajectory(got, expected, rtol=1e-12):
    for step, (a, e) in enumerate(zip(got, expected), start=1):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-14, err_msg=f"after step {step}")


def ref_lamb(x0, grads, eta, b1, b2, eps, lam):
    """You et al. (2019), algorithm 2 with phi the identity."""
    m, v = np.zeros_like(x0), np.zeros_like(x0)

    def update(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + lam * x
        return eta * np.linalg.norm(x) / np.linalg.norm(r) * r

    return reference(x0, grads, update)


def ref_lars(x0, grads, eta, lam, coefficient, momentum):
    """You, Gitman & Ginsburg (2017), algorithm 1: its denominator is |g| + lam |x|, which
    optax and composeopt replace by |g + lam x|; the two agree for lam = 0."""
    v = np.zeros_like(x0)

    def update(t, g, x):
        nonlocal v
        local_rate = coefficient * np.linalg.norm(x) / (np.linalg.norm(g) + lam * np.linalg.norm(x))
        v = momentum * v + eta * local_rate * (g + lam * x)
        return v

    return reference(x0, grads, update)


def ref_novograd(x0, grads, eta, b1, b2, eps, lam):
    """Ginsburg et al. (2019), algorithm 1: v and m start from the first gradient."""
    m, v = None, None

    def update(t, g, x):
        nonlocal m, v
        norm2 = np.sum(g * g)
        v = norm2 if v is None else b2 * v + (1 - b2) * norm2
        step = g / (np.sqrt(v) + eps) + lam * x
        m = step if m is None else b1 * m + step
        return eta * m

    return reference(x0, grads, update)


def ref_fromage(x0, grads, eta):
    """Bernstein et al. (2020), algorithm 1."""
    return reference(
        x0,
        grads,
        lambda t, g, x: x - (x - eta * np.linalg.norm(x) / np.linalg.norm(g) * g) / math.sqrt(1 + eta**2),
    )


def ref_adafactor(x0, grads, rho, d, eps1=1e-30, eps2=1e-3):
    """Shazeer & Stern (2018), algorithm 4 (a matrix) with the relative step rho and beta2 = 1 - t^-0.8."""
    rows = np.zeros(x0.shape[0])
    cols = np.zeros(x0.shape[1])

    def update(t, g, x):
        nonlocal rows, cols
        beta = 1 - t**-0.8
        g2 = g * g + eps1
        rows = beta * rows + (1 - beta) * g2.sum(axis=1)  # R: row sums
        cols = beta * cols + (1 - beta) * g2.sum(axis=0)  # C: column sums
        v = np.outer(rows, cols) / rows.sum()
        u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / d)
        return max(eps2, np.sqrt(np.mean(x * x))) * rho * u

    return reference(x0, grads, update)


def ref_sm3_matrix(x0, grads, eta):
    """Anil et al. (2019), SM3-II with the rows and the columns as the cover; 0/0 = 0."""
    row_max = np.zeros(x0.shape[0])
    col_max = np.zeros(x0.shape[1])

    def update(t, g, x):
        nonlocal row_max, col_max
        nu = np.minimum(row_max[:, None], col_max[None, :]) + g * g
        row_max, col_max = nu.max(axis=1), nu.max(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return eta * np.where(nu > 0, g / np.sqrt(nu), 0.0)

    return reference(x0, grads, update)


@pytest.mark.parametrize(
    "make_rule, make_reference",
    [
        pytest.param(
            lambda: co.Lamb(0.05, (0.8, 0.9), 1e-6, 0.1),
            lambda: ref_lamb(X0, GRADS, 0.05, 0.8, 0.9, 1e-6, 0.1),
            id="Lamb",
        ),
        pytest.param(
            lambda: co.Lars(0.5, 0.0, 0.02, 0.0, 0.8),
            lambda: ref_lars(X0, GRADS, 0.5, 0.0, 0.02, 0.8),
            id="Lars",
        ),
        pytest.param(
            lambda: co.Novograd(0.05, (0.9, 0.5), 1e-6, 0.01),
            lambda: ref_novograd(X0, GRADS, 0.05, 0.9, 0.5, 1e-6, 0.01),
            id="Novograd",
        ),
        pytest.param(lambda: co.Fromage(0.2, 0.0), lambda: ref_fromage(X0, GRADS, 0.2), id="Fromage"),
        pytest.param(
            lambda: co.Adafactor(0.05, min_dim_size_to_factor=3),
            lambda: ref_adafactor(X0, GRADS, 0.05, 1.0),
            id="Adafactor-factored",
        ),
        pytest.param(
            lambda: co.SM3(0.1, momentum=0.0, epsilon=0.0),
            lambda: ref_sm3_matrix(X0, GRADS, 0.1),
            id="SM3",
        ),
    ],
)
def test_rule_matches_the_papers_formula(make_rule, make_reference):
    assert_trajectory(run(make_rule()), make_reference())


def test_sm3_keeps_a_row_and_a_column_accumulator():
    opt, x = co.SM3(), np.array(X0)
    co.update_(opt, x, GRADS[0])
    state = co.state_store(opt).get(x)
    rows, cols = state.accumulators
    np.testing.assert_array_equal(rows, (GRADS[0] ** 2).max(axis=1))
    np.testing.assert_array_equal(cols, (GRADS[0] ** 2).max(axis=0))


def test_sm3_on_a_vector_and_a_scalar_is_adagrad_with_momentum():
    eta, mu, eps = 0.1, 0.5, 1e-8
    opt, x, s = co.SM3(eta, mu, eps), np.array([1.0, -2.0, 0.5]), np.array(0.7)
    grads = [np.array([0.3, -1.2, 0.0]), np.array([-0.7, 0.0, 2.5]), np.array([0.2, 0.4, -0.2])]
    acc, m, ref = np.zeros(3), np.zeros(3), np.array([1.0, -2.0, 0.5])
    acc_s, m_s, ref_s = 0.0, 0.0, 0.7
    for g in grads:
        co.update_(opt, {"x": x, "s": s}, {"x": g.copy(), "s": np.array(g[0])})
        acc = acc + g * g
        with np.errstate(divide="ignore", invalid="ignore"):
            m = mu * m + (1 - mu) * np.where(acc > 0, g / np.sqrt(acc + eps), 0.0)
        ref = ref - eta * m
        acc_s += g[0] ** 2
        m_s = mu * m_s + (1 - mu) * g[0] / math.sqrt(acc_s + eps)
        ref_s -= eta * m_s
    np.testing.assert_allclose(x, ref, rtol=1e-12)
    np.testing.assert_allclose(s, ref_s, rtol=1e-12)
    assert s.shape == ()


def test_adafactor_keeps_row_and_column_means_only_where_it_factors():
    opt = co.Adafactor(min_dim_size_to_factor=3)
    params = {"W": np.ones((3, 4)), "thin": np.ones((2, 4)), "b": np.ones(4)}
    co.update_(opt, params, {k: np.full(v.shape, 0.5) for k, v in params.items()})
    store = co.state_store(opt)
    factored = store.get(params["W"])
    assert factored.v is None and factored.v_row.shape == (3,) and factored.v_col.shape == (4,)
    np.testing.assert_allclose(factored.v_row, 0.25)  # the first step's decay is 0
    assert store.get(params["thin"]).v.shape == (2, 4)  # its second largest axis is below 3
    assert store.get(params["b"]).v_row is None and store.get(params["b"]).m is None


def test_adafactor_momentum_switched_on_later_gets_its_state():
    opt, x = co.Adafactor(0.1), np.linspace(-1, 1, 5)
    co.update_(opt, x, np.ones(5))
    opt.momentum = 0.9
    co.update_(opt, x, np.ones(5))
    assert co.state_store(opt).get(x).m.shape == (5,)


def test_adafactor_decay_offset_counts_from_the_offset():
    """With t0 = 3 the decay at steps 1 to 4 is that of step 1 (0); steps 5, 6 are steps 2, 3."""
    offset, plain = co.Adafactor(0.1, decay_offset=3), co.Adafactor(0.1)
    x, y = np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)
    grads = [np.cos(np.arange(5.0) + k) for k in range(6)]
    for g in grads:
        co.update_(offset, x, g)
    for g in grads[3:]:
        co.update_(plain, y, g)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(co.state_store(offset).get(x).v, co.state_store(plain).get(y).v, rtol=1e-12)


# --------------------------------------------------------------------------
# Trust ratios where a norm is zero (optax's convention: the ratio is 1)
# --------------------------------------------------------------------------


def test_lamb_on_a_zero_parameter_takes_the_plain_adam_step():
    x = np.zeros(3)
    co.update_(co.Lamb(0.1, epsilon=0.0), x, np.array([2.0, -1.0, 0.5]))
    np.testing.assert_allclose(x, [-0.1, 0.1, -0.1])


def test_zero_gradients_give_zero_steps_without_nan(backend):
    x0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    for make in (co.Lamb, co.Lars, co.Novograd, co.SM3, co.Adafactor, lambda: co.Fromage(0.5, 0.0)):
        x = backend.asarray(x0, "float32")
        with np.errstate(divide="raise", invalid="raise", over="raise"):  # NumPy must not even warn
            co.update_(make(), x, backend.asarray(np.zeros((2, 2)), "float32"))
        # Fromage's ratio is 1 and it still shrinks x by its factor 1 / sqrt(1 + eta^2).
        expected = x0 / math.sqrt(1.25) if isinstance(make(), co.Fromage) else x0
        np.testing.assert_allclose(backend.to_numpy(x), expected.astype(np.float32), rtol=1e-7)


def test_lars_ratio_is_one_not_the_trust_coefficient_for_a_zero_parameter():
    x = np.zeros(2)
    co.update_(co.Lars(0.5, momentum=0.0), x, np.array([1.0, -2.0]))
    np.testing.assert_allclose(x, [-0.5, 1.0])


def test_fromage_raises_small_norms_to_min_norm():
    x = np.array([1e-8, 0.0])
    co.update_(co.Fromage(0.5, min_norm=1e-3), x, np.array([0.0, 4.0]))
    shrink = 1 / math.sqrt(1.25)
    np.testing.assert_allclose(x, [1e-8 * shrink, -0.5 * 1e-3 / 4.0 * 4.0 * shrink], rtol=1e-12)


# --------------------------------------------------------------------------
# GradCentralization
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (4, 2, 3, 3), (5, 1)])
def test_grad_centralization_subtracts_the_mean_over_all_axes_but_the_first(shape):
    g = np.random.default_rng(2).normal(size=shape)
    x = np.zeros(shape)
    co.update_(co.GradCentralization(), x, g.copy())
    mean = g.reshape(shape[0], -1).mean(axis=1).reshape((shape[0],) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(-x, g - mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(x.reshape(shape[0], -1).sum(axis=1), 0.0, atol=1e-12)


def test_grad_centralization_by_hand():
    x = np.zeros((2, 3))
    co.update_(co.GradCentralization(), x, np.array([[1.0, 2.0, 6.0], [-3.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(-x, [[-2.0, -1.0, 3.0], [-2.0, 1.0, 1.0]])


def test_grad_centralization_leaves_vectors_scalars_and_empty_arrays_alone():
    params = {"b": np.zeros(3), "s": np.array(0.0), "e": np.zeros((2, 0))}
    grads = {"b": np.array([1.0, 2.0, 6.0]), "s": np.array(4.0), "e": np.zeros((2, 0))}
    co.update_(co.GradCentralization(), params, {k: v.copy() for k, v in grads.items()})
    for key in params:
        np.testing.assert_array_equal(-params[key], grads[key])


def test_grad_centralization_before_adam_is_adam_on_centred_gradients():
    x, y = np.array(X0), np.array(X0)
    chain, adam = co.Optimiser(co.GradCentralization(), co.Adam(0.05)), co.Adam(0.05)
    for g in GRADS:
        co.update_(chain, x, g.copy())
        co.update_(adam, y, g - g.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(x, y, rtol=1e-12)


# --------------------------------------------------------------------------
# float16, and no reading of array values on the host
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: co.Lamb(0.01),
        lambda: co.Lars(1.0),
        lambda: co.Novograd(1.0),
        lambda: co.Fromage(0.01),
        lambda: co.Adafactor(0.01, min_dim_size_to_factor=2),
        lambda: co.SM3(1.0),
    ],
    ids=["Lamb", "Lars", "Novograd", "Fromage", "Adafactor", "SM3"],
)
def test_float16_arrays_whose_sum_of_squares_overflows_float16(make):
    """sum(x**2) = 64 * 4096 > 65504: the norms must be reduced in a wider type."""
    rng = np.random.default_rng(3)
    x64 = 8.0 + rng.uniform(-0.5, 0.5, (64, 64))
    x16, opt16, opt64 = x64.astype(np.float16), make(), make()
    start = x16.copy()
    for step in range(3):
        # |g| in [0.5, 1.5], clear of float16's epsilon floor; sum(g**2) < 65504 fits Novograd's v
        g = 1 + 0.5 * np.cos(3 * x64 + step)
        co.update_(opt16, x16, g.astype(np.float16))
        co.update_(opt64, x64, g)
    assert x16.dtype == np.float16 and np.all(np.isfinite(x16))
    assert not np.array_equal(x16, start)  # the steps are larger than float16's spacing near 8
    np.testing.assert_allclose(x16.astype(np.float64), x64, rtol=0, atol=2e-2)
