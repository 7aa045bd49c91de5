"""Weight decay and learning-rate decays, as rules to place in a chain."""

from __future__ import annotations

from ..hyper import Hyper, decay_factor, nonnegative, nonnegative_int, positive_int
from ..kernel import Kernel
from ..rule import Rule

__all__ = ["WeightDecay", "ExpDecay", "InvDecay"]


class WeightDecay(Rule):
    r"""L2 regularisation: `WeightDecay(lambda_=5e-4)`.

    $$\Delta = dx + \lambda x$$

    the gradient of $\frac{\lambda}{2} \lVert x \rVert^2$ added to the loss's.
    Put it before the rule that takes the step:
    `Optimiser(WeightDecay(1e-4), Momentum())`.

    Args:
        lambda_: penalty $\lambda \ge 0$ (Optimisers.jl's `lambda`).

    Same as `optax.add_decayed_weights(lambda_)`, and as the `weight_decay`
    argument of `torch.optim.SGD`, `Adam` or `RMSprop` when placed before that rule.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.array([2.0])
        >>> opt = co.Optimiser(co.WeightDecay(0.5), co.Descent(0.1))
        >>> _ = co.update_(opt, x, np.array([0.0]))
        >>> print(x)  # 2 - 0.1 * (0 + 0.5 * 2)
        [1.9]
    """

    lambda_: Hyper[float] = Hyper(default=5e-4, check=nonnegative)
    kernel = Kernel("return dx + lambda_ * x")


class ExpDecay(Rule):
    r"""Step-wise exponential decay of a learning rate:
    `ExpDecay(eta=0.001, decay=0.1, decay_step=1000, clip=1e-4, start=0)`.

    At optimiser step $n$ (one per `update_` call, counted from 1), when
    $n > \text{start}$ and $n$ is a multiple of `decay_step`,
    $\eta \leftarrow \max(\eta \cdot \text{decay}, \text{clip})$; then

    $$\Delta = \eta\, dx$$

    The attribute `eta` itself changes, as in Flux, so it can be read (and reset)
    between steps.  Chain it before a rule with learning rate 1, or combine both:
    `Optimiser(ExpDecay(0.1), Descent(1.0))`.

    Args:
        eta: initial learning rate.
        decay: factor in (0, 1] applied every `decay_step` steps.
        decay_step: steps between decays.
        clip: lower bound of `eta`.
        start: number of steps before decay starts.

    With `start=0` its rate is that of
    `optax.exponential_decay(eta, decay_step, decay, staircase=True, end_value=clip)`,
    one step earlier (optax counts from 0).

    Reference: `Flux.Optimise.ExpDecay` (Flux.jl before v0.14).

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.ExpDecay(eta=0.1, decay=0.5, decay_step=2, clip=0.01), np.zeros(1)
        >>> for _ in range(4):
        ...     _ = co.update_(opt, x, np.ones(1))
        ...     print(opt.eta)
        0.1
        0.05
        0.05
        0.025
    """

    eta: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    decay: Hyper[float] = Hyper(default=0.1, check=decay_factor)
    decay_step: Hyper[int] = Hyper(default=1000, check=positive_int)
    clip: Hyper[float] = Hyper(default=1e-4, check=nonnegative)
    start: Hyper[int] = Hyper(default=0, check=nonnegative_int)
    kernel = Kernel("return eta * dx")

    def begin_step(self, step: int) -> None:
        if step > self.start and step % self.decay_step == 0:
            self.eta = max(self.eta * self.decay, self.clip)


class InvDecay(Rule):
    r"""Inverse-time decay: `InvDecay(gamma=0.001)`.

    $$\Delta = \frac{dx}{1 + \gamma n}$$

    with $n$ the optimiser step (one per `update_` call, $n = 1$ on the first).

    Args:
        gamma: decay rate $\gamma \ge 0$.

    Reference: `Flux.Optimise.InvDecay` (Flux.jl before v0.14).

    Examples:
        >>> import numpy as np, composeopt as co
        >>> opt, x = co.InvDecay(gamma=1.0), np.zeros(1)
        >>> for _ in range(2):
        ...     _ = co.update_(opt, x, np.array([6.0]))
        >>> print(x)  # 6 / 2 + 6 / 3
        [-5.]
    """

    gamma: Hyper[float] = Hyper(default=0.001, check=nonnegative)
    step = 1  # the optimiser step, set by the engine through begin_step
    kernel = Kernel("return dx / (1 + gamma * step)")

    def begin_step(self, step: int) -> None:
        self.step = step
