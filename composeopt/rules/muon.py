"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for matrix parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import device

from .._dispatch import eps_for, namespace
from ..errors import HyperparameterError
from ..hyper import Hyper, Scheduled, flag, nonnegative, positive_int, unit_interval
from ..rule import Rule, State, _format
from ..tree import Path
from ._math import ema, widened
from .adam import AdamW

__all__ = ["Muon", "orthogonalize"]

# Jordan et al.'s quintic: chosen to push small singular values up fast, not to converge to 1.
_QUINTIC = (3.4445, -4.7750, 2.0315)

_SHAPE_SCALINGS = ("original", "match_rms_adamw", "none")

_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _shape_scaling(value: Any) -> str:
    if value not in _SHAPE_SCALINGS:
        raise HyperparameterError(f"must be one of {_SHAPE_SCALINGS}, got {value!r}")
    return str(value)


def orthogonalize(xp: ModuleType, g: Any, steps: int, eps: float) -> Any:
    """`steps` quintic Newton–Schulz iterations on `g / max(‖g‖_F, eps)`: roughly $UV^T$ of $g = USV^T$.

    `g` is a matrix `(m, n)` or a stack `(..., m, n)` of matrices, each
    orthogonalised on its own (its own norm); `g` is not written.  The iteration
    works on the wide orientation ($X X^T$ is the smaller Gram matrix); it
    commutes with transposition, so a tall `g` is transposed and back.
    """
    tall = g.shape[-2] > g.shape[-1]
    wide = xp.matrix_transpose(g) if tall else g
    x = _newton_schulz_(xp, xp.asarray(wide, copy=True), steps, eps)
    return xp.matrix_transpose(x) if tall else x


def _newton_schulz_(xp: ModuleType, x: Any, steps: int, eps: float) -> Any:
    """`orthogonalize` of a fresh stack `x` of wide matrices `(..., m, n)`, `m <= n`, in place where
    the namespace allows (NumPy, CuPy, torch; JAX and other immutable arrays rebind): returns it.

    Every matrix of the stack goes through one batched product per matrix
    product of the iteration, and one reduction gives all their norms.
    """
    wide = widened(xp, x)  # float32 at least: a float16 sum of squares overflows, and so may the norm
    norm = xp.maximum(xp.sqrt(xp.sum(wide * wide, axis=(-2, -1), keepdims=True)), eps)
    if wide is x:
        x /= norm
    else:
        x = xp.astype(wide / norm, x.dtype)
    product = _products_into_buffers(x)
    a, b, c = _QUINTIC
    for _ in range(steps):
        gram = product(x, xp.matrix_transpose(x), 0)
        # gram is symmetric, so gram @ gram = gram @ gram^T: a symmetric rank-k product (BLAS syrk)
        poly = product(gram, xp.matrix_transpose(gram), 1)
        poly *= c
        gram *= b
        gram += poly  # b A + c A^2
        change = product(gram, x, 2)
        x *= a
        x += change  # a X + (b A + c A^2) X
    return x


