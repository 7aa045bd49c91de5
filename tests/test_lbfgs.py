"""L-BFGS and minimize: torch.optim.LBFGS parity, the dense BFGS formula, Rosenbrock.

References:

* ``torch.optim.LBFGS`` (float64) with ``max_iter=1`` and no line search takes
  one fixed step ``lr * H g`` per ``step()``, with the same first step and the
  same inverse-Hessian scaling: compared at rtol 1e-10 over 100 steps.
* The dense BFGS inverse update, ``H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T``
  from ``H0 = gamma I``, over the last ``memory`` pairs, written here in NumPy from
  Nocedal & Wright (eq. 7.19) and computed from the iterates the test sees.
* Rosenbrock's minimum (1, ..., 1) from the classic start, and the minimiser that
  torch's strong-Wolfe L-BFGS and SciPy's L-BFGS-B find (each skipped when missing).
"""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co

# --- a smooth convex test function over a tree of two arrays -------------------

SHAPES = {"w": (3, 4), "b": (5,)}
SIZES = {k: int(np.prod(s)) for k, s in SHAPES.items()}


def _problem(seed=0):
    """f(x) = 1/2 x^T A x - c^T x + 1/4 sum(x^4) over the concatenated tree; A SPD."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES.values())
    m = rng.normal(size=(n, n))
    a = m @ m.T / n + 0.5 * np.eye(n)
    c = rng.normal(size=n)

    def flat(params):
        return np.concatenate([np.asarray(params[k]).reshape(-1) for k in SHAPES])

    def split(v):
        out, start = {}, 0
        for k, s in SHAPES.items():
            out[k] = v[start : start + SIZES[k]].reshape(s)
            start += SIZES[k]
        return out

    def fun_and_grad(params):
        x = flat(params)
        loss = 0.5 * x @ a @ x - c @ x + 0.25 * np.sum(x**4)
        return loss, split(a @ x - c + x**3)

    x0 = split(rng.normal(size=n))
    return fun_and_grad, x0, flat


@pytest.mark.parametrize("memory, lr", [(10, 0.1), (3, 0.1), (1, 0.05)])
def test_fixed_steps_match_torch_lbfgs(memory, lr):
    torch = pytest.importorskip("torch")
    fun_and_grad, x0, _ = _problem()
    tensors = [torch.tensor(x0[k], dtype=torch.float64, requires_grad=True) for k in SHAPES]
    reference = torch.optim.LBFGS(
        tensors, lr=lr, max_iter=1, history_size=memory, tolerance_grad=0.0, tolerance_change=0.0
    )

    def closure():
        loss, grads = fun_and_grad({k: t.detach().numpy() for k, t in zip(SHAPES, tensors)})
        for k, t in zip(SHAPES, tensors):
            t.grad = torch.tensor(grads[k], dtype=torch.float64)
        return torch.tensor(loss)

    params = {k: v.copy() for k, v in x0.items()}
    opt = co.LBFGS(lr, memory=memory)
    for step in range(100):
        reference.step(closure)
        co.update_(opt, params, fun_and_grad(params)[1])
        # torch refused no pair (it would drop it, where LBFGS lets it hold a slot):
        assert len(reference.state[tensors[0]].get("old_dirs", [])) == min(step, memory)
        for k, t in zip(SHAPES, tensors):
            np.testing.assert_allclose(
                params[k], t.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{k}, step {step + 1}"
            )
    assert fun_and_grad(params)[0] < fun_and_grad(x0)[0] - 1.0


def _dense_lbfgs_step(pairs, g, eta):
    """eta H g from the dense BFGS recursion over `pairs` (oldest first), skipping y^T s <= 1e-10."""
    accepted = [(s, y) for s, y in pairs if y @ s > 1e-10]
    n = g.size
    if accepted:
        s_new, y_new = accepted[-1]
        h = (s_new @ y_new) / (y_new @ y_new) * np.eye(n)
    else:
        h = np.eye(n)
    for s, y in accepted:
        rho = 1.0 / (y @ s)
        left = np.eye(n) - rho * np.outer(s, y)
        h = left @ h @ left.T + rho * np.outer(s, s)
    return eta * h @ g


@pytest.mark.parametrize("memory", [2, 4, 20])
def test_direction_is_the_dense_bfgs_inverse_hessian_of_the_last_pairs(memory):
    fun_and_grad, x0, flat = _problem(seed=1)
    params = {k: v.copy() for k, v in x0.items()}
    opt = co.LBFGS(0.2, memory=memory)
    points, gradients = [], []
    for step in range(12):
        grads = fun_and_grad(params)[1]
        points.append(flat(params))
        gradients.append(flat(grads))
        before = flat(params)
        co.update_(opt, params, grads)
        taken = before - flat(params)
        if step == 0:
            expected = 0.2 * gradients[0] / max(1.0, np.sum(np.abs(gradients[0])))
        else:
            pairs = [
                (points[i + 1] - points[i], gradients[i + 1] - gradients[i]) for i in range(len(points) - 1)
            ][-memory:]
            expected = _dense_lbfgs_step(pairs, gradients[-1], 0.2)
        np.testing.assert_allclose(taken, expected, rtol=1e-9, atol=1e-13, err_msg=f"step {step + 1}")


def test_a_0d_parameter_takes_the_dense_bfgs_step_of_the_tree():
    # a 0-d leaf beside a vector: NumPy computes on it as on a scalar, and the tree's step
    # must still be the one the dense BFGS formula gives for the concatenated (a, b).
    params = {"a": np.array(1.0), "b": np.array([2.0, -1.0])}
    opt = co.LBFGS(0.5)
    points, gradients = [], []
    for step in range(4):
        grads = {"a": 2 * params["a"], "b": 3 * params["b"]}
        points.append(np.array([params["a"], *params["b"]]))
        gradients.append(np.array([grads["a"], *grads["b"]]))
        co.update_(opt, params, grads)
        assert params["a"].shape == ()
        taken = points[-1] - np.array([params["a"], *params["b"]])
        if step == 0:
            expected = 0.5 * gradients[0] / max(1.0, np.sum(np.abs(gradients[0])))
        else:
            pairs = [(points[i + 1] - points[i], gradients[i + 1] - gradients[i]) for i in range(step)]
            expected = _dense_lbfgs_step(pairs, gradients[-1], 0.5)
        np.testing.assert_allclose(taken, expected, rtol=1e-12, atol=1e-15, err_msg=f"step {step + 1}")


def test_float16_on_a_large_quadratic_stays_finite_and_reaches_the_float32_minimum():
    # The first step is g / |g|_1, tiny over 20k elements: the pair it leaves has s^T y ~ 1e-4,
    # and the two-loop scalars (alpha - beta ~ -7e4 here) pass float16's 65504.
    # The float16 gradients cannot resolve that tiny first step, so the paths differ at first;
    # both must reach the minimum, float16 to within its resolution.
    rng = np.random.default_rng(3)
    n = 20_000
    target, curvature = rng.uniform(-4, 4, n), rng.uniform(0.5, 2.0, n)
    runs = {}
    for dtype in (np.float16, np.float32):
        x, opt = np.zeros(n, dtype), co.LBFGS(1.0, memory=2)
        for step in range(12):
            co.update_(opt, x, (curvature * (x.astype(np.float64) - target)).astype(dtype))
            assert np.all(np.isfinite(x)), f"{np.dtype(dtype).name}, step {step + 1}"
        assert co.state_store(opt).get(x).s.dtype == dtype
        runs[dtype] = x.astype(np.float64)
    resolution = 8 * float(np.finfo(np.float16).eps) * np.max(np.abs(target))
    np.testing.assert_allclose(runs[np.float32], target, atol=resolution / 10)
    np.testing.assert_allclose(runs[np.float16], target, atol=resolution)
    np.testing.assert_allclose(runs[np.float16], runs[np.float32], atol=resolution)


def test_a_pair_without_positive_curvature_is_left_out():
    opt = co.LBFGS(0.5, memory=5)
    x = np.array([1.0, 2.0])
    co.update_(opt, x, np.array([-1.0, -2.0]))  # first step: s = (1/6, 1/3)
    before = x.copy()
    g = np.array([-2.0, -4.0])  # y = g - g_old = (-1, -2), against s: y^T s < 0
    co.update_(opt, x, g)
    np.testing.assert_allclose(before - x, 0.5 * g, rtol=1e-15)  # H = I: the pair takes no part
    assert co.state_store(opt).get(x).t == 2  # though it holds a slot


def test_memory_starts_afresh_when_parameters_are_out_of_step():
    opt = co.LBFGS(1.0, memory=4)
    params = {"a": np.array([1.0, -2.0]), "b": np.array([0.5])}
    co.update_(opt, params, {"a": params["a"].copy(), "b": params["b"].copy()})
    co.update_(opt, params, {"a": params["a"].copy(), "b": None})  # b misses a step
    a, b = params["a"].copy(), params["b"].copy()
    grads = {"a": np.array([0.3, 0.1]), "b": np.array([0.2])}
    co.update_(opt, params, grads)
    # No history: the first-step rule g / max(1, |g|_1) with |g|_1 = 0.6.
    np.testing.assert_allclose(params["a"], a - grads["a"], rtol=1e-15)
    np.testing.assert_allclose(params["b"], b - grads["b"], rtol=1e-15)
    assert {co.state_store(opt).get(x).t for x in params.values()} == {1}


def test_state_is_the_ring_of_pairs():
    opt = co.LBFGS(memory=3)
    x = np.zeros((2, 2), dtype=np.float32)
    co.update_(opt, x, np.ones((2, 2), dtype=np.float32))
    state = co.state_store(opt).get(x)
    assert state.s.shape == state.y.shape == (3, 2, 2) and state.s.dtype == np.float32
    assert state.t == 1


# --- minimize -------------------------------------------------------------------


def rosenbrock(x):
    loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    grad = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
    return loss, grad


def extended_rosenbrock(params):
    """Moré, Garbow & Hillstrom's extended Rosenbrock, its odd and even coordinates as two arrays."""
    u, v = params["odd"], params["even"]
    loss = np.sum(100 * (v - u**2) ** 2 + (1 - u) ** 2)
    return loss, {"odd": -400 * u * (v - u**2) - 2 * (1 - u), "even": 200 * (v - u**2)}


