"""Array-module dispatch: the helpers every rule uses to stay generic.

Rules call `namespace` on their parameter and then only use that namespace,
so one code path serves NumPy, CuPy, PyTorch and any array-API array.  CuPy
is never imported here: `array_api_compat` only looks at modules that the
caller already imported.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["namespace", "is_array", "is_tracer", "backend_name", "eps_for", "copy"]

# Float16 cannot hold 1e-8: an epsilon that rounds to zero turns Adam's 0/0 into NaN
# on zero gradients.  The floor is the value Optimisers.jl uses for Float16.
_FLOAT16_EPS_FLOOR = float(np.float16(1e-7))

_NUMPY_NAMESPACE = array_api_compat.array_namespace(np.empty(0))


def namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace of `arrays` (NumPy, CuPy, array_api_strict, ...).

    It is `array_api_compat.array_namespace`: for NumPy and CuPy arrays it
    returns array-api-compat's wrapper of the module, whose functions follow the
    array-API standard.  A rule calls it once and then uses only `xp.` functions.

    Examples:
        >>> import numpy as np, composeopt as co
        >>> xp = co.namespace(np.ones(3, dtype=np.float32))
        >>> xp.zeros_like(np.ones(3, dtype=np.float32)).dtype
        dtype('float32')
    """
    if arrays and all(type(array) is np.ndarray for array in arrays):
        # What array_namespace answers for plain NumPy arrays, without its ~10 µs of checks
        # (the engine asks several times per parameter per step).
        return _NUMPY_NAMESPACE
    return array_api_compat.array_namespace(*arrays)


def is_array(obj: Any) -> bool:
    """Whether `obj` is an array of some array module (not a Python or NumPy scalar)."""
    if type(obj) is np.ndarray:
        return True
    return array_api_compat.is_array_api_obj(obj) and not isinstance(obj, np.generic)


def is_tracer(obj: Any) -> bool:
    """Whether `obj` is a JAX tracer: the abstract stand-in for an array that `jax.jit`,
    `jax.vmap` and `jax.grad` pass to the function they transform (JAX is not imported here)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(obj, jax.core.Tracer)


def backend_name(obj: Any) -> str:
    """A short human name for the module an array comes from, for error messages."""
    if array_api_compat.is_numpy_array(obj):
        return "numpy"
    if array_api_compat.is_cupy_array(obj):
        return "cupy"
    if array_api_compat.is_torch_array(obj):
        return "torch"
    if array_api_compat.is_jax_array(obj):
        return "jax"
    return type(obj).__module__.split(".")[0]


def eps_for(dtype: Any, epsilon: float) -> float:
    """`epsilon` for arrays of `dtype`, floored for float16 so that it does not underflow."""
    if epsilon != 0 and _is_float16(dtype):
        return max(epsilon, _FLOAT16_EPS_FLOOR)
    return epsilon


_float16_names: dict[Any, bool] = {}


def _is_float16(dtype: Any) -> bool:
    """Whether `dtype` is some module's float16 (`str` of a dtype is slow: remembered)."""
    key = (type(dtype), dtype)  # the type first: dtypes of different modules never meet in ==
    try:
        return _float16_names[key]
    except (KeyError, TypeError):
        # "float16", "torch.float16", "array_api_strict.float16"
        answer = str(dtype).rpartition(".")[2] == "float16"
        try:
            _float16_names[key] = answer
        except TypeError:  # an unhashable dtype object
            pass
        return answer


def copy(xp: ModuleType, array: Any) -> Any:
    """A fresh copy of `array` in its own namespace and device."""
    return xp.asarray(array, copy=True)
