"""The example scripts of docs/examples, run with few steps and checked.

Each example trains the same MLP on the same two spirals with gradients from
another source: backpropagation by hand (NumPy, and CuPy on a GPU), HIPS
autograd, PyTorch (CPU tensors through NumPy views, CUDA tensors through
DLPack) and JAX; and data-parallel, on two MPI ranks.  Examples whose library is missing skip.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import composeopt as co

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
PARAM_NAMES = {"W1", "b1", "W2", "b2", "W3", "b3"}


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch):
    """Import an example by name, as its own script would (docs/examples on sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load_example(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load_example


# --------------------------------------------------------------------------
# NumPy, backpropagation by hand
# --------------------------------------------------------------------------


def test_two_spirals_are_balanced_and_seeded(load):
    mlp = load("numpy_mlp")
    points, labels = mlp.two_spirals(n_per_arm=50, seed=3)
    assert points.shape == (100, 2) and labels.shape == (100,)
    assert labels.sum() == 50
    # the second arm is the first one turned by half a turn, before the noise
    np.testing.assert_allclose(points[:50], -points[50:], atol=0.6)
    np.testing.assert_array_equal(mlp.two_spirals(n_per_arm=50, seed=3)[0], points)
    assert not np.array_equal(mlp.two_spirals(n_per_arm=50, seed=4)[0], points)


def test_hand_written_gradients_match_finite_differences(load):
    mlp = load("numpy_mlp")
    X, y = mlp.two_spirals(n_per_arm=10, seed=1)
    params = mlp.init_params(np, seed=1)
    _, grads = mlp.loss_and_grads(np, params, X, y)
    assert set(grads) == set(params)
    rng = np.random.default_rng(0)
    h = 1e-6
    for name, value in params.items():
        assert grads[name].shape == value.shape
        for index in [tuple(rng.integers(0, n) for n in value.shape) for _ in range(3)]:
            saved = value[index]
            value[index] = saved + h
            up = float(mlp.loss_and_grads(np, params, X, y)[0])
            value[index] = saved - h
            down = float(mlp.loss_and_grads(np, params, X, y)[0])
            value[index] = saved
            assert grads[name][index] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9), name


def test_numpy_mlp_learns_the_spirals(load):
    mlp = load("numpy_mlp")
    result = mlp.train(np, steps=300)
    losses = result["losses"]
    assert len(losses) == 300
    assert losses[0] > 0.6  # about log 2: the untrained net is close to a coin toss
    assert losses[-1] < 0.1
    assert result["accuracy"] > 0.95


def test_numpy_mlp_script_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "numpy_mlp.py"), "--steps", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "final loss" in done.stdout and "step    20" in done.stdout


def test_cupy_mlp_computes_what_numpy_computes(load, cupy_backend):
    mlp = load("numpy_mlp")
    cupy = cupy_backend.xp
    on_gpu, on_cpu = mlp.train(cupy, steps=50), mlp.train(np, steps=50)
    np.testing.assert_allclose(on_gpu["losses"], on_cpu["losses"], rtol=1e-9)
    for name, value in on_cpu["params"].items():
        assert isinstance(on_gpu["params"][name], cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(on_gpu["params"][name]), value, rtol=1e-9, atol=1e-12)


def test_data_parallel_mlp_takes_the_full_batch_steps(mpirun, load):
    done = mpirun(EXAMPLES / "ddp_mlp.py", 2, "--steps", "60", timeout=120)
    assert "ranks agree: True" in done.stdout, done.stdout
    final = re.search(r"2 ranks, final loss (\d+\.\d+)", done.stdout)
    assert final is not None, done.stdout
    # One process on the whole batch: the mean of the two halves' mean gradients is its gradient.
    mlp = load("numpy_mlp")
    X, y = mlp.two_spirals()
    params = mlp.init_params(np, 0)
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.AdamW(0.01, lambda_=1e-4))
    losses = []
    for _ in range(60):
        loss, grads = mlp.loss_and_grads(np, params, X, y)
        co.update_(opt, params, grads)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert abs(float(final.group(1)) - losses[-1]) <= 1e-4


