"""The benchmark's GPU sets (`python -m composeopt.bench --device gpu`): CuPy against torch on CUDA.

The same sets and the same Adam as on the CPU, on CuPy arrays.  The floor
is a CuPy kernel with Adam's traffic (`x += g; m += g; v += g`), timed
alternately with each row; besides, the device's copy bandwidth is measured
once (`cupy.copyto` of the big set's size), and each row gives the share of
it that the step reaches (28 bytes per element moved, over the step's time).
Every step is followed by a device synchronisation, so that its time
includes the kernels it launched.  torch runs where `torch.cuda` is
available; missing peers are skipped.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import numpy as np

from ..chain import Optimiser
from ..engine import update_
from ..flat import flatten
from ..rules.adam import Adam
from ..rules.clip import ClipValue
from ..rules.decay import WeightDecay
from .peers import Make, Step
from .sets import B1, B2, BYTES_PER_ELEMENT, CLIP, DECAY, EPS, LR, shapes
from .timing import run

__all__ = ["gpu_available", "implementations", "floor_step", "copy_bandwidth", "gpu_report"]


def gpu_available() -> bool:
    """Whether CuPy is installed and sees a GPU."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # no driver, no device: CuPy raises its own CUDA errors
        return False


def _synchronize() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


def _arrays(shapes: list[tuple[int, ...]], seed: int) -> list[Any]:
    import cupy

    rng = np.random.default_rng(seed)
    return [cupy.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes]


def _composeopt(mode: str) -> Make:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        from .. import _fused

        opt = Optimiser(ClipValue(CLIP), WeightDecay(DECAY), Adam(LR)) if name == "chain" else Adam(LR)
        params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
        if name == "many-flat":  # the arrays of "many", as views of one buffer: one launch
            flat = flatten(_arrays([(1000,)] * (shapes[0][0] // 1000), 0))
            flat_grads = flat.zeros_like()
            flat_grads.data[...] = grads[0]
            params, grads = [flat.data], [flat_grads.data]

        def step() -> None:
            saved, _fused.MODE = _fused.MODE, mode
            try:
                update_(opt, params, grads)
            finally:
                _fused.MODE = saved
            _synchronize()

        return step

    return make


def _torch(variant: str) -> Make:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        import torch

        rng = np.random.default_rng(0)
        params = [
            torch.tensor(rng.standard_normal(shape, dtype=np.float32), device="cuda").requires_grad_()
            for shape in shapes
        ]
        for p in params:
            p.grad = torch.randn_like(p)
        options = {"foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
        weight_decay = DECAY if name == "chain" else 0.0
        opt = torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=weight_decay, **options)

        def step() -> None:
            if name == "chain":
                torch.nn.utils.clip_grad_value_(params, CLIP)
            opt.step()
            torch.cuda.synchronize()

        return step

    return make


def implementations(only: set[str] | None = None) -> dict[str, Make]:
    """The GPU rows: composeopt's CuPy kernels and generic path, and torch on CUDA if it has it;
    those whose name holds a word of `only`, or all of them."""
    impls: dict[str, Make] = {
        "composeopt fused (CuPy)": _composeopt("auto"),
        "composeopt generic (CuPy)": _composeopt("off"),
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            for variant in ("foreach", "fused"):
                impls[f"torch.optim.Adam {variant} (CUDA)"] = _torch(variant)
    if only:
        impls = {name: make for name, make in impls.items() if any(word in name for word in only)}
    return impls


def floor_step(elements: int) -> tuple[Step, str]:
    """A CuPy kernel with Adam's traffic over `elements` float32 elements."""
    import cupy

    kernel = cupy.ElementwiseKernel("T g", "T x, T m, T v", "x += g; m += g; v += g;", "composeopt_floor")
    x, g, m, v = _arrays([(elements,)] * 4, 2)

    def step() -> None:
        kernel(g, x, m, v)
        _synchronize()

    return step, "CuPy kernel, x += g; m += g; v += g"


def copy_bandwidth(elements: int, reps: int) -> float:
    """The device's copy bandwidth in GB/s (bytes read plus bytes written), median of `reps` copies."""
    import cupy

    source = cupy.ones(elements, dtype=cupy.float32)
    target = cupy.empty_like(source)
    cupy.copyto(target, source)
    _synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        cupy.copyto(target, source)
        _synchronize()
        times.append(time.perf_counter() - start)
    return float(2 * source.nbytes / float(np.median(times)) / 1e9)


def gpu_report(sets: list[str], only: set[str] | None, scale: float, reps: int) -> dict[str, Any]:
    """The GPU sets, and each row's share of the device's copy bandwidth."""
    import cupy

    copy = copy_bandwidth(int(np.prod(shapes("big", scale)[0])), reps)
    results, how = run(sets, implementations(only), floor_step, scale, reps)
    for row in results:
        row["of_copy_bandwidth"] = row["GB/s"] / copy
    return {
        "machine": {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "threads": "GPU"},
        "floor": {"bytes_per_element": BYTES_PER_ELEMENT, "measured_with": how, "copy_GB/s": copy},
        "results": results,
    }
