"""Mixed precision: a wide master copy of each narrow parameter, and the state in that width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._dispatch import namespace
from ..errors import HyperparameterError
from ..hyper import Hyper
from ..rule import Replace, State
from ..store import zero_d_arrays
from .wrappers import Wrapper

__all__ = ["MixedPrecision"]

_WIDTHS = {"float32": 4, "float64": 8}


def _master_dtype(value: Any) -> str:
    name = getattr(value, "__name__", None) or str(value)  # np.float32, "float32", dtype('float32')
    name = name.rpartition(".")[2]
    if name not in _WIDTHS:
        raise HyperparameterError(f"expected 'float32' or 'float64', got {value!r}")
    return name


class MixedPrecision(Wrapper):
    r"""Keep a `dtype` master copy of every narrower parameter: `MixedPrecision(inner, dtype="float32")`.

    For a float16 or bfloat16 parameter $x$ with master copy $w$ (starting as
    $x$ widened), each step is

    $$w \leftarrow w - \text{inner}(w,\ \operatorname{widen}(dx)), \qquad
    x \leftarrow \operatorname{narrow}(w)$$

    so small updates accumulate in $w$ instead of rounding away in $x$, and
    the inner rule's state (Adam's moments) is kept in `dtype` too.  Parameters
    at least as wide as `dtype` go straight to `inner`.  The parameter is
    written back exactly (a [Replace][composeopt.Replace]), so the rule must
    be the last of a chain: wrap the chain in it.

    Args:
        inner: the rule or chain to run in `dtype`.
        dtype: the master precision, `"float32"` (default) or `"float64"`.

    State: `master` ($w$, or `None` for a parameter already as wide) and
    `inner`, the inner rule's state.

    The master copy is taken when the parameter is first seen; if you
    overwrite a parameter's values yourself later, [reset_][composeopt.reset_]
    the optimiser (or its state) so that the master copy follows.  On NumPy,
    bfloat16 is `ml_dtypes.bfloat16`.

    This is the master-weights scheme of
    [Micikevicius et al. (2018)](https://arxiv.org/abs/1710.03740), without
    loss scaling (scale the loss yourself and divide in a chain if you need it).

    Examples:
        >>> import numpy as np, composeopt as co
        >>> x = np.ones(1, dtype=np.float16)
        >>> plain, mixed = co.Descent(1e-4), co.MixedPrecision(co.Descent(1e-4))
        >>> y = x.copy()
        >>> for _ in range(10):
        ...     _ = co.update_(plain, x, np.ones(1, dtype=np.float16))
        ...     _ = co.update_(mixed, y, np.ones(1, dtype=np.float16))
        >>> print(x, y)  # 1 - 1e-4 rounds back to 1 in float16; the master copy keeps count
        [1.] [0.999]
    """

    dtype: Hyper[str] = Hyper(default="float32", check=_master_dtype)
    assigns = True
    _kernel = None  # the master copy is a second parameter: the generic path

    def _widens(self, x: Any) -> bool:
        size = getattr(x.dtype, "itemsize", None)  # NumPy's finfo does not know ml_dtypes' bfloat16
        bits = 8 * size if size is not None else namespace(x).finfo(x.dtype).bits
        return bool(bits < 8 * _WIDTHS[self.dtype])

    def init_tree_(self, xs: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        masters = [
            namespace(x).astype(x, getattr(namespace(x), self.dtype)) if self._widens(x) else None for x in xs
        ]
        inner = self.inner.init_tree_([x if w is None else w for x, w in zip(xs, masters)], paths)
        return [State(master=w, inner=state) for w, state in zip(masters, inner)]

    def apply_tree_(
        self, states: Sequence[Any], xs: Sequence[Any], dxs: Sequence[Any], paths: Sequence[str]
    ) -> list[Any]:
        views, grads = [], []
        for state, x, dx in zip(states, xs, dxs):
            master = state.master
            views.append(x if master is None else master)
            grads.append(dx if master is None else namespace(x).astype(dx, master.dtype))
        updates = self.inner.apply_tree_([state.inner for state in states], views, grads, paths)
        results = []
        for state, x, update in zip(states, xs, updates):
            if state.master is None or update is None:
                results.append(update)
                continue
            xp = namespace(x)
            wide = state.master.dtype
            if type(update) is Replace:
                state.master = xp.astype(update.value, wide)
            else:
                state.master = state.master - update
            if x.ndim == 0:  # NumPy's 0-d results are scalars; keep the wide state as 0-d arrays
                state.master = xp.asarray(state.master, dtype=wide)
                state.inner = zero_d_arrays(state.inner, wide)
            results.append(Replace(xp.astype(state.master, x.dtype)))
        return results