def test_minimize_rosenbrock_2d_from_the_classic_start():
    x = np.array([-1.2, 1.0])
    same, result = co.minimize(rosenbrock, x, steps=200, tol=1e-9)
    assert same is x
    np.testing.assert_allclose(x, [1.0, 1.0], rtol=0, atol=1e-6)
    assert result.converged and result.steps < 100 and result.evaluations < 200
    assert result.losses[0] == 24.199999999999996 and result.loss == result.losses[-1] < 1e-12
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:]))  # Armijo: never uphill


def test_minimize_extended_rosenbrock_10d_over_a_tree():
    params = {"odd": np.full(5, -1.2), "even": np.ones(5)}
    _, result = co.minimize(extended_rosenbrock, params, co.LBFGS(memory=5), steps=500, tol=1e-9)
    assert result.converged, result.message
    for key in params:
        np.testing.assert_allclose(params[key], np.ones(5), rtol=0, atol=1e-6)


def test_minimize_agrees_with_torch_strong_wolfe_lbfgs():
    torch = pytest.importorskip("torch")
    start = np.tile([-1.2, 1.0], 5)
    t = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.LBFGS(
        [t],
        lr=1.0,
        max_iter=500,
        max_eval=1000,
        history_size=10,
        tolerance_grad=1e-10,
        tolerance_change=1e-30,
        line_search_fn="strong_wolfe",
    )

    def closure():
        reference.zero_grad()
        u, v = t[0::2], t[1::2]
        loss = torch.sum(100 * (v - u**2) ** 2 + (1 - u) ** 2)
        loss.backward()
        return loss

    reference.step(closure)
    params = {"odd": start[0::2].copy(), "even": start[1::2].copy()}
    co.minimize(extended_rosenbrock, params, steps=500, tol=1e-10)
    theirs = t.detach().numpy()
    np.testing.assert_allclose(params["odd"], theirs[0::2], atol=1e-7)
    np.testing.assert_allclose(params["even"], theirs[1::2], atol=1e-7)


