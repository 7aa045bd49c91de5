"""The two-spirals MLP again, with gradients from HIPS autograd: `grad(loss)(params)` feeds `update_`.

Run it with `python docs/examples/autograd_mlp.py`.
"""

from __future__ import annotations

import argparse
from typing import Any

import autograd.numpy as anp
import numpy as np
from autograd import grad
from numpy_mlp import init_params, two_spirals

import composeopt as co


def loss(params: dict[str, Any], X: Any, y: Any) -> Any:
    """Mean binary cross-entropy of the MLP's logits, written with autograd's NumPy."""
    h1 = anp.tanh(X @ params["W1"] + params["b1"])
    h2 = anp.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    return anp.mean(anp.logaddexp(0.0, z) - y * z)


gradient = grad(loss)  # with respect to params: a dict of NumPy arrays shaped like them


def train(steps: int = 1500, seed: int = 0) -> dict[str, Any]:
    X, y = two_spirals(seed=seed)
    params = init_params(np, seed)
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01))
    loss_before = float(loss(params, X, y))
    for _ in range(steps):
        co.update_(opt, params, gradient(params, X, y))
    return {"params": params, "loss_before": loss_before, "loss_after": float(loss(params, X, y))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    result = train(parser.parse_args().steps)
    print(f"loss {result['loss_before']:.4f} -> {result['loss_after']:.4f}")
