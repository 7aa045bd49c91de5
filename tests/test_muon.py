"""Muon: parity with optax.contrib.muon and torch.optim.Muon, the Newton–Schulz polynomial, the fallback.

References:

* ``optax.contrib.muon`` (JAX, x64).  It lays matrices out (fan-in, fan-out), the
  transpose of ours, so it runs on the transposed matrices; it bias-corrects the
  momentum and divides by ``norm + eps``, which give the same numbers as ours
  exactly when ``nesterov=False`` and ``eps=0`` (the bias correction is a scalar
  factor that the normalisation removes).
* ``torch.optim.Muon`` (float64 parameters).  Its Newton–Schulz iteration runs in
  bfloat16; for the long float64 run it is replaced by a float64 NumPy iteration
  written here from the post, so that torch's momentum, Nesterov blend, shape
  factor and weight decay are compared at rtol 1e-10 (JAX is kept out of the
  torch tests: XLA compiling next to torch's thread pool crashed), with torch's
  own defaults too (``Muon(1e-3, lambda_=0.1)``).  Steps of the unmodified torch
  rule are compared at bfloat16 accuracy.
* The quintic polynomial itself: on ``U diag(s) V^T`` the iteration is
  ``U diag(p(p(...p(s / |s|)))) V^T`` with ``p(s) = a s + b s^3 + c s^5``.
* The rule orthogonalises same-shaped matrices as one stack; a per-matrix
  iteration written here (one matrix, one norm, ``gram @ gram``) is the
  reference.  The stacked products may round differently from separate ones
  (another BLAS kernel: ``gram @ gram.T`` is a symmetric product), so float64 is
  compared at 1e-12 and float32 at a few ulps of the largest entry, not bit for bit
  (tens where the reference multiplies a transposed view and the rule a copy).
"""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co
from composeopt.rules.muon import orthogonalize

N_STEPS = 120
SHAPES = {"square": (4, 4), "wide": (3, 5), "tall": (6, 2)}
QUINTIC = (3.4445, -4.7750, 2.0315)


def _gradients(seed=5):
    rng = np.random.default_rng(seed)
    target = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    noise = [{k: 0.3 * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(N_STEPS)]

    def grad(step, params):
        return {k: np.asarray(params[k]) - target[k] + noise[step][k] for k in SHAPES}

    return grad


def _start():
    rng = np.random.default_rng(17)
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    return jax


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(eta=0.05, rho=0.9), dict(learning_rate=0.05, beta=0.9)),
        (
            dict(eta=0.02, rho=0.95, lambda_=0.1, shape_scaling="match_rms_adamw", ns_steps=3),
            dict(learning_rate=0.02, beta=0.95, weight_decay=0.1, consistent_rms=0.2, ns_steps=3),
        ),
    ],
    ids=["original", "match_rms_adamw+decay"],
)
def test_muon_matches_optax_contrib_muon_on_transposed_matrices(jax_x64, ours, theirs):
    import jax.numpy as jnp
    import optax

    grad, x0 = _gradients(), _start()
    params = {k: v.copy() for k, v in x0.items()}
    opt = co.Muon(nesterov=False, epsilon=0.0, **ours)
    reference = optax.contrib.muon(nesterov=False, eps=0.0, **theirs)
    transposed = {k: jnp.asarray(v.T) for k, v in x0.items()}
    state = reference.init(transposed)
    update = jax_x64.jit(reference.update)  # optax unjitted takes minutes for 120 steps
    for step in range(N_STEPS):
        co.update_(opt, params, grad(step, params))
        ours_layout = {k: np.asarray(v).T for k, v in transposed.items()}
        g = {k: jnp.asarray(v.T) for k, v in grad(step, ours_layout).items()}
        updates, state = update(g, state, transposed)
        transposed = optax.apply_updates(transposed, updates)
        for k in SHAPES:
            np.testing.assert_allclose(
                params[k],
                np.asarray(transposed[k]).T,
                rtol=1e-10,
                atol=1e-12,
                err_msg=f"{k}, step {step + 1}",
            )
    for k in SHAPES:
        assert not np.allclose(params[k], x0[k], rtol=1e-2, atol=0)


