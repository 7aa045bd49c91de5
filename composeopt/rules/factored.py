"""Memory-light adaptive rules: second moments kept per row and column (or per axis), not per entry.

Their state holds arrays shaped like reductions of `x` (a matrix's row and
column statistics), so they have no fused elementwise fast path; Adafactor has
a whole-rule one on NumPy arrays (`composeopt._fused.factored`), tested equal
to its `apply_` here.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any

from array_api_compat import device

from .._dispatch import copy, eps_for, namespace
from .._fused.factored import FactoredKernel
from ..errors import HyperparameterError
from ..hyper import Hyper, flag, nonnegative, nonnegative_int, positive, unit_interval
from ..rule import Rule, State
from ._math import ema, norm_power, widened

__all__ = ["Adafactor", "SM3"]


def _mean(xp: ModuleType, a: Any, axis: int, keepdims: bool = False) -> Any:
    """The mean over `axis`, summed in float32 for 16-bit arrays (their sums overflow), in `a`'s dtype."""
    return xp.astype(xp.mean(widened(xp, a), axis=axis, keepdims=keepdims), a.dtype)


def _rms(xp: ModuleType, a: Any) -> Any:
    """The root mean square of the whole array as a 0-d array of `a`'s dtype (0 for an empty one)."""
    size = max(math.prod(a.shape), 1)
    return xp.astype(xp.sqrt(norm_power(xp, a, 2) / size), a.dtype)


def _largest_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """`(second largest axis, largest axis)`; ties go to the earlier axis first, as in optax."""
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    return order[-2], order[-1]


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def _optional_threshold(value: Any) -> float | None:
    """A positive clipping threshold, or `None` for no clipping."""
    if value is None:
        return None
    try:
        return positive(value)
    except HyperparameterError as err:
        raise HyperparameterError(f"{err} (or None for no clipping)") from None


