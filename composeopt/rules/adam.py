"""Adam and its relatives: bias-corrected first and second moment estimates."""

from __future__ import annotations

import math
from typing import Any

from .._dispatch import eps_for, namespace
from ..errors import HyperparameterError
from ..hyper import Hyper, HyperTuple, beta_pair, flag, nonnegative, unit_interval
from ..kernel import Kernel
from ..rule import Rule, State
from ._math import DIRECTION, direction_scalars

__all__ = ["Adam", "RAdam", "AdaMax", "NAdam", "AMSGrad", "OAdam", "AdamW", "AdaBelief", "Yogi", "Adan"]


# Each rule's math is its kernel (see composeopt/kernel.py): the moment estimates
# `mu ← β1 mu + (1-β1) dx`, `nu ← β2 nu + (1-β2) dx²`, then the rule's own update.
_MOMENTS = """
mu = b1 * mu + (1 - b1) * dx
nu = b2 * nu + (1 - b2) * (dx * dx)
"""
_DIRECTION = DIRECTION


def _moment_scalars(rule: Any, state: State, dtype: Any) -> dict[str, float]:
    """The scalars of the moments and of the bias-corrected direction, `state.t` already advanced."""
    (b1, b2), t = rule.beta, state.t
    r1, r2 = direction_scalars(rule.beta, t)
    return {"eta": rule.eta, "b1": b1, "b2": b2, "r1": r1, "r2": r2, "eps": eps_for(dtype, rule.epsilon)}


def _radam_scalars(rule: RAdam, state: State, dtype: Any) -> dict[str, float]:
    (b1, b2), t = rule.beta, state.t
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    warmup = rho <= 4
    r = 0.0 if warmup else math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    scalars = _moment_scalars(rule, state, dtype)
    scalars.update(warmup=float(warmup), momentum_rate=rule.eta / (1 - b1**t), eta_r=rule.eta * r)
    return scalars


def _adamax_scalars(rule: AdaMax, state: State, dtype: Any) -> dict[str, float]:
    scalars = _moment_scalars(rule, state, dtype)
    scalars["rate"] = rule.eta / (1 - rule.beta[0] ** state.t)
    return scalars


def _nadam_scalars(rule: NAdam, state: State, dtype: Any) -> dict[str, float]:
    (b1, b2), t = rule.beta, state.t
    scalars = _moment_scalars(rule, state, dtype)
    scalars.update(ahead=b1 / (1 - b1 ** (t + 1)), now=(1 - b1) / (1 - b1**t), root=b2 / (1 - b2**t))
    return scalars


def _amsgrad_scalars(rule: AMSGrad, state: State, dtype: Any) -> dict[str, float]:
    (b1, b2) = rule.beta
    return {"eta": rule.eta, "b1": b1, "b2": b2, "eps": eps_for(dtype, rule.epsilon)}


def _adamw_scalars(rule: AdamW, state: State, dtype: Any) -> dict[str, float]:
    return {**_moment_scalars(rule, state, dtype), "lam": rule.lambda_}


_ADAMW_COUPLED = Kernel(
    _MOMENTS + f"direction = {_DIRECTION}\nreturn eta * (direction + lam * x)",
    _adamw_scalars,
    state=("mu", "nu"),
    counter="t",
)
_ADAMW_DECOUPLED = Kernel(
    _MOMENTS + f"direction = {_DIRECTION}\nreturn eta * direction + lam * x",
    _adamw_scalars,
    state=("mu", "nu"),
    counter="t",
)


class Adam(Rule):
    r"""Adam: `Adam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-8)`.

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2)\, dx^2, \qquad
    \Delta = \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}$$

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: decays $(\beta_1, \beta_2)$ of the first and second moments, each in [0, 1).
        epsilon: $\epsilon$, outside the square root (floored for float16).

    State: `mu` ($m$), `nu` ($v$) and `t`, the steps this parameter has taken.

    Same as `optax.adam(eta, b1, b2, eps=epsilon)` and
    `torch.optim.Adam(lr=eta, betas=beta, eps=epsilon)`.

    Reference: [Kingma & Ba (2014)](https://arxiv.org/abs/1412.6980)

    Examples:
        The first step has size $\eta$ in every coordinate, whatever the
        gradient's scale:

        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(3)
        >>> _ = co.update_(co.Adam(0.1), x, np.array([0.02, -5.0, 2e4]))
        >>> print(x.round(4))
        [-0.1  0.1 -0.1]
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        _MOMENTS + f"return eta * ({_DIRECTION})", _moment_scalars, state=("mu", "nu"), counter="t"
    )


class RAdam(Rule):
    r"""Rectified Adam: `RAdam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-8)`.

    With $\rho_\infty = 2/(1-\beta_2) - 1$ and
    $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$: while $\rho_t \le 4$ the
    step is momentum only, $\Delta = \eta\, m/(1-\beta_1^t)$; after, it is
    [Adam][composeopt.Adam]'s step times

    $$r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}$$

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, outside the square root.

    State: as [Adam][composeopt.Adam].

    Warning:
        The threshold 4 is the paper's and Optimisers.jl's; `optax.radam` and
        `torch.optim.RAdam` use 5. `optax.radam(eta, b1, b2, eps=epsilon, threshold=4.0)`
        is this rule; torch has no setting for it.

    Reference: [Liu et al. (2019)](https://arxiv.org/abs/1908.03265)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        _MOMENTS + f"return momentum_rate * mu if warmup else eta_r * ({_DIRECTION})",
        _radam_scalars,
        state=("mu", "nu"),
        counter="t",
    )


