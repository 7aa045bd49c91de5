"""Chains: order, nesting, indexing, and tree-level rules inside a chain."""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co


def arr(*values):
    return np.array(values, dtype=np.float64)


def test_rules_apply_in_order():
    # Clip first, then scale: (3 -> 1) * 0.1.  Scale first, then clip: 0.3.
    x = arr(0.0)
    co.update_(co.Optimiser(co.ClipValue(1.0), co.Descent(0.1)), x, arr(3.0))
    np.testing.assert_allclose(x, [-0.1])
    y = arr(0.0)
    co.update_(co.Optimiser(co.Descent(0.1), co.ClipValue(1.0)), y, arr(3.0))
    np.testing.assert_allclose(y, [-0.3])


def test_empty_chain_is_the_identity():
    x = arr(1.0, 2.0)
    co.update_(co.Optimiser(), x, arr(0.5, 0.5))
    np.testing.assert_array_equal(x, [0.5, 1.5])


def test_nested_chains_equal_the_flat_chain():
    flat = co.Optimiser(co.ClipValue(0.5), co.WeightDecay(0.1), co.Momentum(0.1))
    nested = co.Optimiser(
        co.ClipValue(0.5), co.Optimiser(co.WeightDecay(0.1), co.Optimiser(co.Momentum(0.1)))
    )
    a, b = {"w": arr(1.0, -2.0)}, {"w": arr(1.0, -2.0)}
    for step in range(5):
        g = arr(math.sin(step), math.cos(step))
        co.update_(flat, a, {"w": g})
        co.update_(nested, b, {"w": g})
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-15)
    assert nested[1][1][0].eta == 0.1


def test_chain_state_is_the_tuple_of_its_rules_states():
    opt = co.Optimiser(co.WeightDecay(), co.Adam())
    x = arr(1.0)
    co.update_(opt, x, arr(1.0))
    state = co.state_store(opt).get(x)
    assert isinstance(state, tuple) and state[0] is None and state[1].t == 1
    assert opt.init(x)[1].t == 0


def test_indexing_iteration_and_length():
    rules = (co.ClipNorm(1.0), co.WeightDecay(), co.Adam())
    opt = co.Optimiser(*rules)
    assert len(opt) == 3 and tuple(opt) == rules and opt[-1] is rules[2]
    with pytest.raises(TypeError, match="argument 1 is a str"):
        co.Optimiser(co.Adam(), "sgd")


def test_chain_apply_directly_on_one_array():
    opt = co.Optimiser(co.ClipGlobalNorm(1.0), co.Descent(0.5))
    dx = opt.apply_(opt.init(arr(0.0, 0.0)), arr(0.0, 0.0), arr(3.0, 4.0))
    np.testing.assert_allclose(dx, [0.3, 0.4])


def test_global_norm_is_taken_over_the_whole_tree():
    params = {"a": arr(0.0, 0.0), "b": arr(0.0)}
    grads = {"a": arr(3.0, 4.0), "b": arr(12.0)}  # joint 2-norm 13
    co.update_(co.ClipGlobalNorm(1.0), params, grads)
    np.testing.assert_allclose(params["a"], [-3 / 13, -4 / 13])
    np.testing.assert_allclose(params["b"], [-12 / 13])
    per_array = {"a": arr(0.0, 0.0), "b": arr(0.0)}
    co.update_(co.ClipNorm(1.0), per_array, grads)
    np.testing.assert_allclose(per_array["a"], [-0.6, -0.8])
    np.testing.assert_allclose(per_array["b"], [-1.0])


def test_global_norm_sees_gradients_as_they_reach_it_in_the_chain():
    # WeightDecay(1) before the clip adds x = (0, 5) to the gradient (0, 7):
    # the clip then sees (0, 12) and (5,) -> norm 13, not the raw norm.
    params = {"a": arr(0.0, 5.0), "b": arr(0.0)}
    grads = {"a": arr(0.0, 7.0), "b": arr(5.0)}
    decay_then_clip = co.Optimiser(co.WeightDecay(1.0), co.ClipGlobalNorm(1.0))
    co.update_(decay_then_clip, params, grads)
    np.testing.assert_allclose(params["a"], [0.0, 5.0 - 12 / 13])
    np.testing.assert_allclose(params["b"], [-5 / 13])
    # Clip first: raw norm sqrt(49 + 25); then the decay term is added unclipped.
    params = {"a": arr(0.0, 5.0), "b": arr(0.0)}
    clip_then_decay = co.Optimiser(co.ClipGlobalNorm(1.0), co.WeightDecay(1.0))
    co.update_(clip_then_decay, params, grads)
    raw = math.sqrt(74)
    np.testing.assert_allclose(params["a"], [0.0, 5.0 - (7 / raw + 5.0)])
    np.testing.assert_allclose(params["b"], [-5 / raw])