class Adafactor(Rule):
    r"""Adafactor, with factored second moments:
    `Adafactor(eta=0.01, decay_rate=0.8, epsilon=1e-30, clipping_threshold=1.0,
    multiply_by_parameter_scale=True, momentum=0.0, lambda_=0.0, factored=True,
    min_dim_size_to_factor=128, decay_offset=0)`.

    With $G = dx^2 + \epsilon$ and the decay $\hat\beta_t = 1 - (t - t_0)^{-c}$
    ($0$ at the first step), an array whose two largest axes both have at
    least `min_dim_size_to_factor` entries keeps the means of $G$ along each of
    them (for a matrix, row means $r$ and column means $c$), otherwise one
    moment $v$ per entry:

    $$r \leftarrow \hat\beta_t r + (1-\hat\beta_t) \operatorname{mean}_{\text{cols}} G,\quad
    c \leftarrow \hat\beta_t c + (1-\hat\beta_t) \operatorname{mean}_{\text{rows}} G,\quad
    u = \frac{dx}{\sqrt{r c^\top / \operatorname{mean}(r)}}
    \qquad\text{or}\qquad
    v \leftarrow \hat\beta_t v + (1-\hat\beta_t) G,\quad u = \frac{dx}{\sqrt v}$$

    then, for the whole array,

    $$u \leftarrow \frac{u}{\max(1, \operatorname{rms}(u)/d)}, \qquad
    u \leftarrow \eta\, \max(\operatorname{rms}(x), 10^{-3})\, u, \qquad
    m \leftarrow \mu m + (1-\mu) u, \qquad
    \Delta = m + \lambda x$$

    For more than two axes, the statistics are means along the two largest
    axes and the row factor is normalised by its mean along the other one.

    Args:
        eta: learning rate $\eta \ge 0$: a step relative to the parameter's size
            while `multiply_by_parameter_scale` is on (the paper's $\rho = 10^{-2}$).
        decay_rate: exponent $c \ge 0$ of the second-moment decay.
        epsilon: $\epsilon$, added to $dx^2$ (floored for float16).
        clipping_threshold: $d > 0$, the largest RMS of $u$; `None` skips the clipping.
        multiply_by_parameter_scale: scale by $\max(\operatorname{rms}(x), 10^{-3})$.
        momentum: $\mu \in [0, 1)$; 0 keeps no momentum state.
        lambda_: weight decay $\lambda \ge 0$, not scaled by $\eta$.
        factored: factor the second moments of arrays with two or more axes.
        min_dim_size_to_factor: the least size of both largest axes for factoring.
        decay_offset: $t_0$, the step a fine-tuning run starts from; the decay is
            taken at step $\max(t - t_0, 1)$.

    State: `v_row` and `v_col` (factored arrays) or `v` (the others), the
    unused ones `None`; `m` (`None` while `momentum` is 0); `t`.

    Same as `optax.adafactor(eta, min_dim_size_to_factor=..., decay_rate=c,
    decay_offset=t0, multiply_by_parameter_scale=..., clipping_threshold=d,
    momentum=momentum or None, weight_decay_rate=lambda_ or None, eps=epsilon,
    factored=...)` up to rounding: optax computes the decay $\hat\beta_t$ in
    float32 (a relative difference near 1e-7 in float64) and keeps the momentum
    in float32 unless given `dtype_momentum`; here both follow `x`.  optax's
    default `learning_rate=None` is `eta=1.0`; the default here is the paper's
    relative step $10^{-2}$.  optax leaves a step $t \le t_0$ undefined (a NaN).

    Warning:
        For arrays of three or more axes, optax (and this rule) factor along
        the two largest axes; `torch.optim.Adafactor` uses the last two.
        For matrices they agree.

    Reference: [Shazeer & Stern (2018)](https://arxiv.org/abs/1804.04235)

    Examples:
        At the first step $v = dx^2$, so $u = \operatorname{sign}(dx)$, and the
        step is `eta` times the RMS of `x` (here 5):

        >>> import numpy as np, composeopt as co
        >>> x = np.array([-5.0, 5.0])
        >>> _ = co.update_(co.Adafactor(0.1), x, np.array([-0.02, 300.0]))
        >>> print(x)
        [-4.5  4.5]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.01, check=nonnegative)
    decay_rate: Hyper[float] = Hyper(default=0.8, check=nonnegative)
    epsilon: Hyper[float] = Hyper(default=1e-30, check=nonnegative)
    clipping_threshold: Hyper[float | None] = Hyper(default=1.0, check=_optional_threshold)
    multiply_by_parameter_scale: Hyper[bool] = Hyper(default=True, check=flag)
    momentum: Hyper[float] = Hyper(default=0.0, check=unit_interval)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    factored: Hyper[bool] = Hyper(default=True, check=flag)
    min_dim_size_to_factor: Hyper[int] = Hyper(default=128, check=nonnegative_int)
    decay_offset: Hyper[int] = Hyper(default=0, check=nonnegative_int)
    _kernel = FactoredKernel()  # the whole step, reductions included, on NumPy arrays

    def init(self, x: Any) -> State:
        xp = namespace(x)
        state = State(v_row=None, v_col=None, v=None, m=None, t=0)
        if not self._factors(x.shape):
            state.v = xp.zeros_like(x)
        else:
            d1, d0 = _largest_axes(x.shape)
            state.v_row = xp.zeros(_without(x.shape, d0), dtype=x.dtype, device=device(x))
            state.v_col = xp.zeros(_without(x.shape, d1), dtype=x.dtype, device=device(x))
        if self.momentum > 0:
            state.m = xp.zeros_like(x)
        return state

    def _factors(self, shape: tuple[int, ...]) -> bool:
        if not self.factored or len(shape) < 2:
            return False
        return bool(shape[_largest_axes(shape)[0]] >= self.min_dim_size_to_factor)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        state.t += 1
        if math.prod(x.shape) == 0:  # nothing to average
            return dx
        decay = 1 - max(state.t - self.decay_offset, 1) ** -self.decay_rate
        square = dx * dx + eps_for(x.dtype, self.epsilon)
        if state.v is None:  # factored at init
            d1, d0 = _largest_axes(x.shape)
            state.v_row = ema(state.v_row, _mean(xp, square, d0), decay)
            state.v_col = ema(state.v_col, _mean(xp, square, d1), decay)
            # r / mean(r), the mean taken along the second largest axis (its place in v_row).
            row_scale = state.v_row / _mean(xp, state.v_row, d1 - 1 if d1 > d0 else d1, keepdims=True)
            u = (
                dx
                / xp.sqrt(xp.expand_dims(row_scale, axis=d0))
                / xp.sqrt(xp.expand_dims(state.v_col, axis=d1))
            )
        else:
            state.v = ema(state.v, square, decay)
            u = dx / xp.sqrt(state.v)
        if self.clipping_threshold is not None:
            u = u / xp.maximum(1.0, _rms(xp, u) / self.clipping_threshold)
        u = self.eta * u
        if self.multiply_by_parameter_scale:
            u = u * xp.maximum(_rms(xp, x), 1e-3)
        if self.momentum > 0 or state.m is not None:
            if state.m is None:  # momentum switched on after init
                state.m = xp.zeros_like(x)
            state.m = ema(state.m, u, self.momentum)
            u = copy(xp, state.m)
        return u + self.lambda_ * x


class SM3(Rule):
    r"""SM3, adaptive steps from one accumulator per index of each axis:
    `SM3(eta=0.1, momentum=0.9, epsilon=1e-8)`.

    For an array with two or more axes, axis $k$ keeps $a_k$, one number per
    index along it.  Each entry takes the smallest accumulator that covers it:

    $$\nu = dx^2 + \min_k a_k, \qquad
    a_k \leftarrow \max_{\text{axes} \ne k} \nu, \qquad
    m \leftarrow \mu m + (1-\mu)\, \frac{dx}{\sqrt{\nu + \epsilon}}, \qquad
    \Delta = \eta\, m$$

    with $dx / \sqrt{\nu + \epsilon}$ taken as 0 where $\nu = 0$.  An array with
    fewer than two axes keeps one accumulator per entry, $a \leftarrow a + dx^2$
    (AdaGrad).  A matrix of $n \times p$ entries keeps $n + p$ accumulators.

    Args:
        eta: learning rate $\eta \ge 0$.
        momentum: $\mu \in [0, 1)$, the decay of the moving average $m$.
        epsilon: $\epsilon \ge 0$, inside the square root (floored for float16).

    State: `accumulators` (a list: one array per axis, or one shaped like `x`)
    and `mu` ($m$).

    Same as `optax.sm3(eta, momentum)`, whose $\epsilon$ is fixed at 1e-8.
    optax cannot take 0-d parameters; here they are treated as 1-element vectors.

    Reference: [Anil et al. (2019)](https://arxiv.org/abs/1901.11150)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.zeros((2, 2))
        >>> opt = co.SM3(1.0, momentum=0.0, epsilon=0.0)
        >>> _ = co.update_(opt, x, np.array([[3.0, 0.0], [0.0, 1.0]]))
        >>> print(co.state_store(opt).get(x).accumulators)  # row and column maxima of dx²
        [array([9., 1.]), array([9., 1.])]
        >>> print(x)  # -dx / |dx|, and 0 where dx is 0
        [[-1.  0.]
         [ 0. -1.]]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.1, check=nonnegative)
    momentum: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    _kernel = None

    def init(self, x: Any) -> State:
        xp = namespace(x)
        if x.ndim < 2:
            accumulators = [xp.zeros_like(x)]
        else:
            accumulators = [xp.zeros((size,), dtype=x.dtype, device=device(x)) for size in x.shape]
        return State(accumulators=accumulators, mu=xp.zeros_like(x))

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        if x.ndim < 2:
            nu = dx * dx + state.accumulators[0]
            state.accumulators = [nu]
        elif math.prod(x.shape) == 0:  # no maxima to take
            return dx
        else:
            axes = range(x.ndim)
            covers = [  # accumulator k spread along axis k
                xp.reshape(a, tuple(-1 if j == k else 1 for j in axes))
                for k, a in enumerate(state.accumulators)
            ]
            nu = dx * dx + functools.reduce(xp.minimum, covers)
            state.accumulators = [xp.max(nu, axis=tuple(j for j in axes if j != k)) for k in axes]
        positive = nu > 0
        eps = eps_for(x.dtype, self.epsilon)
        # The inner where keeps 1/sqrt(0) from being computed (NumPy would warn) where the outer one drops it.
        scale = xp.where(positive, 1 / xp.sqrt(xp.where(positive, nu + eps, 1.0)), 0.0)
        state.mu = ema(state.mu, dx * scale, self.momentum)
        return self.eta * state.mu
