"""adjust_, parameter groups, freeze_/thaw_ and hyperparameter logging."""

from __future__ import annotations

import re

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError, TreeStructureError


def model():
    return {
        "encoder": {"W": np.ones((2, 2)), "bias": np.ones(2)},
        "decoder": {"W": np.ones((2, 2)), "bias": np.ones(2), "norm": np.ones(2)},
    }


def ones_like(tree):
    return {k: ones_like(v) if isinstance(v, dict) else np.ones_like(v) for k, v in tree.items()}


# --- adjust_ ------------------------------------------------------------------------


def test_adjust_sets_every_rule_that_has_the_name_and_keeps_state():
    opt = co.Optimiser(co.ClipValue(1.0), co.Momentum(0.1, 0.5), co.Optimiser(co.Descent(0.2)))
    x = np.zeros(1)
    co.update_(opt, x, np.ones(1))  # momentum v = 0.1, then Descent scales: 0.02
    assert co.adjust_(opt, 1.0) is opt
    assert opt[1].eta == 1.0 and opt[2][0].eta == 1.0
    co.update_(opt, x, np.ones(1))  # v = 0.5 * 0.1 + 1.0 = 1.05, then * 1.0
    np.testing.assert_allclose(x, [-0.02 - 1.05])
    co.adjust_(opt, rho=0.0, thresh=0.5)
    assert opt[1].rho == 0.0 and opt[0].thresh == 0.5


def test_adjust_refuses_unknown_names_and_bad_values_without_changing_anything():
    opt = co.Optimiser(co.Adam(0.1), co.Descent(0.2))
    with pytest.raises(HyperparameterError, match="no rule of .* has a hyperparameter 'momentum'"):
        co.adjust_(opt, momentum=0.9)
    with pytest.raises(HyperparameterError, match="no rule"):
        co.adjust_(opt, eta=0.5, momentum=0.9)
    with pytest.raises(HyperparameterError, match=r"Adam\.epsilon"):
        co.adjust_(opt, eta=0.5, epsilon=-1.0)  # eta is set on both rules before epsilon fails
    assert opt[0].eta == 0.1 and opt[1].eta == 0.2 and opt[0].epsilon == 1e-8


def test_adjust_accepts_a_schedule():
    opt = co.adjust_(co.Adam(), eta=co.Step(1.0, 1, 0.5))
    x = np.zeros(1)
    co.update_(opt, x, np.ones(1))
    co.update_(opt, x, np.ones(1))
    assert opt.eta == 0.5


# --- groups ---------------------------------------------------------------------------


def test_groups_route_parameters_by_pattern_and_default():
    params = model()
    opt = co.Groups(("*/bias", co.Descent(1.0)), (["*norm*"], co.Descent(0.0)), default=co.Descent(0.5))
    co.update_(opt, params, ones_like(params))
    assert params["encoder"]["bias"][0] == 0.0 and params["decoder"]["bias"][0] == 0.0
    assert params["decoder"]["norm"][0] == 1.0
    assert params["encoder"]["W"][0, 0] == 0.5 and params["decoder"]["W"][0, 0] == 0.5


def test_groups_with_regex_and_predicate_and_no_weight_decay_for_biases():
    params = model()
    grads = ones_like(params)
    opt = co.Groups(
        (re.compile(r"^encoder/"), co.Descent(0.0)),  # a frozen-by-rate sub-network
        (lambda path, x: x.ndim == 1, co.Optimiser(co.Descent(0.1))),
        default=co.Optimiser(co.WeightDecay(1.0), co.Descent(0.1)),
    )
    co.update_(opt, params, grads)
    np.testing.assert_array_equal(params["encoder"]["W"], 1.0)
    np.testing.assert_allclose(params["decoder"]["bias"], 0.9)
    np.testing.assert_allclose(params["decoder"]["W"], 1.0 - 0.1 * (1 + 1.0))


def test_each_group_has_its_own_schedule_and_state():
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    opt = co.Groups(("a", co.Descent(co.Exponential(1.0, 0.5))), ("b", co.Momentum(1.0, 0.5)))
    for _ in range(2):
        co.update_(opt, params, {"a": np.ones(1), "b": np.ones(1)})
    np.testing.assert_allclose(params["a"], [-1.5])
    np.testing.assert_allclose(params["b"], [-(1.0 + 1.5)])
    assert co.state_store(opt).get(params["a"])[0] == 0 and co.state_store(opt).get(params["b"])[0] == 1
    assert co.hyperparameters(opt) == {"[0].eta": 0.5, "[1].eta": 1.0, "[1].rho": 0.5}


def test_a_parameter_without_a_group_is_an_error_naming_it():
    opt = co.Groups(("encoder/*", co.Adam()))
    params = model()
    with pytest.raises(TreeStructureError, match=r"params\['decoder'\]\['W'\]: no group"):
        co.update_(opt, params, ones_like(params))
    assert len(co.state_store(opt)) == 0


def test_groups_inside_a_chain_see_the_globally_clipped_gradient():
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    opt = co.Optimiser(co.ClipGlobalNorm(1.0), co.Groups(("a", co.Descent(1.0)), default=co.Descent(2.0)))
    co.update_(opt, params, {"a": np.array([3.0]), "b": np.array([4.0])})
    np.testing.assert_allclose([params["a"][0], params["b"][0]], [-0.6, -1.6])
    assert opt[1][0].eta == 1.0 and len(opt[1]) == 1 and opt[1].default.eta == 2.0


def test_groups_argument_checks():
    with pytest.raises(TypeError, match="must be a \\(selector, rule\\) pair"):
        co.Groups(("*", "adam"))
    with pytest.raises(TypeError, match="default must be"):
        co.Groups(default="adam")


# --- freeze_ / thaw_ ------------------------------------------------------------------


def test_frozen_parameters_are_not_updated_and_their_state_does_not_advance():
    params = model()
    opt = co.Adam(0.1)
    co.update_(opt, params, ones_like(params))
    co.freeze_(opt, params["encoder"])
    frozen_value = params["encoder"]["W"].copy()
    for _ in range(3):
        co.update_(opt, params, ones_like(params))
    np.testing.assert_array_equal(params["encoder"]["W"], frozen_value)
    assert co.state_store(opt).get(params["encoder"]["W"]).t == 1
    assert co.state_store(opt).get(params["decoder"]["W"]).t == 4
    co.thaw_(opt, params)
    co.update_(opt, params, ones_like(params))
    assert co.state_store(opt).get(params["encoder"]["W"]).t == 2


def test_freeze_with_a_pattern():
    params = model()
    opt = co.freeze_(co.Descent(1.0), params, where="*/bias")
    co.update_(opt, params, ones_like(params))
    assert params["encoder"]["bias"][0] == 1.0 and params["encoder"]["W"][0, 0] == 0.0
    co.thaw_(opt, params, where=["encoder/*"])
    co.update_(opt, params, ones_like(params))
    assert params["encoder"]["bias"][0] == 0.0 and params["decoder"]["bias"][0] == 1.0


def test_hyperparameters_of_a_single_rule_and_a_nested_chain():
    assert co.hyperparameters(co.Descent(0.3)) == {"eta": 0.3}
    values = co.hyperparameters(co.Optimiser(co.ClipNorm(1.0), co.Optimiser(co.Momentum())))
    assert values == {"[0].omega": 1.0, "[0].p": 2, "[0].throw": True, "[1][0].eta": 0.01, "[1][0].rho": 0.9}
