"""Weight decay and learning-rate decays, as rules to place in a chain."""

from __future__ import annotations

from typing import Any

from .._fused.kernel import Kernel
from ..hyper import Hyper, decay_factor, nonnegative, nonnegative_int, positive_int
from ..rule import Rule

__all__ = ["WeightDecay", "ExpDecay", "InvDecay"]


class WeightDecay(Rule):
    r"""L2 regularisation: ``WeightDecay(lambda_=5e-4)``.

    .. math:: \Delta = dx + \lambda x

    the gradient of ``λ/2 ‖x‖²`` added to the loss's.  Put it before the rule
    that takes the step: ``Optimiser(WeightDecay(1e-4), Momentum())``.

    Args:
        lambda_: penalty ``λ ≥ 0`` (Optimisers.jl's ``lambda``).

    Equals ``optax.add_decayed_weights(lambda_)``.
    """

    fallible = False
    lambda_ = Hyper(5e-4, nonnegative)
    fused = Kernel("return dx + lam * x", lambda rule, state, dtype: {"lam": rule.lambda_})

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return dx + self.lambda_ * x


class ExpDecay(Rule):
    r"""Step-wise exponential decay of a learning rate:
    ``ExpDecay(eta=0.001, decay=0.1, decay_step=1000, clip=1e-4, start=0)``.

    At optimiser step ``n`` (one per ``update_`` call, counted from 1), when
    ``n > start`` and ``n % decay_step == 0``, ``eta ← max(eta · decay, clip)``;
    then :math:`\Delta = \eta\, dx`.  The attribute ``eta`` itself changes, as in
    Flux, so it can be read (and reset) between steps.  Chain it before a rule
    with learning rate 1 or combine both: ``Optimiser(ExpDecay(0.1), Descent(1.0))``.

    Args:
        eta: initial learning rate.
        decay: factor in (0, 1] applied every ``decay_step`` steps.
        decay_step: steps between decays.
        clip: lower bound of ``eta``.
        start: number of steps before decay starts.

    Reference: Flux.Optimise.ExpDecay (Flux.jl before v0.14).
    """

    fallible = False
    eta = Hyper(0.001, nonnegative)
    decay = Hyper(0.1, decay_factor)
    decay_step = Hyper(1000, positive_int)
    clip = Hyper(1e-4, nonnegative)
    start = Hyper(0, nonnegative_int)
    fused = Kernel("return eta * dx", lambda rule, state, dtype: {"eta": rule.eta})

    def begin_step(self, step: int) -> None:
        if step > self.start and step % self.decay_step == 0:
            self.eta = max(self.eta * self.decay, self.clip)

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.eta * dx


class InvDecay(Rule):
    r"""Inverse-time decay: ``InvDecay(gamma=0.001)``.

    .. math:: \Delta = \frac{dx}{1 + \gamma n}

    with ``n`` the optimiser step (one per ``update_`` call, ``n = 1`` on the first).

    Args:
        gamma: decay rate ``γ ≥ 0``.

    Reference: Flux.Optimise.InvDecay (Flux.jl before v0.14).
    """

    fallible = False
    gamma = Hyper(0.001, nonnegative)
    step = 1  # the optimiser step, set by the engine through begin_step
    fused = Kernel(
        "return dx / slowdown", lambda rule, state, dtype: {"slowdown": 1 + rule.gamma * rule.step}
    )

    def begin_step(self, step: int) -> None:
        self.step = step

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return dx / (1 + self.gamma * self.step)
