"""The demo's test functions with their gradients, and the problems of its comparison."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rule import Rule
from ..rules.adam import AdaBelief, Adam
from ..rules.adaptive import AdaGrad, RMSProp
from ..rules.sgd import Descent, Momentum, Nesterov

__all__ = [
    "SEED",
    "X_STAR",
    "MLP_SIZES",
    "Problem",
    "RuleFactory",
    "quartic",
    "quartic_gradient",
    "rosenbrock",
    "rosenbrock_gradient",
    "beale",
    "beale_gradient",
    "two_spirals",
    "mlp_init",
    "mlp_loss_and_gradient",
    "problems",
]

SEED = 42
"""Seed of every random number the demo draws."""

X_STAR = -9 / 8
"""The minimiser of `2x^4 + 3x^3 + 2`: its gradient `x^2 (8x + 9)` vanishes
at `x = 0` (a saddle, not a minimum) and at `x = -9/8`."""


def quartic(x: np.ndarray) -> np.ndarray:
    """`L(x) = 2x^4 + 3x^3 + 2`, the loss of TensorFlow's guide; minimum about 0.932 at `x = -9/8`."""
    value: np.ndarray = 2 * x**4 + 3 * x**3 + 2
    return value


def quartic_gradient(x: np.ndarray) -> np.ndarray:
    """The gradient `8x^3 + 9x^2` of `L(x) = 2x^4 + 3x^3 + 2`.

    Overflow is expected once a run diverges: it gives `inf` or `nan`,
    which `convergence_test` reports, so NumPy is asked not to warn.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        gradient: np.ndarray = 8 * x**3 + 9 * x**2
    return gradient


def rosenbrock(p: np.ndarray) -> np.ndarray:
    """`(1 - x)^2 + 100 (y - x^2)^2` at `p = (x, y)` (`p[0]` and `p[1]` may be grids); minimum 0 at (1, 1)."""
    x, y = p[0], p[1]
    value: np.ndarray = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    return value


def rosenbrock_gradient(p: np.ndarray) -> np.ndarray:
    """The gradient of `rosenbrock` at `p`."""
    x, y = p[0], p[1]
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def _beale_terms(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = p[0], p[1]
    return 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3


def beale(p: np.ndarray) -> np.ndarray:
    """Beale's function `sum_k (c_k - x + x y^k)^2`, `c = (1.5, 2.25, 2.625)`; minimum 0 at (3, 0.5)."""
    t1, t2, t3 = _beale_terms(p)
    value: np.ndarray = t1**2 + t2**2 + t3**2
    return value


def beale_gradient(p: np.ndarray) -> np.ndarray:
    """The gradient of `beale` at `p`."""
    x, y = p[0], p[1]
    t1, t2, t3 = _beale_terms(p)
    return np.array(
        [
            2 * t1 * (y - 1) + 2 * t2 * (y**2 - 1) + 2 * t3 * (y**3 - 1),
            2 * t1 * x + 4 * t2 * x * y + 6 * t3 * x * y**2,
        ]
    )


def two_spirals(n_per_arm: int = 100, noise: float = 0.08, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Points on two interleaved spirals: `(points (2n, 2), labels (2n,))`, labels 0 and 1."""
    rng = np.random.default_rng(seed)
    angle = np.sqrt(rng.random(n_per_arm)) * 3 * np.pi  # up to one and a half turns
    arm = np.stack([angle * np.cos(angle), angle * np.sin(angle)], axis=1) / (3 * np.pi)
    points = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * n_per_arm, 2))
    labels = np.concatenate([np.zeros(n_per_arm), np.ones(n_per_arm)])
    return points, labels


MLP_SIZES = (2, 16, 16, 1)
"""Layer sizes of the demo's MLP: two inputs, two tanh layers, one logit."""


def mlp_init(seed: int = SEED) -> dict[str, np.ndarray]:
    """The MLP's parameters: weights with variance 2 / fan-in, zero biases."""
    rng = np.random.default_rng(seed)
    params = {}
    for k, (fan_in, fan_out) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]), start=1):
        params[f"W{k}"] = rng.normal(0.0, math.sqrt(2 / fan_in), (fan_in, fan_out))
        params[f"b{k}"] = np.zeros(fan_out)
    return params