def _torch_muon_run(torch, make_opt, grad, x0):
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in x0.items()}
    opt = make_opt(list(tensors.values()))
    history = []
    for step in range(N_STEPS):
        current = {k: t.detach().numpy() for k, t in tensors.items()}
        for k, g in grad(step, current).items():
            tensors[k].grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        history.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return history


def _newton_schulz_per_matrix(g, steps):
    """Jordan et al.'s iteration in NumPy, written from the post (Frobenius scaling, wide side),
    one matrix at a time, in `g`'s dtype (float64 unless told)."""
    a, b, c = QUINTIC
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(np.sqrt(np.sum(x * x)), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(eta=0.02, rho=0.95), dict(lr=0.02, momentum=0.95, weight_decay=0.0)),
        (
            dict(eta=0.03, rho=0.9, lambda_=0.1, ns_steps=4),
            dict(lr=0.03, momentum=0.9, weight_decay=0.1, ns_steps=4),
        ),
        (
            dict(eta=0.01, rho=0.8, nesterov=False, shape_scaling="match_rms_adamw"),
            dict(lr=0.01, momentum=0.8, nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
        ),
    ],
    ids=["nesterov", "nesterov+decay", "momentum+match_rms_adamw"],
)
def test_muon_matches_torch_muon_with_a_float64_newton_schulz(monkeypatch, ours, theirs):
    torch = pytest.importorskip("torch")
    muon_module = pytest.importorskip("torch.optim._muon")

    def float64_newton_schulz(g, coefficients, steps, eps):
        assert tuple(coefficients) == QUINTIC
        return torch.tensor(_newton_schulz_per_matrix(g.numpy(), steps), dtype=torch.float64)

    monkeypatch.setattr(muon_module, "_zeropower_via_newtonschulz", float64_newton_schulz)
    grad, x0 = _gradients(seed=8), _start()
    expected = _torch_muon_run(torch, lambda p: torch.optim.Muon(p, **theirs), grad, x0)
    params = {k: v.copy() for k, v in x0.items()}
    opt = co.Muon(**ours)
    for step in range(N_STEPS):
        co.update_(opt, params, grad(step, params))
        for k in SHAPES:
            np.testing.assert_allclose(
                params[k], expected[step][k], rtol=1e-10, atol=1e-12, err_msg=f"{k}, step {step + 1}"
            )


def test_one_step_matches_torch_muon_at_bfloat16_accuracy():
    torch = pytest.importorskip("torch")
    grad, x0 = _gradients(seed=2), _start()
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in x0.items()}
    reference = torch.optim.Muon(list(tensors.values()), lr=0.1, weight_decay=0.0)
    for k, g in grad(0, x0).items():
        tensors[k].grad = torch.tensor(g)
    reference.step()
    params = {k: v.copy() for k, v in x0.items()}
    co.update_(co.Muon(0.1), params, grad(0, params))
    for k in SHAPES:
        scale = 0.1 * max(1.0, SHAPES[k][0] / SHAPES[k][1]) ** 0.5
        np.testing.assert_allclose(params[k], tensors[k].detach().numpy(), rtol=0, atol=0.03 * scale)


@pytest.mark.parametrize("shape", [(4, 4), (3, 7), (7, 3)])
@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_is_the_quintic_on_the_singular_values(shape, steps):
    rng = np.random.default_rng(sum(shape) + steps)
    g = rng.normal(size=shape)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    s = s / np.sqrt(np.sum(s**2))
    a, b, c = QUINTIC
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    expected = (u * s) @ vt
    np.testing.assert_allclose(
        orthogonalize(co.namespace(g), g, steps, 1e-7), expected, rtol=1e-10, atol=1e-12
    )


