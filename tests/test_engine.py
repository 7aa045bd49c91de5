"""update_ and update over trees: structure, tied arrays, None gradients, errors, atomic steps."""

from __future__ import annotations

import re
from collections import OrderedDict, namedtuple

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import (
    ComposeoptError,
    NonFiniteError,
    ShapeMismatchError,
    TreeStructureError,
    UnsupportedArrayError,
)

Layer = namedtuple("Layer", ["weight", "bias"])


def arr(*values):
    return np.array(values, dtype=np.float64)


# --- trees -----------------------------------------------------------------


def test_single_array_is_updated_in_place():
    x = arr(1.0, 2.0)
    assert co.update_(co.Descent(0.5), x, arr(2.0, -2.0)) is x
    np.testing.assert_array_equal(x, [0.0, 3.0])


def test_nested_tree_of_every_container_kind():
    params = {
        "layers": [Layer(arr(1.0), arr(2.0)), (arr(3.0),)],
        "head": OrderedDict(w=arr(4.0)),
    }
    grads = {
        "layers": [Layer(arr(1.0), arr(1.0)), [arr(1.0)]],  # a list may stand for a tuple
        "head": {"w": arr(1.0)},
    }
    co.update_(co.Descent(1.0), params, grads)
    assert params["layers"][0].weight[0] == 0.0
    assert params["layers"][0].bias[0] == 1.0
    assert params["layers"][1][0][0] == 2.0
    assert params["head"]["w"][0] == 3.0


def test_functional_update_rebuilds_the_same_container_types():
    params = {"layers": [Layer(arr(1.0), arr(2.0))], "head": OrderedDict(w=arr(4.0)), "name": "mlp"}
    grads = {"layers": [Layer(arr(1.0), None)], "head": OrderedDict(w=arr(1.0)), "name": None}
    new = co.update(co.Descent(1.0), params, grads)
    assert type(new["layers"][0]) is Layer and type(new["head"]) is OrderedDict
    assert new["layers"][0].weight[0] == 0.0 and params["layers"][0].weight[0] == 1.0
    assert new["layers"][0].bias is params["layers"][0].bias  # None gradient: same array kept
    assert new["name"] == "mlp"


def test_none_gradient_skips_the_leaf_and_keeps_its_state_still():
    opt = co.Adam(0.1)
    params = {"a": arr(1.0), "b": arr(1.0)}
    co.update_(opt, params, {"a": arr(1.0), "b": arr(1.0)})
    co.update_(opt, params, {"a": arr(1.0), "b": None})
    store = co.state_store(opt)
    assert store.get(params["a"]).t == 2
    assert store.get(params["b"]).t == 1
    assert store.step == 2


def test_none_in_place_of_a_subtree_skips_it():
    params = {"enc": {"w": arr(1.0)}, "dec": [arr(1.0), arr(2.0)]}
    co.update_(co.Descent(1.0), params, {"enc": None, "dec": [arr(1.0), arr(1.0)]})
    assert params["enc"]["w"][0] == 1.0 and params["dec"][1][0] == 1.0


def test_tied_array_is_updated_once_from_the_sum_of_its_gradients():
    shared = arr(10.0, 10.0)
    params = {"encoder": shared, "decoder": shared}
    opt = co.Adam(0.1)
    co.update_(opt, params, {"encoder": arr(1.0, 2.0), "decoder": arr(3.0, -2.0)})
    assert len(co.state_store(opt)) == 1
    # Adam's first step is eta * sign(g) where g != 0; the summed gradient is (4, 0).
    np.testing.assert_allclose(shared, [9.9, 10.0])
    descent = {"a": arr(1.0), "b": None}
    descent["b"] = descent["a"]
    co.update_(co.Descent(1.0), descent, {"a": arr(2.0), "b": None})
    np.testing.assert_array_equal(descent["a"], [-1.0])


def test_caller_gradients_are_never_modified():
    class Scribbler(co.Rule):
        def apply_(self, state, x, dx):
            dx *= 100.0  # rules may overwrite the gradient they are handed
            return dx

    grad = arr(1.0, 2.0)
    x = arr(0.0, 0.0)
    co.update_(co.Optimiser(Scribbler(), co.Descent(1.0)), x, grad)
    np.testing.assert_array_equal(grad, [1.0, 2.0])
    np.testing.assert_array_equal(x, [-100.0, -200.0])


def test_float64_gradient_is_cast_to_a_float32_parameter():
    x = np.ones(3, dtype=np.float32)
    co.update_(co.Adam(0.1), x, np.ones(3, dtype=np.float64))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, 0.9, rtol=1e-6)


# --- errors -----------------------------------------------------------------


