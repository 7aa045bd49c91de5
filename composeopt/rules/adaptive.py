"""Rules with a per-element step size from accumulated squared gradients."""

from __future__ import annotations

from typing import Any

from .._dispatch import eps_for, namespace
from ..hyper import Hyper, flag, nonnegative, unit_interval
from ..kernel import Kernel
from ..rule import Rule, State

__all__ = ["RMSProp", "AdaGrad", "AdaDelta"]


def _rmsprop(rule: RMSProp, state: Any, dtype: Any) -> dict[str, float]:
    return {"eta": rule.eta, "rho": rule.rho, "eps": eps_for(dtype, rule.epsilon)}


def _adagrad(rule: AdaGrad, state: Any, dtype: Any) -> dict[str, float]:
    return {"eta": rule.eta, "eps": eps_for(dtype, rule.epsilon)}


def _adadelta(rule: AdaDelta, state: Any, dtype: Any) -> dict[str, float]:
    return {"rho": rule.rho, "eps": eps_for(dtype, rule.epsilon)}


_RMSPROP = Kernel(
    """
    s = rho * s + (1 - rho) * (dx * dx)
    return eta * dx / (sqrt(s) + eps)
    """,
    _rmsprop,
    state=("s",),
)
_RMSPROP_CENTRED = Kernel(
    """
    s = rho * s + (1 - rho) * (dx * dx)
    g = rho * g + (1 - rho) * dx
    return eta * dx / (sqrt(s - g * g) + eps)
    """,
    _rmsprop,
    state=("s", "g"),
)


class RMSProp(Rule):
    r"""RMSProp: `RMSProp(eta=0.001, rho=0.9, epsilon=1e-8, centred=False)`.

    $$s \leftarrow \rho\, s + (1-\rho)\, dx^2, \qquad
    \Delta = \frac{\eta\, dx}{\sqrt{s - \bar g^2} + \epsilon}$$

    where $\bar g = 0$, or with `centred=True` the running mean
    $\bar g \leftarrow \rho\, \bar g + (1-\rho)\, dx$ (Graves 2013), so that
    $s - \bar g^2$ estimates the variance of the gradient.

    Args:
        eta: learning rate $\eta \ge 0$.
        rho: decay $\rho \in [0, 1)$ of the running averages.
        epsilon: $\epsilon$, added outside the square root.
        centred: use the centred variant.

    State: `s`, and `g` when centred.

    Same as `torch.optim.RMSprop(lr=eta, alpha=rho, eps=epsilon, centered=centred)`
    (torch's default `alpha` is 0.99).

    Warning:
        optax puts $\epsilon$ inside the square root by default:
        `optax.rmsprop(eta, decay=rho, eps=epsilon, eps_in_sqrt=False, centered=centred)`
        is this rule.

    References: [Hinton, lecture 6e of Neural Networks for Machine Learning (2012)](https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf);
    centred: [Graves (2013)](https://arxiv.org/abs/1308.0850)
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    rho: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    centred: Hyper[bool] = Hyper(default=False, check=flag)

    @property
    def _kernel(self) -> Kernel:
        return _RMSPROP_CENTRED if self.centred else _RMSPROP

    def init(self, x: Any) -> State:
        xp = namespace(x)
        return State(s=xp.zeros_like(x), g=xp.zeros_like(x) if self.centred else None)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        if self.centred and state.g is None:  # centred was switched on after the first steps
            state.g = namespace(x).zeros_like(x)
        return super().apply_(state, x, dx)  # the kernel's math


class AdaGrad(Rule):
    r"""AdaGrad: `AdaGrad(eta=0.1, epsilon=1e-8)`.

    $$s \leftarrow s + dx^2, \qquad \Delta = \frac{\eta\, dx}{\sqrt{s} + \epsilon}$$

    with $s$ starting at $\epsilon$, as in Optimisers.jl.

    Args:
        eta: learning rate $\eta \ge 0$.
        epsilon: $\epsilon$, both the initial accumulator and the term added outside the root.

    State: `s`.

    Same as `torch.optim.Adagrad(lr=eta, eps=epsilon, initial_accumulator_value=epsilon)`.

    Warning:
        optax puts $\epsilon$ inside the root and matches only for `epsilon=0`:
        `optax.adagrad(eta, initial_accumulator_value=0.0, eps=0.0)`.

    Reference: [Duchi, Hazan & Singer (2011)](https://www.jmlr.org/papers/v12/duchi11a.html)
    """

    eta: Hyper[float] = Hyper(default=0.1, check=nonnegative)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel("s = s + dx * dx\nreturn eta * dx / (sqrt(s) + eps)", _adagrad, state=("s",))

    def init(self, x: Any) -> State:
        return State(s=namespace(x).full_like(x, self.epsilon))


class AdaDelta(Rule):
    r"""AdaDelta: `AdaDelta(rho=0.9, epsilon=1e-8)`; it has no learning rate.

    $$s \leftarrow \rho\, s + (1-\rho)\, dx^2, \qquad
    \Delta = dx\, \frac{\sqrt{u + \epsilon}}{\sqrt{s + \epsilon}}, \qquad
    u \leftarrow \rho\, u + (1-\rho)\, \Delta^2$$

    Args:
        rho: decay $\rho \in [0, 1)$ of the running averages.
        epsilon: $\epsilon$, inside both square roots.

    State: `s` (squared gradients) and `u` (squared updates).

    Same as `optax.adadelta(1.0, rho, epsilon)` and
    `torch.optim.Adadelta(lr=1.0, rho=rho, eps=epsilon)`.

    Reference: [Zeiler (2012)](https://arxiv.org/abs/1212.5701)
    """

    rho: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    epsilon: Hyper[float] = Hyper(default=1e-8, check=nonnegative)
    kernel = Kernel(
        """
        s = rho * s + (1 - rho) * (dx * dx)
        change = dx * sqrt(u + eps) / sqrt(s + eps)
        u = rho * u + (1 - rho) * (change * change)
        return change
        """,
        _adadelta,
        state=("s", "u"),
    )
