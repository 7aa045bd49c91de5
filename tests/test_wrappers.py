"""Lookahead: parity with optax.lookahead, the sync step by hand, and its life as a container rule.

Reference: ``optax.lookahead`` (JAX, x64) keeps fast and slow weights in a
``LookaheadParams`` pair; the user's parameter here is optax's ``fast`` (after a
sync step both equal the new slow weights), and our state's ``slow`` is optax's
``slow``.  optax resets nothing by default (``reset_state=False``), as here.
"""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co

N_STEPS = 120
SHAPES = {"w": (3, 4), "b": (5,)}


def _gradients(seed=3):
    rng = np.random.default_rng(seed)
    curvature = {k: np.linspace(0.3, 1.7, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}
    noise = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(N_STEPS)]

    def grad(step, params):
        return {k: curvature[k] * np.asarray(params[k]) + noise[step][k] for k in SHAPES}

    return grad


@pytest.mark.parametrize(
    "inner, theirs, k, alpha",
    [
        (lambda: co.Adam(0.05), lambda optax: optax.adam(0.05), 5, 0.5),
        (lambda: co.Adam(0.02, (0.8, 0.95)), lambda optax: optax.adam(0.02, b1=0.8, b2=0.95), 3, 0.8),
        (lambda: co.Momentum(0.02, 0.8), lambda optax: optax.sgd(0.02, momentum=0.8), 4, 0.3),
        (lambda: co.Momentum(0.05, 0.9), lambda optax: optax.sgd(0.05, momentum=0.9), 1, 0.5),
    ],
    ids=["Adam-k5", "Adam-k3", "Momentum-k4", "Momentum-k1"],
)
def test_lookahead_matches_optax_over_many_float64_steps(inner, theirs, k, alpha):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    grad = _gradients()
    rng = np.random.default_rng(11)
    x0 = {key: rng.normal(size=shape) for key, shape in SHAPES.items()}
    params = {key: value.copy() for key, value in x0.items()}
    arrays = dict(params)
    opt = co.Lookahead(inner(), k=k, alpha=alpha)

    reference = optax.lookahead(theirs(optax), sync_period=k, slow_step_size=alpha, reset_state=False)
    theirs_params = optax.LookaheadParams.init_synced({key: jnp.asarray(v) for key, v in x0.items()})
    state = reference.init(theirs_params)

    for step in range(N_STEPS):
        co.update_(opt, params, grad(step, params))
        g = {key: jnp.asarray(v) for key, v in grad(step, theirs_params.fast).items()}
        updates, state = reference.update(g, state, theirs_params)
        theirs_params = optax.apply_updates(theirs_params, updates)
        for key in SHAPES:
            assert params[key] is arrays[key]
            np.testing.assert_allclose(
                params[key],
                np.asarray(theirs_params.fast[key]),
                rtol=1e-10,
                atol=1e-12,
                err_msg=f"step {step + 1}",
            )
            np.testing.assert_allclose(
                co.state_store(opt).get(params[key]).slow,
                np.asarray(theirs_params.slow[key]),
                rtol=1e-10,
                atol=1e-12,
            )
    for key in SHAPES:
        assert not np.allclose(params[key], x0[key], rtol=1e-3, atol=0)


def test_sync_step_by_hand():
    # Descent(0.1), k=3, alpha=0.25, x0 = 2, gradients 1, -2, 4, 1:
    #   fast: 2 - 0.1 = 1.9; 1.9 + 0.2 = 2.1; 2.1 - 0.4 = 1.7 -> sync: slow = 2 + 0.25 (1.7 - 2) = 1.925
    #   then fast from the slow weights: 1.925 - 0.1 = 1.825
    opt = co.Lookahead(co.Descent(0.1), k=3, alpha=0.25)
    x = np.array([2.0])
    seen = []
    for g in (1.0, -2.0, 4.0, 1.0):
        co.update_(opt, x, np.array([g]))
        seen.append(float(x[0]))
    np.testing.assert_allclose(seen, [1.9, 2.1, 1.925, 1.825], rtol=1e-15)
    state = co.state_store(opt).get(x)
    assert state.t == 4 and float(state.slow[0]) == 1.925


