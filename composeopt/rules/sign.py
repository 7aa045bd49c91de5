"""Rules built on signs: Rprop and Lion step by the sign of a gradient, SignDecay adds the sign of x."""

from __future__ import annotations

from typing import Any

from .._dispatch import namespace
from ..errors import HyperparameterError
from ..hyper import Hyper, HyperTuple, beta_pair, nonnegative, positive
from ..kernel import Kernel
from ..rule import Rule, State

__all__ = ["Rprop", "Lion", "SignDecay"]


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    try:
        first, second = value
    except (TypeError, ValueError):
        raise HyperparameterError(f"expected a pair {what}, got {value!r}") from None
    return first, second


def rprop_factors(value: Any) -> tuple[float, float]:
    """Rprop's pair `(decrease, increase)` with `0 < decrease < 1 < increase` (torch's check)."""
    decrease, increase = _pair(value, "(decrease, increase)")
    decrease, increase = positive(decrease), positive(increase)
    if not decrease < 1 < increase:
        raise HyperparameterError(f"needs 0 < decrease < 1 < increase, got {value!r}")
    return decrease, increase


def step_bounds(value: Any) -> tuple[float, float]:
    """A pair `(smallest, largest)` of step sizes with `0 <= smallest <= largest`."""
    low, high = _pair(value, "(smallest, largest)")
    low, high = nonnegative(low), nonnegative(high)
    if low > high:
        raise HyperparameterError(f"needs smallest <= largest, got {value!r}")
    return low, high


def _rprop_scalars(rule: Rprop, state: Any, dtype: Any) -> dict[str, float]:
    (down, up), (low, high) = rule.ell, rule.gamma
    return {"down": down, "up": up, "low": low, "high": high}


