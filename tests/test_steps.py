"""AccumGrad, SkipNonFinite, MixedPrecision and the SGD factory.

References: hand-computed steps, optax (``MultiSteps``, ``apply_if_finite``,
``sgd``) and torch.optim.SGD where they are installed, and for
MixedPrecision the same rule run by hand on a float32 copy.
"""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError, NonFiniteError

# --- AccumGrad -------------------------------------------------------------------


def test_accumgrad_updates_with_the_mean_every_n_calls():
    opt, x = co.Optimiser(co.AccumGrad(3), co.Momentum(0.1, 0.5)), np.zeros(2)
    grads = [np.array([1.0, 2.0]), np.array([4.0, -1.0]), np.array([1.0, 2.0])]
    for g in grads[:2]:
        co.update_(opt, x, g)
        np.testing.assert_array_equal(x, [0.0, 0.0])
    co.update_(opt, x, grads[2])
    np.testing.assert_allclose(x, [-0.2, -0.1])  # 0.1 * mean, Momentum's first step
    assert co.state_store(opt).get(x)[1].v.tolist() == pytest.approx([0.2, 0.1])
    for g in grads:
        co.update_(opt, x, g)
    # Momentum's second step: v = 0.5 v + 0.1 mean
    np.testing.assert_allclose(x, [-0.2 - 0.3, -0.1 - 0.15])


def test_accumgrad_one_is_the_identity():
    x, y = np.array([1.0, 2.0]), np.array([1.0, 2.0])
    co.update_(co.Optimiser(co.AccumGrad(1), co.Descent(0.5)), x, np.array([1.0, 1.0]))
    co.update_(co.Descent(0.5), y, np.array([1.0, 1.0]))
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("inner", ["adam", "clip+momentum"])
def test_accumgrad_matches_optax_multisteps(inner):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    if inner == "adam":
        ours = co.Optimiser(co.AccumGrad(3), co.Adam(0.05, (0.8, 0.95)))
        theirs = optax.MultiSteps(optax.adam(0.05, b1=0.8, b2=0.95), 3, accumulator_dtype=jnp.float64)
    else:
        ours = co.Optimiser(co.AccumGrad(2), co.ClipGlobalNorm(1.0), co.Momentum(0.02, 0.8))
        inner_chain = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.02, momentum=0.8))
        theirs = optax.MultiSteps(inner_chain, 2, accumulator_dtype=jnp.float64)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4))
    jx = jnp.asarray(x)
    state = theirs.init(jx)
    step_theirs = jax.jit(theirs.update)
    for step in range(120):
        g = 0.5 * x + rng.normal(size=x.shape)
        co.update_(ours, x, g)
        updates, state = step_theirs(jnp.asarray(g), state, jx)
        jx = optax.apply_updates(jx, updates)
        # optax accumulates in float32 unless told otherwise
        np.testing.assert_allclose(x, np.asarray(jx), rtol=1e-10, atol=1e-12, err_msg=f"step {step + 1}")


def test_accumgrad_rejects_a_bad_count():
    with pytest.raises(HyperparameterError, match="AccumGrad.n"):
        co.AccumGrad(0)


# --- SkipNonFinite ---------------------------------------------------------------


def test_skip_leaves_every_parameter_and_state_alone_and_counts():
    opt = co.SkipNonFinite(co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam(0.1)))
    params = {"a": np.ones(2), "b": np.ones(3)}
    co.update_(opt, params, {"a": np.ones(2), "b": np.ones(3)})
    before = {k: v.copy() for k, v in params.items()}
    moments = co.state_store(opt).get(params["a"]).inner[1].mu.copy()
    co.update_(opt, params, {"a": np.ones(2), "b": np.array([1.0, np.inf, 1.0])})
    for key in params:
        np.testing.assert_array_equal(params[key], before[key])
    state = co.state_store(opt).get(params["a"])
    np.testing.assert_array_equal(state.inner[1].mu, moments)
    assert (state.skipped, state.streak, state.inner[1].t) == (1, 1, 1)
    co.update_(opt, params, {"a": np.ones(2), "b": np.ones(3)})
    state = co.state_store(opt).get(params["a"])
    assert (state.skipped, state.streak, state.inner[1].t) == (1, 0, 2)
    assert not np.array_equal(params["a"], before["a"])


def test_skip_gives_up_after_max_consecutive_and_changes_nothing():
    opt, x = co.SkipNonFinite(co.Momentum(0.1), max_consecutive=2), np.ones(2)
    bad = np.array([np.nan, 1.0])
    co.update_(opt, {"w": x}, {"w": bad})
    co.update_(opt, {"w": x}, {"w": bad})
    with pytest.raises(NonFiniteError, match=r"params\['w'\]: gradient is not finite, after 2 skipped"):
        co.update_(opt, {"w": x}, {"w": bad})
    state = co.state_store(opt).get(x)
    assert (state.skipped, state.streak) == (2, 2)
    assert co.state_store(opt).step == 2
    co.update_(opt, {"w": x}, {"w": np.ones(2)})  # a finite step resets the streak
    assert co.state_store(opt).get(x).streak == 0
    with pytest.raises(HyperparameterError, match="or None"):
        co.SkipNonFinite(co.Descent(), max_consecutive=0)


