"""Yogi and Adan against their published updates, written out in float64 NumPy.

The other rules of ``composeopt.rules.adam`` are in ``test_formulas.py``; optax
parity for both is in ``test_optax_parity.py``.

* Yogi: Zaheer et al. (2018), Algorithm 2, with optax's conventions (both
  moments start at ``initial_accumulator``, bias correction), and a first step
  by hand.
* Adan: the authors' algorithm (Xie et al. 2022, Algorithm 1, as their
  reference code computes it: bias correction, epsilon outside the root,
  weight decay ``x <- x (1 - eta lambda)`` before the step, i.e. ``no_prox``).
  Its gradient-difference term is weighted by beta2: this is where optax
  0.2.8 differs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError


def run(opt, x0, grads):
    x, out = np.array(x0, dtype=np.float64), []
    for g in grads:
        co.update_(opt, x, np.array(g, dtype=np.float64))
        out.append(x.copy())
    return out


def assert_trajectory(got, expected, rtol=1e-12, atol=1e-15):
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"after step {step}")


def gradients(seed, steps=30, size=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=size), [rng.normal(size=size) for _ in range(steps)]


# --------------------------------------------------------------------------
# Yogi
# --------------------------------------------------------------------------


def ref_yogi(x0, grads, eta, b1, b2, eps, v0):
    x, m, v, out = np.array(x0), np.full_like(x0, v0), np.full_like(x0, v0), []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g**2) * g**2
        x = x - eta * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(x)
    return out


@pytest.mark.parametrize(
    "make, settings",
    [
        (co.Yogi, (0.01, 0.9, 0.999, 1e-3, 1e-6)),
        (lambda: co.Yogi(0.1, (0.5, 0.9), 1e-6, 0.3), (0.1, 0.5, 0.9, 1e-6, 0.3)),
    ],
    ids=["defaults", "custom"],
)
def test_yogi_matches_formula(make, settings):
    x0, grads = gradients(1)
    grads[4] = grads[4] * 1e-3  # small gradients: v must shrink, the sign term's other branch
    assert_trajectory(run(make(), x0, grads), ref_yogi(x0, grads, *settings))


def test_yogi_first_step_by_hand():
    # m1 = 0.9e-6 + 0.1 g, v1 = 1e-6 + 0.001 g^2 (v0 < g^2), bias corrections 0.1 and 0.001
    g = 2.0
    m1, v1 = 0.9e-6 + 0.1 * g, 1e-6 + 0.001 * g * g
    step = 0.01 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-3)
    [x] = run(co.Yogi(), [1.0], [[g]])
    np.testing.assert_allclose(x, [1.0 - step], rtol=1e-13)
    assert 0.0099 < step < 0.01  # (2.000009 / 2.00125): about eta, as Adam's first step


def test_yogi_second_moment_shrinks_additively():
    opt, x = co.Yogi(initial_accumulator=1.0), np.zeros(1)
    co.update_(opt, x, np.array([0.5]))
    # v > g^2: v <- v - (1 - b2) g^2, not the multiplicative decay of Adam
    np.testing.assert_allclose(co.state_store(opt).get(x).nu, [1.0 - 0.001 * 0.25], rtol=1e-15)


# --------------------------------------------------------------------------
# Adan
# --------------------------------------------------------------------------


def ref_adan_authors(x0, grads, eta, b1, b2, b3, eps, lam):
    """Adan as its authors' reference code computes it, with the decoupled (no_prox) decay."""
    x, out = np.array(x0), []
    m, d, n = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    previous = None
    for t, g in enumerate(grads, start=1):
        diff = np.zeros_like(g) if previous is None else g - previous
        m = b1 * m + (1 - b1) * g
        d = b2 * d + (1 - b2) * diff
        n = b3 * n + (1 - b3) * (g + b2 * diff) ** 2
        denominator = np.sqrt(n) / math.sqrt(1 - b3**t) + eps
        x = x * (1 - eta * lam)
        x = x - eta / (1 - b1**t) * m / denominator - eta * b2 / (1 - b2**t) * d / denominator
        previous = g
        out.append(x)
    return out


@pytest.mark.parametrize(
    "make, settings",
    [
        (lambda: co.Adan(epsilon=0.0), (1e-3, 0.98, 0.92, 0.99, 0.0, 0.0)),
        (lambda: co.Adan(0.05, (0.9, 0.8, 0.95), 0.0, 0.2), (0.05, 0.9, 0.8, 0.95, 0.0, 0.2)),
    ],
    ids=["defaults-eps0", "custom-weight-decay"],
)
def test_adan_matches_the_authors_algorithm(make, settings):
    # epsilon = 0: the authors add it outside the root only, optax (and we) inside too.
    x0, grads = gradients(2)
    assert_trajectory(run(make(), x0, grads), ref_adan_authors(x0, grads, *settings), rtol=1e-11)


def test_adan_epsilon_inside_and_outside_the_root():
    # First step: the difference is 0, m = (1 - b1) g, n = (1 - b3) g^2, so after bias
    # correction the step is eta * g / (sqrt(g^2 + eps) + eps).
    g, eps = 3e-4, 1e-7
    [x] = run(co.Adan(0.1, epsilon=eps), [0.0], [[g]])
    np.testing.assert_allclose(x, [-0.1 * g / (math.sqrt(g * g + eps) + eps)], rtol=1e-12)


def test_adan_uses_beta2_on_the_gradient_difference():
    # Two steps by hand with b = (0.5, 0.25, 0.5), eta = 1, epsilon = 0, g = 1 then 3.
    # Step 2: diff = 2, m = 0.25 + 1.5 = 1.75, d = 0.75 * 2 = 1.5, n = 0.25 + 0.5 (3 + 0.25 * 2)^2 = 6.375;
    # bias corrections 0.75, 1 - 0.0625 = 0.9375, 0.75.
    opt, x = co.Adan(1.0, (0.5, 0.25, 0.5), 0.0), np.zeros(1)
    co.update_(opt, x, np.array([1.0]))
    np.testing.assert_allclose(x, [-1.0], rtol=1e-15)  # m-hat = g, n-hat = g^2: a step of eta
    co.update_(opt, x, np.array([3.0]))
    second = (1.75 / 0.75 + 0.25 * 1.5 / 0.9375) / math.sqrt(6.375 / 0.75)
    np.testing.assert_allclose(x, [-1.0 - second], rtol=1e-13)


def test_adan_rejects_a_bad_beta():
    for beta in [(0.9, 0.9), (0.9, 1.0, 0.9), 0.9]:
        with pytest.raises(HyperparameterError, match="Adan.beta"):
            co.Adan(beta=beta)
