"""JAX arrays are immutable: the functional `co.update` returns new parameters each step.

Run it with `python docs/examples/jax_mlp.py`; `--compare-optax` times a training step
against optax (eagerly, and compiled whole with `jax.jit`) instead of training.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
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
    # Compile the gradient, not the update: composeopt's state lives in Python, which a
    # jitted function runs only once (co.update refuses to run inside jax.jit).
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01))
    losses = []
    for _ in range(steps):
        value, grads = value_and_grad(params, X, y)
        params = co.update(opt, params, grads)  # new arrays; the state moves to them
        losses.append(float(value))
    return {"params": params, "losses": losses, "opt": opt}


def compare_with_optax(steps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Milliseconds per training step (the jitted gradient and the update) three ways:
    composeopt eagerly, optax eagerly, and optax compiled with the gradient in one `jax.jit`.
    All take the same steps: clip the global norm at 5, then Adam(0.01).  `first_ms` is
    the first step, which compiles (JAX compiles each eager operation once per shape and
    keeps it for the process, so the runs after the first one find some of theirs done)."""
    import optax

    points, labels = two_spirals(seed=seed)
    X, y = jnp.asarray(points), jnp.asarray(labels)
    start = {name: jnp.asarray(value) for name, value in init_params(np, seed).items()}
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    transform = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(0.01))

    def optax_step(params: Any, state: Any) -> tuple[Any, Any]:
        _, grads = value_and_grad(params, X, y)
        updates, state = transform.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def composeopt_step(opt: co.Rule) -> Callable[[Any, Any], tuple[Any, Any]]:
        def step(params: Any, state: Any) -> tuple[Any, Any]:
            _, grads = value_and_grad(params, X, y)
            return co.update(opt, params, grads), state

        return step

    runs = {
        "composeopt, eager": composeopt_step(co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01))),
        "optax, eager": optax_step,
        "optax, jax.jit": jax.jit(optax_step),
    }
    times, first, params_after = {}, {}, {}
    for name, step in runs.items():
        params, state = start, transform.init(start)
        began = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(params)
        first[name] = (time.perf_counter() - began) * 1e3
        best = float("inf")
        for _ in range(10):  # the best of ten rounds: the machine may be busy with other work
            began = time.perf_counter()
            for _ in range(steps // 10):
                params, state = step(params, state)
            jax.block_until_ready(params)
            best = min(best, (time.perf_counter() - began) / (steps // 10))
        times[name] = best * 1e3
        params_after[name] = params
    return {"ms_per_step": times, "first_ms": first, "params": params_after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compare-optax", action="store_true", help="time a step against optax")
    arguments = parser.parse_args()
    if arguments.compare_optax:
        compared = compare_with_optax(arguments.steps or 1000)
        timed = compared["ms_per_step"]
        for name, ms in timed.items():
            print(
                f"{name:18s} {ms:7.3f} ms/step ({ms / timed['optax, jax.jit']:4.1f}x optax under jit), "
                f"first step {compared['first_ms'][name]:6.0f} ms"
            )
    else:
        result = train(arguments.steps or 1500)
        print(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