@pytest.mark.parametrize(("p", "norm"), [(1, 7.0 + 1.0), (math.inf, 4.0), (3, (27 + 64 + 1) ** (1 / 3))])
def test_global_norm_of_other_orders(p, norm):
    params = {"a": arr(0.0, 0.0), "b": arr(0.0)}
    co.update_(co.ClipGlobalNorm(1.0, p), params, {"a": arr(3.0, -4.0), "b": arr(1.0)})
    np.testing.assert_allclose(params["a"], [-3 / norm, 4 / norm])


def test_global_norm_below_the_threshold_leaves_gradients_alone():
    params = {"a": arr(0.0), "b": arr(0.0)}
    co.update_(co.ClipGlobalNorm(10.0), params, {"a": arr(3.0), "b": arr(4.0)})
    np.testing.assert_array_equal([params["a"][0], params["b"][0]], [-3.0, -4.0])


def test_global_norm_skips_parameters_without_gradient():
    params = {"a": arr(0.0), "b": arr(0.0)}
    co.update_(co.ClipGlobalNorm(1.0), params, {"a": arr(2.0), "b": None})
    np.testing.assert_allclose(params["a"], [-1.0])


def test_global_norm_of_float16_gradients_does_not_overflow():
    x = np.zeros(4, dtype=np.float16)
    co.update_(co.ClipGlobalNorm(1.0), x, np.full(4, 300.0, dtype=np.float16))  # sum of squares 360000
    assert x.dtype == np.float16
    np.testing.assert_allclose(x.astype(np.float64), -0.5, rtol=1e-3)


# --- rules that skip a parameter (None) or set it (Replace) -----------------------


class _SkipOdd(co.Rule):
    """Returns None on odd optimiser steps, the gradient otherwise."""

    def init(self, x):
        return co.State(calls=0)

    def apply_(self, state, x, dx):
        state.calls += 1
        return None if state.calls % 2 else dx


class _SetTo(co.Rule):
    assigns = True
    value = co.Hyper(0.0)

    def apply_(self, state, x, dx):
        return co.Replace(co.namespace(x).full_like(x, self.value))


def test_none_leaves_the_parameter_alone_and_stops_the_chain():
    counted = co.Momentum(0.1)
    opt = co.Optimiser(_SkipOdd(), counted)
    x = np.array([1.0, 2.0])
    co.update_(opt, x, np.ones(2))
    np.testing.assert_array_equal(x, [1.0, 2.0])
    assert co.state_store(opt).get(x)[1].v.tolist() == [0.0, 0.0]  # Momentum never ran
    co.update_(opt, x, np.ones(2))
    np.testing.assert_allclose(x, [0.9, 1.9])


def test_none_in_a_tree_only_drops_that_parameter():
    class SkipB(co.Rule):
        def apply_tree_(self, states, xs, dxs, paths):
            return [None if path.endswith("['b']") else dx for dx, path in zip(dxs, paths)]

    seen = []

    class Record(co.Rule):
        def apply_tree_(self, states, xs, dxs, paths):
            seen.extend(paths)
            return list(dxs)

    params = {"a": np.ones(2), "b": np.ones(2)}
    co.update_(co.Optimiser(SkipB(), Record(), co.Descent(0.5)), params, {"a": np.ones(2), "b": np.ones(2)})
    assert seen == ["params['a']"]
    np.testing.assert_array_equal(params["a"], [0.5, 0.5])
    np.testing.assert_array_equal(params["b"], [1.0, 1.0])
    new = co.update(co.Optimiser(SkipB(), co.Descent(0.5)), params, {"a": np.ones(2), "b": np.ones(2)})
    assert new["b"] is params["b"]
    np.testing.assert_array_equal(new["a"], [0.0, 0.0])


def test_replace_sets_the_parameter_exactly_in_place_and_functionally():
    x = np.array([1.0, -3.0], dtype=np.float16)
    co.update_(_SetTo(0.1), x, np.ones(2, dtype=np.float16))
    assert x.dtype == np.float16 and x.tolist() == [np.float16(0.1)] * 2
    y = np.array([5.0])
    new = co.update(co.Optimiser(co.ClipValue(1.0), _SetTo(2.0)), y, np.ones(1))
    assert y.tolist() == [5.0] and new.tolist() == [2.0]


def test_a_rule_that_assigns_must_be_last_in_a_chain():
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.Optimiser(_SetTo(), co.Descent())
    assert co.Optimiser(co.Descent(), _SetTo()).assigns
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.Optimiser(co.Optimiser(_SetTo()), co.Descent())


def test_an_undeclared_replace_before_the_end_raises_before_anything_changes():
    class Sneaky(_SetTo):
        assigns = False

    opt, x = co.Optimiser(Sneaky(), co.Descent()), np.ones(2)
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.update_(opt, x, np.ones(2))
    np.testing.assert_array_equal(x, [1.0, 1.0])
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.update_(opt, {"w": x}, {"w": np.ones(2)})