class AdaMax(Rule):
    r"""AdaMax, Adam with the infinity norm: `AdaMax(eta=0.001, beta=(0.9, 0.999), epsilon=1e-8)`.

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    u \leftarrow \max(\beta_2 u, |dx|), \qquad
    \Delta = \frac{\eta}{1-\beta_1^t}\, \frac{m}{u + \epsilon}$$

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, added to $u$.

    State: `mu` ($m$), `nu` ($u$) and `t`.

    Warning:
        optax and torch keep $\max(\beta_2 u, |dx| + \epsilon)$ and divide by it,
        so they agree exactly for `epsilon=0`:
        `optax.adamax(eta, b1, b2, eps=0.0)`, `torch.optim.Adamax(lr=eta, betas=beta, eps=0.0)`.

    Reference: [Kingma & Ba (2014), section 7](https://arxiv.org/abs/1412.6980)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        """
        mu = b1 * mu + (1 - b1) * dx
        nu = maximum(b2 * nu, abs(dx))
        return rate * mu / (nu + eps)
        """,
        _adamax_scalars,
        state=("mu", "nu"),
        counter="t",
    )


class NAdam(Rule):
    r"""Nesterov-accelerated Adam: `NAdam(eta=0.001, beta=(0.9, 0.999), epsilon=1e-8)`.

    $$\Delta = \eta\,
    \frac{\beta_1 m / (1-\beta_1^{t+1}) + (1-\beta_1)\, dx / (1-\beta_1^t)}
         {\sqrt{\beta_2 v / (1-\beta_2^t)} + \epsilon}$$

    with $m$ and $v$ updated as in [Adam][composeopt.Adam] first.  This is
    Dozat's algorithm 2 as Optimisers.jl writes it: constant $\beta_1$ and the
    factor $\beta_2$ under the root.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, outside the square root.

    State: as [Adam][composeopt.Adam].

    Warning:
        No exact twin: `optax.nadam` has no $\beta_2$ factor under the root and
        `torch.optim.NAdam` adds a momentum-decay schedule.

    Reference: [Dozat (2016)](https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        _MOMENTS + "return eta * (ahead * mu + now * dx) / (sqrt(root * nu) + eps)",
        _nadam_scalars,
        state=("mu", "nu"),
        counter="t",
    )


class AMSGrad(Rule):
    r"""AMSGrad: `AMSGrad(eta=0.001, beta=(0.9, 0.999), epsilon=1e-8)`.

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2)\, dx^2, \qquad
    \hat v \leftarrow \max(\hat v, v), \qquad
    \Delta = \frac{\eta\, m}{\sqrt{\hat v} + \epsilon}$$

    without bias correction, as in the paper; $m$, $v$ and $\hat v$ start at
    $\epsilon$, as in Optimisers.jl.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, the initial state and the term outside the root.

    State: `mu` ($m$), `nu` ($v$), `nu_max` ($\hat v$).

    Warning:
        `optax.amsgrad` and `torch.optim.Adam(amsgrad=True)` bias-correct, so
        their first steps differ.

    Reference: [Reddi, Kale & Kumar (2018)](https://openreview.net/forum?id=ryQu7f-RZ)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        _MOMENTS + "nu_max = maximum(nu_max, nu)\nreturn eta * mu / (sqrt(nu_max) + eps)",
        _amsgrad_scalars,
        state=("mu", "nu", "nu_max"),
    )

    def init(self, x: Any) -> State:
        xp = namespace(x)
        return State(
            mu=xp.full_like(x, self.epsilon),
            nu=xp.full_like(x, self.epsilon),
            nu_max=xp.full_like(x, self.epsilon),
        )


class OAdam(Rule):
    r"""Optimistic Adam: `OAdam(eta=0.001, beta=(0.5, 0.9), epsilon=1e-8)`.

    With $a_t$ the step of [Adam][composeopt.Adam], the update is

    $$\Delta = 2 a_t - a_{t-1}, \qquad a_0 = 0$$

    an extrapolation suited to adversarial (min-max) training.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, by default (0.5, 0.9).
        epsilon: $\epsilon$, outside the square root.

    State: `mu`, `nu`, `t`, and `previous`, the last Adam step.

    Reference: [Daskalakis et al. (2017)](https://arxiv.org/abs/1711.00141)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.5, 0.9), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        _MOMENTS
        + f"step = eta * ({_DIRECTION})\nchange = 2 * step - previous\nprevious = step\nreturn change",
        _moment_scalars,
        state=("mu", "nu", "previous"),
        counter="t",
    )


