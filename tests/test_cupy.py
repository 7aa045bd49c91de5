"""CuPy specifics (skipped without a GPU): state on the device, no silent host copies,
module and device mixing refused.  The generic rule tests also run on CuPy through
the ``backend`` fixture."""

from __future__ import annotations

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import UnsupportedArrayError
from composeopt.registry import CASES


def test_state_lives_on_the_parameters_device(cupy_backend):
    cupy = cupy_backend.xp
    x = cupy.ones((4, 4), dtype=cupy.float32)
    opt = co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam())
    co.update_(opt, {"w": x}, {"w": cupy.ones((4, 4), dtype=cupy.float32)})
    state = co.state_store(opt).get(x)[1]
    assert isinstance(state.mu, cupy.ndarray) and state.mu.device == x.device


def test_numpy_gradient_for_a_cupy_parameter_is_refused(cupy_backend):
    cupy = cupy_backend.xp
    with pytest.raises(
        UnsupportedArrayError, match=r"params\['w'\]: gradient is a numpy array but the parameter is a cupy"
    ):
        co.update_(co.Adam(), {"w": cupy.ones(3)}, {"w": np.ones(3)})


def test_gradient_on_another_gpu_is_refused(cupy_backend):
    cupy = cupy_backend.xp
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    x = cupy.ones(3)
    with cupy.cuda.Device(1):
        g = cupy.ones(3)
    with pytest.raises(UnsupportedArrayError, match="on device"):
        co.update_(co.Adam(), x, g)


@pytest.mark.parametrize("case", list(CASES))
def test_cupy_matches_numpy(cupy_backend, case):
    cupy = cupy_backend.xp
    on_gpu, on_cpu = CASES[case](), CASES[case]()
    host = {"W": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.linspace(2, 3, 4)}
    device = {k: cupy.asarray(v) for k, v in host.items()}
    for step in range(5):
        grads = {k: np.sin(v * (step + 1)) for k, v in host.items()}
        co.update_(on_cpu, host, grads)
        co.update_(on_gpu, device, {k: cupy.asarray(v) for k, v in grads.items()})
    for key in host:
        np.testing.assert_allclose(cupy.asnumpy(device[key]), host[key], rtol=1e-12, atol=1e-14)
