"""Dtypes: parameters keep theirs, state has it, hyperparameters are cast, float16 stays finite."""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co
from composeopt._dispatch import eps_for
from composeopt.registry import CASES

EPSILON_RULES = [
    "Adam()",
    "RAdam()",
    "AdaMax()",
    "NAdam()",
    "OAdam()",
    "AdamW()",
    "AdaBelief()",
    "RMSProp()",
    "RMSProp(centred=True)",
    "AdaGrad()",
    "AdaDelta()",
    "AMSGrad()",
]


@pytest.mark.parametrize("case", EPSILON_RULES)
def test_float16_zero_gradients_stay_finite(case):
    opt = CASES[case]()
    x = np.ones(5, dtype=np.float16)
    for _ in range(10):
        co.update_(opt, x, np.zeros(5, dtype=np.float16))
    assert x.dtype == np.float16
    assert np.all(np.isfinite(x))


def test_epsilon_is_floored_for_float16_only():
    assert eps_for(np.dtype(np.float16), 1e-8) == pytest.approx(1.1920928955078125e-07)
    assert eps_for(np.dtype(np.float16), 0.0) == 0.0
    assert eps_for(np.dtype(np.float16), 1e-3) == 1e-3
    assert eps_for(np.dtype(np.float32), 1e-8) == 1e-8
    assert np.float16(eps_for(np.dtype(np.float16), 1e-16)) > 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_steps_match_float64_math_to_their_precision(dtype):
    opt32, opt64 = co.Adam(0.01), co.Adam(0.01)
    x, ref = np.linspace(-1, 1, 7).astype(dtype), np.linspace(-1, 1, 7)
    for step in range(5):
        g = np.cos(ref + step)
        co.update_(opt32, x, g.astype(dtype))
        co.update_(opt64, ref, g)
    tolerance = 5e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(x.astype(np.float64), ref, atol=tolerance)
    assert co.state_store(opt32).get(x).mu.dtype == dtype


@pytest.mark.parametrize("case", ["ClipValue(0.5)", "Rprop()", "FTRL()"])
def test_clamping_rules_take_bfloat16(case):
    # NumPy's clip through array-api-compat raises on ml_dtypes' bfloat16: these rules clamp
    # with maximum and minimum instead, and agree with the float32 step rounded to bfloat16.
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    x = np.array([-1.5, -0.25, 0.0, 0.75, 3.0], dtype=bfloat16)
    g = np.array([4.0, -0.3, 0.2, -2.0, 0.6], dtype=bfloat16)
    x32 = x.astype(np.float32)
    co.update_(CASES[case](), x, g)
    co.update_(CASES[case](), x32, g.astype(np.float32))
    assert x.dtype == bfloat16
    np.testing.assert_array_equal(x.astype(np.float32), x32.astype(bfloat16).astype(np.float32))