def test_shape_mismatch_names_the_path():
    params = {"layer1": {"W": np.zeros((4, 3))}}
    grads = {"layer1": {"W": np.zeros((3, 4))}}
    message = "params['layer1']['W']: gradient shape (3, 4) != parameter shape (4, 3)"
    with pytest.raises(ShapeMismatchError, match=re.escape(message)):
        co.update_(co.Adam(), params, grads)


@pytest.mark.parametrize(
    ("grads", "message"),
    [
        ({"a": arr(1.0)}, r"params: gradient keys differ .*missing \['b'\]"),
        ({"a": arr(1.0), "b": [arr(1.0)], "c": arr(1.0)}, r"unexpected \['c'\]"),
        ({"a": arr(1.0), "b": [arr(1.0), arr(1.0)]}, r"params\['b'\]: gradient is a list of length 2"),
        ([arr(1.0), arr(1.0)], r"params: gradient is a list, parameter is a dict"),
        ({"a": arr(1.0), "b": arr(1.0)}, r"params\['b'\]: gradient is a ndarray, parameter is a list"),
        ({"a": [1.0], "b": [arr(1.0)]}, r"params\['a'\]: gradient is a list, not an array"),
    ],
)
def test_structure_mismatch_names_the_path(grads, message):
    params = {"a": arr(1.0), "b": [arr(2.0)]}
    with pytest.raises((TreeStructureError, UnsupportedArrayError), match=message):
        co.update_(co.Descent(), params, grads)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128])
def test_non_float_parameters_are_refused(dtype):
    params = {"n": np.zeros(3, dtype=dtype)}
    with pytest.raises(UnsupportedArrayError, match=r"params\['n'\]: parameter has dtype .*real floating"):
        co.update_(co.Descent(), params, {"n": np.zeros(3)})


@pytest.mark.parametrize("fused", ["auto", "off"])
@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, np.bool_])
def test_integer_and_boolean_gradients_are_cast_to_the_parameters_dtype(monkeypatch, fused, dtype):
    # As Optimisers.jl and torch.optim take them: the same step as the equal float gradient.
    monkeypatch.setattr(co._fused, "MODE", fused)
    values = np.array([1, 0, 1, 1]).astype(dtype)
    for rule in (co.Descent(0.5), co.Adam(0.1)):
        x, y = np.ones(4, dtype=np.float32), np.ones(4, dtype=np.float32)
        twin = type(rule)(*rule.hyperparameters().values())
        for _ in range(3):
            co.update_(rule, x, values)
            co.update_(twin, y, values.astype(np.float32))
        np.testing.assert_array_equal(x, y)
        assert x.dtype == np.float32


def test_complex_gradient_is_refused():
    with pytest.raises(UnsupportedArrayError, match=r"params: gradient has dtype complex128"):
        co.update_(co.Descent(), arr(1.0), np.array([1j]))


def test_non_array_parameter_needs_a_none_gradient():
    params = {"w": arr(1.0), "activation": "relu"}
    co.update_(co.Descent(1.0), params, {"w": arr(1.0), "activation": None})
    with pytest.raises(UnsupportedArrayError, match=r"params\['activation'\]: parameter is a str"):
        co.update_(co.Descent(1.0), params, {"w": arr(1.0), "activation": arr(1.0)})
    with pytest.raises(TreeStructureError, match=r"params\['w'\]: gradient given for a None"):
        co.update_(co.Descent(1.0), {"w": None}, {"w": arr(1.0)})


def test_read_only_parameter_points_to_update():
    x = arr(1.0, 2.0)
    x.flags.writeable = False
    with pytest.raises(
        UnsupportedArrayError, match=r"params: parameter is a read-only numpy array.*composeopt\.update"
    ):
        co.update_(co.Descent(), x, arr(1.0, 1.0))
    new = co.update(co.Descent(1.0), x, arr(1.0, 1.0))
    np.testing.assert_array_equal(new, [0.0, 1.0])


def test_jax_arrays_need_the_functional_update():
    jnp = pytest.importorskip("jax.numpy")
    params = {"w": jnp.ones(3)}
    with pytest.raises(UnsupportedArrayError, match=r"params\['w'\]: parameter is a read-only jax array"):
        co.update_(co.Adam(), params, {"w": jnp.ones(3)})
    opt = co.Adam(0.1)
    for _ in range(2):
        params = co.update(opt, params, {"w": jnp.ones(3)})
    np.testing.assert_allclose(np.asarray(params["w"]), 0.8, rtol=1e-6)
    assert co.state_store(opt).get(params["w"]).t == 2  # state followed the new arrays


