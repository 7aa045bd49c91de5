"""Layer-wise rules: each array's step is scaled by a norm of that whole array.

The norms stay 0-d arrays on the array's device and are combined with
`xp.where`, so these rules never wait for the GPU.  Their fast paths are
staged: a reduction over each array (its norm, and the update's) sits
between the kernel that makes the update and the one that scales it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import device

from .._dispatch import copy, eps_for, namespace
from .._fused.kernel import Kernel
from .._fused.reduce import Measure, Outcome, Reduce, Staged
from ..hyper import Hyper, HyperTuple, beta_pair, flag, nonnegative, unit_interval
from ..rule import Rule, State
from ._math import (
    DIRECTION,
    bias_corrected_direction,
    ema,
    norm_from_power,
    norm_power,
    widened,
)
from .adam import _MOMENTS, _moment_scalars

__all__ = ["Lamb", "Lars", "Novograd", "Fromage", "GradCentralization"]


def _norm(xp: ModuleType, a: Any) -> Any:
    """The 2-norm of `a` as a 0-d array, reduced in float32 or wider (16-bit sums of squares overflow)."""
    return norm_from_power(xp, norm_power(xp, a, 2), 2)


def _trust_ratio(
    xp: ModuleType,
    x_norm: Any,
    u_norm: Any,
    coefficient: float = 1.0,
    eps: float = 0.0,
    min_norm: float = 0.0,
) -> Any:
    """`c ‖x‖ / (‖u‖ + eps)`, each norm at least `min_norm`, and 1 where a norm is 0.

    This is optax's `scale_by_trust_ratio`: a zero parameter (a fresh bias) or a zero
    update keeps its step instead of getting none (or a NaN).
    """
    x_norm = xp.maximum(x_norm, min_norm)
    u_norm = xp.maximum(u_norm, min_norm)
    degenerate = xp.logical_or(x_norm == 0, u_norm == 0)
    # The inner where keeps 0/0 from being computed (NumPy would warn) where the outer one discards it.
    return xp.where(degenerate, 1.0, coefficient * x_norm / xp.where(degenerate, 1.0, u_norm + eps))


def _trust_scaled(
    xp: ModuleType, u: Any, x: Any, coefficient: float = 1.0, eps: float = 0.0, min_norm: float = 0.0
) -> Any:
    """`u` times its trust ratio (`_trust_ratio`)."""
    ratio = _trust_ratio(xp, _norm(xp, x), _norm(xp, u), coefficient, eps, min_norm)
    return u * xp.astype(ratio, u.dtype)


_NORMS = (Measure("d", 2), Measure("x", 2))


def _trust_ratios(powers: Any, dtype: Any, coefficient: float, eps: float, min_norm: float) -> list[float]:
    """`_trust_ratio` of each row `(‖u‖², ‖x‖²)` of `powers`, to the bits the generic path
    gives each array.  There the norms are 0-d arrays of `dtype`, and NumPy computes with
    such an array and a Python float in `work` (`dtype` under NumPy 2, float64 under the
    value-based casting of NumPy 1); vectors of `work` round as those scalars do."""
    work = np.maximum(np.zeros((), dtype=dtype), 0.0).dtype
    with np.errstate(all="ignore"):  # a non-finite norm gives a NaN ratio, as there
        u_norm = np.sqrt(powers[:, 0].astype(dtype)).astype(work)
        x_norm = np.sqrt(powers[:, 1].astype(dtype)).astype(work)
        ratio = _trust_ratio(np, x_norm, u_norm, coefficient, eps, min_norm)
        values: list[float] = np.asarray(ratio).astype(dtype).tolist()
    return values


def _finish_trust(settings: Callable[[Any, Any], tuple[float, float, float]]) -> Reduce:
    """The reduction of a trust ratio: `ratio` for the next kernel, from the measured sums of
    squares of the update and of `x`; `settings(rule, dtype)` gives `(c, eps, min_norm)`."""

    def finish(
        rule: Any,
        states: Sequence[Any],
        values: Sequence[Sequence[float]],
        dtypes: Sequence[Any],
        paths: Sequence[str],
    ) -> Outcome:
        powers = np.array(values, dtype=np.float64).reshape(len(values), 2)
        ratios = [0.0] * len(values)
        for dtype in dict.fromkeys(dtypes):  # all arrays of a dtype at once
            rows = [i for i, other in enumerate(dtypes) if other == dtype]
            for i, ratio in zip(rows, _trust_ratios(powers[rows], dtype, *settings(rule, dtype))):
                ratios[i] = ratio
        return Outcome([{"ratio": ratio} for ratio in ratios])

    return Reduce(lambda rule: _NORMS, finish)


class Lamb(Rule):
    r"""LAMB, Adam with a layer-wise trust ratio:
    `Lamb(eta=0.001, beta=(0.9, 0.999), epsilon=1e-6, lambda_=0.0)`.

    With $m$, $v$ updated as in [Adam][composeopt.Adam] and
    $u = \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda x$,

    $$\Delta = \eta\, \frac{\lVert x \rVert}{\lVert u \rVert}\, u$$

    with the ratio replaced by 1 where $\lVert x \rVert$ or $\lVert u \rVert$ is 0.
    Norms are 2-norms of the whole array.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, outside the square root (floored for float16).
        lambda_: weight decay $\lambda \ge 0$, added before the trust ratio.

    State: `mu` ($m$), `nu` ($v$) and `t`, as [Adam][composeopt.Adam].

    Same as `optax.lamb(eta, b1, b2, eps=epsilon, weight_decay=lambda_)` (its
    `eps_root` at 0, its default).  The paper's clipping function $\phi$ of
    $\lVert x \rVert$ is the identity here, as in optax.

    Reference: [You et al. (2019)](https://arxiv.org/abs/1904.00962)

    Examples:
        The first Adam direction is about ±1 per coordinate; the trust ratio
        rescales it to the norm of `x` (5 here):

        >>> import numpy as np, composeopt as co
        >>> x = np.array([3.0, 4.0])
        >>> _ = co.update_(co.Lamb(0.1), x, np.array([1.0, -1.0]))
        >>> print(x.round(4))  # 3 - 0.1 * 5 / sqrt(2), 4 + 0.1 * 5 / sqrt(2)
        [2.6464 4.3536]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-6, check=nonnegative)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    _kernel = Staged(
        Kernel(
            _MOMENTS + f"return {DIRECTION} + lam * x",
            lambda rule, state, dtype: {**_moment_scalars(rule, state, dtype), "lam": rule.lambda_},
            state=("mu", "nu"),
            counter="t",
        ),
        _finish_trust(lambda rule, dtype: (1.0, 0.0, 0.0)),
        Kernel("return eta * (dx * ratio)", lambda rule, state, dtype: {"eta": rule.eta}),
    )

    def init(self, x: Any) -> State:
        xp = namespace(x)
        return State(mu=xp.zeros_like(x), nu=xp.zeros_like(x), t=0)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        b1, b2 = self.beta
        state.t += 1
        state.mu = ema(state.mu, dx, b1)
        state.nu = ema(state.nu, dx * dx, b2)
        eps = eps_for(x.dtype, self.epsilon)
        direction = bias_corrected_direction(xp, state.mu, state.nu, state.t, self.beta, eps)
        return self.eta * _trust_scaled(xp, direction + self.lambda_ * x, x)


