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