class Rprop(Rule):
    r"""Resilient backpropagation: `Rprop(eta=0.001, ell=(0.5, 1.2), gamma=(1e-6, 50.0))`.

    Each element has its own step size $s$, starting at $\eta$. With
    $g'$ the gradient kept from the last step (0 at first):

    $$s \leftarrow \operatorname{clamp}\big(s \cdot \ell,\ \Gamma_{\min}, \Gamma_{\max}\big),
    \quad \ell = \begin{cases} \ell_+ & dx\, g' > 0 \\ \ell_- & dx\, g' < 0 \\ 1 & dx\, g' = 0 \end{cases}
    \qquad g' \leftarrow \begin{cases} 0 & dx\, g' < 0 \\ dx & \text{otherwise} \end{cases}
    \qquad \Delta = s \operatorname{sign}(g')$$

    so a step whose gradient changed sign shrinks the step size and does not move.
    $\eta$ only sets the first step sizes: changing it later has no effect.

    Args:
        eta: initial step size $\eta \ge 0$.
        ell: factors $(\ell_-, \ell_+)$ with $0 < \ell_- < 1 < \ell_+$.
        gamma: bounds $(\Gamma_{\min}, \Gamma_{\max})$ of the step size.

    State: `step` ($s$) and `previous` ($g'$).

    Same as `torch.optim.Rprop(lr=eta, etas=ell, step_sizes=gamma)`.

    Warning:
        optax 0.2.8's `optax.rprop` returns each step's update one step late
        (its first update is 0; google-deepmind/optax#1725), so it is no twin.
        It and Optimisers.jl also leave $s$ unclamped where $dx\, g' = 0$,
        which only matters when $\eta$ lies outside $\Gamma$.

    Reference: [Riedmiller & Braun (1993)](https://doi.org/10.1109/ICNN.1993.298623)

    Examples:
        Steps grow by 1.2 while the sign holds; the step after a flip is 0:

        >>> import numpy as np, composeopt as co
        >>> opt, x = co.Rprop(0.1), np.zeros(1)
        >>> for g in [1.0, 1.0, -1.0, -1.0]:
        ...     _ = co.update_(opt, x, np.array([g]))
        ...     print(x.round(4))
        [-0.1]
        [-0.22]
        [-0.22]
        [-0.16]
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    ell: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.5, 1.2), check=rprop_factors)
    gamma: HyperTuple[tuple[float, float]] = HyperTuple(default=(1e-6, 50.0), check=step_bounds)
    # `turn` is -1, 0 or 1, so `held` and `flipped` are 0 or 1 and the factor is exactly
    # `up`, `down` or 1: the same products as torch's.  Where the sign flipped, torch zeroes
    # the gradient it keeps.
    kernel = Kernel(
        """
        turn = sign(dx * previous)
        held = maximum(turn, 0)
        flipped = held - turn
        factor = up * held + down * flipped + (1 - held - flipped)
        step = minimum(maximum(step * factor, low), high)
        previous = dx * (1 - flipped)
        return sign(previous) * step
        """,
        _rprop_scalars,
        state=("step", "previous"),
    )

    def init(self, x: Any) -> State:
        xp = namespace(x)
        return State(step=xp.full_like(x, self.eta), previous=xp.zeros_like(x))


def _lion_scalars(rule: Lion, state: Any, dtype: Any) -> dict[str, float]:
    b1, b2 = rule.beta
    return {"eta": rule.eta, "b1": b1, "b2": b2}


class Lion(Rule):
    r"""Lion, evolved sign momentum: `Lion(eta=0.0001, beta=(0.9, 0.99))`.

    $$\Delta = \eta\, \operatorname{sign}\big(\beta_1 m + (1-\beta_1)\, dx\big), \qquad
    m \leftarrow \beta_2 m + (1-\beta_2)\, dx$$

    ($\Delta$ uses the old $m$.)  Every element moves by exactly $\eta$ (or 0),
    so $\eta$ is usually 3-10 times smaller than Adam's.

    Args:
        eta: learning rate $\eta \ge 0$.
        beta: $(\beta_1, \beta_2)$: $\beta_1$ blends the momentum into this
            step's direction, $\beta_2$ is the momentum's decay.

    State: `mu` ($m$), starting at 0.

    Same as `optax.lion(eta, b1, b2, weight_decay=0.0)`; optax's default weight
    decay 1e-3 (scaled by $\eta$) is `Optimiser(Lion(eta, beta), WeightDecay(eta * 1e-3))`.

    Warning:
        This is the paper's algorithm.  Optimisers.jl's `Lion` updates its
        momentum as $\beta_2\, dx + (1-\beta_2)\, m$, the coefficients swapped,
        and so takes different steps.

    Reference: [Chen et al. (2023)](https://arxiv.org/abs/2302.06675)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(3)
        >>> _ = co.update_(co.Lion(0.1), x, np.array([0.02, -5.0, 0.0]))
        >>> print(x)
        [-0.1  0.1  0. ]
    """

    eta: Hyper[float] = Hyper(default=0.0001, check=nonnegative)
    beta: HyperTuple[tuple[float, float]] = HyperTuple(default=(0.9, 0.99), check=beta_pair)
    kernel = Kernel(
        """
        direction = sign(b1 * mu + (1 - b1) * dx)
        mu = b2 * mu + (1 - b2) * dx
        return eta * direction
        """,
        _lion_scalars,
        state=("mu",),
    )


class SignDecay(Rule):
    r"""L1 regularisation: `SignDecay(lambda_=0.001)`.

    $$\Delta = dx + \lambda \operatorname{sign}(x)$$

    the (sub)gradient of $\lambda \lVert x \rVert_1$ added to the loss's.  Put
    it before the rule that takes the step: `Optimiser(SignDecay(1e-4), Adam())`.

    Args:
        lambda_: penalty $\lambda \ge 0$.

    Same as Optimisers.jl's `SignDecay(lambda)`; $\operatorname{sign}(0) = 0$,
    so an element at exactly 0 gets no push.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.array([2.0, -3.0, 0.0])
        >>> opt = co.Optimiser(co.SignDecay(0.5), co.Descent(0.1))
        >>> _ = co.update_(opt, x, np.zeros(3))
        >>> print(x)  # each moves 0.1 * 0.5 towards 0
        [ 1.95 -2.95  0.  ]
    """

    lambda_: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    kernel = Kernel("return dx + lambda_ * sign(x)")
