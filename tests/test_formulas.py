"""Reference tests: every rule against its update formula, written out in NumPy.

Each ``ref_*`` function below is written straight from the formula in the
specification, in plain float64 NumPy, independently of ``composeopt``.  It
takes the starting parameter ``x0`` and the list of gradients, and returns the
expected parameter after each step (``x_t = x_{t-1} - update_t``).  The tests
run the library rule for the same steps with ``co.update_`` (in place, on the
same array object every step) and compare ``x`` after every step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co

RTOL = 1e-12
ATOL = 1e-15

X0 = np.array([1.0, -2.0, 0.5])

# Fixed, non-trivial gradients: they differ from step to step and each of the
# first three holds a zero and a negative component.
GRADS = [
    np.array([0.3, -1.2, 0.0]),
    np.array([-0.7, 0.0, 2.5]),
    np.array([0.0, 0.4, -0.2]),
    np.array([0.2, -0.9, 0.6]),
    np.array([-1.1, 0.5, 0.05]),
    np.array([0.8, 1.3, -0.4]),
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def run_library(opt, grads, x0=X0):
    """Run ``co.update_`` once per gradient on one array; return x after each step.

    The same array object is updated in place every step (the optimiser keys
    its state on the array's identity); gradients are passed as copies so a
    rule that works in place on its input cannot corrupt the references.
    """
    x = np.array(x0, dtype=np.float64)
    history = []
    for g in grads:
        co.update_(opt, x, g.copy())
        history.append(x.copy())
    return history


def assert_trajectory(got, expected, rtol=RTOL, atol=ATOL):
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"after step {step}")


def steps(x0, grads, update_fn):
    """Apply ``x -= update_fn(t, g, x)`` for t = 1, 2, ...; return x after each step.

    ``update_fn`` carries its own state in a closure; ``x`` is the parameter
    before the step.
    """
    x = np.array(x0, dtype=np.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        x = x - update_fn(t, g, x)
        out.append(x)
    return out


# --------------------------------------------------------------------------
# Reference implementations (plain NumPy, straight from the formulas)
# --------------------------------------------------------------------------


def ref_descent(x0, grads, eta):
    return steps(x0, grads, lambda t, g, x: eta * g)


def ref_momentum(x0, grads, eta, rho):
    v = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal v
        v = rho * v + eta * g
        return v

    return steps(x0, grads, upd)


def ref_nesterov(x0, grads, eta, rho):
    vel = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal vel
        u = -(rho**2) * vel + (1 + rho) * eta * g  # uses the old velocity
        vel = rho * vel - eta * g
        return u

    return steps(x0, grads, upd)


def ref_rmsprop(x0, grads, eta, rho, eps, centred):
    quad = np.zeros_like(x0)
    lin = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal quad, lin
        quad = rho * quad + (1 - rho) * g**2
        if centred:
            lin = rho * lin + (1 - rho) * g
        return eta * g / (np.sqrt(quad - lin**2) + eps)

    return steps(x0, grads, upd)


def ref_adam(x0, grads, eta, beta, eps):
    b1, b2 = beta
    m = np.zeros_like(x0)
    v = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        return eta * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)

    return steps(x0, grads, upd)


def ref_radam(x0, grads, eta, beta, eps, branches=None):
    """RAdam; if ``branches`` is a list, appends True/False (rectified or not) per step."""
    b1, b2 = beta
    m = np.zeros_like(x0)
    v = np.zeros_like(x0)
    rho_inf = 2 / (1 - b2) - 1

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if branches is not None:
            branches.append(rho_t > 4)
        if rho_t > 4:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return eta * r * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        return eta * m / (1 - b1**t)

    return steps(x0, grads, upd)


def ref_adamax(x0, grads, eta, beta, eps):
    b1, b2 = beta
    m = np.zeros_like(x0)
    u = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, u
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g))
        return eta / (1 - b1**t) * m / (u + eps)

    return steps(x0, grads, upd)


def ref_nadam(x0, grads, eta, beta, eps):
    """Dozat's NAdam in the form used by Optimisers.jl (b2 inside the root)."""
    b1, b2 = beta
    m = np.zeros_like(x0)
    v = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        num = b1 * m / (1 - b1 * b1**t) + (1 - b1) * g / (1 - b1**t)
        return eta * num / (np.sqrt(b2 * v / (1 - b2**t)) + eps)

    return steps(x0, grads, upd)


def ref_amsgrad(x0, grads, eta, beta, eps):
    """AMSGrad as Optimisers.jl: moments start filled with eps, no bias correction."""
    b1, b2 = beta
    m = np.full_like(x0, eps)
    v = np.full_like(x0, eps)
    vhat = np.full_like(x0, eps)

    def upd(t, g, x):
        nonlocal m, v, vhat
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        vhat = np.maximum(vhat, v)
        return eta * m / (np.sqrt(vhat) + eps)

    return steps(x0, grads, upd)


def ref_oadam(x0, grads, eta, beta, eps):
    b1, b2 = beta
    m = np.zeros_like(x0)
    v = np.zeros_like(x0)
    term = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, v, term
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        old_term = term
        term = eta * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        return 2 * term - old_term

    return steps(x0, grads, upd)


def ref_adagrad(x0, grads, eta, eps):
    acc = np.full_like(x0, eps)

    def upd(t, g, x):
        nonlocal acc
        acc = acc + g**2
        return eta * g / (np.sqrt(acc) + eps)

    return steps(x0, grads, upd)


def ref_adadelta(x0, grads, rho, eps):
    acc = np.zeros_like(x0)
    dacc = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal acc, dacc
        acc = rho * acc + (1 - rho) * g**2
        d = g * np.sqrt(dacc + eps) / np.sqrt(acc + eps)  # old dacc
        dacc = rho * dacc + (1 - rho) * d**2
        return d

    return steps(x0, grads, upd)


def ref_adamw(x0, grads, eta, beta, lambda_, eps, couple):
    b1, b2 = beta
    m = np.zeros_like(x0)
    v = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        a = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if couple:
            return eta * (a + lambda_ * x)
        return eta * a + lambda_ * x

    return steps(x0, grads, upd)


def ref_adabelief(x0, grads, eta, beta, eps):
    b1, b2 = beta
    m = np.zeros_like(x0)
    s = np.zeros_like(x0)

    def upd(t, g, x):
        nonlocal m, s
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps  # uses the new m
        return eta * (m / (1 - b1**t)) / (np.sqrt(s / (1 - b2**t)) + eps)

    return steps(x0, grads, upd)


def ref_weightdecay(x0, grads, lambda_):
    return steps(x0, grads, lambda t, g, x: g + lambda_ * x)


def ref_invdecay(x0, grads, gamma):
    return steps(x0, grads, lambda t, g, x: g / (1 + gamma * t))


def ref_clipvalue(x0, grads, thresh):
    return steps(x0, grads, lambda t, g, x: np.clip(g, -thresh, thresh))


def pnorm(g, p):
    if p == np.inf:
        return np.max(np.abs(g))
    return np.sum(np.abs(g) ** p) ** (1 / p)


def ref_clipnorm(x0, grads, omega, p):
    return steps(x0, grads, lambda t, g, x: g * min(1.0, omega / pnorm(g, p)))


# --------------------------------------------------------------------------
# One test per rule family: defaults and non-default hyperparameters
# --------------------------------------------------------------------------

# (id, constructor, reference) triples.  The "defaults" cases construct the
# rule with no arguments, so they also check the default hyperparameters.
RULE_CASES = [
    ("Descent-defaults", lambda: co.Descent(), lambda: ref_descent(X0, GRADS[:3], 0.1)),
    ("Descent-eta0.3", lambda: co.Descent(0.3), lambda: ref_descent(X0, GRADS[:3], 0.3)),
    ("Momentum-defaults", lambda: co.Momentum(), lambda: ref_momentum(X0, GRADS[:3], 0.01, 0.9)),
    (
        "Momentum-eta0.2-rho0.5",
        lambda: co.Momentum(0.2, 0.5),
        lambda: ref_momentum(X0, GRADS[:3], 0.2, 0.5),
    ),
    ("Nesterov-defaults", lambda: co.Nesterov(), lambda: ref_nesterov(X0, GRADS[:3], 0.001, 0.9)),
    (
        "Nesterov-eta0.2-rho0.7",
        lambda: co.Nesterov(0.2, 0.7),
        lambda: ref_nesterov(X0, GRADS[:3], 0.2, 0.7),
    ),
    (
        "RMSProp-defaults",
        lambda: co.RMSProp(),
        lambda: ref_rmsprop(X0, GRADS[:3], 0.001, 0.9, 1e-8, False),
    ),
    (
        "RMSProp-eta0.05-rho0.8-eps1e-3",
        lambda: co.RMSProp(0.05, 0.8, 1e-3),
        lambda: ref_rmsprop(X0, GRADS[:3], 0.05, 0.8, 1e-3, False),
    ),
    (
        "RMSProp-centred",
        lambda: co.RMSProp(0.05, 0.8, 1e-3, centred=True),
        lambda: ref_rmsprop(X0, GRADS[:3], 0.05, 0.8, 1e-3, True),
    ),
    (
        "RMSProp-centred-positional",
        lambda: co.RMSProp(0.02, 0.7, 1e-8, True),
        lambda: ref_rmsprop(X0, GRADS[:3], 0.02, 0.7, 1e-8, True),
    ),
    ("Adam-defaults", lambda: co.Adam(), lambda: ref_adam(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-8)),
    (
        "Adam-eta0.05-beta(0.8,0.95)-eps1e-3",
        lambda: co.Adam(0.05, (0.8, 0.95), 1e-3),
        lambda: ref_adam(X0, GRADS[:3], 0.05, (0.8, 0.95), 1e-3),
    ),
    (
        "Adam-keywords",
        lambda: co.Adam(eta=0.05, beta=(0.8, 0.95), epsilon=1e-3),
        lambda: ref_adam(X0, GRADS[:3], 0.05, (0.8, 0.95), 1e-3),
    ),
    (
        "RAdam-defaults",
        lambda: co.RAdam(),
        lambda: ref_radam(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-8),
    ),
    (
        "AdaMax-defaults",
        lambda: co.AdaMax(),
        lambda: ref_adamax(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-8),
    ),
    (
        "AdaMax-eta0.05-beta(0.8,0.5)",
        lambda: co.AdaMax(0.05, (0.8, 0.5), 1e-3),
        lambda: ref_adamax(X0, GRADS[:3], 0.05, (0.8, 0.5), 1e-3),
    ),
    (
        "NAdam-defaults",
        lambda: co.NAdam(),
        lambda: ref_nadam(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-8),
    ),
    (
        "NAdam-eta0.05-beta(0.8,0.95)-eps1e-3",
        lambda: co.NAdam(0.05, (0.8, 0.95), 1e-3),
        lambda: ref_nadam(X0, GRADS[:3], 0.05, (0.8, 0.95), 1e-3),
    ),
    (
        "AMSGrad-defaults",
        lambda: co.AMSGrad(),
        lambda: ref_amsgrad(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-8),
    ),
    (
        "AMSGrad-eta0.05-beta(0.8,0.95)-eps1e-2",
        lambda: co.AMSGrad(0.05, (0.8, 0.95), 1e-2),
        lambda: ref_amsgrad(X0, GRADS[:3], 0.05, (0.8, 0.95), 1e-2),
    ),
    (
        "OAdam-defaults",
        lambda: co.OAdam(),
        lambda: ref_oadam(X0, GRADS[:3], 0.001, (0.5, 0.9), 1e-8),
    ),
    (
        "OAdam-eta0.05-beta(0.7,0.95)-eps1e-3",
        lambda: co.OAdam(0.05, (0.7, 0.95), 1e-3),
        lambda: ref_oadam(X0, GRADS[:3], 0.05, (0.7, 0.95), 1e-3),
    ),
    ("AdaGrad-defaults", lambda: co.AdaGrad(), lambda: ref_adagrad(X0, GRADS[:3], 0.1, 1e-8)),
    (
        "AdaGrad-eta0.3-eps1e-2",
        lambda: co.AdaGrad(0.3, 1e-2),
        lambda: ref_adagrad(X0, GRADS[:3], 0.3, 1e-2),
    ),
    ("AdaDelta-defaults", lambda: co.AdaDelta(), lambda: ref_adadelta(X0, GRADS[:3], 0.9, 1e-8)),
    (
        "AdaDelta-rho0.5-eps1e-2",
        lambda: co.AdaDelta(0.5, 1e-2),
        lambda: ref_adadelta(X0, GRADS[:3], 0.5, 1e-2),
    ),
    (
        "AdamW-defaults",
        lambda: co.AdamW(),
        lambda: ref_adamw(X0, GRADS[:3], 0.001, (0.9, 0.999), 0.0, 1e-8, True),
    ),
    (
        "AdamW-couple-True",
        lambda: co.AdamW(0.05, (0.8, 0.95), 0.1, 1e-3, True),
        lambda: ref_adamw(X0, GRADS[:3], 0.05, (0.8, 0.95), 0.1, 1e-3, True),
    ),
    (
        "AdamW-couple-False",
        lambda: co.AdamW(0.05, (0.8, 0.95), 0.1, 1e-3, couple=False),
        lambda: ref_adamw(X0, GRADS[:3], 0.05, (0.8, 0.95), 0.1, 1e-3, False),
    ),
    (
        "AdamW-keywords-lambda_",
        lambda: co.AdamW(eta=0.05, lambda_=0.3),
        lambda: ref_adamw(X0, GRADS[:3], 0.05, (0.9, 0.999), 0.3, 1e-8, True),
    ),
    (
        "AdaBelief-defaults",
        lambda: co.AdaBelief(),
        lambda: ref_adabelief(X0, GRADS[:3], 0.001, (0.9, 0.999), 1e-16),
    ),
    (
        "AdaBelief-eta0.05-beta(0.8,0.95)-eps1e-3",
        lambda: co.AdaBelief(0.05, (0.8, 0.95), 1e-3),
        lambda: ref_adabelief(X0, GRADS[:3], 0.05, (0.8, 0.95), 1e-3),
    ),
    ("WeightDecay-defaults", lambda: co.WeightDecay(), lambda: ref_weightdecay(X0, GRADS[:3], 5e-4)),
    ("WeightDecay-lambda0.3", lambda: co.WeightDecay(0.3), lambda: ref_weightdecay(X0, GRADS[:3], 0.3)),
    ("InvDecay-defaults", lambda: co.InvDecay(), lambda: ref_invdecay(X0, GRADS[:3], 0.001)),
    ("InvDecay-gamma0.5", lambda: co.InvDecay(0.5), lambda: ref_invdecay(X0, GRADS[:3], 0.5)),
    ("ClipValue-0.5", lambda: co.ClipValue(0.5), lambda: ref_clipvalue(X0, GRADS[:3], 0.5)),
    ("ClipGrad-alias-0.5", lambda: co.ClipGrad(0.5), lambda: ref_clipvalue(X0, GRADS[:3], 0.5)),
    (
        "ClipNorm-defaults",
        lambda: co.ClipNorm(),
        lambda: ref_clipnorm(X0, GRADS[:3], 10.0, 2),
    ),
    (
        "ClipNorm-omega0.5",
        lambda: co.ClipNorm(0.5),
        lambda: ref_clipnorm(X0, GRADS[:3], 0.5, 2),
    ),
]


@pytest.mark.parametrize(
    "make_rule, make_reference",
    [pytest.param(rule, ref, id=name) for name, rule, ref in RULE_CASES],
)
def test_rule_matches_formula(make_rule, make_reference):
    """Three steps of one rule versus its NumPy formula (see the ``ref_*`` functions)."""
    assert_trajectory(run_library(make_rule(), GRADS[:3]), make_reference())


def test_update_is_in_place_and_keeps_dtype():
    """``update_`` changes the given array object itself and keeps it float64."""
    x = X0.copy()
    before = x
    co.update_(co.Descent(0.1), x, GRADS[0].copy())
    assert x is before
    assert x.dtype == np.float64
    np.testing.assert_allclose(x, X0 - 0.1 * GRADS[0], rtol=RTOL, atol=ATOL)


def test_functional_update_returns_new_params_and_leaves_input():
    """``co.update`` returns new params (x - eta*g) and does not modify its input."""
    x = X0.copy()
    new = co.update(co.Descent(0.1), x, GRADS[0].copy())
    np.testing.assert_array_equal(x, X0)
    np.testing.assert_allclose(new, X0 - 0.1 * GRADS[0], rtol=RTOL, atol=ATOL)

    params = {"a": X0.copy(), "b": np.array([3.0, -1.0])}
    grads = {"a": GRADS[1].copy(), "b": np.array([0.5, 0.0])}
    new = co.update(co.Descent(0.2), params, grads)
    np.testing.assert_array_equal(params["a"], X0)
    np.testing.assert_array_equal(params["b"], [3.0, -1.0])
    np.testing.assert_allclose(new["a"], X0 - 0.2 * GRADS[1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(new["b"], [3.0 - 0.1, -1.0], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# RAdam: both branches (rho_t <= 4 and rho_t > 4)
# --------------------------------------------------------------------------


def test_radam_both_branches():
    """With b2 = 0.8, rho_t <= 4 for t <= 4 and rho_t > 4 from t = 5 on.

    Reference: ``ref_radam`` (threshold 4, as in the paper / Optimisers.jl).
    """
    branches = []
    expected = ref_radam(X0, GRADS, 0.05, (0.9, 0.8), 1e-3, branches)
    assert branches == [False, False, False, False, True, True]
    got = run_library(co.RAdam(0.05, (0.9, 0.8), 1e-3), GRADS)
    assert_trajectory(got, expected)


# --------------------------------------------------------------------------
# ExpDecay / InvDecay: counting optimiser steps
# --------------------------------------------------------------------------


def test_expdecay_sanity_sequence():
    """Flux's sanity check: ExpDecay(0.2, 0.5, 1, 1e-3) alone with g = 1 gives
    updates max(0.2 * 0.5**n, 1e-3) for n = 1..8, and ``opt.eta`` follows them."""
    opt = co.ExpDecay(0.2, 0.5, 1, 1e-3)
    x = np.zeros(2)
    total = 0.0
    for n in range(1, 9):
        co.update_(opt, x, np.ones(2))
        expected_eta = max(0.2 * 0.5**n, 1e-3)
        total += expected_eta
        assert opt.eta == pytest.approx(expected_eta, rel=RTOL, abs=0)
        np.testing.assert_allclose(x, [-total, -total], rtol=RTOL, atol=0, err_msg=f"step {n}")
    # the last step is clipped: 0.2 * 0.5**8 = 7.8e-4 < 1e-3
    assert opt.eta == pytest.approx(1e-3, rel=RTOL, abs=0)


def test_expdecay_defaults_do_not_decay_early():
    """ExpDecay() = eta 0.001, decay_step 1000: three steps are plain 0.001 * g."""
    opt = co.ExpDecay()
    got = run_library(opt, GRADS[:3])
    assert_trajectory(got, ref_descent(X0, GRADS[:3], 0.001))
    assert opt.eta == pytest.approx(0.001, rel=RTOL, abs=0)


def test_expdecay_counts_update_calls_not_arrays():
    """With a dict of 3 arrays and decay_step = 2, eta decays once every 2
    ``update_`` calls (steps 2 and 4), not once per array."""
    opt = co.ExpDecay(0.1, 0.5, 2, 1e-4)
    x0 = {"a": X0.copy(), "b": np.array([2.0, -1.0]), "c": np.array([[0.5], [1.5]])}
    params = {k: v.copy() for k, v in x0.items()}
    g = {"a": GRADS[0], "b": np.array([1.0, -0.5]), "c": np.array([[0.0], [2.0]])}
    expected = {k: v.copy() for k, v in x0.items()}
    for n, expected_eta in zip(range(1, 5), [0.1, 0.05, 0.05, 0.025]):
        co.update_(opt, params, {k: v.copy() for k, v in g.items()})
        assert opt.eta == pytest.approx(expected_eta, rel=RTOL, abs=0), f"step {n}"
        for k in expected:
            expected[k] = expected[k] - expected_eta * g[k]
            np.testing.assert_allclose(params[k], expected[k], rtol=RTOL, atol=ATOL, err_msg=f"step {n}, {k}")


def test_expdecay_start():
    """ExpDecay(0.1, 0.5, 2, 1e-4, start=3): decay only when n > 3 and n % 2 == 0,
    i.e. at steps 4 and 6 (not at step 2, nor at step 5)."""
    opt = co.ExpDecay(0.1, 0.5, 2, 1e-4, start=3)
    expected_etas = [0.1, 0.1, 0.1, 0.05, 0.05, 0.025]
    x = X0.copy()
    expected = X0.copy()
    for n, (g, eta) in enumerate(zip(GRADS, expected_etas), start=1):
        co.update_(opt, x, g.copy())
        expected = expected - eta * g
        assert opt.eta == pytest.approx(eta, rel=RTOL, abs=0), f"step {n}"
        np.testing.assert_allclose(x, expected, rtol=RTOL, atol=ATOL, err_msg=f"step {n}")


def test_invdecay_counts_update_calls_not_arrays():
    """InvDecay(0.5) on a dict of 3 arrays: update = g / (1 + 0.5 n), the same n
    for every array of one ``update_`` call, n = 1, 2, 3."""
    opt = co.InvDecay(0.5)
    x0 = {"a": X0.copy(), "b": np.array([2.0, -1.0]), "c": np.array([[0.5], [1.5]])}
    params = {k: v.copy() for k, v in x0.items()}
    grads = [
        {"a": GRADS[i], "b": np.array([1.0, -0.5]) * (i + 1), "c": np.array([[0.0], [2.0 - i]])}
        for i in range(3)
    ]
    expected = {k: v.copy() for k, v in x0.items()}
    for n, g in enumerate(grads, start=1):
        co.update_(opt, params, {k: v.copy() for k, v in g.items()})
        for k in expected:
            expected[k] = expected[k] - g[k] / (1 + 0.5 * n)
            np.testing.assert_allclose(params[k], expected[k], rtol=RTOL, atol=ATOL, err_msg=f"step {n}, {k}")


# --------------------------------------------------------------------------
# ClipNorm / ClipGlobalNorm
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, norm",
    [
        pytest.param(1, 7.0, id="p=1"),
        pytest.param(2, 5.0, id="p=2"),
        pytest.param(np.inf, 4.0, id="p=inf"),
    ],
)
def test_clipnorm_p(p, norm):
    """g = [3, -4, 0]: 1-norm 7, 2-norm 5, inf-norm 4.  omega = 2 clips to g * 2/norm;
    omega = 8 leaves g alone."""
    g = np.array([3.0, -4.0, 0.0])
    assert pnorm(g, p) == norm

    x = X0.copy()
    co.update_(co.ClipNorm(2.0, p), x, g.copy())
    np.testing.assert_allclose(x, X0 - g * (2.0 / norm), rtol=RTOL, atol=ATOL)

    x = X0.copy()
    co.update_(co.ClipNorm(8.0, p=p), x, g.copy())
    np.testing.assert_allclose(x, X0 - g, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("p", [1, 2, np.inf], ids=["p=1", "p=2", "p=inf"])
def test_clipnorm_p_several_steps(p):
    """ClipNorm(0.7, p) over three steps, against ``ref_clipnorm``."""
    got = run_library(co.ClipNorm(0.7, p), GRADS[:3])
    assert_trajectory(got, ref_clipnorm(X0, GRADS[:3], 0.7, p))


def test_clipnorm_is_per_array():
    """ClipNorm clips each array by its own norm: 'a' (norm 5) is scaled by 1/5,
    'b' (norm 0.5) is left alone."""
    params = {"a": X0.copy(), "b": np.array([1.0, 2.0])}
    grads = {"a": np.array([3.0, -4.0, 0.0]), "b": np.array([0.3, -0.4])}
    co.update_(co.ClipNorm(1.0), params, {k: v.copy() for k, v in grads.items()})
    np.testing.assert_allclose(params["a"], X0 - grads["a"] / 5.0, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(params["b"], [1.0 - 0.3, 2.0 + 0.4], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_clipnorm_throws_on_non_finite(bad):
    """ClipNorm(throw=True) (the default) refuses a non-finite gradient norm and
    names the parameter's path in the message."""
    params = {"w": X0.copy()}
    grads = {"w": np.array([1.0, bad, 0.0])}
    with pytest.raises(Exception) as excinfo:
        co.update_(co.ClipNorm(1.0), params, grads)
    assert isinstance(excinfo.value, (ValueError, FloatingPointError))
    assert "params['w']" in str(excinfo.value)


def _global_norm(arrays, p=2):
    return sum(np.sum(np.abs(a) ** p) for a in arrays) ** (1 / p)


def test_clipglobalnorm_tree():
    """One 2-norm over both arrays: sqrt(9 + 16 + 144) = 13; omega = 6.5 halves
    every gradient; omega = 20 leaves them alone."""
    x0 = {"a": X0.copy(), "b": np.array([1.0, 2.0])}
    g = {"a": np.array([3.0, -4.0, 0.0]), "b": np.array([12.0, 0.0])}
    assert _global_norm(g.values()) == 13.0

    params = {k: v.copy() for k, v in x0.items()}
    co.update_(co.ClipGlobalNorm(6.5), params, {k: v.copy() for k, v in g.items()})
    for k in x0:
        np.testing.assert_allclose(params[k], x0[k] - 0.5 * g[k], rtol=RTOL, atol=ATOL)

    params = {k: v.copy() for k, v in x0.items()}
    co.update_(co.ClipGlobalNorm(20.0), params, {k: v.copy() for k, v in g.items()})
    for k in x0:
        np.testing.assert_allclose(params[k], x0[k] - g[k], rtol=RTOL, atol=ATOL)


def test_clipglobalnorm_p1():
    """p = 1: total = sum of |g| over all arrays = 7 + 12 = 19; omega = 3.8 scales by 0.2."""
    x0 = {"a": X0.copy(), "b": np.array([1.0, 2.0])}
    g = {"a": np.array([3.0, -4.0, 0.0]), "b": np.array([-12.0, 0.0])}
    params = {k: v.copy() for k, v in x0.items()}
    co.update_(co.ClipGlobalNorm(3.8, p=1), params, {k: v.copy() for k, v in g.items()})
    for k in x0:
        np.testing.assert_allclose(params[k], x0[k] - g[k] * (3.8 / 19.0), rtol=RTOL, atol=ATOL)


def test_clipglobalnorm_sees_transformed_gradient_in_chain():
    """In Optimiser(WeightDecay(0.5), ClipGlobalNorm(1.0), Descent(0.1)) the global
    norm is that of h = g + 0.5 x (the gradient as it reaches the clip rule)."""
    x0 = {"a": X0.copy(), "b": np.array([1.0, 2.0])}
    g = {"a": np.array([0.3, -0.4, 0.0]), "b": np.array([0.2, 0.0])}
    h = {k: g[k] + 0.5 * x0[k] for k in x0}
    scale = min(1.0, 1.0 / _global_norm(h.values()))
    # the norm of g alone is below 1, so a rule looking at g would not clip:
    assert _global_norm(g.values()) < 1.0 and scale < 0.9

    opt = co.Optimiser(co.WeightDecay(0.5), co.ClipGlobalNorm(1.0), co.Descent(0.1))
    params = {k: v.copy() for k, v in x0.items()}
    co.update_(opt, params, {k: v.copy() for k, v in g.items()})
    for k in x0:
        np.testing.assert_allclose(params[k], x0[k] - 0.1 * scale * h[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_clipglobalnorm_after_clipvalue_in_chain():
    """Optimiser(ClipValue(0.5), ClipGlobalNorm(0.6)): the norm is taken of the
    value-clipped gradient, over both arrays, over two steps."""
    x0 = {"a": X0.copy(), "b": np.array([1.0, 2.0])}
    grads = [
        {"a": np.array([3.0, -0.1, 0.0]), "b": np.array([-2.0, 0.2])},
        {"a": np.array([0.05, 0.1, -0.02]), "b": np.array([0.0, -0.03])},
    ]
    opt = co.Optimiser(co.ClipValue(0.5), co.ClipGlobalNorm(0.6))
    params = {k: v.copy() for k, v in x0.items()}
    expected = {k: v.copy() for k, v in x0.items()}
    for step, g in enumerate(grads, start=1):
        c = {k: np.clip(v, -0.5, 0.5) for k, v in g.items()}
        scale = min(1.0, 0.6 / _global_norm(c.values()))
        co.update_(opt, params, {k: v.copy() for k, v in g.items()})
        for k in x0:
            expected[k] = expected[k] - scale * c[k]
            np.testing.assert_allclose(
                params[k], expected[k], rtol=RTOL, atol=ATOL, err_msg=f"step {step}, {k}"
            )


# --------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------


def test_chain_clipvalue_weightdecay_descent():
    """Optimiser(ClipValue(0.5), WeightDecay(0.1), Descent(0.1)):
    update = 0.1 * (clip(g, -0.5, 0.5) + 0.1 * x), by hand."""
    opt = co.Optimiser(co.ClipValue(0.5), co.WeightDecay(0.1), co.Descent(0.1))
    expected = steps(X0, GRADS[:3], lambda t, g, x: 0.1 * (np.clip(g, -0.5, 0.5) + 0.1 * x))
    assert_trajectory(run_library(opt, GRADS[:3]), expected)

    # first step written out in full: x = [1, -2, 0.5], g = [0.3, -1.2, 0]
    # clip -> [0.3, -0.5, 0]; + 0.1 x -> [0.4, -0.7, 0.05]; * 0.1 -> [0.04, -0.07, 0.005]
    np.testing.assert_allclose(expected[0], [0.96, -1.93, 0.495], rtol=RTOL, atol=ATOL)


def test_optimiserchain_alias():
    """OptimiserChain is the same as Optimiser."""
    opt = co.OptimiserChain(co.WeightDecay(0.1), co.Momentum(0.1, 0.5))
    v = np.zeros(3)

    def upd(t, g, x):
        nonlocal v
        v = 0.5 * v + 0.1 * (g + 0.1 * x)
        return v

    assert_trajectory(run_library(opt, GRADS[:3]), steps(X0, GRADS[:3], upd))


def test_chain_adam_then_weightdecay():
    """Order matters: Optimiser(Adam(0.05), WeightDecay(0.2)) gives
    update = adam_update + 0.2 x (decay NOT scaled by eta)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = np.zeros(3)
    v = np.zeros(3)

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        return 0.05 * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + 0.2 * x

    opt = co.Optimiser(co.Adam(0.05), co.WeightDecay(0.2))
    assert_trajectory(run_library(opt, GRADS[:3]), steps(X0, GRADS[:3], upd))


def test_stateful_rule_keeps_separate_state_per_array_in_nested_tree():
    """Momentum on a nested tree {'a': [x1, (x2,)], 'b': x3}: each array has its
    own velocity; compared with ``ref_momentum`` per array."""
    x1, x2, x3 = X0.copy(), np.array([2.0, -1.0]), np.array([[0.5, 1.5], [-0.5, 3.0]])
    params = {"a": [x1, (x2,)], "b": x3}
    g1 = GRADS[:3]
    g2 = [np.array([1.0, -0.5]), np.array([0.0, 0.25]), np.array([-2.0, 1.0])]
    g3 = [np.array([[0.1, 0.0], [-0.3, 1.0]]) * (i + 1) for i in range(3)]
    opt = co.Momentum(0.2, 0.5)
    for t in range(3):
        grads = {"a": [g1[t].copy(), (g2[t].copy(),)], "b": g3[t].copy()}
        co.update_(opt, params, grads)
    # the arrays were updated in place
    assert params["a"][0] is x1 and params["a"][1][0] is x2 and params["b"] is x3
    np.testing.assert_allclose(x1, ref_momentum(X0, g1, 0.2, 0.5)[-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        x2, ref_momentum(np.array([2.0, -1.0]), g2, 0.2, 0.5)[-1], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        x3,
        ref_momentum(np.array([[0.5, 1.5], [-0.5, 3.0]]), g3, 0.2, 0.5)[-1],
        rtol=RTOL,
        atol=ATOL,
    )


# --------------------------------------------------------------------------
# Hyperparameter mutation
# --------------------------------------------------------------------------


def test_adam_eta_mutation_takes_effect_and_keeps_moments():
    """Adam(0.1) for two steps, then ``opt.eta = 0.01``: step 3 uses eta = 0.01
    with the moments and step count (t = 3) carried over."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    etas = [0.1, 0.1, 0.01]
    m = np.zeros(3)
    v = np.zeros(3)

    def upd(t, g, x):
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        return etas[t - 1] * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)

    expected = steps(X0, GRADS[:3], upd)

    opt = co.Adam(0.1)
    x = X0.copy()
    got = []
    for t, g in enumerate(GRADS[:3], start=1):
        if t == 3:
            opt.eta = 0.01
        co.update_(opt, x, g.copy())
        got.append(x.copy())
    assert_trajectory(got, expected)

    # a fresh Adam(0.01) at step 3 would give a different point (moments reset):
    fresh = ref_adam(expected[1], GRADS[2:3], 0.01, (b1, b2), eps)[0]
    assert not np.allclose(fresh, expected[2], rtol=1e-6, atol=0)


def test_momentum_rho_mutation_takes_effect():
    """Momentum(0.1, 0.9) for one step, then ``opt.rho = 0.5``: the velocity is kept
    and decays with the new rho."""
    g1, g2 = GRADS[0], GRADS[1]
    v1 = 0.1 * g1
    v2 = 0.5 * v1 + 0.1 * g2
    opt = co.Momentum(0.1, 0.9)
    x = X0.copy()
    co.update_(opt, x, g1.copy())
    opt.rho = 0.5
    co.update_(opt, x, g2.copy())
    np.testing.assert_allclose(x, X0 - v1 - v2, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# Default hyperparameters are attributes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_rule, attrs",
    [
        pytest.param(lambda: co.Descent(), {"eta": 0.1}, id="Descent"),
        pytest.param(lambda: co.Momentum(), {"eta": 0.01, "rho": 0.9}, id="Momentum"),
        pytest.param(lambda: co.Nesterov(), {"eta": 0.001, "rho": 0.9}, id="Nesterov"),
        pytest.param(
            lambda: co.RMSProp(),
            {"eta": 0.001, "rho": 0.9, "epsilon": 1e-8, "centred": False},
            id="RMSProp",
        ),
        pytest.param(lambda: co.Adam(), {"eta": 0.001, "beta": (0.9, 0.999), "epsilon": 1e-8}, id="Adam"),
        pytest.param(lambda: co.OAdam(), {"eta": 0.001, "beta": (0.5, 0.9), "epsilon": 1e-8}, id="OAdam"),
        pytest.param(lambda: co.AdaGrad(), {"eta": 0.1, "epsilon": 1e-8}, id="AdaGrad"),
        pytest.param(lambda: co.AdaDelta(), {"rho": 0.9, "epsilon": 1e-8}, id="AdaDelta"),
        pytest.param(
            lambda: co.AdamW(),
            {"eta": 0.001, "beta": (0.9, 0.999), "lambda_": 0.0, "epsilon": 1e-8, "couple": True},
            id="AdamW",
        ),
        pytest.param(
            lambda: co.AdaBelief(),
            {"eta": 0.001, "beta": (0.9, 0.999), "epsilon": 1e-16},
            id="AdaBelief",
        ),
        pytest.param(lambda: co.WeightDecay(), {"lambda_": 5e-4}, id="WeightDecay"),
        pytest.param(
            lambda: co.ExpDecay(),
            {"eta": 0.001, "decay": 0.1, "decay_step": 1000, "clip": 1e-4, "start": 0},
            id="ExpDecay",
        ),
        pytest.param(lambda: co.InvDecay(), {"gamma": 0.001}, id="InvDecay"),
        pytest.param(lambda: co.ClipValue(0.3), {"thresh": 0.3}, id="ClipValue"),
        pytest.param(lambda: co.ClipNorm(), {"omega": 10.0, "p": 2, "throw": True}, id="ClipNorm"),
        pytest.param(lambda: co.ClipGlobalNorm(2.0), {"omega": 2.0, "p": 2}, id="ClipGlobalNorm"),
    ],
)
def test_default_hyperparameters(make_rule, attrs):
    rule = make_rule()
    for name, value in attrs.items():
        got = getattr(rule, name)
        if isinstance(value, tuple):
            got = tuple(got)
        assert got == value, name
