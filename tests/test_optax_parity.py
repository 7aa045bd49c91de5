"""Parity with optax: 150 float64 steps of each rule against its optax twin.

Reference: optax (run in JAX with x64 enabled), an implementation written
independently of ``composeopt``.  Both sides start from the same dict of two
arrays and get their gradient from the same deterministic function of the
step and of their own parameters (the gradient of a quadratic plus a fixed
per-step pseudo-random term).  The parameters are compared after every step.

Conventions: optax's updates are *added* to the params (``optax.apply_updates``)
and its optimiser aliases already scale by ``-learning_rate``; composeopt
*subtracts* its update, so ``x - ours == x + optax``.

Rules without a same-convention optax twin get formula tests only
(``tests/test_formulas.py``): NAdam (optax has no ``b2`` inside the root),
AMSGrad (optax bias-corrects), OAdam, ExpDecay, InvDecay, ClipNorm, Rprop (optax
0.2.8 returns each update one step late; torch is its twin in ``test_rules_sign.py``),
FTRL (no optax twin; ``test_rules_ftrl.py``).  Adan is compared for ``b2 = 0.5``
only, the one value where optax's coefficient agrees with the paper's.
"""

from __future__ import annotations

import numpy as np
import pytest

optax = pytest.importorskip("optax")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import composeopt as co  # noqa: E402

N_STEPS = 150
RTOL = 1e-10
ATOL = 1e-12

SHAPES = {"w": (3, 4), "b": (5,)}


def _initial_params():
    rng = np.random.default_rng(20240611)
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _make_gradient_fn(seed=7):
    """g_t(x) = c * x + noise_t: the gradient of sum(c x^2 / 2) plus a fixed
    per-step normal term.  c is positive and differs per element."""
    rng = np.random.default_rng(seed)
    curv = {k: np.linspace(0.2, 1.5, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}
    noise = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(N_STEPS)]

    def grad(step, params):
        return {k: curv[k] * np.asarray(params[k]) + noise[step][k] for k in SHAPES}

    return grad


def _run_parity(ours, theirs):
    grad = _make_gradient_fn()
    x0 = _initial_params()

    params = {k: v.copy() for k, v in x0.items()}
    arrays = dict(params)  # the same objects must be updated in place every step

    jparams = {k: jnp.asarray(v) for k, v in x0.items()}
    state = theirs.init(jparams)

    for step in range(N_STEPS):
        g = grad(step, params)
        co.update_(ours, params, g)

        jg = {k: jnp.asarray(v) for k, v in grad(step, jparams).items()}
        updates, state = theirs.update(jg, state, jparams)
        jparams = optax.apply_updates(jparams, updates)

        for k in SHAPES:
            assert params[k] is arrays[k]
            expected = np.asarray(jparams[k])
            assert expected.dtype == np.float64
            np.testing.assert_allclose(
                params[k], expected, rtol=RTOL, atol=ATOL, err_msg=f"step {step + 1}, {k!r}"
            )

    # make sure the run actually moved the parameters
    for k in SHAPES:
        assert not np.allclose(params[k], x0[k], rtol=1e-3, atol=0)


