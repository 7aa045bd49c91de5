"""The benchmark's sets of arrays and the Adam settings every implementation uses."""

from __future__ import annotations

import numpy as np

__all__ = [
    "BYTES_PER_ELEMENT",
    "SETS",
    "RECIPES",
    "DISTRIBUTED",
    "LR",
    "B1",
    "B2",
    "EPS",
    "CLIP",
    "DECAY",
    "resnet50_shapes",
    "shapes",
    "arrays",
]

BYTES_PER_ELEMENT = 28  # float32 x, g, m, v read; x, m, v written
SETS = ("big", "resnet50", "many", "many-flat", "chain")
RECIPES = "recipes"
"""The set name of `composeopt.bench.recipes`: its own arrays and rows, not an Adam set of `shapes`."""
DISTRIBUTED = "distributed"
"""The set name of `composeopt.bench.distributed`: the data-parallel rows."""
LR, B1, B2, EPS, CLIP, DECAY = 1e-3, 0.9, 0.999, 1e-8, 1.0, 1e-4


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The shapes of torchvision's ResNet-50 parameters, in order (161 arrays, 25,557,032 elements)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(4 * planes, planes, 1, 1), (4 * planes,), (4 * planes,)]
            if block == 0:
                shapes += [(4 * planes, inplanes, 1, 1), (4 * planes,), (4 * planes,)]
            inplanes = 4 * planes
    return shapes + [(1000, 2048), (1000,)]


def shapes(name: str, scale: float) -> list[tuple[int, ...]]:
    """The shapes of the set `name` with every size multiplied by `scale` (ResNet-50's arrays flattened)."""

    def scaled(n: int) -> int:
        return max(1, int(n * scale))

    if name in ("big", "chain"):
        return [(scaled(1 << 24),)]
    if name == "resnet50":
        return [(scaled(int(np.prod(shape))),) for shape in resnet50_shapes()]
    count = scaled(1000)
    return [(1000,)] * count if name == "many" else [(1000 * count,)]


def arrays(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    """Standard-normal float32 arrays of the given shapes."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