class AdamW(Rule):
    r"""Adam with weight decay:
    `AdamW(eta=0.001, beta=(0.9, 0.999), lambda_=0.0, epsilon=1e-8, couple=True)`.

    With $a$ the direction of [Adam][composeopt.Adam] at learning rate 1:

    * `couple=True` (torch.optim.AdamW, optax.adamw): $\Delta = \eta\,(a + \lambda x)$;
    * `couple=False` (the paper's decoupled form): $\Delta = \eta\, a + \lambda x$.

    Coupled, it equals
    `Optimiser(Adam(1.0, beta, epsilon), WeightDecay(lambda_), Descent(eta))`.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$.
        lambda_: weight decay $\lambda \ge 0$ (Optimisers.jl's `lambda`).
        epsilon: $\epsilon$.
        couple: scale the weight decay by $\eta$.

    State: as [Adam][composeopt.Adam].

    Same as `torch.optim.AdamW(lr=eta, betas=beta, eps=epsilon, weight_decay=lambda_)`
    and `optax.adamw(eta, b1, b2, eps=epsilon, weight_decay=lambda_)`.

    Warning:
        The default $\lambda$ differs: 0 here (as in Optimisers.jl), 0.01 in
        torch, 1e-4 in optax. Pass it explicitly.

    Reference: [Loshchilov & Hutter (2017)](https://arxiv.org/abs/1711.05101)
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    couple: Hyper[bool] = Hyper(default=True, check=flag)

    @property
    def _kernel(self) -> Kernel:  # init and apply_ come from it, as from a class's kernel
        return _ADAMW_COUPLED if self.couple else _ADAMW_DECOUPLED


class AdaBelief(Rule):
    r"""AdaBelief: `AdaBelief(eta=0.001, beta=(0.9, 0.999), epsilon=1e-16)`.

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    s \leftarrow \beta_2 s + (1-\beta_2)(dx - m)^2 + \epsilon, \qquad
    \Delta = \eta\, \frac{m/(1-\beta_1^t)}{\sqrt{s/(1-\beta_2^t)} + \epsilon}$$

    Adam with the variance of the gradient around its mean (the "belief") in
    place of its second moment.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$.
        epsilon: $\epsilon$, added to $s$ and outside the root; by default 1e-16.

    State: `mu` ($m$), `nu` ($s$) and `t`.

    Same as `optax.adabelief(eta, b1, b2, eps=epsilon, eps_root=epsilon)`.

    Reference: [Zhuang et al. (2020)](https://arxiv.org/abs/2010.07468)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=1e-16, check=nonnegative)
    kernel = Kernel(
        f"""
        mu = b1 * mu + (1 - b1) * dx
        surprise = dx - mu
        nu = b2 * nu + (1 - b2) * (surprise * surprise)
        nu = nu + eps
        return eta * ({_DIRECTION})
        """,
        _moment_scalars,
        state=("mu", "nu"),
        counter="t",
    )


class Yogi(Rule):
    r"""Yogi: `Yogi(eta=0.01, beta=(0.9, 0.999), epsilon=0.001, initial_accumulator=1e-6)`.

    [Adam][composeopt.Adam] with an additive second moment, which grows or
    shrinks by at most $(1-\beta_2)\, dx^2$ per step:

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    v \leftarrow v - (1-\beta_2)\, \operatorname{sign}(v - dx^2)\, dx^2, \qquad
    \Delta = \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}$$

    with $m$ and $v$ starting at `initial_accumulator`, and the bias correction
    of optax (the paper's algorithm has none).

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: moment decays $(\beta_1, \beta_2)$, each in [0, 1).
        epsilon: $\epsilon$, outside the square root; by default 1e-3, as in the paper.
        initial_accumulator: the starting value of $m$ and $v$.

    State: `mu` ($m$), `nu` ($v$) and `t`.

    Same as `optax.yogi(eta, b1, b2, eps=epsilon)` (for another
    `initial_accumulator`, `optax.scale_by_yogi(b1, b2, epsilon,
    initial_accumulator_value=...)` followed by `optax.scale(-eta)`).

    Reference: [Zaheer et al. (2018)](https://papers.nips.cc/paper/8186-adaptive-methods-for-nonconvex-optimization)
    """

    eta: Hyper[float] = Hyper(default=0.01, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.999), check=beta_pair)
    epsilon: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    initial_accumulator: Hyper[float] = Hyper(default=1e-6, check=nonnegative)
    kernel = Kernel(
        f"""
        mu = b1 * mu + (1 - b1) * dx
        square = dx * dx
        nu = nu - (1 - b2) * sign(nu - square) * square
        return eta * ({_DIRECTION})
        """,
        _moment_scalars,
        state=("mu", "nu"),
        counter="t",
    )

    def init(self, x: Any) -> State:
        xp = namespace(x)
        start = self.initial_accumulator
        return State(mu=xp.full_like(x, start), nu=xp.full_like(x, start), t=0)


