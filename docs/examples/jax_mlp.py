"""JAX arrays are immutable: the functional `co.update` returns new parameters each step.

Run it with `python docs/examples/jax_mlp.py`.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy_mlp import init_params, two_spirals

import composeopt as co


def loss(params: dict[str, Any], X: Any, y: Any) -> Any:
    h1 = jnp.tanh(X @ params["W1"] + params["b1"])
    h2 = jnp.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def train(steps: int = 1500, seed: int = 0) -> dict[str, Any]:
    points, labels = two_spirals(seed=seed)
    X, y = jnp.asarray(points), jnp.asarray(labels)
    params = {name: jnp.asarray(value) for name, value in init_params(np, seed).items()}
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01))
    losses = []
    for _ in range(steps):
        value, grads = value_and_grad(params, X, y)
        params = co.update(opt, params, grads)  # new arrays; the state moves to them
        losses.append(float(value))
    return {"params": params, "losses": losses, "opt": opt}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    result = train(parser.parse_args().steps)
    print(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