def test_the_update_is_near_orthogonal_and_scaled_by_shape():
    g = np.random.default_rng(0).normal(size=(8, 2))
    x = np.zeros((8, 2))
    co.update_(co.Muon(1.0, rho=0.0), x, g)
    singular = np.linalg.svd(-x, compute_uv=False)
    assert np.all((singular > 0.5 * 2) & (singular < 1.5 * 2))  # sqrt(8 / 2) = 2


def test_other_parameters_take_the_fallback_exactly():
    rng = np.random.default_rng(4)
    params = {
        "W": rng.normal(size=(3, 2)),
        "b": rng.normal(size=3),
        "s": np.asarray(0.5),
        "k": rng.normal(size=(2, 2, 2)),
    }
    alone = {k: v.copy() for k, v in params.items() if k != "W"}
    muon = co.Muon(fallback=co.Optimiser(co.ClipGlobalNorm(0.5), co.Adam(0.01)))
    reference = co.Optimiser(co.ClipGlobalNorm(0.5), co.Adam(0.01))
    for step in range(10):
        co.update_(muon, params, {k: np.sin(v + step) for k, v in params.items()})
        co.update_(reference, alone, {k: np.sin(v + step) for k, v in alone.items()})
    for key in alone:  # the global norm is over the non-matrix gradients only
        # (the chain alone takes the fused fast path, the fallback the generic one: rounding apart)
        np.testing.assert_allclose(params[key], alone[key], rtol=1e-14, atol=1e-15)
    assert co.hyperparameters(muon)["[0][1].eta"] == 0.01


def test_default_fallback_and_zero_gradients():
    opt = co.Muon()
    assert opt.fallback == co.AdamW(3e-4) and opt.fallback is not co.Muon().fallback
    x = np.ones((3, 3), dtype=np.float32)
    co.update_(opt, x, np.zeros((3, 3), dtype=np.float32))
    np.testing.assert_array_equal(x, np.ones((3, 3)))  # no 0/0


def test_bad_hyperparameters_are_refused():
    with pytest.raises(co.errors.HyperparameterError, match="Muon.shape_scaling"):
        co.Muon(shape_scaling="spectral")
    with pytest.raises(co.errors.HyperparameterError, match="Muon.ns_steps"):
        co.Muon(ns_steps=0)
    with pytest.raises(TypeError, match="fallback"):
        co.Muon(fallback="adam")


def test_torch_muon_defaults_are_the_documented_mapping():
    torch = pytest.importorskip("torch")
    import inspect

    from composeopt.rules.muon import _QUINTIC

    defaults = {k: p.default for k, p in inspect.signature(torch.optim.Muon).parameters.items()}
    assert defaults == {
        "params": inspect.Parameter.empty,
        "lr": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.95,
        "nesterov": True,
        "ns_coefficients": QUINTIC,
        "eps": 1e-7,
        "ns_steps": 5,
        "adjust_lr_fn": None,
    }
    assert _QUINTIC == QUINTIC
    ours = co.Muon(1e-3, lambda_=0.1)
    assert (ours.rho, ours.nesterov, ours.epsilon, ours.ns_steps, ours.shape_scaling) == (
        0.95,
        True,
        1e-7,
        5,
        "original",
    )


# Same-shaped matrices in both orientations, so that the stacks hold several of each.
TREE_SHAPES = {"a": (5, 3), "b": (3, 5), "c": (5, 3), "d": (4, 4), "e": (4, 4), "f": (6, 2)}