# (id, composeopt constructor, optax constructor)
CASES = [
    ("Descent~sgd", lambda: co.Descent(0.05), lambda: optax.sgd(0.05)),
    ("Descent-default~sgd(0.1)", lambda: co.Descent(), lambda: optax.sgd(0.1)),
    (
        "Momentum~sgd(momentum)",
        lambda: co.Momentum(0.02, 0.8),
        lambda: optax.sgd(0.02, momentum=0.8),
    ),
    (
        "Momentum-default~sgd(0.01,momentum=0.9)",
        lambda: co.Momentum(),
        lambda: optax.sgd(0.01, momentum=0.9),
    ),
    (
        "Nesterov~sgd(nesterov)",
        lambda: co.Nesterov(0.02, 0.8),
        lambda: optax.sgd(0.02, momentum=0.8, nesterov=True),
    ),
    (
        "Nesterov-default~sgd(nesterov)",
        lambda: co.Nesterov(),
        lambda: optax.sgd(0.001, momentum=0.9, nesterov=True),
    ),
    (
        "RMSProp~rmsprop",
        lambda: co.RMSProp(0.01, 0.8, 1e-6),
        lambda: optax.rmsprop(0.01, decay=0.8, eps=1e-6, eps_in_sqrt=False),
    ),
    (
        "RMSProp-default~rmsprop",
        lambda: co.RMSProp(),
        lambda: optax.rmsprop(0.001, decay=0.9, eps=1e-8, eps_in_sqrt=False),
    ),
    (
        "RMSProp-centred~rmsprop(centered)",
        lambda: co.RMSProp(0.01, 0.8, 1e-6, centred=True),
        lambda: optax.rmsprop(0.01, decay=0.8, eps=1e-6, eps_in_sqrt=False, centered=True),
    ),
    ("Adam-default~adam", lambda: co.Adam(), lambda: optax.adam(0.001)),
    (
        "Adam~adam(b1=0.8,b2=0.95)",
        lambda: co.Adam(0.05, (0.8, 0.95), 1e-6),
        lambda: optax.adam(0.05, b1=0.8, b2=0.95, eps=1e-6),
    ),
    # optax's default threshold is 5; the paper and Optimisers.jl use 4.
    (
        "RAdam-default~radam(threshold=4)",
        lambda: co.RAdam(),
        lambda: optax.radam(0.001, threshold=4.0),
    ),
    (
        "RAdam~radam(b1=0.8,b2=0.95,threshold=4)",
        lambda: co.RAdam(0.05, (0.8, 0.95), 1e-6),
        lambda: optax.radam(0.05, b1=0.8, b2=0.95, eps=1e-6, threshold=4.0),
    ),
    # optax keeps nu = max(b2 nu, |g| + eps) and divides by nu, composeopt keeps
    # u = max(b2 u, |g|) and divides by u + eps: identical only for eps = 0.
    (
        "AdaMax-eps0~adamax(eps=0)",
        lambda: co.AdaMax(0.05, (0.8, 0.95), 0.0),
        lambda: optax.adamax(0.05, b1=0.8, b2=0.95, eps=0.0),
    ),
    # optax puts eps inside the root and starts from initial_accumulator_value:
    # identical for epsilon = 0 on our side and both set to 0 on optax's.
    (
        "AdaGrad-eps0~adagrad(init=0,eps=0)",
        lambda: co.AdaGrad(0.1, 0.0),
        lambda: optax.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0),
    ),
    (
        "AdaDelta~adadelta(lr=1)",
        lambda: co.AdaDelta(0.8, 1e-6),
        lambda: optax.adadelta(learning_rate=1.0, rho=0.8, eps=1e-6),
    ),
    (
        "AdaDelta-default~adadelta(lr=1,eps=1e-8)",
        lambda: co.AdaDelta(),
        lambda: optax.adadelta(learning_rate=1.0, rho=0.9, eps=1e-8),
    ),
    (
        "AdamW-couple~adamw",
        lambda: co.AdamW(0.05, (0.8, 0.95), 0.1, 1e-6),
        lambda: optax.adamw(0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1),
    ),
    (
        "AdamW-keywords~adamw",
        lambda: co.AdamW(eta=0.01, lambda_=0.05, couple=True),
        lambda: optax.adamw(0.01, weight_decay=0.05),
    ),
    ("AdaBelief-default~adabelief", lambda: co.AdaBelief(), lambda: optax.adabelief(0.001)),
    (
        "AdaBelief~adabelief(eps_root=eps)",
        lambda: co.AdaBelief(0.05, (0.8, 0.95), 1e-10),
        lambda: optax.adabelief(0.05, b1=0.8, b2=0.95, eps=1e-10, eps_root=1e-10),
    ),
    (
        "WeightDecay+Descent~chain(add_decayed_weights,sgd)",
        lambda: co.Optimiser(co.WeightDecay(0.1), co.Descent(0.05)),
        lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05)),
    ),
    (
        "ClipValue+Descent~chain(clip,sgd)",
        lambda: co.Optimiser(co.ClipValue(0.5), co.Descent(0.05)),
        lambda: optax.chain(optax.clip(0.5), optax.sgd(0.05)),
    ),
    (
        "ClipGrad+Descent~chain(clip,sgd)",
        lambda: co.OptimiserChain(co.ClipGrad(0.5), co.Descent(0.05)),
        lambda: optax.chain(optax.clip(0.5), optax.sgd(0.05)),
    ),
    (
        "ClipGlobalNorm+Adam~chain(clip_by_global_norm,adam)",
        lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam(0.05, (0.8, 0.95))),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05, b1=0.8, b2=0.95)),
    ),
    (
        "ClipGlobalNorm+WeightDecay+Adam~chain(3)",
        lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.WeightDecay(1e-2), co.Adam(1e-2)),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2), optax.adam(1e-2)
        ),
    ),
    (
        "ClipValue+WeightDecay+Momentum~chain(3)",
        lambda: co.Optimiser(co.ClipValue(0.5), co.WeightDecay(0.05), co.Momentum(0.02, 0.8)),
        lambda: optax.chain(optax.clip(0.5), optax.add_decayed_weights(0.05), optax.sgd(0.02, momentum=0.8)),
    ),
    # the global norm is taken of g + lambda x, as it reaches the clip rule
    (
        "WeightDecay+ClipGlobalNorm+RMSProp-centred~chain(3)",
        lambda: co.Optimiser(co.WeightDecay(0.5), co.ClipGlobalNorm(2.0), co.RMSProp(0.01, 0.8, 1e-6, True)),
        lambda: optax.chain(
            optax.add_decayed_weights(0.5),
            optax.clip_by_global_norm(2.0),
            optax.rmsprop(0.01, decay=0.8, eps=1e-6, eps_in_sqrt=False, centered=True),
        ),
    ),
    # a transform after the optimiser: clip is odd, so clip(-u) = -clip(u)
    (
        "Adam+ClipValue~chain(adam,clip)",
        lambda: co.Optimiser(co.Adam(0.05), co.ClipValue(0.02)),
        lambda: optax.chain(optax.adam(0.05), optax.clip(0.02)),
    ),
    (
        "SGD(momentum,weight_decay)~chain(add_decayed_weights,sgd)",
        lambda: co.SGD(0.02, momentum=0.8, weight_decay=0.1),
        lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.02, momentum=0.8)),
    ),
    # optax's default weight decay is 1e-3: pass 0.
    ("Lion-default~lion(wd=0)", lambda: co.Lion(), lambda: optax.lion(1e-4, weight_decay=0.0)),
    (
        "Lion~lion(b1=0.8,b2=0.95,wd=0)",
        lambda: co.Lion(0.01, (0.8, 0.95)),
        lambda: optax.lion(0.01, b1=0.8, b2=0.95, weight_decay=0.0),
    ),
    # optax scales its weight decay by the learning rate, after the sign
    (
        "Lion+WeightDecay~lion(wd)",
        lambda: co.Optimiser(co.Lion(0.01, (0.8, 0.95)), co.WeightDecay(0.01 * 0.5)),
        lambda: optax.lion(0.01, b1=0.8, b2=0.95, weight_decay=0.5),
    ),
    (
        "SignDecay+Lion~chain(add_decayed_weights(sign),lion)",
        lambda: co.Optimiser(co.SignDecay(0.3), co.Lion(0.01)),
        lambda: optax.chain(
            optax.stateless(lambda g, p: jax.tree.map(lambda g, p: g + 0.3 * jnp.sign(p), g, p)),
            optax.lion(0.01, weight_decay=0.0),
        ),
    ),
    ("Yogi-default~yogi", lambda: co.Yogi(), lambda: optax.yogi(0.01)),
    (
        "Yogi~yogi(b1=0.8,b2=0.95,eps=1e-6)",
        lambda: co.Yogi(0.05, (0.8, 0.95), 1e-6),
        lambda: optax.yogi(0.05, b1=0.8, b2=0.95, eps=1e-6),
    ),
    (
        "Yogi-initial~chain(scale_by_yogi(initial_accumulator_value),scale)",
        lambda: co.Yogi(0.05, (0.8, 0.95), 1e-6, initial_accumulator=0.5),
        lambda: optax.chain(
            optax.scale_by_yogi(0.8, 0.95, 1e-6, initial_accumulator_value=0.5), optax.scale(-0.05)
        ),
    ),
    # optax 0.2.8 weights Adan's gradient difference by 1 - b2 where the paper has b2
    # (google-deepmind/optax#1715): the two agree for b2 = 0.5 only.
    (
        "Adan(b2=0.5)~adan",
        lambda: co.Adan(0.01, (0.98, 0.5, 0.99)),
        lambda: optax.adan(0.01, b1=0.98, b2=0.5, b3=0.99),
    ),
    (
        "Adan(b2=0.5,eps,lambda)~adan(eps_root=eps,weight_decay)",
        lambda: co.Adan(0.02, (0.9, 0.5, 0.95), 1e-6, 0.1),
        lambda: optax.adan(0.02, b1=0.9, b2=0.5, b3=0.95, eps=1e-6, eps_root=1e-6, weight_decay=0.1),
    ),
]


@pytest.mark.parametrize(
    "make_ours, make_theirs",
    [pytest.param(ours, theirs, id=name) for name, ours, theirs in CASES],
)
def test_parity_with_optax(make_ours, make_theirs):
    _run_parity(make_ours(), make_theirs())
