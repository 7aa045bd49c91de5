"""Hyperparameters: defaults, positional order, validation, mutation between steps, repr."""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError


def test_positional_order_and_keywords_follow_flux_and_optimisers_jl():
    assert co.Adam(0.01, (0.8, 0.9), 1e-6).hyperparameters() == {
        "eta": 0.01,
        "beta": (0.8, 0.9),
        "epsilon": 1e-6,
    }
    assert co.AdamW(0.01, (0.8, 0.9), 0.1, 1e-6, False) == co.AdamW(
        eta=0.01, beta=(0.8, 0.9), lambda_=0.1, epsilon=1e-6, couple=False
    )
    assert co.ExpDecay(0.1, 0.5, 10, 1e-3, 5).hyperparameters() == {
        "eta": 0.1,
        "decay": 0.5,
        "decay_step": 10,
        "clip": 1e-3,
        "start": 5,
    }
    assert co.RMSProp().hyperparameters() == {"eta": 0.001, "rho": 0.9, "epsilon": 1e-8, "centred": False}
    assert co.Momentum().rho == 0.9 and co.Nesterov().eta == 0.001 and co.Descent().eta == 0.1
    assert co.AdaGrad().eta == 0.1 and co.AdaDelta().rho == 0.9 and co.AdaBelief().epsilon == 1e-16
    assert co.OAdam().beta == (0.5, 0.9) and co.WeightDecay().lambda_ == 5e-4
    assert co.InvDecay().gamma == 0.001 and co.ClipNorm().omega == 10.0


def test_repr_round_trips_a_chain_in_the_documented_form():
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam())
    assert repr(opt) == (
        "Optimiser(ClipNorm(omega=1.0, p=2, throw=True), Adam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-08))"
    )
    assert eval(repr(opt), vars(co)) == opt
    inf_norm = co.ClipNorm(2.0, math.inf)
    assert eval(repr(inf_norm), vars(co)) == inf_norm


@pytest.mark.parametrize(
    "make",
    [
        lambda: co.Descent(-0.1),
        lambda: co.Descent(float("nan")),
        lambda: co.Descent(math.inf),
        lambda: co.Descent("0.1"),
        lambda: co.Descent(True),
        lambda: co.Momentum(rho=1.0),
        lambda: co.Momentum(rho=-0.1),
        lambda: co.Adam(beta=(0.9, 1.0)),
        lambda: co.Adam(beta=(-0.1, 0.9)),
        lambda: co.Adam(beta=0.9),
        lambda: co.Adam(beta=(0.9, 0.99, 0.9)),
        lambda: co.Adam(epsilon=-1e-8),
        lambda: co.RMSProp(centred=1),
        lambda: co.AdamW(lambda_=-1.0),
        lambda: co.ExpDecay(decay=0.0),
        lambda: co.ExpDecay(decay=1.5),
        lambda: co.ExpDecay(decay_step=0),
        lambda: co.ExpDecay(decay_step=2.5),
        lambda: co.ExpDecay(start=-1),
        lambda: co.InvDecay(gamma=-1.0),
        lambda: co.ClipValue(-1.0),
        lambda: co.ClipNorm(p=0),
        lambda: co.ClipNorm(p=-2),
        lambda: co.ClipNorm(throw="yes"),
        lambda: co.ClipGlobalNorm(-1.0),
    ],
)
def test_impossible_hyperparameters_raise_at_construction(make):
    with pytest.raises(HyperparameterError):
        make()


def test_invalid_assignment_raises_and_keeps_the_old_value():
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.01))
    with pytest.raises(HyperparameterError, match=r"Adam\.eta: must be in \[0, inf\), got -1\.0"):
        opt[1].eta = -1
    with pytest.raises(HyperparameterError, match=r"Adam\.beta"):
        opt[1].beta = (0.9, 1.5)
    assert opt[1].eta == 0.01 and opt[1].beta == (0.9, 0.999)


def test_wrong_arguments_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        co.Adam(lr=0.1)
    with pytest.raises(TypeError, match="at most 3 positional"):
        co.Adam(0.1, (0.9, 0.99), 1e-8, 1)
    with pytest.raises(TypeError, match="multiple values for 'eta'"):
        co.Adam(0.1, eta=0.2)
    with pytest.raises(TypeError, match="missing required argument 'omega'"):
        co.ClipGlobalNorm()


def test_values_are_normalised():
    rule = co.ClipNorm(np.float32(2), p=2.0, throw=np.bool_(False))
    assert rule.omega == 2.0 and type(rule.omega) is float
    assert rule.p == 2 and type(rule.p) is int
    assert rule.throw is False
    assert co.ClipNorm(p=1.5).p == 1.5


def test_mutating_eta_takes_effect_at_the_next_step_and_keeps_state():
    x = np.array([1.0])
    opt = co.Momentum(0.1, 0.5)
    co.update_(opt, x, np.array([1.0]))  # v = 0.1
    opt.eta = 1.0
    co.update_(opt, x, np.array([1.0]))  # v = 0.5 * 0.1 + 1.0
    np.testing.assert_allclose(x, [1.0 - 0.1 - 1.05])


def test_mutating_a_rule_inside_a_chain_by_index():
    x = np.array([1.0])
    opt = co.Optimiser(co.ClipValue(10.0), co.WeightDecay(0.0), co.Descent(0.1))
    co.update_(opt, x, np.array([1.0]))
    opt[2].eta = 0.5
    opt[1].lambda_ = 1.0
    co.update_(opt, x, np.array([1.0]))  # x = 0.9 - 0.5 * (1 + 0.9)
    np.testing.assert_allclose(x, [0.9 - 0.5 * 1.9])


def test_equality_is_by_type_and_value_and_rules_are_unhashable():
    assert co.Adam() == co.Adam() and co.Adam() != co.Adam(0.1) and co.Adam() != co.NAdam()
    assert co.ADAM is co.Adam and co.ClipGrad is co.ClipValue and co.OptimiserChain is co.Optimiser
    with pytest.raises(TypeError):
        hash(co.Adam())


def test_rules_show_their_constructor_signature():
    import inspect

    assert str(inspect.signature(co.Adam)) == "(eta=0.001, beta=(0.9, 0.999), epsilon=1e-08)"
    assert str(inspect.signature(co.ClipGlobalNorm)) == "(omega, p=2)"
    assert "rules" in str(inspect.signature(co.Optimiser))
