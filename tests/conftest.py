"""Array backends for the tests: every backend test runs on NumPy, on the strict
array-API namespace (which proves the generic code would run on CuPy), and on
CuPy when a GPU is present; missing backends skip cleanly."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np
import pytest


@dataclass(frozen=True)
class Backend:
    """How to make and read arrays of one array module."""

    name: str
    xp: ModuleType
    dtypes: tuple[str, ...]

    def asarray(self, values: Any, dtype: str = "float64") -> Any:
        host = np.asarray(values, dtype=dtype)
        if self.name == "array_api_strict":
            return self.xp.asarray(host.tolist() if host.ndim else float(host), dtype=getattr(self.xp, dtype))
        return self.xp.asarray(host)

    def copy(self, array: Any) -> Any:
        # Through array_api_compat: NumPy 1.26's own asarray has no copy argument.
        return array_api_compat.array_namespace(array).asarray(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        if self.name == "cupy":
            return self.xp.asnumpy(array)
        if self.name == "array_api_strict":
            return np.from_dlpack(array)
        return np.asarray(array)


def _cupy_backend() -> Backend | None:
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return Backend("cupy", cupy, ("float16", "float32", "float64"))


def _load(name: str) -> Backend | None:
    if name == "numpy":
        return Backend("numpy", np, ("float16", "float32", "float64"))
    if name == "array_api_strict":
        try:
            strict = importlib.import_module("array_api_strict")
        except ImportError:
            return None
        return Backend("array_api_strict", strict, ("float32", "float64"))  # it has no float16
    return _cupy_backend()


BACKEND_NAMES = ("numpy", "array_api_strict", "cupy")
_cache: dict[str, Backend | None] = {}


def get_backend(name: str) -> Backend:
    if name not in _cache:
        _cache[name] = _load(name)
    backend = _cache[name]
    if backend is None:
        pytest.skip(f"{name} is not available here")
    return backend


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test that takes ``backend`` runs once per installed array module."""
    return get_backend(request.param)


@pytest.fixture
def cupy_backend() -> Backend:
    """CuPy on a GPU, or a skip."""
    return get_backend("cupy")