def test_skip_matches_optax_apply_if_finite():
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(3, 4))
    ours, x = co.SkipNonFinite(co.Adam(0.05)), x0.copy()
    theirs = optax.apply_if_finite(optax.adam(0.05), max_consecutive_errors=1000)
    jx = jnp.asarray(x0)
    state = theirs.init(jx)
    step_theirs = jax.jit(theirs.update)  # unjitted, apply_if_finite takes ~0.3 s a step
    for step in range(120):
        g = x + rng.normal(size=x.shape)
        if step % 7 in (3, 4):
            g[step % 3, 1] = np.nan if step % 2 else -np.inf
        co.update_(ours, x, g)
        updates, state = step_theirs(jnp.asarray(g), state, jx)
        jx = optax.apply_updates(jx, updates)
        np.testing.assert_allclose(x, np.asarray(jx), rtol=1e-10, atol=1e-12, err_msg=f"step {step + 1}")
        mine = co.state_store(ours).get(x)
        assert (mine.skipped, mine.streak) == (int(state.total_notfinite), int(state.notfinite_count))


# --- MixedPrecision --------------------------------------------------------------


def test_mixed_precision_equals_the_inner_rule_run_in_float32_by_hand():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 5)).astype(np.float16)
    master = x.astype(np.float32)
    ours, reference = co.MixedPrecision(co.Adam(1e-3)), co.Adam(1e-3)
    for _ in range(50):
        g = (x.astype(np.float32) + rng.normal(size=x.shape)).astype(np.float16)
        co.update_(ours, x, g)
        co.update_(reference, master, g.astype(np.float32))
        np.testing.assert_array_equal(x, master.astype(np.float16))
    state = co.state_store(ours).get(x)
    np.testing.assert_array_equal(state.master, master)
    assert state.inner.mu.dtype == np.float32


def test_mixed_precision_keeps_small_updates_that_float16_rounds_away():
    x, plain = np.ones(3, dtype=np.float16), np.ones(3, dtype=np.float16)
    mixed = co.MixedPrecision(co.Descent(1e-4))
    for _ in range(100):
        co.update_(mixed, x, np.ones(3, dtype=np.float16))
        co.update_(co.Descent(1e-4), plain, np.ones(3, dtype=np.float16))
    np.testing.assert_array_equal(plain, 1.0)
    np.testing.assert_array_equal(x, np.float16(0.99))


def test_mixed_precision_bfloat16_on_numpy():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x = np.linspace(-1, 1, 6).astype(bf16)
    master = x.astype(np.float32)
    ours, reference = co.MixedPrecision(co.Momentum(0.01)), co.Momentum(0.01)
    for _ in range(20):
        g = x.astype(np.float32).astype(bf16)
        co.update_(ours, x, g)
        co.update_(reference, master, g.astype(np.float32))
        assert x.dtype == bf16
        np.testing.assert_array_equal(x.astype(np.float32), master.astype(bf16).astype(np.float32))


def test_mixed_precision_passes_wide_parameters_straight_through():
    x, y = np.array([1.0, 2.0]), np.array([1.0, 2.0])
    mixed = co.MixedPrecision(co.Adam(0.1))
    co.update_(mixed, x, np.ones(2))
    co.update_(co.Adam(0.1), y, np.ones(2))
    np.testing.assert_array_equal(x, y)
    assert co.state_store(mixed).get(x).master is None


def test_mixed_precision_must_come_last_and_checks_its_dtype():
    with pytest.raises(co.errors.ComposeoptError, match="last rule"):
        co.Optimiser(co.MixedPrecision(co.Adam()), co.Descent())
    with pytest.raises(HyperparameterError, match="float32"):
        co.MixedPrecision(co.Adam(), "float16")
    assert co.MixedPrecision(co.Adam(), np.dtype("float64")).dtype == "float64"


def test_mixed_precision_survives_a_checkpoint(tmp_path):
    params = {"w": np.linspace(-1, 1, 4).astype(np.float16)}
    opt = co.MixedPrecision(co.Adam(1e-3))
    co.update_(opt, params, {"w": np.ones(4, dtype=np.float16)})
    co.save(tmp_path / "opt", opt, params)
    restored = co.MixedPrecision(co.Adam(1e-3))
    co.load(tmp_path / "opt", restored, params)
    state = co.state_store(restored).get(params["w"])
    assert state.master.dtype == np.float32
    np.testing.assert_array_equal(state.master, co.state_store(opt).get(params["w"]).master)


# --- SGD -------------------------------------------------------------------------


def test_sgd_builds_the_matching_rules():
    assert co.SGD(0.1) == co.Descent(0.1)
    assert co.SGD(0.1, momentum=0.8) == co.Momentum(0.1, 0.8)
    assert co.SGD(0.1, 0.8, nesterov=True) == co.Nesterov(0.1, 0.8)
    assert co.SGD(0.1, weight_decay=0.01) == co.Optimiser(co.WeightDecay(0.01), co.Descent(0.1))
    with pytest.raises(HyperparameterError, match="nesterov"):
        co.SGD(0.1, nesterov=True)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.8, "nesterov": True}, {"momentum": 0.9, "weight_decay": 0.01}],
)
def test_sgd_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=(3, 4))
    x = x0.copy()
    opt = co.SGD(0.05, **kwargs)
    w = torch.tensor(x0, requires_grad=True)
    theirs = torch.optim.SGD([w], lr=0.05, **kwargs)
    for _ in range(120):
        g = 0.5 * x + rng.normal(size=x.shape)
        co.update_(opt, x, g)
        w.grad = torch.tensor(g)
        theirs.step()
        np.testing.assert_allclose(x, w.detach().numpy(), rtol=1e-10, atol=1e-12)
