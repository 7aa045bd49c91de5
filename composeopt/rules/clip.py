"""Gradient clipping: by value, by each array's norm, and by the norm of the whole tree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from array_api_compat import device

from .._collective import combine_powers, current
from .._dispatch import namespace
from .._fused.kernel import Kernel
from .._fused.reduce import Measure, Outcome, Reduce, Staged, capped, clip_scale, joint_power, norm_of
from ..errors import NonFiniteError, UnsupportedArrayError
from ..hyper import Hyper, flag, nonnegative, norm_order, positive
from ..rule import Rule
from ._math import norm_from_power, norm_power

__all__ = ["ClipValue", "ClipGrad", "ClipNorm", "ClipGlobalNorm"]


_SCALE = Kernel("return dx * scale", lambda rule, state, dtype: {})
"""The kernel after a norm clip's reduction: `scale` is what its `finish` gives each array."""


def _finish_per_array(
    rule: Any,
    states: Sequence[Any],
    values: Sequence[Sequence[float]],
    dtypes: Sequence[Any],
    paths: Sequence[str],
) -> Outcome:
    scalars = []
    for (power,), dtype, path in zip(values, dtypes, paths):
        norm = norm_of(capped(power, dtype), rule.p)
        if rule.throw and not math.isfinite(norm):
            raise NonFiniteError(f"{path}: gradient has {rule.p}-norm {norm}")
        scalars.append({"scale": clip_scale(norm, rule.omega)})
    return Outcome(scalars)


def _finish_joint(
    rule: Any,
    states: Sequence[Any],
    values: Sequence[Sequence[float]],
    dtypes: Sequence[Any],
    paths: Sequence[str],
) -> Outcome:
    powers = [capped(power, dtype) for (power,), dtype in zip(values, dtypes)]
    total = joint_power(powers, rule.p, dtypes)
    if current() is not None:  # a sharded step: this rank's shard is a part of the tree
        total = joint_power(combine_powers([total], rule.p), rule.p, dtypes)
    scale = clip_scale(norm_of(total, rule.p), rule.omega)
    return Outcome([{"scale": scale}] * len(values))


def _measure_norm(rule: Any) -> tuple[Measure, ...]:
    return (Measure("d", rule.p),)


def _scale_down(xp: Any, dx: Any, norm: Any, omega: float) -> Any:
    """`dx · min(1, ω / norm)`, written as `ω / max(norm, ω)` to never divide by 0;
    `norm` stays a 0-d array, so there is no host round trip."""
    scale = omega / xp.maximum(norm, omega)
    return dx * xp.astype(scale, dx.dtype)


class ClipValue(Rule):
    r"""Clip each gradient component to $[-\delta, \delta]$: `ClipValue(thresh=10.0)`.

    $$\Delta = \operatorname{clamp}(dx, -\delta, \delta)$$

    Args:
        thresh: the bound $\delta \ge 0$.

    Alias `ClipGrad` (Optimisers.jl's name).  Same as `optax.clip(thresh)` and
    `torch.nn.utils.clip_grad_value_(params, thresh)`.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(3)
        >>> _ = co.update_(co.ClipValue(1.0), x, np.array([-3.0, 0.5, 20.0]))
        >>> print(x)
        [ 1.  -0.5 -1. ]
    """

    thresh: Hyper[float] = Hyper(default=10.0, check=nonnegative)
    # maximum and minimum rather than clip, which array-api-compat refuses for bfloat16.
    kernel = Kernel("return minimum(maximum(dx, -thresh), thresh)")


ClipGrad = ClipValue