def beta_triple(value: Any) -> tuple[float, float, float]:
    """A triple `(beta1, beta2, beta3)` of coefficients in `[0, 1)`."""
    try:
        b1, b2, b3 = value
    except (TypeError, ValueError):
        raise HyperparameterError(f"expected a triple (beta1, beta2, beta3), got {value!r}") from None
    return unit_interval(b1), unit_interval(b2), unit_interval(b3)


def _adan_scalars(rule: Adan, state: State, dtype: Any) -> dict[str, float]:
    (b1, b2, b3), t = rule.beta, state.t
    return {
        "eta": rule.eta,
        "lam": rule.lambda_,
        "later": 0.0 if t == 1 else 1.0,  # no previous gradient at the first step
        "b1": b1,
        "b2": b2,
        "b3": b3,
        "c1": 1 - b1**t,
        "c2": 1 - b2**t,
        "c3": 1 - b3**t,
        "eps": eps_for(dtype, rule.epsilon),
    }


class Adan(Rule):
    r"""Adaptive Nesterov momentum:
    `Adan(eta=0.001, beta=(0.98, 0.92, 0.99), epsilon=1e-8, lambda_=0.0)`.

    With $\delta = dx - dx_{t-1}$ (0 at the first step):

    $$m \leftarrow \beta_1 m + (1-\beta_1)\, dx, \qquad
    d \leftarrow \beta_2 d + (1-\beta_2)\, \delta, \qquad
    n \leftarrow \beta_3 n + (1-\beta_3)\, \big(dx + \beta_2 \delta\big)^2$$

    $$\Delta = \eta \left(\frac{\hat m + \beta_2 \hat d}{\sqrt{\hat n + \epsilon} + \epsilon}
    + \lambda x\right)$$

    where hats are bias-corrected ($\hat m = m / (1-\beta_1^t)$, ...), as in
    the authors' code and optax.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: decays $(\beta_1, \beta_2, \beta_3)$ of the gradient, its
            difference and the squared term, each in [0, 1).  The paper writes
            $1-\beta$ for each: its 0.02, 0.08, 0.01 are these defaults.
        epsilon: $\epsilon$, inside and outside the square root, as optax's
            `eps` and `eps_root` (floored for float16).
        lambda_: weight decay $\lambda \ge 0$, scaled by $\eta$.

    State: `mu` ($m$), `delta` ($d$), `nu` ($n$), `previous` (the last
    gradient) and `t`.

    Warning:
        optax 0.2.8's `optax.adan` weights the gradient difference by
        $1-\beta_2$ where the paper (Algorithm 1, $1-\beta_2$ in its notation)
        and the authors' code weight it by $\beta_2$ (see google-deepmind/optax#1715).
        This rule follows the paper; it equals
        `optax.adan(eta, b1, b2, b3, eps=epsilon, eps_root=epsilon, weight_decay=lambda_)`
        only for $\beta_2 = 0.5$.  The weight decay is optax's and the authors'
        `no_prox=True` form; the paper's default divides instead,
        $x \leftarrow (x - \eta u) / (1 + \lambda\eta)$.

    Reference: [Xie et al. (2022)](https://arxiv.org/abs/2208.06677)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    beta: HyperTuple[tuple[float, float, float]] = HyperTuple(default=(0.98, 0.92, 0.99), check=beta_triple)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    lambda_: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    kernel = Kernel(
        """
        change = (dx - previous) * later
        mu = b1 * mu + (1 - b1) * dx
        delta = b2 * delta + (1 - b2) * change
        ahead = dx + b2 * change
        nu = b3 * nu + (1 - b3) * (ahead * ahead)
        previous = dx
        direction = (mu / c1 + b2 * (delta / c2)) / (sqrt(nu / c3 + eps) + eps)
        return eta * (direction + lam * x)
        """,
        _adan_scalars,
        state=("mu", "delta", "nu", "previous"),
        counter="t",
    )
