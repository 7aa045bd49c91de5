"""The CPU implementations of the benchmark: composeopt's paths and the installed peers.

Each is a factory `make(set_name, shapes)` that returns a step function, or
`None` to skip that set.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import _fused
from ..chain import Optimiser
from ..engine import update_
from ..flat import flatten
from ..rules.adam import Adam
from ..rules.clip import ClipValue
from ..rules.decay import WeightDecay
from .sets import B1, B2, CLIP, DECAY, EPS, LR, arrays

__all__ = ["Step", "Make", "implementations"]

Step = Callable[[], None]
Make = Callable[[str, list[tuple[int, ...]]], "Step | None"]


def _composeopt(mode: str) -> Make:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        opt = Optimiser(ClipValue(CLIP), WeightDecay(DECAY), Adam(LR)) if name == "chain" else Adam(LR)
        params, grads = arrays(shapes, 0), arrays(shapes, 1)
        if name == "many-flat":  # the arrays of "many", as views of one buffer
            flat = flatten(arrays([(1000,)] * (shapes[0][0] // 1000), 0))
            flat_grads = flat.zeros_like()
            flat_grads.data[...] = grads[0]
            params, grads = [flat.data], [flat_grads.data]

        def step() -> None:
            with _mode(mode):
                update_(opt, params, grads)

        return step

    return make


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    saved, _fused.MODE = _fused.MODE, mode
    try:
        yield
    finally:
        _fused.MODE = saved


def _numpy_textbook(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
    params, grads = arrays(shapes, 0), arrays(shapes, 1)
    ms = [np.zeros_like(x) for x in params]
    vs = [np.zeros_like(x) for x in params]
    t = [0]

    def step() -> None:
        t[0] += 1
        for x, g, m, v in zip(params, grads, ms, vs):
            if name == "chain":
                g = np.clip(g, -CLIP, CLIP) + DECAY * x
            m[...] = B1 * m + (1 - B1) * g
            v[...] = B2 * v + (1 - B2) * g * g
            x -= LR * (m / (1 - B1 ** t[0])) / (np.sqrt(v / (1 - B2 ** t[0])) + EPS)

    return step


def _numpy_out(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
    if name == "chain":
        return None
    params, grads = arrays(shapes, 0), arrays(shapes, 1)
    ms = [np.zeros_like(x) for x in params]
    vs = [np.zeros_like(x) for x in params]
    scratch = [np.empty_like(x) for x in params]
    t = [0]

    def step() -> None:
        t[0] += 1
        c1, c2 = 1 - B1 ** t[0], 1 - B2 ** t[0]
        for x, g, m, v, s in zip(params, grads, ms, vs, scratch):
            m *= B1
            np.multiply(g, 1 - B1, out=s)
            m += s
            v *= B2
            np.multiply(g, g, out=s)
            s *= 1 - B2
            v += s
            np.divide(v, c2, out=s)
            np.sqrt(s, out=s)
            s += EPS
            np.divide(m, s, out=s)
            s *= LR / c1
            x -= s

    return step


def _torch(variant: str) -> Make:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        import torch

        params = [torch.from_numpy(x).requires_grad_() for x in arrays(shapes, 0)]
        for p, g in zip(params, arrays(shapes, 1)):
            p.grad = torch.from_numpy(g)
        options = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[
            variant
        ]
        decay = DECAY if name == "chain" else 0.0
        opt = torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=decay, **options)

        def step() -> None:
            if name == "chain":
                torch.nn.utils.clip_grad_value_(params, CLIP)
            opt.step()

        return step

    return make


def _optax(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
    import jax
    import optax

    transform = optax.adam(LR, B1, B2, EPS)
    if name == "chain":
        transform = optax.chain(optax.clip(CLIP), optax.add_decayed_weights(DECAY), transform)
    params = [jax.device_put(x) for x in arrays(shapes, 0)]
    grads = [jax.device_put(g) for g in arrays(shapes, 1)]
    state = [transform.init(params)]
    box = [params]

    def apply(params: Any, state: Any, grads: Any) -> Any:
        updates, state = transform.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(apply, donate_argnums=(0, 1))

    def step() -> None:
        box[0], state[0] = update(box[0], state[0], grads)
        jax.block_until_ready(box[0])  # type: ignore[no-untyped-call]

    return step


def implementations(only: set[str] | None) -> dict[str, Make]:
    """The CPU rows by name: those whose name holds a word of `only`, or all of them."""
    impls: dict[str, Make] = {}
    if _fused._numba_available():
        impls["composeopt fused (numba)"] = _composeopt("auto")
    impls["composeopt fused (NumPy fallback)"] = _composeopt("numpy")
    impls["composeopt generic"] = _composeopt("off")
    impls["NumPy, textbook expressions"] = _numpy_textbook
    impls["NumPy in place (out=, scratch)"] = _numpy_out
    if importlib.util.find_spec("torch") is not None:
        for variant in ("for-loop", "foreach", "fused"):
            impls[f"torch.optim.Adam {variant}"] = _torch(variant)
    if importlib.util.find_spec("optax") is not None and importlib.util.find_spec("jax") is not None:
        impls["optax.adam, jax.jit"] = _optax
    if only:
        impls = {name: make for name, make in impls.items() if any(word in name for word in only)}
    return impls