def mlp_loss_and_gradient(
    params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean binary cross-entropy of the MLP's logits on `(X, y)`, and its gradient (backpropagation)."""
    h1 = np.tanh(X @ params["W1"] + params["b1"])
    h2 = np.tanh(h1 @ params["W2"] + params["b2"])
    z = (h2 @ params["W3"] + params["b3"])[:, 0]
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    dz = ((1 + np.tanh(z / 2)) / 2 - y)[:, None] / len(y)  # sigmoid(z) - y, without overflow
    da2 = (dz @ params["W3"].T) * (1 - h2 * h2)
    da1 = (da2 @ params["W2"].T) * (1 - h1 * h1)
    grads = {
        "W1": X.T @ da1,
        "b1": da1.sum(axis=0),
        "W2": h1.T @ da2,
        "b2": da2.sum(axis=0),
        "W3": h2.T @ dz,
        "b3": dz.sum(axis=0),
    }
    return loss, grads


RuleFactory = Callable[[], Rule]


@dataclass(frozen=True)
class Problem:
    """A minimisation problem that `compare_rules` runs every rule of `rules` on.

    `start` returns fresh parameters (an array, or a tree of arrays) and
    `loss_and_gradient` the loss and gradient at given parameters.  For
    problems in one or two dimensions, `surface` is the loss as a function of
    a grid (`surface(np.stack([X, Y]))`, or `surface(x)` in one dimension)
    and `window` the region to draw, `(x_min, x_max, y_min, y_max)` or
    `(x_min, x_max)`.
    """

    name: str
    title: str
    description: str
    start: Callable[[], Any]
    loss_and_gradient: Callable[[Any], tuple[float, Any]]
    steps: int
    rules: tuple[RuleFactory, ...]
    min_loss: float = 0.0
    minimum: tuple[float, ...] | None = None
    surface: Callable[[np.ndarray], np.ndarray] | None = None
    window: tuple[float, ...] | None = None


def _value_and_gradient(
    f: Callable[[np.ndarray], np.ndarray], gradient: Callable[[np.ndarray], np.ndarray]
) -> Callable[[Any], tuple[float, Any]]:
    """`p -> (f(p) as a float, gradient(p))` for a function of one small array."""
    return lambda p: (float(np.sum(f(p))), gradient(p))


def _lineup(
    descent: float,
    momentum: float,
    nesterov: float,
    rmsprop: float,
    adagrad: float,
    adam: float,
    adabelief: float,
) -> tuple[RuleFactory, ...]:
    """The seven rules of the comparison, each with the learning rate given for this problem."""
    return (
        lambda: Descent(descent),
        lambda: Momentum(momentum),
        lambda: Nesterov(nesterov),
        lambda: RMSProp(rmsprop),
        lambda: AdaGrad(adagrad),
        lambda: Adam(adam),
        lambda: AdaBelief(adabelief),
    )


def problems(seed: int = SEED) -> list[Problem]:
    """The problems of the comparison; `seed` draws the spirals and the MLP's initial weights.

    Each rule gets a learning rate suited to the problem (steps that
    converge without diverging), as one would tune it by hand.
    """
    points, labels = two_spirals(seed=seed)
    return [
        Problem(
            name="rosenbrock",
            title="Rosenbrock",
            description="(1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2); minimum 0 at (1, 1)",
            start=lambda: np.array([-1.5, 2.0]),
            loss_and_gradient=_value_and_gradient(rosenbrock, rosenbrock_gradient),
            steps=3000,
            rules=_lineup(1e-3, 5e-4, 1e-3, 3e-3, 1.0, 0.05, 0.05),
            minimum=(1.0, 1.0),
            surface=rosenbrock,
            window=(-2.0, 2.0, -0.5, 3.5),
        ),
        Problem(
            name="beale",
            title="Beale",
            description="sum_k (c_k - x + x y^k)^2 from (1, 1.5); minimum 0 at (3, 0.5)",
            start=lambda: np.array([1.0, 1.5]),
            loss_and_gradient=_value_and_gradient(beale, beale_gradient),
            steps=2000,
            rules=_lineup(1e-2, 1e-3, 3e-3, 3e-3, 0.5, 0.05, 0.05),
            minimum=(3.0, 0.5),
            surface=beale,
            window=(-0.5, 4.0, -1.5, 2.0),
        ),
        Problem(
            name="quartic",
            title="Quartic",
            description="2x^4 + 3x^3 + 2 from x = 2 (TensorFlow's guide); minimum 0.932 at x = -9/8",
            start=lambda: np.array([2.0]),
            loss_and_gradient=_value_and_gradient(quartic, quartic_gradient),
            steps=500,
            rules=_lineup(1e-2, 1e-2, 1e-2, 1e-2, 0.5, 0.1, 0.1),
            min_loss=float(quartic(np.array(X_STAR))),
            minimum=(X_STAR,),
            surface=quartic,
            window=(-1.8, 2.2),
        ),
        Problem(
            name="mlp",
            title="MLP on two spirals",
            description="2-16-16-1 tanh MLP, mean cross-entropy on 200 points, full batch",
            start=lambda: mlp_init(seed),
            loss_and_gradient=lambda params: mlp_loss_and_gradient(params, points, labels),
            steps=1500,
            rules=_lineup(0.5, 0.05, 0.05, 3e-3, 0.1, 0.01, 0.01),
        ),
    ]
