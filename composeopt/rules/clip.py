"""Gradient clipping: by value, by each array's norm, and by the norm of the whole tree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from array_api_compat import device

from .._dispatch import namespace
from .._fused.kernel import Kernel, NormClip
from ..errors import NonFiniteError, UnsupportedArrayError
from ..hyper import REQUIRED, Hyper, flag, nonnegative, norm_order, positive
from ..rule import Rule
from ._math import norm_from_power, norm_power

__all__ = ["ClipValue", "ClipGrad", "ClipNorm", "ClipGlobalNorm"]


def _scale_down(xp: Any, dx: Any, norm: Any, omega: float) -> Any:
    """``dx · min(1, ω / norm)``, written as ``ω / max(norm, ω)`` to never divide by 0;
    ``norm`` stays a 0-d array, so there is no host round trip."""
    scale = omega / xp.maximum(norm, omega)
    return dx * xp.astype(scale, dx.dtype)


class ClipValue(Rule):
    r"""Clip each gradient component to ``[-thresh, thresh]``: ``ClipValue(thresh=10.0)``.

    .. math:: \Delta = \mathrm{clamp}(dx, -\delta, \delta)

    Args:
        thresh: the bound ``δ ≥ 0``.

    Alias ``ClipGrad`` (Optimisers.jl's name).  Equals ``optax.clip(thresh)``
    and torch's ``clip_grad_value_``.
    """

    fallible = False
    thresh = Hyper(10.0, nonnegative)
    fused = Kernel(
        "return minimum(maximum(dx, low), high)",
        lambda rule, state, dtype: {"low": -rule.thresh, "high": rule.thresh},
    )

    def apply_(self, state: Any, x: Any, dx: Any) -> Any:
        return namespace(dx).clip(dx, -self.thresh, self.thresh)


ClipGrad = ClipValue


class ClipNorm(Rule):
    r"""Rescale each gradient array whose p-norm exceeds ``omega``: ``ClipNorm(omega=10.0, p=2, throw=True)``.

    .. math:: \Delta = dx \cdot \min\left(1, \frac{\omega}{\|dx\|_p}\right)

    Args:
        omega: the largest norm allowed, ``> 0``.
        p: order of the norm, ``p > 0`` (``math.inf`` for the largest magnitude).
        throw: raise :class:`~composeopt.errors.NonFiniteError` when a norm is
            infinite or NaN (reading the norm then waits for the device).

    Per array, as Optimisers.jl's ClipNorm; see :class:`ClipGlobalNorm` for one
    norm over all parameters (torch's ``clip_grad_norm_``).
    """

    omega = Hyper(10.0, positive)
    p = Hyper(2, norm_order)
    throw = Hyper(True, flag)
    fused = NormClip("array")  # when it cannot fail (throw=False)

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
    r"""Rescale all gradients together when their joint p-norm exceeds ``omega``:
    ``ClipGlobalNorm(omega, p=2)``.

    .. math::
        N = \Big(\sum_{\text{arrays}} \sum_i |dx_i|^p\Big)^{1/p}, \qquad
        \Delta = dx \cdot \min\left(1, \frac{\omega}{N}\right)

    A tree-level rule: ``N`` is the norm of the gradients as they reach this
    rule in the chain, over every parameter updated this step.  ``N`` stays a
    0-d device array (no host synchronisation).  Equals
    ``optax.clip_by_global_norm(omega)`` for ``p=2``; ``torch.nn.utils.clip_grad_norm_``
    divides by ``N + 1e-6`` and so clips slightly more.

    Args:
        omega: the largest joint norm allowed, ``> 0``.
        p: order of the norm, ``p > 0`` (``math.inf`` for the largest magnitude).
    """

    fallible = False
    omega = Hyper(REQUIRED, positive)
    p = Hyper(2, norm_order)
    fused = NormClip("tree")

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
        norm = norm_from_power(xp, total, self.p)
        return [_scale_down(xp, dx, norm, self.omega) for dx in dxs]