def _tree_gradients(seed, shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    target = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    noise = [{k: (0.3 * rng.normal(size=s)).astype(dtype) for k, s in shapes.items()} for _ in range(N_STEPS)]

    def grad(step, params):
        return {k: np.asarray(params[k], dtype=dtype) - target[k] + noise[step][k] for k in shapes}

    return grad


def test_torch_muon_with_its_defaults_matches_a_tree_of_same_shaped_matrices(monkeypatch):
    torch = pytest.importorskip("torch")
    muon_module = pytest.importorskip("torch.optim._muon")

    def float64_newton_schulz(g, coefficients, steps, eps):
        return torch.tensor(_newton_schulz_per_matrix(g.numpy(), steps), dtype=torch.float64)

    monkeypatch.setattr(muon_module, "_zeropower_via_newtonschulz", float64_newton_schulz)
    rng = np.random.default_rng(23)
    x0 = {k: rng.normal(size=s) for k, s in TREE_SHAPES.items()}
    grad = _tree_gradients(9, TREE_SHAPES)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in x0.items()}
    reference = torch.optim.Muon(list(tensors.values()))  # lr 1e-3, weight decay 0.1
    params = {k: v.copy() for k, v in x0.items()}
    opt = co.Muon(1e-3, lambda_=0.1)
    for step in range(20):
        for k, g in grad(step, {k: t.numpy() for k, t in tensors.items()}).items():
            tensors[k].grad = torch.tensor(g)
        reference.step()
        co.update_(opt, params, grad(step, params))
        for k in TREE_SHAPES:
            np.testing.assert_allclose(
                params[k], tensors[k].numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{k}, step {step + 1}"
            )
    assert not np.allclose(params["a"], x0["a"], rtol=1e-3, atol=0)


def test_several_steps_match_torch_muon_at_bfloat16_accuracy():
    torch = pytest.importorskip("torch")
    steps, lr = 5, 0.05
    grad = _tree_gradients(4, TREE_SHAPES, np.float32)
    rng = np.random.default_rng(6)
    x0 = {k: rng.normal(size=s).astype(np.float32) for k, s in TREE_SHAPES.items()}
    tensors = {k: torch.tensor(v) for k, v in x0.items()}
    reference = torch.optim.Muon(list(tensors.values()), lr=lr, weight_decay=0.1)
    params = {k: v.copy() for k, v in x0.items()}
    opt = co.Muon(lr, lambda_=0.1)
    for step in range(steps):
        for k, g in grad(step, {k: t.numpy() for k, t in tensors.items()}).items():
            tensors[k].grad = torch.tensor(g)
        reference.step()
        co.update_(opt, params, grad(step, params))
        for k, (rows, cols) in TREE_SHAPES.items():
            # torch's bfloat16 iteration: each step off by up to some 10% of its size
            bound = 0.1 * lr * max(1.0, rows / cols) ** 0.5 * (step + 1)
            np.testing.assert_allclose(params[k], tensors[k].numpy(), rtol=0, atol=bound, err_msg=f"{k}")
    for k, (rows, cols) in TREE_SHAPES.items():  # and they moved well beyond that tolerance
        assert np.abs(params[k] - x0[k]).max() > 0.2 * lr * max(1.0, rows / cols) ** 0.5 * steps


def _ulps(dtype):
    return 4 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5)])