def _products_into_buffers(x: Any) -> Callable[[Any, Any, int], Any]:
    """`product(p, q, slot)`: `p @ q`; for NumPy's BLAS dtypes written into a buffer kept per
    `slot`, so that the iteration allocates its matrices once rather than once per step (large
    ones are fresh pages from the system each time).

    Not for 16-bit floats: ml_dtypes' bfloat16 `p @ q` sums in float32, but its product
    into `out=` sums in bfloat16.
    """
    if type(x) is not np.ndarray or x.dtype not in _BLAS_DTYPES:
        return lambda p, q, slot: p @ q
    buffers: dict[int, Any] = {}

    def product(p: Any, q: Any, slot: int) -> Any:
        out = buffers.get(slot)
        if out is None:
            out = buffers[slot] = np.empty(p.shape[:-1] + q.shape[-1:], dtype=x.dtype)
        return np.matmul(p, q, out=out)

    return product


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
    Muon.  The matrix products and the norm stay on the device.  The matrices
    of one shape (a tall one counted as its transpose), dtype and device are
    orthogonalised together, as one stack: one batched product per product of
    the iteration and one reduction for all their norms, each matrix still
    normalised by its own norm.  The numbers are those of one matrix at a
    time, to rounding (NumPy's batched product calls BLAS matrix by matrix).
    A float16 or bfloat16 norm is taken and divided by in float32.

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

    Same as `torch.optim.Muon(params, lr=eta, weight_decay=lambda_, momentum=rho,
    nesterov=nesterov, eps=epsilon, ns_steps=ns_steps, adjust_lr_fn=shape_scaling)`
    on the matrices, with torch's default `ns_coefficients` (this rule's
    quintic); `shape_scaling="none"` has no torch counterpart.  Torch's own
    defaults differ in two: `lr=1e-3, weight_decay=0.1`, so
    `torch.optim.Muon(params)` is `Muon(1e-3, lambda_=0.1)` (its `momentum`,
    `nesterov`, `eps`, `ns_steps` and `adjust_lr_fn=None`, i.e. `"original"`, are
    this rule's).  Torch shrinks $x$ by $1 - \eta\lambda$ before subtracting the
    step, the same number to rounding; it runs the Newton–Schulz iteration in
    bfloat16 and this rule in the parameter's dtype, so the two agree to
    bfloat16 accuracy (to rounding when torch's iteration is made float64);
    and it refuses non-matrix parameters where this rule hands them to `fallback`.

    `optax.contrib.muon` bias-corrects the momentum (the same direction
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
            return self._matrix_steps([state], [x], [dx])[0]
        return self.fallback.apply_(state, x, dx)

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        matrices = [i for i, x in enumerate(xs) if x.ndim == 2]
        others = [i for i, x in enumerate(xs) if x.ndim != 2]
        updates: list[Any] = [None] * len(xs)
        if matrices:
            results = self._matrix_steps(
                [states[i] for i in matrices], [xs[i] for i in matrices], [dxs[i] for i in matrices]
            )
            for i, update in zip(matrices, results):
                updates[i] = update
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

    def _matrix_steps(self, states: Sequence[State], xs: Sequence[Any], dxs: Sequence[Any]) -> list[Any]:
        """The updates of the matrices `xs`, those of one wide shape, dtype and device orthogonalised
        as one stack (a tall matrix joins the stack of its transpose's shape)."""
        looks = []
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (state, x, dx) in enumerate(zip(states, xs, dxs)):
            state.mu = ema(state.mu, dx, self.rho)
            if self.nesterov:  # (1 - rho) dx + rho mu, written into dx (the rule's to write): no new array
                dx *= 1 - self.rho
                dx += self.rho * state.mu
            looks.append(dx if self.nesterov else state.mu)
            rows, cols = x.shape
            key = (type(x), device(x), x.dtype, min(rows, cols), max(rows, cols))
            groups.setdefault(key, []).append(i)
        directions: list[Any] = [None] * len(xs)
        for members in groups.values():
            x = xs[members[0]]
            xp = namespace(x)
            tall = [xs[i].shape[0] > xs[i].shape[1] for i in members]
            wide = [xp.matrix_transpose(looks[i]) if t else looks[i] for i, t in zip(members, tall)]
            stack = xp.stack(wide)  # a copy, the iteration's to write
            stack = _newton_schulz_(xp, stack, self.ns_steps, eps_for(x.dtype, self.epsilon))
            for j, (i, t) in enumerate(zip(members, tall)):
                directions[i] = xp.matrix_transpose(stack[j, ...]) if t else stack[j, ...]
        return [self._scaled(x, direction) for x, direction in zip(xs, directions)]

    def _scaled(self, x: Any, direction: Any) -> Any:
        rows, cols = x.shape
        if self.shape_scaling == "original":
            scale = math.sqrt(max(1.0, rows / cols)) if cols else 1.0
        elif self.shape_scaling == "match_rms_adamw":
            scale = 0.2 * math.sqrt(max(rows, cols))
        else:
            scale = 1.0
        step = direction  # a view of the orthogonalised stack, which nothing else keeps: scaled in place
        step *= self.eta * scale
        if self.lambda_:
            step += (self.eta * self.lambda_) * x
        return step

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