def test_sync_sets_the_parameter_exactly_to_the_slow_weights_and_keeps_no_alias():
    opt = co.Lookahead(co.Adam(0.1), k=2, alpha=0.5)
    x = np.array([1.0, -3.0, 0.25], dtype=np.float32)
    for step in range(2):
        co.update_(opt, x, np.sin(x + step))
    slow = co.state_store(opt).get(x).slow
    np.testing.assert_array_equal(x, slow)
    assert slow.dtype == np.float32 and not np.shares_memory(x, slow)
    new = co.update(opt, x, np.ones(3, np.float32))  # functional: the new array must not be the state's
    co.update_(opt, new, np.ones(3, np.float32))
    assert not np.shares_memory(new, co.state_store(opt).get(new).slow)


def test_schedules_and_adjust_reach_the_inner_rule():
    opt = co.Lookahead(co.Descent(eta=lambda step: 0.1 * step), k=100)
    x = np.array([0.0])
    for _ in range(3):
        co.update_(opt, x, np.array([1.0]))
    np.testing.assert_allclose(x, [-0.6])  # 0.1 + 0.2 + 0.3
    assert co.hyperparameters(opt) == {"k": 100, "alpha": 0.5, "[0].eta": 0.30000000000000004}
    co.adjust_(opt, eta=1.0)
    assert opt.inner.eta == 1.0


def test_inside_groups_only_its_group_looks_ahead():
    opt = co.Groups(("w", co.Lookahead(co.Descent(0.1), k=2, alpha=0.5)), default=co.Descent(0.1))
    params = {"w": np.array([1.0]), "b": np.array([1.0])}
    for _ in range(2):
        co.update_(opt, params, {"w": np.array([1.0]), "b": np.array([1.0])})
    np.testing.assert_allclose(params["w"], [0.9])  # synced: 1 + 0.5 (0.8 - 1)
    np.testing.assert_allclose(params["b"], [0.8])
    assert opt.assigns


def test_must_be_last_in_a_chain_and_takes_a_rule():
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.Optimiser(co.Lookahead(co.Adam()), co.Descent())
    co.Optimiser(co.ClipNorm(1.0), co.Lookahead(co.Adam()))  # last: fine
    with pytest.raises(TypeError, match="Rule"):
        co.Lookahead(0.1)
    with pytest.raises(co.errors.HyperparameterError, match="Lookahead.k"):
        co.Lookahead(co.Adam(), k=0)
    with pytest.raises(co.errors.HyperparameterError, match="Lookahead.alpha"):
        co.Lookahead(co.Adam(), alpha=1.5)


def test_a_failing_inner_rule_leaves_state_and_parameter_alone():
    opt = co.Lookahead(co.Optimiser(co.ClipNorm(1.0), co.Descent(0.1)), k=2)
    x = np.array([1.0, 2.0])
    co.update_(opt, x, np.array([1.0, 0.0]))
    before = x.copy(), co.state_store(opt).get(x).t
    with pytest.raises(co.errors.NonFiniteError):
        co.update_(opt, x, np.array([np.inf, 0.0]))
    np.testing.assert_array_equal(x, before[0])
    assert co.state_store(opt).get(x).t == before[1]


def test_checkpoint_round_trip_resumes_exactly():
    def run(opt, params, steps, start=0):
        for step in range(start, start + steps):
            co.update_(opt, params, {k: np.cos(v + step) for k, v in params.items()})

    make = lambda: co.Lookahead(co.Adam(0.05), k=3)  # noqa: E731
    params = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.zeros(2)}
    opt = make()
    run(opt, params, 4)
    saved = co.state_dict(opt, params)
    copy = {k: v.copy() for k, v in params.items()}
    run(opt, params, 5, start=4)
    resumed = co.load_state_dict(make(), copy, saved)
    run(resumed, copy, 5, start=4)
    for key in params:
        np.testing.assert_array_equal(params[key], copy[key])
