"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for matrix parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .._dispatch import eps_for, namespace
from ..errors import HyperparameterError
from ..hyper import Hyper, Scheduled, flag, nonnegative, positive_int, unit_interval
from ..rule import Rule, State, _format
from ..tree import Path
from ._math import ema, norm_power
from .adam import AdamW

__all__ = ["Muon", "orthogonalize"]

# Jordan et al.'s quintic: chosen to push small singular values up fast, not to converge to 1.
_QUINTIC = (3.4445, -4.7750, 2.0315)

_SHAPE_SCALINGS = ("original", "match_rms_adamw", "none")


def _shape_scaling(value: Any) -> str:
    if value not in _SHAPE_SCALINGS:
        raise HyperparameterError(f"must be one of {_SHAPE_SCALINGS}, got {value!r}")
    return str(value)


def orthogonalize(xp: ModuleType, g: Any, steps: int, eps: float) -> Any:
    """`steps` quintic Newton–Schulz iterations on `g / max(‖g‖_F, eps)`: roughly $UV^T$ of $g = USV^T$.

    The iteration works on the wide orientation ($X X^T$ is the smaller Gram
    matrix); it commutes with transposition, so a tall `g` is transposed and back.
    """
    tall = g.shape[0] > g.shape[1]
    x = xp.matrix_transpose(g) if tall else g
    norm = xp.sqrt(norm_power(xp, x, 2))  # reduced in float32 at least: no float16 overflow
    x = x / xp.astype(xp.maximum(norm, eps), x.dtype)
    a, b, c = _QUINTIC
    for _ in range(steps):
        gram = x @ xp.matrix_transpose(x)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return xp.matrix_transpose(x) if tall else x