def test_minimize_agrees_with_scipy_lbfgsb():
    optimize = pytest.importorskip("scipy.optimize")
    start = np.array([-1.2, 1.0])
    theirs = optimize.minimize(rosenbrock, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    x = start.copy()
    co.minimize(rosenbrock, x, tol=1e-10)
    np.testing.assert_allclose(x, theirs.x, atol=1e-5)  # scipy stops on its own, looser criteria


def test_minimize_with_another_rule_takes_plain_steps():
    def quadratic(x):
        return 0.5 * float(np.sum(x * x)), x.copy()

    x = np.array([1.0, -2.0])
    _, result = co.minimize(quadratic, x, co.Descent(0.5), steps=100, tol=1e-8)
    assert result.converged and result.steps == 28 and result.evaluations == 29  # halves each step
    x = np.array([1.0, -2.0])
    _, result = co.minimize(quadratic, x, co.Descent(0.5), steps=5)
    assert not result.converged and result.steps == 5 and "5 steps" in result.message
    np.testing.assert_allclose(x, [1.0 / 32, -2.0 / 32])


def test_a_failed_line_search_puts_the_parameters_back():
    def lying(x):  # the gradient points uphill of the loss
        return float(np.sum(x)), -np.ones_like(x)

    x = np.array([0.5, 0.5])
    _, result = co.minimize(lying, x, steps=10)
    assert not result.converged and "line search" in result.message
    np.testing.assert_array_equal(x, [0.5, 0.5])


def test_minimize_on_array_api_strict():
    xp = pytest.importorskip("array_api_strict")

    def quadratic(params):
        x = params["x"]
        return xp.sum((x - 3.0) ** 2), {"x": 2 * (x - 3.0)}

    params = {"x": xp.asarray([0.0, 1.0, -4.0])}
    _, result = co.minimize(quadratic, params, tol=1e-10)
    assert result.converged
    np.testing.assert_allclose(np.from_dlpack(params["x"]), [3.0, 3.0, 3.0], atol=1e-9)


def test_a_parameter_joining_after_memory_changed_restarts_every_ring():
    opt = co.LBFGS(0.1, memory=4)
    params = {"a": np.linspace(-1.0, 1.0, 3)}
    for _ in range(3):
        co.update_(opt, params, {"a": 2 * params["a"]})
    opt.memory = 2
    params["b"] = np.ones(2)
    for _ in range(4):  # the old ring had 4 slots, the new one would have had 2: no IndexError
        co.update_(opt, params, {k: 2 * v for k, v in params.items()})
    store = co.state_store(opt)
    assert {store.get(x).s.shape[0] for x in params.values()} == {2}
    assert np.all(np.isfinite(params["a"])) and np.all(np.isfinite(params["b"]))
