"""FTRL against the published FTRL-proximal update, written independently in float64 NumPy.

Reference: the formula of TensorFlow's ``ApplyFtrl`` op (``tf.raw_ops.ApplyFtrl``),
which MindSpore's ``nn.FTRL`` documents too:

    accum_new = accum + grad * grad
    linear += grad - (accum_new^(-lr_power) - accum^(-lr_power)) / lr * var
    quadratic = 1.0 / (accum_new^(lr_power) * lr) + 2 * l2
    var = (sign(linear) * l1 - linear) / quadratic if |linear| > l1 else 0.0
    accum = accum_new

transcribed below with ``np.power`` for every ``lr_power`` (the rule uses a
square root for -1/2), plus steps computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt.errors import HyperparameterError


def ref_apply_ftrl(x0, grads, lr, initial_accum, lr_power, l1, l2):
    var = np.array(x0, dtype=np.float64)
    accum = np.full_like(var, initial_accum)
    linear = np.zeros_like(var)
    out = []
    for grad in grads:
        accum_new = accum + grad * grad
        linear = linear + grad - (np.power(accum_new, -lr_power) - np.power(accum, -lr_power)) / lr * var
        quadratic = 1.0 / (np.power(accum_new, lr_power) * lr) + 2 * l2
        var = np.where(np.abs(linear) > l1, (np.sign(linear) * l1 - linear) / quadratic, 0.0)
        accum = accum_new
        out.append(var)
    return out


def run(opt, x0, grads):
    x, out = np.array(x0, dtype=np.float64), []
    for g in grads:
        co.update_(opt, x, np.array(g, dtype=np.float64))
        out.append(x.copy())
    return out


CASES = [
    ("defaults", {}, (1e-3, 0.1, -0.5, 0.0, 0.0)),
    ("l1-l2", {"eta": 0.1, "l1": 0.05, "l2": 0.1}, (0.1, 0.1, -0.5, 0.05, 0.1)),
    ("big-l1", {"eta": 0.5, "l1": 1.0}, (0.5, 0.1, -0.5, 1.0, 0.0)),
    ("accum-lr", {"eta": 0.2, "initial_accumulator": 1.0}, (0.2, 1.0, -0.5, 0.0, 0.0)),
    ("power-0.7", {"eta": 0.1, "lr_power": -0.7, "l1": 0.01}, (0.1, 0.1, -0.7, 0.01, 0.0)),
    ("power-1", {"eta": 0.1, "lr_power": -1.0, "l2": 0.5}, (0.1, 0.1, -1.0, 0.0, 0.5)),
    ("power-0", {"eta": 0.1, "lr_power": 0.0, "l1": 0.02}, (0.1, 0.1, 0.0, 0.02, 0.0)),
]


@pytest.mark.parametrize("fused", ["numpy", "off"])
@pytest.mark.parametrize("kwargs, settings", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ftrl_matches_apply_ftrl(monkeypatch, fused, kwargs, settings):
    monkeypatch.setattr(_fused, "MODE", fused)
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=6)
    grads = [rng.normal(size=6) for _ in range(40)]
    expected = ref_apply_ftrl(x0, grads, *settings)
    got = run(co.FTRL(**kwargs), x0, grads)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        # The rule returns x - x_new and the engine subtracts it: x_new up to the rounding of x.
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-15, err_msg=f"after step {step}")
        assert np.all(g[e == 0] == 0)  # L1's zeros are exact
    if kwargs.get("l1", 0) >= 1:
        assert any(np.any(e == 0) for e in expected), "the run never hit the L1 threshold"


def test_ftrl_steps_by_hand():
    # eta = 1/2, n0 = 1, x0 = 2, g = 3: n = 10, z = 3 - (sqrt(10) - 1) / 0.5 * 2 = 7 - 4 sqrt(10),
    # x = -z / (sqrt(10) / 0.5) = 2 - 3.5 / sqrt(10).
    [x] = run(co.FTRL(0.5, 1.0), [2.0], [[3.0]])
    np.testing.assert_allclose(x, [2 - 3.5 / math.sqrt(10)], rtol=1e-14)
    # With l1 = 1 (|z| = 5.65 > 1) the numerator shrinks by 1: x = 2 - 4 / sqrt(10).
    [x] = run(co.FTRL(0.5, 1.0, l1=1.0), [2.0], [[3.0]])
    np.testing.assert_allclose(x, [2 - 4 / math.sqrt(10)], rtol=1e-14)
    # With l2 = 1/4 the denominator grows by 1/2: x = (4 sqrt(10) - 7) / (2 sqrt(10) + 1/2).
    [x] = run(co.FTRL(0.5, 1.0, l2=0.25), [2.0], [[3.0]])
    np.testing.assert_allclose(x, [(4 * math.sqrt(10) - 7) / (2 * math.sqrt(10) + 0.5)], rtol=1e-14)


def test_ftrl_l1_keeps_small_weights_at_exactly_zero():
    opt, x = co.FTRL(0.1, l1=1.0), np.zeros(3)
    for g in ([0.3, -0.2, 0.5], [0.3, -0.2, 0.6], [0.3, -0.2, 0.1]):  # |sum| of the first two stays <= 1
        co.update_(opt, x, np.array(g))
    assert x[0] == 0.0 and x[1] == 0.0 and x[2] != 0.0


def test_ftrl_power_zero_is_dual_averaging():
    # lr_power = 0: n^0 = 1, so z is the sum of the gradients and x = -eta z (from x0 = 0).
    rng = np.random.default_rng(9)
    grads = [rng.normal(size=4) for _ in range(10)]
    got = run(co.FTRL(0.3, lr_power=0.0), np.zeros(4), grads)
    np.testing.assert_allclose(got[-1], -0.3 * np.sum(grads, axis=0), rtol=1e-13, atol=1e-15)


def test_only_the_square_root_power_has_a_fast_path():
    assert co.FTRL()._kernel is not None
    assert co.FTRL(lr_power=-0.7)._kernel is None
    assert _fused.plan(co.FTRL(lr_power=0.0)) is None


def test_changing_the_power_between_steps(monkeypatch):
    monkeypatch.setattr(_fused, "MODE", "numpy")
    rng = np.random.default_rng(2)
    x0, grads = rng.normal(size=3), [rng.normal(size=3) for _ in range(6)]
    opt, x = co.FTRL(0.1, l1=0.01), x0.copy()
    accum, linear = np.full(3, 0.1), np.zeros(3)
    expected = x0.copy()
    for step, g in enumerate(grads):
        opt.lr_power = -0.5 if step % 2 == 0 else -0.8  # fused, then generic, on the same state
        co.update_(opt, x, g)
        expected = ref_step(expected, g, accum, linear, 0.1, opt.lr_power, 0.01, 0.0)
    np.testing.assert_allclose(x, expected, rtol=1e-11)


def ref_step(var, grad, accum, linear, lr, lr_power, l1, l2):
    """One ApplyFtrl step that updates `accum` and `linear` in place."""
    accum_new = accum + grad * grad
    linear += grad - (np.power(accum_new, -lr_power) - np.power(accum, -lr_power)) / lr * var
    quadratic = 1.0 / (np.power(accum_new, lr_power) * lr) + 2 * l2
    accum[...] = accum_new
    return np.where(np.abs(linear) > l1, (np.sign(linear) * l1 - linear) / quadratic, 0.0)


@pytest.mark.parametrize(
    "kwargs", [{"eta": 0.0}, {"lr_power": 0.5}, {"lr_power": float("nan")}, {"l1": -1.0}, {"lr_power": True}]
)
def test_ftrl_rejects_impossible_hyperparameters(kwargs):
    with pytest.raises(HyperparameterError, match="FTRL"):
        co.FTRL(**kwargs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ftrl_16_bit_parameters_follow_the_formula_past_float16s_largest(dtype):
    # Weights near 100 at the default eta: z ~ -(sqrt(n') - sqrt(n)) / eta * x reaches ~1e5 on
    # the first step, past float16's 65504, and bfloat16's 8 bits drop each later change to z.
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(5)
    x = (rng.uniform(60, 140, 8) * rng.choice([-1, 1], 8)).astype(dtype)
    grads = [rng.normal(size=8).astype(dtype) for _ in range(20)]
    var, accum, linear = x.astype(np.float64), np.full(8, 0.1), np.zeros(8)
    opt, largest = co.FTRL(), 0.0
    eps = float(np.finfo(dtype).eps)
    for step, g in enumerate(grads, start=1):
        before = x.astype(np.float64)
        co.update_(opt, x, g)
        var = ref_step(var, g.astype(np.float64), accum, linear, 1e-3, -0.5, 0.0, 0.0)  # in float64
        largest = max(largest, float(np.max(np.abs(linear))))
        assert x.dtype == dtype
        # The engine subtracts x - x_new from x: x_new up to the rounding of the old x.
        gap = np.abs(x.astype(np.float64) - var) / (eps * (np.abs(before) + np.abs(var)))
        assert np.all(gap <= 3), f"after step {step}: {x} != {var}"
    assert largest > 65504
    state = co.state_store(opt).get(x)
    assert state.accum.dtype == state.linear.dtype == np.float32