# --------------------------------------------------------------------------
# HIPS autograd
# --------------------------------------------------------------------------


def test_autograd_gradients_equal_the_hand_written_ones(load):
    pytest.importorskip("autograd")
    example, mlp = load("autograd_mlp"), load("numpy_mlp")
    X, y = mlp.two_spirals(n_per_arm=20, seed=2)
    params = mlp.init_params(np, seed=2)
    by_hand = mlp.loss_and_grads(np, params, X, y)[1]
    by_autograd = example.gradient(params, X, y)
    assert set(by_autograd) == PARAM_NAMES
    for name in PARAM_NAMES:
        np.testing.assert_allclose(by_autograd[name], by_hand[name], rtol=1e-10, atol=1e-14)


def test_autograd_example_trains(load):
    pytest.importorskip("autograd")
    result = load("autograd_mlp").train(steps=150)
    assert result["loss_after"] < result["loss_before"] / 3


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------


@pytest.fixture
def torch():
    """torch, or a skip; one thread, since the model is tiny and JAX's threads may be busy too."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_torch_views_write_into_the_model(load, torch):
    example = load("torch_mlp")
    model = example.make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    views = {name: example.as_array(p) for name, p in model.named_parameters()}
    co.update_(co.Descent(0.5), views, {name: np.ones_like(v) for name, v in views.items()})
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name] - 0.5), name


def test_torch_example_trains_the_model(load, torch):
    example = load("torch_mlp")
    model = example.make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = example.train(model, co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01)), steps=150)
    assert losses[-1] < losses[0] / 2
    for name, p in model.named_parameters():
        assert not torch.allclose(p.detach(), before[name]), name


def test_composeopt_adam_takes_torch_adams_steps(load, torch):
    example, mlp = load("torch_mlp"), load("numpy_mlp")
    ours, theirs = example.make_model(seed=1), example.make_model(seed=1)
    example.train(ours, co.Adam(0.01), steps=25)

    points, labels = mlp.two_spirals()
    X = torch.tensor(points, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01)
    for _ in range(25):
        reference.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(theirs(X)[:, 0], y).backward()
        reference.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_torch_tensors_can_also_be_updated_directly(load, torch):
    model = load("torch_mlp").make_model()
    params = {name: p.data for name, p in model.named_parameters()}  # tensors that do not require grad
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    co.update_(co.Descent(0.25), params, {name: torch.ones_like(t) for name, t in params.items()})
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), before[name] - 0.25), name


def test_torch_cuda_tensors_through_dlpack(load, torch):
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for torch")
    example = load("torch_mlp")
    on_gpu, on_cpu = example.make_model(), example.make_model()
    example.train(on_gpu, co.Adam(0.01), steps=20, device="cuda")
    example.train(on_cpu, co.Adam(0.01), steps=20)
    for p, q in zip(on_gpu.parameters(), on_cpu.parameters()):
        assert p.device.type == "cuda"
        np.testing.assert_allclose(p.detach().cpu().numpy(), q.detach().numpy(), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------


def test_jax_example_updates_immutable_arrays(load):
    jax = pytest.importorskip("jax")
    example = load("jax_mlp")
    result = example.train(steps=60)
    losses, params, opt = result["losses"], result["params"], result["opt"]
    assert losses[-1] < 0.8 * losses[0]
    assert set(params) == PARAM_NAMES
    assert all(isinstance(value, jax.Array) for value in params.values())
    store = co.state_store(opt)
    assert store.step == 60
    assert len(store) == len(PARAM_NAMES)  # the state moved to the new arrays, nothing left behind
    assert all(store.get(value) is not None for value in params.values())


def test_jax_example_is_reproducible(load):
    pytest.importorskip("jax")
    example = load("jax_mlp")
    first, second = example.train(steps=5), example.train(steps=5)
    assert first["losses"] == second["losses"]
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(np.asarray(first["params"][name]), np.asarray(second["params"][name]))