class ClipNorm(Rule):
    r"""Rescale each gradient array whose p-norm exceeds $\omega$:
    `ClipNorm(omega=10.0, p=2, throw=True)`.

    $$\Delta = dx \cdot \min\left(1, \frac{\omega}{\lVert dx \rVert_p}\right)$$

    Args:
        omega: the largest norm allowed, $\omega > 0$.
        p: order of the norm, $p > 0$ (`math.inf` for the largest magnitude).
        throw: raise [NonFiniteError][composeopt.errors.NonFiniteError] when a
            norm is infinite or NaN (reading the norm then waits for the device).

    Per array, as Optimisers.jl's `ClipNorm`; [ClipGlobalNorm][composeopt.ClipGlobalNorm]
    takes one norm over all parameters (torch's `clip_grad_norm_`).

    Reference: [Pascanu, Mikolov & Bengio (2013)](https://arxiv.org/abs/1211.5063)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.zeros(2)
        >>> _ = co.update_(co.ClipNorm(1.0), x, np.array([3.0, 4.0]))  # norm 5
        >>> print(x)
        [-0.6 -0.8]
    """

    omega: Hyper[float] = Hyper(default=10.0, check=positive)
    p: Hyper[float] = Hyper(default=2, check=norm_order)
    throw: Hyper[bool] = Hyper(default=True, check=flag)
    # Its norms before any rule writes state: a non-finite one raises with nothing changed.
    _kernel = Staged(Reduce(_measure_norm, _finish_per_array, decisive=lambda rule: bool(rule.throw)), _SCALE)

    @property
    def fallible(self) -> bool:  # type: ignore[override]
        return bool(self.throw)

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        xp = namespace(dx)
        norm = norm_from_power(xp, norm_power(xp, dx, self.p), self.p)
        if self.throw and not bool(xp.isfinite(norm)):
            raise NonFiniteError(f"gradient has {self.p}-norm {float(norm)}")
        return _scale_down(xp, dx, norm, self.omega)


class ClipGlobalNorm(Rule):
    r"""Rescale all gradients together when their joint p-norm exceeds $\omega$:
    `ClipGlobalNorm(omega, p=2)`.

    $$N = \Big(\sum_{\text{arrays}} \sum_i |dx_i|^p\Big)^{1/p}, \qquad
    \Delta = dx \cdot \min\left(1, \frac{\omega}{N}\right)$$

    A tree-level rule: $N$ is the norm of the gradients as they reach this rule
    in the chain, over every parameter updated this step.  $N$ stays a 0-d array
    on the device, so the rule never waits for the GPU; inside a
    [ShardedOptimiser][composeopt.dist.ShardedOptimiser] each rank holds a part
    of the tree, and the parts' sums are added over the ranks (one scalar
    all-reduce, read on the host).

    Args:
        omega: the largest joint norm allowed, $\omega > 0$.
        p: order of the norm, $p > 0$ (`math.inf` for the largest magnitude).

    Same as `optax.clip_by_global_norm(omega)` for `p=2`;
    `torch.nn.utils.clip_grad_norm_` divides by $N + 10^{-6}$ and so clips a
    little more.

    Reference: [Pascanu, Mikolov & Bengio (2013)](https://arxiv.org/abs/1211.5063)

    Examples:
        >>> import numpy as np, composeopt as co
        >>> params = {"a": np.zeros(2), "b": np.zeros(2)}
        >>> grads = {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 4.0])}  # joint norm 5
        >>> _ = co.update_(co.ClipGlobalNorm(1.0), params, grads)
        >>> print(params["a"], params["b"])
        [-0.6  0. ] [ 0.  -0.8]
    """

    fallible = False
    omega: Hyper[float] = Hyper(check=positive)
    p: Hyper[float] = Hyper(default=2, check=norm_order)
    _kernel = Staged(Reduce(_measure_norm, _finish_joint, scope="tree"), _SCALE)

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return self.apply_tree_([state], [x], [dx], ["params"])[0]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        if not dxs:
            return []
        xp = namespace(*dxs)
        for dx, path in zip(dxs, paths):
            if device(dx) != device(dxs[0]):
                raise UnsupportedArrayError(
                    f"{path}: ClipGlobalNorm needs every gradient on one device, "
                    f"got {device(dx)} and {device(dxs[0])} ({paths[0]})"
                )
        total = None
        for dx in dxs:
            power = norm_power(xp, dx, self.p)
            if total is None:
                total = power
            elif self.p == math.inf:
                total = xp.maximum(total, power)
            else:
                total = total + power
        if current() is not None and total is not None:  # a sharded step: add the other ranks' parts
            combined = combine_powers([float(total)], self.p)[0]
            total = xp.asarray(combined, dtype=total.dtype, device=device(total))
        norm = norm_from_power(xp, total, self.p)
        return [_scale_down(xp, dx, norm, self.omega) for dx in dxs]