class Lars(Rule):
    r"""LARS, momentum with a layer-wise trust ratio:
    `Lars(eta=1.0, lambda_=0.0, trust_coefficient=0.001, epsilon=0.0, momentum=0.9, nesterov=False)`.

    $$u = \eta\, \frac{c\, \lVert x \rVert}{\lVert dx + \lambda x \rVert + \epsilon}\,(dx + \lambda x),
    \qquad v \leftarrow \mu\, v + u, \qquad
    \Delta = v \ \text{ or, with Nesterov, } \ \Delta = u + \mu\, v$$

    with the ratio replaced by 1 (not $c$) where either norm is 0.  The paper
    divides by $\lVert dx \rVert + \lambda \lVert x \rVert$ instead; optax and
    this rule take the norm of the decayed gradient itself.

    Args:
        eta: learning rate $\eta \ge 0$.
        lambda_: weight decay $\lambda \ge 0$, added to the gradient first.
        trust_coefficient: $c \ge 0$, the trust ratio's multiplier.
        epsilon: $\epsilon \ge 0$, added to the denominator's norm.
        momentum: $\mu \in [0, 1)$.
        nesterov: use the Nesterov form of the momentum.

    State: `v`, the velocity, starting at 0.

    Same as `optax.lars(eta, weight_decay=lambda_, trust_coefficient=c, eps=epsilon,
    momentum=momentum, nesterov=nesterov)`, whose defaults these are (optax has no
    default learning rate; the paper's schedules start near 1 and more).
    Parameters that optax would leave out through its masks get a plain
    [Momentum][composeopt.Momentum] through [Groups][composeopt.Groups].

    Reference: [You, Gitman & Ginsburg (2017)](https://arxiv.org/abs/1708.03888)

    Examples:
        The step is $c\,\eta\,\lVert x \rVert$ long, whatever the gradient's size:

        >>> import numpy as np, composeopt as co
        >>> x = np.array([30.0, 40.0])
        >>> _ = co.update_(co.Lars(), x, np.array([-6.0, 8.0]))
        >>> print(x)  # a step of length 0.001 * 50 along the gradient
        [30.03 39.96]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=1.0, check=nonnegative)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    trust_coefficient: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    epsilon: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    momentum: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    nesterov: Hyper[bool] = Hyper(default=False, check=flag)
    _kernel = Staged(
        Kernel("return dx + lam * x", lambda rule, state, dtype: {"lam": rule.lambda_}),
        _finish_trust(lambda rule, dtype: (rule.trust_coefficient, eps_for(dtype, rule.epsilon), 0.0)),
        Kernel(
            """
            step = eta * (dx * ratio)
            v = v * momentum + step
            return step + momentum * v if nesterov else v
            """,
            lambda rule, state, dtype: {
                "eta": rule.eta,
                "momentum": rule.momentum,
                "nesterov": float(rule.nesterov),
            },
            state=("v",),
        ),
    )

    def init(self, x: Any) -> State:
        return State(v=namespace(x).zeros_like(x))

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        eps = eps_for(x.dtype, self.epsilon)
        step = self.eta * _trust_scaled(xp, dx + self.lambda_ * x, x, self.trust_coefficient, eps)
        state.v *= self.momentum
        state.v += step
        if self.nesterov:
            return step + self.momentum * state.v
        return copy(xp, state.v)


def _novograd_moments(
    rule: Novograd, states: Sequence[Any], values: Sequence[Sequence[float]], dtypes: Sequence[Any]
) -> Outcome:
    """Each array's new `nu` from its measured `‖dx‖²`, as `Novograd.apply_` computes it
    (0-d arrays of the dtype), and `root = sqrt(nu) + eps` for the kernel."""
    b2 = rule.beta[1]
    scalars, nus = [], []
    for state, (power,), dtype in zip(states, values, dtypes):
        square = np.asarray(power, dtype=dtype)
        nu = np.asarray(square if state.t == 1 else b2 * state.nu + (1 - b2) * square, dtype=dtype)
        nus.append(nu)
        scalars.append({"root": float(np.sqrt(nu) + eps_for(dtype, rule.epsilon))})

    def keep() -> None:
        for state, nu in zip(states, nus):
            state.nu = nu

    return Outcome(scalars, keep)


class Novograd(Rule):
    r"""NovoGrad, a second moment per array:
    `Novograd(eta=0.001, beta=(0.9, 0.25), epsilon=1e-6, lambda_=0.0)`.

    $$v \leftarrow \beta_2 v + (1-\beta_2)\, \lVert dx \rVert^2
    \ \ (v = \lVert dx \rVert^2 \text{ at } t = 1),
    \qquad m \leftarrow \beta_1 m + \frac{dx}{\sqrt{v} + \epsilon} + \lambda x,
    \qquad \Delta = \eta\, m$$

    $v$ is one number per array; $m$ is a running sum (no $1-\beta_1$ factor),
    as in the paper.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: decays $(\beta_1, \beta_2)$ of $m$ and of $v$, each in [0, 1).
        epsilon: $\epsilon$, outside the square root (floored for float16).
        lambda_: weight decay $\lambda \ge 0$, inside the momentum.

    State: `mu` ($m$), `nu` ($v$, a 0-d array in `x`'s dtype) and `t`.
    $\lVert dx \rVert^2$ is summed in float32 for float16 arrays, but `nu` is
    float16 and overflows once $\lVert dx \rVert > 256$ (the step is then 0).

    Same as `optax.novograd(eta, b1, b2, eps=epsilon, weight_decay=lambda_)`
    (its `eps_root` at 0, its default); optax has no default learning rate.

    Reference: [Ginsburg et al. (2019)](https://arxiv.org/abs/1905.11286)

    Examples:
        The first step is the gradient divided by its norm:

        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(2)
        >>> _ = co.update_(co.Novograd(0.1, epsilon=0.0), x, np.array([3.0, -4.0]))
        >>> print(x)
        [-0.06  0.08]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.25), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-6, check=nonnegative)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    _kernel = Staged(
        Reduce(
            lambda rule: (Measure("d", 2),),
            lambda rule, states, values, dtypes, paths: _novograd_moments(rule, states, values, dtypes),
            state_ok=lambda state, x: (
                type(getattr(state, "nu", None)) is np.ndarray
                and state.nu.shape == ()
                and state.nu.dtype == x.dtype
            ),
        ),
        Kernel(
            "mu = b1 * mu + (dx / root + lam * x)\nreturn eta * mu",
            lambda rule, state, dtype: {"eta": rule.eta, "b1": rule.beta[0], "lam": rule.lambda_},
            state=("mu",),
            counter="t",
        ),
    )

    def init(self, x: Any) -> State:
        xp = namespace(x)
        return State(mu=xp.zeros_like(x), nu=xp.zeros((), dtype=x.dtype, device=device(x)), t=0)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        b1, b2 = self.beta
        state.t += 1
        square = xp.astype(norm_power(xp, dx, 2), x.dtype)
        # The first step takes the norm itself, not (1 - β2) of it (the paper's and optax's start).
        nu = square if state.t == 1 else b2 * state.nu + (1 - b2) * square
        # NumPy 1.x computes on 0-d arrays as on scalars, and widens float16/32 scalars
        # times Python floats to float64: keep nu a 0-d array in x's dtype.
        state.nu = xp.asarray(nu, dtype=x.dtype)
        eps = eps_for(x.dtype, self.epsilon)
        state.mu *= b1
        state.mu += dx / (xp.sqrt(state.nu) + eps) + self.lambda_ * x
        return self.eta * state.mu


