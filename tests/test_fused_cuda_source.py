"""The CuPy kernels' generated CUDA source, checked without a GPU.

The body that ``cupy_backend.stage_kernel`` gives to ``cupy.ElementwiseKernel``
is plain C++ over one element.  Here it is compiled by the host's C++ compiler
(double precision, no FMA contraction) inside a loop, and its results are
compared with the NumPy backend's program for the same stage, which
tests/test_fused.py checks against the generic path.  Skipped without g++.
"""

from __future__ import annotations

import ctypes
import importlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from composeopt import _fused
from composeopt._fused import numpy_backend
from composeopt._fused.kernel import Kernel
from composeopt.registry import CASES

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++")


class _Captured:
    def __init__(self, in_params, out_params, operation, name, preamble=""):
        self.inputs = [param.split()[-1] for param in in_params.split(",")]
        self.outputs = [param.split()[-1] for param in out_params.split(",")]
        self.operation, self.preamble = operation, preamble


@pytest.fixture
def cupy_backend_source(monkeypatch):
    """composeopt._fused.cupy_backend imported against a stand-in cupy that records kernels."""
    fake = types.ModuleType("cupy")
    fake.ElementwiseKernel = _Captured
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "composeopt._fused.cupy_backend", raising=False)
    module = importlib.import_module("composeopt._fused.cupy_backend")
    yield module
    sys.modules.pop("composeopt._fused.cupy_backend", None)


def _stages():
    seen = {}
    for case, make in CASES.items():
        plan = _fused.plan(make())
        if plan is None:
            continue
        for number, stage in enumerate(plan.stages):
            kernels = tuple(entry.kernel for entry in stage.entries)
            last = number == len(plan.stages) - 1
            for scaled in (False, True):
                seen.setdefault((stage.key, scaled, last), (case, kernels, scaled, last))
    return list(seen.values())


STAGES = _stages()


def _compile(kernel, tmp_path):
    """The kernel body in a C++ loop: run(n, g, x, out, k, states)."""
    inputs, outputs = kernel.inputs, kernel.outputs
    lines = [
        "#include <cmath>",
        "using std::sqrt; using std::fabs;",
        "#define __device__",
        "typedef double T;",
    ]
    lines.append(kernel.preamble)
    lines.append('extern "C" void run(long n, const T* g_, T* x_, T* out_, const T* k, T** s) {')
    lines.append("  for (long i = 0; i < n; ++i) {")
    lines.append("    const T g = g_[i];")
    for position, name in enumerate(inputs[1:]):  # scale (when scaled) and the scalars, in k's order
        lines.append(f"    const T {name} = k[{position}];")
    lines.append("    T& x = x_[i];")
    states = [name for name in outputs if name not in ("x", "out")]
    if "out" in outputs:
        lines.append("    T& out = out_[i];")
    for position, name in enumerate(states):
        lines.append(f"    T& {name} = s[{position}][i];")
    lines.append("    " + kernel.operation.replace("\n", "\n    "))
    lines.append("  }")
    lines.append("}")
    source = tmp_path / "stage.cpp"
    source.write_text("\n".join(lines) + "\n")
    library = tmp_path / "stage.so"
    subprocess.run(
        [GXX, "-O1", "-ffp-contract=off", "-shared", "-fPIC", str(source), "-o", str(library)], check=True
    )
    run = ctypes.CDLL(str(library)).run
    run.restype = None
    return run, len(states)


@pytest.mark.parametrize(
    ("case", "kernels", "scaled", "last"), STAGES, ids=[f"{s[0]}-{s[2]}-{s[3]}" for s in STAGES]
)
def test_cuda_body_computes_what_the_numpy_program_computes(
    cupy_backend_source, tmp_path, case, kernels, scaled, last
):
    kernel = cupy_backend_source.stage_kernel(kernels, scaled, last)
    run, state_count = _compile(kernel, tmp_path)
    rng = np.random.default_rng(7)
    n = 64
    g, x = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n)
    states = [rng.uniform(0.1, 1.0, n) for _ in range(state_count)]
    scalar_count = sum(len(k.scalar_names) for k in kernels)
    values = rng.uniform(0.05, 0.95, scalar_count)
    scale = 0.5
    # The C++ loop takes the scale first (as the kernel's inputs list it); the NumPy program last.
    k_cpp = np.array(([scale] if scaled else []) + list(values))
    k_numpy = tuple(np.float64(v) for v in list(values) + ([scale] if scaled else []))

    expected = [a.copy() for a in (g, x, np.zeros(n), *states)]
    program = numpy_backend.stage_program(kernels, scaled, last)
    blocks = [np.empty(n) for _ in range(program.temporaries)]
    with np.errstate(all="ignore"):  # random states may put a negative under a root: NaN in both
        program.function(expected[0], expected[1], expected[2], k_numpy, blocks, *expected[3:])

    actual = [a.copy() for a in (g, x, np.zeros(n), *states)]
    pointers = (ctypes.POINTER(ctypes.c_double) * max(1, state_count))(
        *[a.ctypes.data_as(ctypes.POINTER(ctypes.c_double)) for a in actual[3:]]
    )
    double_p = ctypes.POINTER(ctypes.c_double)
    run(
        ctypes.c_long(n),
        actual[0].ctypes.data_as(double_p),
        actual[1].ctypes.data_as(double_p),
        actual[2].ctypes.data_as(double_p),
        k_cpp.ctypes.data_as(double_p),
        pointers,
    )
    for got, want in zip(actual[1:], expected[1:]):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_cuda_sign_is_numpys_sign(cupy_backend_source, tmp_path):
    """co_sign: -1, 0 or 1, NaN for NaN and +0 for -0, as np.sign."""
    kernel = Kernel("return sign(dx) * one", lambda rule, state, dtype: {"one": 1.0})
    run, _ = _compile(cupy_backend_source.stage_kernel((kernel,), False, False), tmp_path)
    g = np.array([-0.0, 0.0, np.nan, -3.0, 2.5, np.inf, -np.inf, 1e-300, -1e-300])
    x, out, k = np.zeros_like(g), np.empty_like(g), np.array([1.0])
    double_p = ctypes.POINTER(ctypes.c_double)
    states = (double_p * 1)()
    run(ctypes.c_long(len(g)), *(a.ctypes.data_as(double_p) for a in (g, x, out, k)), states)
    np.testing.assert_array_equal(out, np.sign(g))
    np.testing.assert_array_equal(np.signbit(out), np.signbit(np.sign(g)))
