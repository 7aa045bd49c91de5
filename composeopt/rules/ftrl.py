"""FTRL-proximal: follow the regularised leader, the online-learning rule with L1 sparsity."""

from __future__ import annotations

import math
import numbers
from typing import Any

from array_api_compat import device

from .._dispatch import namespace
from ..errors import HyperparameterError
from ..hyper import Hyper, nonnegative, positive
from ..kernel import Kernel
from ..rule import Rule, State
from ._math import clamp, widened, widened_dtype

__all__ = ["FTRL"]


def nonpositive(value: Any) -> float:
    """A finite real number `<= 0` (FTRL's learning-rate power)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"expected a real number, got {value!r}")
    number = float(value)
    if not -math.inf < number <= 0:  # NaN fails too
        raise HyperparameterError(f"must be in (-inf, 0], got {number!r}")
    return number


# The fast path of the default power, -1/2 (the kernel language has no power function).
# `clamp(z, -l1, l1) - z` is `sign(z) l1 - z` where |z| > l1, and 0 elsewhere.
_SQRT_KERNEL = Kernel(
    """
    fresh = accum + dx * dx
    root = sqrt(fresh)
    linear = linear + (dx - (root - sqrt(accum)) / eta * x)
    accum = fresh
    target = (minimum(maximum(linear, -l1), l1) - linear) / (root / eta + 2 * l2)
    return x - target
    """,
    state=("accum", "linear"),
)


class FTRL(Rule):
    r"""FTRL-proximal: `FTRL(eta=0.001, initial_accumulator=0.1, lr_power=-0.5, l1=0.0, l2=0.0)`.

    With $p$ = `lr_power`, $n$ the sum of squared gradients and $z$ the
    "linear" accumulator, each step sets $x$ to the minimiser of the
    regularised linearised losses so far:

    $$n' = n + dx^2, \qquad
    z \leftarrow z + dx - \frac{n'^{-p} - n^{-p}}{\eta}\, x, \qquad n \leftarrow n'$$

    $$x_{\text{new}} = \begin{cases}
    \dfrac{\operatorname{sign}(z)\, \ell_1 - z}{n^{-p}/\eta + 2 \ell_2} & |z| > \ell_1 \\
    0 & \text{otherwise}
    \end{cases}, \qquad \Delta = x - x_{\text{new}}$$

    so L1 sets elements exactly to 0.  The new $x$ does not depend on the old
    one except through $z$: put FTRL last in a chain, as the rule that takes
    the step.

    Args:
        eta: learning rate $\eta > 0$.
        initial_accumulator: the starting value of $n$, $\ge 0$.
        lr_power: $p \le 0$; $-1/2$ is AdaGrad-like, 0 a fixed rate.  Only
            $-1/2$ has a fused fast path (the others take the generic one).
        l1: L1 strength $\ell_1 \ge 0$.
        l2: L2 strength $\ell_2 \ge 0$.

    State: `accum` ($n$) and `linear` ($z$, starting at 0), in the parameter's
    dtype, but float32 for a float16 or bfloat16 parameter, whose step is then
    computed in float32 too: $|z| \approx |x| \sqrt{n} / \eta$ passes float16's
    65504 at weights near 100 with the default $\eta$, and bfloat16's 8-bit
    significand would round away the small additions to $n$ and $z$.

    Same as MindSpore's `nn.FTRL(params, initial_accum, learning_rate, lr_power, l1, l2)`
    and TensorFlow's `ApplyFtrl` op (`tf.raw_ops.ApplyFtrl`), whose defaults
    these are.

    Reference: [McMahan et al. (2013)](https://doi.org/10.1145/2487575.2488200)

    Examples:
        A gradient too small to beat the L1 threshold leaves the weight at 0:

        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(2)
        >>> _ = co.update_(co.FTRL(0.1, l1=0.5), x, np.array([0.3, -2.0]))
        >>> print(x.round(4))
        [0.     0.0741]
    """

    fallible = False
    eta: Hyper[float] = Hyper(default=0.001, check=positive)
    initial_accumulator: Hyper[float] = Hyper(default=0.1, check=nonnegative)
    lr_power: Hyper[float] = Hyper(default=-0.5, check=nonpositive)
    l1: Hyper[float] = Hyper(default=0.0, check=nonnegative)
    l2: Hyper[float] = Hyper(default=0.0, check=nonnegative)

    # apply_ is written out beside the kernel, which cannot say two things it does: a power
    # other than -1/2, and the float32 state and arithmetic of a 16-bit parameter (the kernel
    # computes in the parameter's dtype).  For float32 and float64 they compute the same.
    @property
    def _kernel(self) -> Kernel | None:
        return _SQRT_KERNEL if self.lr_power == -0.5 else None

    def init(self, x: Any) -> State:
        xp = namespace(x)
        wide = widened_dtype(xp, x.dtype)
        return State(
            accum=xp.full(x.shape, self.initial_accumulator, dtype=wide, device=device(x)),
            linear=xp.zeros(x.shape, dtype=wide, device=device(x)),
        )

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        xp = namespace(x)
        x_wide, dx_wide = widened(xp, x), widened(xp, dx)

        def power(n: Any) -> Any:  # n^(-p), as the kernel computes it for p = -1/2
            return xp.sqrt(n) if self.lr_power == -0.5 else n ** (-self.lr_power)

        # In place, so that a 0-d parameter's state stays a float32 array rather than a
        # NumPy scalar (which the engine would cast back to the parameter's dtype).
        previous_root = power(state.accum)
        state.accum += dx_wide * dx_wide
        root = power(state.accum)
        state.linear += dx_wide - (root - previous_root) / self.eta * x_wide
        shrunk = clamp(xp, state.linear, -self.l1, self.l1) - state.linear
        target = shrunk / (root / self.eta + 2 * self.l2)
        return xp.astype(x_wide - target, x.dtype, copy=False)
