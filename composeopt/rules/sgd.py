"""Plain gradient descent and its momentum variants."""

from __future__ import annotations

from typing import Any

from ..chain import Optimiser
from ..errors import HyperparameterError
from ..hyper import Hyper, nonnegative, unit_interval
from ..kernel import Kernel
from ..rule import Rule
from .decay import WeightDecay

__all__ = ["Descent", "Momentum", "Nesterov", "SGD"]


def _nesterov(rule: Nesterov, state: Any, dtype: Any) -> dict[str, float]:
    return {"eta": rule.eta, "rho": rule.rho, "rho2": rule.rho**2}  # `**`: the kernel has no power


class Descent(Rule):
    r"""Gradient descent: `Descent(eta=0.1)`.

    $$\Delta = \eta \, dx$$

    Args:
        eta: learning rate $\eta \ge 0$.

    Same as `torch.optim.SGD(lr=eta)` and `optax.sgd(eta)`.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.array([1.0, 2.0])
        >>> _ = co.update_(co.Descent(0.1), x, np.array([1.0, -1.0]))
        >>> print(x)
        [0.9 2.1]
    """

    eta: Hyper[float] = Hyper(default=0.1, check=nonnegative)
    kernel = Kernel("return eta * dx")


class Momentum(Rule):
    r"""Gradient descent with momentum: `Momentum(eta=0.01, rho=0.9)`.

    $$v \leftarrow \rho\, v + \eta\, dx, \qquad \Delta = v$$

    Args:
        eta: learning rate $\eta \ge 0$.
        rho: momentum $\rho \in [0, 1)$.

    State: `v`, the velocity, starting at 0.

    Same as `optax.sgd(eta, momentum=rho)`, and as
    `torch.optim.SGD(lr=eta, momentum=rho)` while `eta` is constant (torch keeps
    the velocity of the gradients and multiplies by the current rate afterwards).

    Reference: [Polyak (1964)](https://doi.org/10.1016/0041-5553(64)90137-5)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.Momentum(eta=0.1, rho=0.5), np.array([1.0])
        >>> for _ in range(2):
        ...     _ = co.update_(opt, x, np.array([1.0]))
        >>> print(x)  # steps of 0.1, then 0.5 * 0.1 + 0.1
        [0.75]
    """

    eta: Hyper[float] = Hyper(default=0.01, check=nonnegative)
    rho: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    kernel = Kernel("v = rho * v + eta * dx\nreturn v", state=("v",))


class Nesterov(Rule):
    r"""Gradient descent with Nesterov momentum: `Nesterov(eta=0.001, rho=0.9)`.

    $$\Delta = (1 + \rho)\, \eta\, dx - \rho^2 v, \qquad v \leftarrow \rho\, v - \eta\, dx$$

    ($\Delta$ uses the old $v$.)  This is the form of Optimisers.jl, which takes
    the look-ahead step without a second gradient evaluation.

    Args:
        eta: learning rate $\eta \ge 0$.
        rho: momentum $\rho \in [0, 1)$.

    State: `v`, starting at 0.

    Same as `optax.sgd(eta, momentum=rho, nesterov=True)` and
    `torch.optim.SGD(lr=eta, momentum=rho, nesterov=True)`.

    Reference: [Sutskever et al. (2013)](http://proceedings.mlr.press/v28/sutskever13.html)
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    rho: Hyper[float] = Hyper(default=0.9, check=unit_interval)
    kernel = Kernel(
        """
        change = (1 + rho) * eta * dx - rho2 * v
        v = rho * v - eta * dx
        return change
        """,
        _nesterov,
        state=("v",),
    )


def SGD(eta: float = 0.001, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> Rule:
    r"""torch's `SGD` as a composeopt rule: `SGD(eta=0.001, momentum=0.0, nesterov=False, weight_decay=0.0)`.

    A convenience for users of `torch.optim.SGD` and `optax.sgd`: it builds
    the rule (or chain) of existing rules that takes the same steps, and adds
    no code path of its own:

    | arguments | rule |
    |---|---|
    | `SGD(eta)` | `Descent(eta)` |
    | `SGD(eta, momentum=rho)` | `Momentum(eta, rho)` |
    | `SGD(eta, momentum=rho, nesterov=True)` | `Nesterov(eta, rho)` |
    | `SGD(eta, ..., weight_decay=lam)` | `Optimiser(WeightDecay(lam), ...)` |

    Args:
        eta: learning rate (torch's `lr`, default 0.001 as torch's).
        momentum: momentum $\rho \in [0, 1)$; 0 for plain descent.
        nesterov: Nesterov momentum (needs `momentum > 0`).
        weight_decay: L2 penalty $\lambda$ added to the gradient, as torch's.

    Same as `torch.optim.SGD(lr=eta, momentum=momentum, nesterov=nesterov,
    weight_decay=weight_decay)` (with `dampening=0`, and a constant `eta` when
    `momentum > 0`, see [Momentum][composeopt.Momentum]) and
    `optax.sgd(eta, momentum, nesterov)` chained after `optax.add_decayed_weights(weight_decay)`.

    Examples:
        >>> import composeopt as co
        >>> co.SGD(0.1, momentum=0.9, weight_decay=1e-4)
        Optimiser(WeightDecay(lambda_=0.0001), Momentum(eta=0.1, rho=0.9))
    """
    if nesterov and not momentum:
        raise HyperparameterError("SGD: nesterov=True needs momentum > 0")
    step: Rule
    if nesterov:
        step = Nesterov(eta, momentum)
    elif momentum:
        step = Momentum(eta, momentum)
    else:
        step = Descent(eta)
    return Optimiser(WeightDecay(weight_decay), step) if weight_decay else step
