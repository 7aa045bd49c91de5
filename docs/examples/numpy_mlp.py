"""A small MLP on two spirals, with backpropagation written by hand, trained by composeopt.

Every array operation goes through `xp`, so the same script runs on the CPU
with NumPy and on a GPU with CuPy:

    python docs/examples/numpy_mlp.py
    python docs/examples/numpy_mlp.py --xp cupy
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any

import numpy as np

import composeopt as co

SIZES = (2, 32, 32, 1)  # inputs, two hidden layers, one logit


def two_spirals(n_per_arm: int = 200, noise: float = 0.08, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on two interleaved spirals, as NumPy arrays: `(points (2n, 2), labels (2n,))`."""
    rng = np.random.default_rng(seed)
    angle = np.sqrt(rng.random(n_per_arm)) * 3 * np.pi  # up to one and a half turns
    arm = np.stack([angle * np.cos(angle), angle * np.sin(angle)], axis=1) / (3 * np.pi)
    points = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * n_per_arm, 2))
    labels = np.concatenate([np.zeros(n_per_arm), np.ones(n_per_arm)])
    return points, labels


def init_params(xp: ModuleType, seed: int = 0) -> dict[str, Any]:
    """Weights drawn with variance 2 / fan-in, zero biases, as `xp` arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for k, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:]), start=1):
        params[f"W{k}"] = xp.asarray(rng.normal(0.0, np.sqrt(2 / fan_in), (fan_in, fan_out)))
        params[f"b{k}"] = xp.zeros(fan_out)
    return params


def loss_and_grads(xp: ModuleType, params: dict[str, Any], X: Any, y: Any) -> tuple[Any, dict[str, Any]]:
    """Mean binary cross-entropy of the logits, and its gradient by backpropagation."""
    h1 = xp.tanh(X @ params["W1"] + params["b1"])
    h2 = xp.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    loss = xp.mean(xp.logaddexp(0.0, z) - y * z)  # -log sigmoid(z) for y = 1, -log(1 - sigmoid(z)) for 0

    dz = ((1 + xp.tanh(z / 2)) / 2 - y)[:, None] / z.shape[0]  # sigmoid(z) - y, without overflow
    da2 = (dz @ params["W3"].T) * (1 - h2 * h2)
    da1 = (da2 @ params["W2"].T) * (1 - h1 * h1)
    grads = {
        "W3": h2.T @ dz,
        "b3": xp.sum(dz, axis=0),
        "W2": h1.T @ da2,
        "b2": xp.sum(da2, axis=0),
        "W1": X.T @ da1,
        "b1": xp.sum(da1, axis=0),
    }
    return loss, grads


def accuracy(xp: ModuleType, params: dict[str, Any], X: Any, y: Any) -> float:
    h1 = xp.tanh(X @ params["W1"] + params["b1"])
    h2 = xp.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    return float(xp.mean((z > 0) == (y > 0.5)))


def train(xp: ModuleType = np, steps: int = 1500, seed: int = 0, log_every: int = 0) -> dict[str, Any]:
    """Train the MLP full-batch; returns the parameters, the loss at every step and the accuracy."""
    points, labels = two_spirals(seed=seed)
    X, y = xp.asarray(points), xp.asarray(labels)
    params = init_params(xp, seed)
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.WeightDecay(1e-4), co.Adam(0.01))
    losses = []
    for step in range(1, steps + 1):
        loss, grads = loss_and_grads(xp, params, X, y)
        co.update_(opt, params, grads)  # every array of params changes in place
        losses.append(float(loss))
        if log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {losses[-1]:.4f}  accuracy {accuracy(xp, params, X, y):.3f}")
    return {"params": params, "losses": losses, "accuracy": accuracy(xp, params, X, y)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xp", default="numpy", help="array module: numpy (default) or cupy")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    result = train(importlib.import_module(args.xp), steps=args.steps, log_every=max(1, args.steps // 5))
    print(f"final loss {result['losses'][-1]:.4f}, accuracy {result['accuracy']:.3f}")


if __name__ == "__main__":
    main()
