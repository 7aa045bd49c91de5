"""`python -m composeopt.bench`: ms per optimiser step, against the memory-traffic floor and peers.

An Adam step must read x, g, m, v and write x, m, v: 28 bytes per float32
element.  The floor is the time of a loop with exactly that traffic
(`x += g; m += g; v += g`) over the same number of elements, on the same
threads, timed alternately with each implementation in the same run.  Sets:

* `big`: one array of 16.8M elements;
* `resnet50`: ResNet-50's 161 parameter arrays (25.6M elements);
* `many`: 1000 arrays of 1000 elements (composeopt also as one flat buffer:
  `many-flat`, see `flatten`);
* `chain`: `Optimiser(ClipValue(1), WeightDecay(1e-4), Adam())` on `big`.

Peers that are installed run side by side (torch.optim for-loop, foreach and
fused; optax under `jax.jit`; plain NumPy written two ways); missing ones
are skipped.  Timings are medians of `--reps` steps after two warm-up steps.
Where CuPy sees a GPU, the same sets run there too (`--device`, see
`composeopt.bench.gpu`), against torch on CUDA and the device's copy bandwidth.

The modules, one job each: `sets` (the arrays and Adam's settings), `peers`
(the CPU implementations), `timing` (the floor and the alternating timer),
`gpu` (the CuPy sets), `report` (the printed tables) and `cli` (the command
line).  `import composeopt` loads none of them.
"""

from __future__ import annotations

from .cli import main
from .sets import SETS, resnet50_shapes

__all__ = ["SETS", "main", "resnet50_shapes"]