def test_mixing_array_modules_is_refused():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(
        UnsupportedArrayError,
        match=r"params\['w'\]: gradient is a array_api_strict array but the parameter is a numpy array",
    ):
        co.update_(co.Descent(), {"w": arr(1.0)}, {"w": strict.asarray([1.0], dtype=strict.float64)})
    params = {"a": arr(1.0), "b": strict.asarray([1.0], dtype=strict.float64)}
    grads = {"a": arr(1.0), "b": strict.asarray([1.0], dtype=strict.float64)}
    with pytest.raises(
        UnsupportedArrayError,
        match=r"params\['b'\]: parameter is a array_api_strict array but params\['a'\] is a numpy",
    ):
        co.update_(co.Descent(), params, grads)


def test_gradient_on_another_device_is_refused():
    strict = pytest.importorskip("array_api_strict")
    other = strict.Device("device1")
    x = strict.asarray([1.0], dtype=strict.float64)
    g = strict.asarray([1.0], dtype=strict.float64, device=other)
    with pytest.raises(UnsupportedArrayError, match=r"params\['w'\]: gradient is on device .*device1"):
        co.update_(co.Descent(), {"w": x}, {"w": g})


def test_parameters_on_two_devices_cannot_share_a_global_norm():
    strict = pytest.importorskip("array_api_strict")
    other = strict.Device("device1")
    params = {
        "a": strict.asarray([3.0], dtype=strict.float64),
        "b": strict.asarray([4.0], dtype=strict.float64, device=other),
    }
    grads = {k: strict.asarray(v, copy=True) for k, v in params.items()}
    co.update_(co.Descent(1.0), params, grads)  # per-array rules are fine across devices
    with pytest.raises(
        UnsupportedArrayError, match=r"params\['b'\]: ClipGlobalNorm needs every gradient on one device"
    ):
        co.update_(co.Optimiser(co.ClipGlobalNorm(1.0), co.Descent()), params, grads)


def test_update_needs_a_rule():
    with pytest.raises(TypeError, match="expected a composeopt Rule"):
        co.update_("adam", arr(1.0), arr(1.0))
    with pytest.raises(TypeError, match="expected a composeopt Rule"):
        co.update(None, arr(1.0), arr(1.0))


# --- atomic steps -------------------------------------------------------------


def _snapshot(opt, params):
    store = co.state_store(opt)
    states = {}
    for key, x in params.items():
        state = store.get(x)
        states[key] = (
            None
            if state is None
            else [np.copy(s.mu) for s in state if isinstance(s, co.State) and hasattr(s, "mu")]
        )
    return {k: np.copy(v) for k, v in params.items()}, states, store.step


def test_failing_step_changes_no_parameter_no_state_no_counter():
    opt = co.Optimiser(co.ExpDecay(0.5, 0.5, 1), co.Adam(0.1), co.ClipNorm(1.0))
    params = {"a": arr(1.0, 2.0), "b": arr(3.0), "c": arr(5.0)}
    co.update_(opt, params, {"a": arr(1.0, 1.0), "b": arr(1.0), "c": None})
    values, states, step = _snapshot(opt, params)
    eta = opt[0].eta
    with pytest.raises(NonFiniteError, match=r"params\['b'\]: gradient has 2-norm"):
        co.update_(opt, params, {"a": arr(1.0, 1.0), "b": arr(np.inf), "c": arr(1.0)})
    after_values, after_states, after_step = _snapshot(opt, params)
    for key in params:
        np.testing.assert_array_equal(after_values[key], values[key])
    for key in ("a", "b"):
        for before, after in zip(states[key], after_states[key]):
            np.testing.assert_array_equal(after, before)
    assert after_states["c"] is None  # no state was created for the new parameter
    assert (after_step, opt[0].eta) == (step, eta)
    assert co.state_store(opt).get(params["a"])[1].t == 1
    # And the optimiser goes on exactly as if the failed step never happened.
    twin = co.Optimiser(co.ExpDecay(0.5, 0.5, 1), co.Adam(0.1), co.ClipNorm(1.0))
    twin_params = {"a": arr(1.0, 2.0), "b": arr(3.0), "c": arr(5.0)}
    co.update_(twin, twin_params, {"a": arr(1.0, 1.0), "b": arr(1.0), "c": None})
    for p, o in ((params, opt), (twin_params, twin)):
        co.update_(o, p, {"a": arr(1.0, 1.0), "b": arr(2.0), "c": arr(1.0)})
    for key in params:
        np.testing.assert_array_equal(params[key], twin_params[key])