def test_a_stack_is_orthogonalised_matrix_by_matrix(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    # wildly different scales: each matrix is divided by its own norm, not the stack's
    scales = np.array([1.0, 1e3, 1e-3, 7.0])[:, None, None]
    stack = (scales * rng.normal(size=(4, *shape))).astype(dtype)
    before = stack.copy()
    got = orthogonalize(co.namespace(stack), stack, 5, 1e-7)
    np.testing.assert_array_equal(stack, before)  # the input is not written
    assert got.dtype == dtype and got.shape == stack.shape
    for g, result in zip(stack, got):
        expected = _newton_schulz_per_matrix(g, 5)
        tolerance = 1e-12 if dtype == np.float64 else _ulps(dtype)
        np.testing.assert_allclose(result, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def _per_matrix_muon_updates(opt, states, xs, dxs):
    """Muon's updates, one matrix at a time, from the formula (the reference for the stacks)."""
    updates = []
    for key, x in xs.items():
        mu = states[key] = opt.rho * states[key] + (1 - opt.rho) * dxs[key]
        u = (1 - opt.rho) * dxs[key] + opt.rho * mu if opt.nesterov else mu
        rows, cols = x.shape
        scale = {
            "original": max(1.0, rows / cols) ** 0.5,
            "match_rms_adamw": 0.2 * max(rows, cols) ** 0.5,
            "none": 1.0,
        }[opt.shape_scaling]
        updates.append(
            opt.eta * scale * _newton_schulz_per_matrix(u, opt.ns_steps) + opt.eta * opt.lambda_ * x
        )
    return updates


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "nesterov, shape_scaling", [(True, "original"), (False, "match_rms_adamw")], ids=["nesterov", "momentum"]
)
def test_the_stacked_updates_are_those_of_one_matrix_at_a_time(dtype, nesterov, shape_scaling):
    shapes = {**TREE_SHAPES, "g": (2, 6), "h": (3, 5)}
    rng = np.random.default_rng(11)
    xs = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    xs["mixed"] = rng.normal(size=(3, 5))  # float64 beside float32 matrices of its shape: its own stack
    opt = co.Muon(0.1, rho=0.8, nesterov=nesterov, lambda_=0.05, shape_scaling=shape_scaling)
    paths = list(xs)
    states = opt.init_tree_(list(xs.values()), paths)
    reference_states = {k: np.zeros_like(x) for k, x in xs.items()}
    for step in range(4):
        dxs = {k: rng.normal(size=x.shape).astype(x.dtype) for k, x in xs.items()}
        expected = _per_matrix_muon_updates(opt, reference_states, xs, {k: v.copy() for k, v in dxs.items()})
        got = opt.apply_tree_(states, list(xs.values()), list(dxs.values()), paths)
        for key, update, want in zip(xs, got, expected):
            assert update.dtype == xs[key].dtype and update.shape == xs[key].shape
            # float32: the per-matrix reference multiplies a tall matrix's transposed view, the
            # rule a contiguous copy; BLAS rounds the two a few ulps apart, and the iteration
            # (slope up to a = 3.4 on small singular values) grows that to some tens
            tolerance = 1e-12 if xs[key].dtype == np.float64 else 16 * _ulps(np.float32)
            scale = np.abs(want).max()
            np.testing.assert_allclose(update, want, rtol=0, atol=tolerance * scale, err_msg=f"{key}, {step}")


def test_a_float16_matrix_whose_norm_overflows_float16_still_gets_its_step():
    g = np.random.default_rng(3).choice([-1100.0, 1100.0], size=(64, 64))  # norm 70,400 > 65,504
    x = np.zeros((64, 64), dtype=np.float16)
    co.update_(co.Muon(0.1, rho=0.0), x, g.astype(np.float16))
    expected = -0.1 * _newton_schulz_per_matrix(g, 5)
    assert np.all(np.isfinite(x)) and np.abs(x).max() > 0
    np.testing.assert_allclose(x.astype(np.float64), expected, rtol=0, atol=0.02 * np.abs(expected).max())


def test_a_bfloat16_stack_follows_the_float64_iteration_at_bfloat16_accuracy():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    g = np.random.default_rng(4).normal(size=(3, 4, 6)) * np.array([1.0, 1e4, 1e-4])[:, None, None]
    got = orthogonalize(co.namespace(g), g.astype(ml_dtypes.bfloat16), 5, 1e-7)
    assert got.dtype == ml_dtypes.bfloat16
    for one, result in zip(g, got):  # 8 significant bits, through five iterations of products
        expected = _newton_schulz_per_matrix(one, 5)
        np.testing.assert_allclose(
            result.astype(np.float64), expected, rtol=0, atol=0.05 * np.abs(expected).max()
        )
