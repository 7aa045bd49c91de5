"""L-BFGS: a quasi-Newton direction from the last few steps and gradient changes."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from array_api_compat import device

from .._collective import current, sum_across
from .._dispatch import namespace
from ..hyper import Hyper, nonnegative, positive_int
from ..rule import Rule, State
from ._math import norm_power, widened

__all__ = ["LBFGS"]


def _dot(xp: ModuleType, a: Any, b: Any) -> Any:
    """`sum(a * b)` as a 0-d array, in float32 or wider (sums over a tree overflow float16)."""
    return xp.sum(widened(xp, a) * widened(xp, b))


def _tree_dot(xp: ModuleType, pairs: Sequence[tuple[Any, Any]]) -> Any:
    """The dot product of two trees, given as (a, b) array pairs: a 0-d array on the device."""
    total = _dot(xp, *pairs[0])
    for a, b in pairs[1:]:
        total = total + _dot(xp, a, b)
    return _over_ranks(xp, total)


def _over_ranks(xp: ModuleType, total: Any) -> Any:
    """A sum over this rank's parameters, summed over the ranks in a sharded step (the
    tree is spread over them); as it is otherwise."""
    if current() is None:
        return total
    return xp.asarray(sum_across(float(total)), dtype=total.dtype, device=device(total))


class LBFGS(Rule):
    r"""Limited-memory BFGS: `LBFGS(eta=1.0, memory=10, epsilon=1e-10)`.

    A tree-level rule: with $s_i = x_{i+1} - x_i$ and $y_i = g_{i+1} - g_i$
    the last `memory` changes of the whole parameter tree and of its gradient,
    the update is $\Delta = \eta\, H g$, where $H$ is the BFGS inverse-Hessian
    estimate built from those pairs on $H_0 = \gamma I$,
    $\gamma = s^T y / y^T y$ of the newest pair.  Nocedal's two-loop
    recursion computes $Hg$ without forming $H$:

    $$q \leftarrow g;\quad \text{newest to oldest: } \alpha_i = \rho_i s_i^T q,\;
    q \leftarrow q - \alpha_i y_i; \quad r \leftarrow \gamma q;\quad
    \text{oldest to newest: } r \leftarrow r + s_i(\alpha_i - \rho_i y_i^T r)$$

    with $\rho_i = 1/(y_i^T s_i)$.  A pair with $y_i^T s_i \le \epsilon$
    (no positive curvature) gets $\rho_i = 0$, so it takes no part, though it
    holds its slot in the memory until newer pairs push it out.  The first step
    has no pairs: $\Delta = \eta\, g / \max(1, \lVert g\rVert_1)$.  The dot
    products are sums over every parameter of the step and stay 0-d arrays on
    the device (inside a [ShardedOptimiser][composeopt.dist.ShardedOptimiser]
    each is read on the host and summed over the ranks).  For float16 and
    bfloat16 parameters they, the first step's scale and the two-loop
    recursion are computed in float32 (its scalars pass float16's 65504 when
    the steps are small); the pairs keep the parameter's dtype.

    L-BFGS wants a step size that a line search chose; with `update_` and a
    fixed `eta` it works on smooth, mildly curved problems.
    [minimize][composeopt.minimize] runs it with a backtracking line search.
    The memory is the tree's: pass every parameter at every step.  When the
    parameters of a step have not all taken the same number of steps (one
    was added, or left out by a `None` gradient), the rule starts its memory
    afresh for all of them.

    Args:
        eta: step size $\eta \ge 0$ (1 is the quasi-Newton step).
        memory: number of $(s, y)$ pairs kept, an integer $\ge 1$.
        epsilon: smallest curvature $y^T s$ for a pair to count.

    State: `s` and `y`, the pairs, each of shape `(memory, *x.shape)` (used as a
    ring: pair $j$ sits at slot $j \bmod$ `memory`; a later change of
    `memory` takes effect when a new parameter joins the tree, or after
    [reset_][composeopt.reset_]); `x_prev` and `g_prev`, the
    parameter and gradient of the previous step; `t`, the steps taken.

    Same as `torch.optim.LBFGS(lr=eta, history_size=memory, max_iter=1,
    tolerance_grad=0, tolerance_change=0)` with one `step()` per gradient,
    while no pair is refused (torch does not store a refused pair at all).

    Reference: [Nocedal (1980)](https://doi.org/10.1090/S0025-5718-1980-0572855-7);
    [Liu & Nocedal (1989)](https://doi.org/10.1007/BF01589116)

    Examples:
        On a quadratic the second step lands on the minimum:

        >>> import numpy as np, composeopt as co
        >>> x = np.array([3.0, -1.0])
        >>> opt = co.LBFGS()
        >>> for _ in range(2):
        ...     _ = co.update_(opt, x, 2 * x)  # the gradient of |x|^2
        >>> print(x)
        [0. 0.]
    """

    fallible = False
    _kernel = None  # dot products over the whole tree: no elementwise fast path
    eta: Hyper[float] = Hyper(default=1.0, check=nonnegative)
    memory: Hyper[int] = Hyper(default=10, check=positive_int)
    epsilon: Hyper[float] = Hyper(default=1e-10, check=nonnegative)

    def init(self, x: Any) -> State:
        xp = namespace(x)
        history = (self.memory, *x.shape)
        zeros = xp.zeros(history, dtype=x.dtype, device=device(x))
        return State(s=zeros, y=xp.zeros_like(zeros), x_prev=xp.zeros_like(x), g_prev=xp.zeros_like(x), t=0)

    def apply_(self, state: State, x: Any, dx: Any) -> Any:
        return self.apply_tree_([state], [x], [dx], ["params"])[0]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        if not xs:
            return []
        xp = namespace(*xs)
        if len({(state.t, state.s.shape[0]) for state in states}) > 1:
            # Not one tree's history (a parameter was added or skipped, or `memory` changed
            # in between): start again, every ring at the current `memory`.
            for state in states:
                state.t = 0
                if state.s.shape[0] != self.memory:
                    state.s = xp.zeros(
                        (self.memory, *state.s.shape[1:]), dtype=state.s.dtype, device=device(state.s)
                    )
                    state.y = xp.zeros_like(state.s)
        t = states[0].t
        size = states[0].s.shape[0]  # the memory the state was made with
        if t > 0:
            slot = (t - 1) % size
            for state, x, dx in zip(states, xs, dxs):
                state.s[slot, ...] = x - state.x_prev
                state.y[slot, ...] = dx - state.g_prev
        for state, x, dx in zip(states, xs, dxs):
            state.x_prev[...] = x
            state.g_prev[...] = dx
            state.t += 1
        pairs = min(t, size)
        if pairs == 0:
            # 1 / |g|_1 of a large tree is a float16 subnormal, or 0 past |g|_1 = 1.7e7: scale in float32.
            first = 1.0 / xp.maximum(_l1(xp, dxs), 1.0)
            wide = [widened(xp, dx) for dx in dxs]
            steps = [(self.eta * xp.astype(first, w.dtype)) * w for w in wide]
            return [xp.astype(step, dx.dtype, copy=False) for step, dx in zip(steps, dxs)]
        newest_first = [(t - 1 - j) % size for j in range(pairs)]
        return self._two_loop(xp, states, dxs, newest_first)

    def _two_loop(
        self, xp: ModuleType, states: Sequence[State], dxs: Sequence[Any], slots: list[int]
    ) -> list[Any]:
        """$\\eta H g$ over the tree, `slots` newest first."""
        rho, gamma = {}, None
        for slot in reversed(slots):  # oldest first, so that gamma ends at the newest valid pair
            sy = _tree_dot(xp, [(state.s[slot, ...], state.y[slot, ...]) for state in states])
            yy = _tree_dot(xp, [(state.y[slot, ...], state.y[slot, ...]) for state in states])
            valid = sy > self.epsilon
            rho[slot] = xp.where(valid, 1.0 / sy, 0.0)
            scale = xp.where(valid, sy / yy, 1.0)
            gamma = scale if gamma is None else xp.where(valid, scale, gamma)
        # q and r in float32 or wider: the scalars alpha and beta grow like 1/|s| as the steps
        # shrink and pass float16's 65504 while the direction is still small.  New lists, not in-place
        # updates: NumPy returns a 0-d array's products as scalars, which += would not write back.
        q = [widened(xp, dx) for dx in dxs]
        alpha = {}
        for slot in slots:
            alpha[slot] = rho[slot] * _tree_dot(
                xp, [(state.s[slot, ...], qi) for state, qi in zip(states, q)]
            )
            q = [
                qi - xp.astype(alpha[slot], qi.dtype) * widened(xp, state.y[slot, ...])
                for state, qi in zip(states, q)
            ]
        r = [xp.astype(gamma, qi.dtype) * qi for qi in q]
        for slot in reversed(slots):
            beta = rho[slot] * _tree_dot(xp, [(state.y[slot, ...], ri) for state, ri in zip(states, r)])
            r = [
                ri + xp.astype(alpha[slot] - beta, ri.dtype) * widened(xp, state.s[slot, ...])
                for state, ri in zip(states, r)
            ]
        return [xp.astype(self.eta * ri, dx.dtype, copy=False) for ri, dx in zip(r, dxs)]


def _l1(xp: ModuleType, arrays: Sequence[Any]) -> Any:
    total = None
    for a in arrays:
        part = norm_power(xp, a, 1)
        total = part if total is None else total + part
    return _over_ranks(xp, total)