def test_bad_gradient_late_in_the_tree_changes_nothing():
    opt = co.Adam(0.1)
    params = {"a": arr(1.0), "b": np.zeros((2, 2))}
    with pytest.raises(ShapeMismatchError):
        co.update_(opt, params, {"a": arr(1.0), "b": np.zeros((2, 3))})
    assert params["a"][0] == 1.0
    assert len(co.state_store(opt)) == 0 and co.state_store(opt).step == 0


def test_a_user_rule_that_raises_mid_step_leaves_everything_as_it_was():
    class Picky(co.Rule):
        def apply_(self, state, x, dx):
            if float(dx[0]) < 0:
                raise ValueError("negative gradient")
            return dx

    opt = co.Optimiser(co.Momentum(0.1), Picky())
    params = [arr(1.0), arr(1.0)]
    co.update_(opt, params, [arr(1.0), arr(1.0)])
    velocity = [np.copy(co.state_store(opt).get(x)[0].v) for x in params]
    with pytest.raises(ValueError, match="negative gradient"):
        co.update_(opt, params, [arr(1.0), arr(-50.0)])
    for x, v in zip(params, velocity):
        np.testing.assert_array_equal(co.state_store(opt).get(x)[0].v, v)
        np.testing.assert_array_equal(x, [0.9])


def test_a_rule_returning_the_wrong_shape_is_caught_before_any_change():
    class Broken(co.Rule):
        def init(self, x):
            return co.State(n=0)

        def apply_(self, state, x, dx):
            state.n += 1
            return dx[:1]

    opt = Broken()
    x = arr(1.0, 2.0)
    with pytest.raises(
        ShapeMismatchError, match=r"params: update shape \(1,\) from Broken\(\) != parameter shape \(2,\)"
    ):
        co.update_(opt, x, arr(1.0, 1.0))
    np.testing.assert_array_equal(x, [1.0, 2.0])
    assert co.state_store(opt).get(x) is None
    with pytest.raises(UnsupportedArrayError, match="returned a float update"):
        co.update_(co.Optimiser(co.Descent(), _ReturnsFloat()), x, arr(1.0, 1.0))


class _ReturnsFloat(co.Rule):
    def apply_(self, state, x, dx):
        return 1.0


def test_errors_are_composeopt_errors_and_builtin_errors():
    with pytest.raises(ComposeoptError):
        co.update_(co.Descent(), arr(1.0), arr(1.0, 2.0))
    with pytest.raises(ValueError):
        co.update_(co.Descent(), arr(1.0), arr(1.0, 2.0))


def test_non_finite_values_do_not_warn_or_raise_without_throw():
    x = arr(1.0, 2.0)
    co.update_(co.Optimiser(co.ClipNorm(1.0, throw=False), co.Descent()), x, arr(np.inf, 1.0))
    assert np.isnan(x[0]) or np.isinf(x[0])


def test_empty_tree_and_all_none_gradients_count_a_step():
    opt = co.ExpDecay(1.0, 0.5, 1)
    co.update_(opt, {}, {})
    co.update_(opt, {"a": arr(1.0)}, {"a": None})
    assert co.state_store(opt).step == 2 and opt.eta == 0.25


def test_reset_forgets_state_and_steps():
    opt = co.Adam()
    x = arr(1.0)
    co.update_(opt, x, arr(1.0))
    assert co.reset_(opt) is opt
    assert len(co.state_store(opt)) == 0 and co.state_store(opt).step == 0


@pytest.mark.parametrize(
    "make_shared", [lambda: [arr(1.0), arr(2.0)], lambda: {"w": arr(1.0), "b": arr(2.0)}]
)
def test_functional_update_keeps_a_shared_container_shared(make_shared):
    import copy

    from composeopt.tree import array_leaves

    shared = make_shared()
    tree = {"a": shared, "b": shared, "c": (shared, [shared])}
    new = co.update(co.Descent(0.5), tree, {"a": shared, "b": shared, "c": (shared, [shared])})
    assert new["a"] is new["b"] is new["c"][0] is new["c"][1][0]
    assert new["a"] is not shared
    in_place = copy.deepcopy(tree)  # deepcopy keeps the sharing too
    co.update_(co.Descent(0.5), in_place, copy.deepcopy(tree))
    for got, want in zip(array_leaves(new), array_leaves(in_place)):
        np.testing.assert_array_equal(got[1], want[1])


def test_rebuild_calls_replace_once_per_distinct_array_and_container():
    from composeopt.tree import rebuild

    x = arr(1.0)
    inner = [x, x]
    calls = []
    out = rebuild({"p": inner, "q": inner, "r": (x,)}, lambda leaf: calls.append(leaf) or leaf * 2)
    assert len(calls) == 1
    assert out["p"] is out["q"] and out["p"][0] is out["p"][1] is out["r"][0]
