"""The training runs the sharded-checkpoint tests resume: small float64 trees, gradients that
are multiples of 1/1024 (so that sums over any split of the ranks are exact), and the chains
of the two shard modes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

import composeopt as co

MODES = ("flat", "whole")
STEPS_BEFORE, STEPS_AFTER = 3, 2


def rule(mode: str) -> Any:
    """The chain that each mode shards: elementwise with a tree-level clip, or per-array."""
    if mode == "flat":
        return co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-3))
    return co.Optimiser(co.ClipNorm(1.0), co.Adam(1e-3))


def params() -> dict[str, Any]:
    return {
        "layer": {"W": np.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": np.full(3, 0.25)},
        "out": [np.arange(5, dtype=np.float64) / 8],
    }


def grads(step: int) -> dict[str, Any]:
    """The mean gradient of `step`: integers from -8 to 8 over 1024 (a global norm under 1)."""

    def grad(shape: tuple[int, ...], salt: int) -> np.ndarray:
        n = int(np.prod(shape))
        return (((np.arange(n) * (7 + step) + 3 * salt + step) % 17 - 8) / 1024).reshape(shape)

    return {"layer": {"W": grad((4, 3), 1), "b": grad((3,), 2)}, "out": [grad((5,), 3)]}


def reference(mode: str, steps: int) -> dict[str, Any]:
    """The unsharded chain in one process after `steps` steps."""
    opt, tree = rule(mode), params()
    for step in range(steps):
        co.update_(opt, tree, grads(step))
    return tree


def flat(tree: Any) -> dict[str, np.ndarray]:
    from composeopt.tree import array_leaves

    return {str(path): np.array(x) for path, x in array_leaves(tree)}


def unflat(arrays: Any) -> dict[str, Any]:
    """`params()` with the values saved by `flat`."""
    tree = params()
    from composeopt.tree import array_leaves

    for path, x in array_leaves(tree):
        x[...] = arrays[str(path)]
    return tree


def snapshot(zopt: Any, tree: Any) -> tuple[bytes, dict[str, bytes]]:
    """Everything a load could change, as bytes: the inner state of this rank's pieces, its
    step and hyperparameters, and the params."""
    local = zopt.local_tree()
    plain = co.state_dict(zopt.rule, local)
    arrays: dict[str, bytes] = {}

    def strip(value: Any, where: str) -> Any:
        if isinstance(value, np.ndarray):
            arrays[where] = value.dtype.str.encode() + str(value.shape).encode() + value.tobytes()
            return "array"
        if isinstance(value, dict):
            return {key: strip(item, f"{where}/{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [strip(item, f"{where}/{i}") for i, item in enumerate(value)]
        return value

    text = json.dumps(strip(plain, ""), sort_keys=True).encode()
    for path, x in flat(tree).items():
        arrays["params" + path] = x.tobytes()
    return text, arrays