class Fromage(Rule):
    r"""Fromage, Frobenius-matched gradient descent: `Fromage(eta=0.01, min_norm=1e-6)`.

    $$x \leftarrow \frac{1}{\sqrt{1+\eta^2}}
    \left(x - \eta\, \frac{\lVert x \rVert}{\lVert dx \rVert}\, dx\right),
    \quad\text{that is}\quad
    \Delta = \frac{\eta}{\sqrt{1+\eta^2}}\, \frac{\lVert x \rVert}{\lVert dx \rVert}\, dx
    + \left(1 - \frac{1}{\sqrt{1+\eta^2}}\right) x$$

    Each norm is raised to at least `min_norm`; with `min_norm=0` the ratio is 1
    where a norm is 0.  The shrink factor keeps the norms of the weights from growing.

    Args:
        eta: learning rate $\eta \ge 0$, a relative step size.
        min_norm: the smallest value either norm is taken to have, $\ge 0$.

    Same as `optax.fromage(eta, min_norm)`.

    Reference: [Bernstein et al. (2020)](https://arxiv.org/abs/2002.03432)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.array([3.0, 4.0])
        >>> _ = co.update_(co.Fromage(0.75), x, np.array([0.0, 1.0]))
        >>> print(x)  # (x - 0.75 * 5 * [0, 1]) / 1.25
        [2.4 0.2]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.01, check=nonnegative)
    min_norm: Hyper[float] = Hyper(default=1e-6, check=nonnegative)
    _kernel = Staged(
        _finish_trust(lambda rule, dtype: (1.0, 0.0, rule.min_norm)),
        Kernel(
            "return scaled * (dx * ratio) + kept * x",
            lambda rule, state, dtype: {
                "scaled": rule.eta * (1 / math.sqrt(1 + rule.eta**2)),
                "kept": 1 - 1 / math.sqrt(1 + rule.eta**2),
            },
        ),
    )

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        shrink = 1 / math.sqrt(1 + self.eta**2)
        scaled = _trust_scaled(namespace(x), dx, x, min_norm=self.min_norm)
        return self.eta * shrink * scaled + (1 - shrink) * x


class GradCentralization(Rule):
    r"""Gradient centralisation: `GradCentralization()`.

    For an array with two or more axes, subtract from the gradient its mean over
    every axis but the first (for a dense layer's `(out, in)` weight, each row's
    mean; for a convolution's `(out, in, h, w)` kernel, each filter's mean):

    $$\Delta_{i\ldots} = dx_{i\ldots} - \operatorname{mean}_{\ldots}\, dx_{i\ldots}$$

    Gradients of arrays with fewer than two axes (biases, scalars) pass unchanged.
    A gradient transform: put it before the rule that takes the step,
    `Optimiser(GradCentralization(), Adam())`.  The mean of a float16 array is
    taken in float32.

    As in the authors' code (with `gc_conv_only=False`).  The first axis is
    taken to index output units, as in PyTorch's layouts; Keras kernels keep
    them last.  MindSpore's `grad_centralization` group option offers the same
    for convolution kernels only.

    Reference: [Yong et al. (2020)](https://arxiv.org/abs/2004.01461)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.zeros((2, 2))
        >>> _ = co.update_(co.GradCentralization(), x, np.array([[1.0, 3.0], [0.0, -4.0]]))
        >>> print(x)  # minus the centred rows: [-1, 1] and [2, -2]
        [[ 1. -1.]
         [-2.  2.]]
    """

    fallible = False
    _kernel = None

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        if dx.ndim < 2 or math.prod(dx.shape) == 0:  # the mean of an empty array is NaN
            return dx
        xp = namespace(dx)
        mean = xp.mean(widened(xp, dx), axis=tuple(range(1, dx.ndim)), keepdims=True)
        return dx - xp.astype(mean, dx.dtype)