class Muon(Rule):
    r"""Muon for matrices, another rule for the rest:
    `Muon(eta=0.02, rho=0.95, nesterov=True, ns_steps=5, lambda_=0.0, epsilon=1e-7,
    shape_scaling="original", fallback=AdamW(3e-4))`.

    For a 2-D parameter $x$ of shape $(m, n)$:

    $$b \leftarrow \rho\, b + (1-\rho)\, dx, \qquad
    u = \begin{cases} (1-\rho)\, dx + \rho\, b & \text{nesterov} \\ b & \text{otherwise}\end{cases},
    \qquad \Delta = \eta\, s_{m,n}\, \mathrm{NS}_5(u) + \eta \lambda\, x$$

    where $\mathrm{NS}_k$ divides $u$ by $\max(\lVert u\rVert_F, \epsilon)$ and
    then takes $k$ steps of $X \leftarrow aX + (bA + cA^2)X$, $A = XX^T$, with
    $(a, b, c) = (3.4445, -4.7750, 2.0315)$ (on $u^T$ when $m > n$): an
    approximate $UV^T$ of $u = USV^T$.  The shape factor $s_{m,n}$ is
    $\sqrt{\max(1, m/n)}$ (`"original"`, for weights laid out
    (fan-out, fan-in) as torch's `Linear`), $0.2\sqrt{\max(m, n)}$
    (`"match_rms_adamw"`, the update RMS of AdamW) or 1 (`"none"`).

    Every other parameter (vectors, scalars, convolution kernels) takes the
    `fallback` rule instead; flatten a kernel to a matrix yourself to give it
    Muon.  The matrix products and the norm stay on the device.

    Args:
        eta: learning rate $\eta \ge 0$.
        rho: momentum $\rho \in [0, 1)$.
        nesterov: orthogonalise the Nesterov look-ahead $u$ rather than $b$.
        ns_steps: Newton–Schulz iterations, an integer $\ge 1$.
        lambda_: decoupled weight decay $\lambda \ge 0$, scaled by $\eta$ (not by $s_{m,n}$).
        epsilon: floor $\epsilon$ of the norm that $u$ is divided by.
        shape_scaling: `"original"`, `"match_rms_adamw"` or `"none"`.
        fallback: the rule for non-matrix parameters, with its own
            hyperparameters (Muon's `eta` and schedules do not reach it);
            by default `AdamW(3e-4)` (no weight decay), the split that
            torch's documentation suggests.  It may be a chain.

    State: `mu` ($b$) for a matrix; the fallback's state for the others.

    Same as `torch.optim.Muon(lr=eta, momentum=rho, nesterov=nesterov, ns_steps=ns_steps,
    weight_decay=lambda_, eps=epsilon, adjust_lr_fn=shape_scaling)` on the matrices
    (torch's default `weight_decay` is 0.1 and its `lr` 1e-3), except that torch
    runs the Newton–Schulz iteration in bfloat16 and this rule in the parameter's
    dtype.  `optax.contrib.muon` bias-corrects the momentum (the same direction
    after normalisation, unless `nesterov`), divides by
    $\lVert u\rVert_F + \epsilon$, lays matrices out (fan-in, fan-out) so that its
    default factor is $\sqrt{\max(1, n/m)}$, and gives other parameters its own
    Nesterov AdamW: with `nesterov=False, epsilon=0` it equals
    `optax.contrib.muon(eta, beta=rho, eps=0.0, nesterov=False, weight_decay=lambda_)`
    on the transposed matrices.

    Reference: [Jordan et al. (2024)](https://kellerjordan.github.io/posts/muon/);
    `"match_rms_adamw"`: [Liu et al. (2025)](https://arxiv.org/abs/2502.16982)

    Examples:
        Each step of a matrix has the same size whatever the gradient's scale:

        >>> import numpy as np, composeopt as co
        >>> opt = co.Muon(0.1, rho=0.0, ns_steps=20)
        >>> x = np.zeros((2, 2))
        >>> _ = co.update_(opt, x, np.array([[300.0, 0.0], [0.0, 0.003]]))
        >>> print(np.round(x, 1))
        [[-0.1  0. ]
         [ 0.  -0.1]]
    """

    fallible = False  # its own arithmetic cannot fail; the engine asks `fallback` itself
    _kernel = None  # a norm and matrix products per array: no elementwise fast path
    eta: Hyper[float] = Hyper(default=0.02, check=nonnegative)
    rho: Hyper[float] = Hyper(default=0.95, check=unit_interval)
    nesterov: Hyper[bool] = Hyper(default=True, check=flag)
    ns_steps: Hyper[int] = Hyper(default=5, check=positive_int)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    epsilon: Hyper[float] = Hyper(default=1e-7, check=nonnegative)
    shape_scaling: Hyper[str] = Hyper(default="original", check=_shape_scaling)

    def __init__(
        self,
        eta: Scheduled[float] = 0.02,
        rho: Scheduled[float] = 0.95,
        nesterov: Scheduled[bool] = True,
        ns_steps: Scheduled[int] = 5,
        lambda_: Scheduled[float] = 0.0,
        epsilon: Scheduled[float] = 1e-7,
        shape_scaling: Scheduled[str] = "original",
        fallback: Rule | None = None,
    ) -> None:
        if fallback is None:
            fallback = AdamW(3e-4)
        if not isinstance(fallback, Rule):
            raise TypeError(f"Muon: fallback must be a composeopt Rule, got {type(fallback).__name__}")
        self.fallback = fallback
        super().__init__(eta, rho, nesterov, ns_steps, lambda_, epsilon, shape_scaling)

    @property
    def assigns(self) -> bool:  # type: ignore[override]
        return self.fallback.assigns

    def init(self, x: Any) -> Any:
        if x.ndim == 2:
            return State(mu=namespace(x).zeros_like(x))
        return self.fallback.init_tree_([x], [Path()])[0]

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        others = [i for i, x in enumerate(xs) if x.ndim != 2]
        states = [State(mu=namespace(x).zeros_like(x)) if x.ndim == 2 else None for x in xs]
        for i, state in zip(
            others, self.fallback.init_tree_([xs[i] for i in others], [paths[i] for i in others])
        ):
            states[i] = state
        return states

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        if x.ndim == 2:
            return self._matrix_step(state, x, dx)
        return self.fallback.apply_(state, x, dx)

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        updates = [
            self._matrix_step(state, x, dx) if x.ndim == 2 else None for state, x, dx in zip(states, xs, dxs)
        ]
        others = [i for i, x in enumerate(xs) if x.ndim != 2]
        if others:
            results = self.fallback.apply_tree_(
                [states[i] for i in others],
                [xs[i] for i in others],
                [dxs[i] for i in others],
                [paths[i] for i in others],
            )
            for i, update in zip(others, results):
                updates[i] = update
        return updates

    def _matrix_step(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        state.mu = ema(state.mu, dx, self.rho)
        u = (1 - self.rho) * dx + self.rho * state.mu if self.nesterov else state.mu
        direction = orthogonalize(xp, u, self.ns_steps, eps_for(x.dtype, self.epsilon))
        rows, cols = x.shape
        if self.shape_scaling == "original":
            scale = math.sqrt(max(1.0, rows / cols)) if cols else 1.0
        elif self.shape_scaling == "match_rms_adamw":
            scale = 0.2 * math.sqrt(max(rows, cols))
        else:
            scale = 1.0
        step = (self.eta * scale) * direction
        return step + (self.eta * self.lambda_) * x if self.lambda_ else step

    def begin_step(self, step: int) -> None:
        self.fallback.begin_step(step)

    def children(self) -> tuple[Rule, ...]:
        return (self.fallback,)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{name}={_format(value)}" for name, value in self.settings().items())
        return f"Muon({hyper}, fallback={self.fallback!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Muon)
        return self.fallback == other.fallback and self.settings() == other.settings()
