"""Rprop, Lion and SignDecay against references written independently of composeopt.

* Rprop: ``torch.optim.Rprop`` (skipped without torch), 150 float64 steps on a
  noisy quadratic whose gradient depends on the parameters, so any difference
  would compound; and hand-computed steps.
* Lion: the update of Chen et al. (2023), Algorithm 2, written out in NumPy,
  and a hand-computed sequence on which the swapped coefficients of
  Optimisers.jl's Lion would step the other way (optax parity is in
  ``test_optax_parity.py``).
* SignDecay: the formula ``dx + lambda sign(x)`` by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError

N_STEPS = 150
SHAPES = {"w": (3, 4), "b": (5,)}


def _problem(seed=11):
    """Starting parameters and `grad(step, params)`: c * x + noise_t, c > 0 per element."""
    rng = np.random.default_rng(seed)
    x0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curvature = {k: np.linspace(0.2, 1.5, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}
    noise = [{k: 0.3 * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(N_STEPS)]

    def grad(step, params):
        return {k: curvature[k] * params[k] + noise[step][k] for k in SHAPES}

    return x0, grad


# --------------------------------------------------------------------------
# Rprop
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: co.Rprop(), {"lr": 1e-3}),  # torch's etas and step_sizes defaults are ours
        (
            lambda: co.Rprop(0.05, (0.3, 1.5), (1e-3, 0.2)),
            {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.2)},
        ),
        # eta above the largest step: torch clamps it at the first step, as we do
        (lambda: co.Rprop(0.5, (0.5, 1.2), (1e-4, 0.05)), {"lr": 0.5, "step_sizes": (1e-4, 0.05)}),
    ],
    ids=["defaults", "custom", "eta-outside-gamma"],
)
def test_rprop_matches_torch(ours, theirs):
    torch = pytest.importorskip("torch")
    x0, grad = _problem()
    params = {k: v.copy() for k, v in x0.items()}
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in x0.items()}
    opt, reference = ours(), torch.optim.Rprop(list(tensors.values()), **theirs)
    flips = 0
    for step in range(N_STEPS):
        g = grad(step, params)
        co.update_(opt, params, g)
        torch_g = grad(step, {k: t.numpy() for k, t in tensors.items()})
        for k, t in tensors.items():
            t.grad = torch.tensor(torch_g[k], dtype=torch.float64)
        reference.step()
        for k in SHAPES:
            np.testing.assert_allclose(
                params[k], tensors[k].numpy(), rtol=1e-12, atol=1e-14, err_msg=f"step {step + 1}, {k!r}"
            )
            flips += int(np.sum(co.state_store(opt).get(params[k]).previous == 0))
    assert flips > 0, "the run never took the sign-flip branch"
    for k in SHAPES:
        assert not np.allclose(params[k], x0[k], rtol=1e-3, atol=0)


def test_rprop_hand_computed_steps():
    # factors 0.5 / 2, bounds [0.05, 0.3], start 0.1
    opt, x = co.Rprop(0.1, (0.5, 2.0), (0.05, 0.3)), np.zeros(2)
    expected = [
        ([1.0, -1.0], [-0.1, 0.1]),  # first step: no previous gradient, step 0.1
        ([2.0, -3.0], [-0.3, 0.3]),  # same signs: 0.2 each
        ([5.0, 1.0], [-0.6, 0.3]),  # 0.4 clamped to 0.3; the second flips: step 0.1, no move
        ([-1.0, 1.0], [-0.6, 0.2]),  # the first flips (0.15, no move); second: no previous, 0.1
        ([-1.0, 1.0], [-0.45, 0.0]),  # 0.15 (no previous); 0.2
        ([-1.0, 1.0], [-0.15, -0.3]),  # 0.3; 0.4 clamped to 0.3
    ]
    for g, want in expected:
        co.update_(opt, x, np.array(g))
        np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-15)


def test_rprop_step_size_never_leaves_its_bounds():
    opt, x = co.Rprop(0.1, (0.5, 1.2), (0.01, 0.2)), np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        co.update_(opt, x, rng.normal(size=3))
        step = co.state_store(opt).get(x).step
        assert np.all((0.01 <= step) & (step <= 0.2))


@pytest.mark.parametrize(
    "kwargs",
    [{"ell": (1.2, 0.5)}, {"ell": (0.5, 1.0)}, {"ell": (0.0, 1.2)}, {"gamma": (1.0, 0.5)}, {"ell": 0.5}],
)
def test_rprop_rejects_impossible_factors_and_bounds(kwargs):
    with pytest.raises(HyperparameterError, match="Rprop"):
        co.Rprop(**kwargs)


# --------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------


def ref_lion(x0, grads, eta, b1, b2):
    """Chen et al. (2023), Algorithm 2 without weight decay."""
    x, m, out = np.array(x0, dtype=np.float64), np.zeros_like(x0), []
    for g in grads:
        c = b1 * m + (1 - b1) * g
        x = x - eta * np.sign(c)
        m = b2 * m + (1 - b2) * g
        out.append(x)
    return out


@pytest.mark.parametrize(
    "make, eta, beta",
    [(co.Lion, 1e-4, (0.9, 0.99)), (lambda: co.Lion(0.05, (0.5, 0.8)), 0.05, (0.5, 0.8))],
    ids=["defaults", "custom"],
)
def test_lion_matches_the_paper(make, eta, beta):
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=6) for _ in range(40)]
    grads[3][:2] = 0.0  # sign(0) = 0: such elements do not move on the first steps
    x0 = rng.normal(size=6)
    opt, x = make(), x0.copy()
    for g, want in zip(grads, ref_lion(x0, grads, eta, *beta)):
        co.update_(opt, x, g.copy())
        np.testing.assert_allclose(x, want, rtol=1e-13, atol=0)


def test_lion_momentum_is_the_papers_not_swapped():
    # After three gradients of 1 the paper's momentum is small (1 - 0.99^3 = 0.0297), so
    # c = 0.9 * 0.0297 + 0.1 * (-0.2) > 0 and the fourth step still goes down by eta.
    # With the coefficients swapped (Optimisers.jl) the momentum is near 1 and follows the
    # new gradient at once: the fourth step would go up.
    opt, x = co.Lion(0.1, (0.9, 0.99)), np.zeros(1)
    for g in [1.0, 1.0, 1.0, -0.2]:
        co.update_(opt, x, np.array([g]))
    np.testing.assert_allclose(x, [-0.4], rtol=1e-15)
    np.testing.assert_allclose(co.state_store(opt).get(x).mu, [0.99 * (1 - 0.99**3) - 0.01 * 0.2], rtol=1e-12)


def test_lion_steps_are_eta_or_zero():
    x, opt = np.array([0.0, 1.0, -1.0]), co.Lion(0.25)
    co.update_(opt, x, np.array([0.0, 3.0, -1e-9]))
    np.testing.assert_array_equal(x, [0.0, 0.75, -0.75])


# --------------------------------------------------------------------------
# SignDecay
# --------------------------------------------------------------------------


def test_signdecay_formula():
    x = np.array([2.0, -0.5, 0.0, 1e-30])
    dx = np.array([0.1, 0.2, -0.3, 0.0])
    update = co.SignDecay(0.01).apply_(None, x, dx.copy())
    np.testing.assert_array_equal(update, [0.1 + 0.01, 0.2 - 0.01, -0.3, 0.01])


def test_signdecay_default_and_chain():
    assert co.SignDecay().lambda_ == 1e-3
    x = np.array([3.0, -3.0, 0.0])
    co.update_(co.Optimiser(co.SignDecay(0.5), co.Descent(0.2)), x, np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(x, [3.0 - 0.2 * 1.5, -3.0 - 0.2 * 0.5, -0.2], rtol=1e-15)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rprop_hand_computed_steps_in_16_bit(dtype):
    # The float64 steps of test_rprop_hand_computed_steps, to the precision of the dtype (the
    # step sizes 0.1, 0.2, 0.3, ... themselves round to it).
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    opt, x = co.Rprop(0.1, (0.5, 2.0), (0.05, 0.3)), np.zeros(2, dtype)
    expected = [[-0.1, 0.1], [-0.3, 0.3], [-0.6, 0.3], [-0.6, 0.2], [-0.45, 0.0], [-0.15, -0.3]]
    grads = [[1.0, -1.0], [2.0, -3.0], [5.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]]
    eps = float(np.finfo(dtype).eps)
    for g, want in zip(grads, expected):
        co.update_(opt, x, np.array(g, dtype))
        assert x.dtype == dtype
        np.testing.assert_allclose(x.astype(np.float64), want, rtol=0, atol=4 * eps * 0.6)
