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
`composeopt.bench_gpu`), against torch on CUDA and the device's copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _fused, bench_gpu
from .chain import Optimiser
from .engine import update_
from .flat import flatten
from .rules.adam import Adam
from .rules.clip import ClipValue
from .rules.decay import WeightDecay

__all__ = ["main", "resnet50_shapes"]

BYTES_PER_ELEMENT = 28  # float32 x, g, m, v read; x, m, v written
SETS = ("big", "resnet50", "many", "many-flat", "chain")
LR, B1, B2, EPS, CLIP, DECAY = 1e-3, 0.9, 0.999, 1e-8, 1.0, 1e-4

Step = Callable[[], None]
SETTLE_SECONDS = 0.02


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


def _shapes(name: str, scale: float) -> list[tuple[int, ...]]:
    def scaled(n: int) -> int:
        return max(1, int(n * scale))

    if name in ("big", "chain"):
        return [(scaled(1 << 24),)]
    if name == "resnet50":
        return [(scaled(int(np.prod(shape))),) for shape in resnet50_shapes()]
    count = scaled(1000)
    return [(1000,)] * count if name == "many" else [(1000 * count,)]


def _arrays(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


# --- implementations: each returns a step function for a set, or None to skip it ----------


def _composeopt(mode: str) -> Callable[[str, list[tuple[int, ...]]], Step | None]:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        opt = Optimiser(ClipValue(CLIP), WeightDecay(DECAY), Adam(LR)) if name == "chain" else Adam(LR)
        params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
        if name == "many-flat":  # the arrays of "many", as views of one buffer
            flat = flatten(_arrays([(1000,)] * (shapes[0][0] // 1000), 0))
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
    params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
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
    params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
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


def _torch(variant: str) -> Callable[[str, list[tuple[int, ...]]], Step | None]:
    def make(name: str, shapes: list[tuple[int, ...]]) -> Step | None:
        import torch

        params = [torch.from_numpy(x).requires_grad_() for x in _arrays(shapes, 0)]
        for p, g in zip(params, _arrays(shapes, 1)):
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
    params = [jax.device_put(x) for x in _arrays(shapes, 0)]
    grads = [jax.device_put(g) for g in _arrays(shapes, 1)]
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


def _floor_step(elements: int) -> tuple[Step, str]:
    """The same-traffic loop over `elements` float32 elements, and how it is done."""
    x, g, m, v = _arrays([(elements,)] * 4, 2)
    if _fused._numba_available():
        from ._fused._numba_floor import same_traffic
        from ._fused.threads import run_chunks

        def step() -> None:
            run_chunks(lambda job, lo, hi: same_traffic(lo, hi, x, g, m, v), [elements])

        how = "numba loop, x += g; m += g; v += g"
    else:

        def step() -> None:
            np.add(x, g, out=x)
            np.add(m, g, out=m)
            np.add(v, g, out=v)

        how = "three NumPy adds (no numba: an estimate)"
    return step, how


def _settle() -> None:
    """Wait `SETTLE_SECONDS` without sleeping.

    OpenMP threads (torch's) and XLA's spin for several milliseconds after their work, on
    the cores that the next call needs: the call after such a step waits for them to go
    idle, so that it does not pay for the step before it.  Busy, not asleep, so that this
    thread's core stays awake.  Other steps are followed at once, as an optimiser step
    follows the backward pass: waiting costs a small step its warm cores.
    """
    end = time.perf_counter() + SETTLE_SECONDS
    while time.perf_counter() < end:
        pass


def _spins(impl: str) -> bool:
    """Whether the implementation leaves threads spinning after a step (see `_settle`)."""
    return impl.startswith(("torch", "optax"))


def _time_beside(step: Step, floor: Step, reps: int, settle: tuple[bool, bool]) -> tuple[float, float]:
    """Median seconds of `step` and of `floor`, timed alternately: on a shared machine both
    see the same conditions, so their ratio is steadier than either time.  `settle` says
    whether to `_settle` before `step` and before `floor`."""
    for _ in range(2):
        step()
        floor()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for function, samples, wait in ((step, times[0], settle[0]), (floor, times[1], settle[1])):
            if wait:
                _settle()
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _implementations(only: set[str] | None) -> dict[str, Callable[[str, list[tuple[int, ...]]], Step | None]]:
    impls: dict[str, Callable[[str, list[tuple[int, ...]]], Step | None]] = {}
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m composeopt.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {','.join(SETS)}")
    parser.add_argument("--quick", action="store_true", help="arrays 16 times smaller, fewer repetitions")
    parser.add_argument("--scale", type=float, default=None, help="multiply every set's size by this")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=None, help="threads for composeopt and torch")
    parser.add_argument(
        "--only", default="", help="comma-separated words: run implementations whose name has one"
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="auto: the CPU sets, and the GPU sets too when CuPy sees a GPU",
    )
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (1 / 16 if args.quick else 1.0)
    reps = args.reps or (5 if args.quick else 15)
    if args.threads:
        os.environ["COMPOSEOPT_NUM_THREADS"] = str(args.threads)
    from ._fused.threads import thread_count

    threads = thread_count()
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)
    sets = [name for name in args.sets.split(",") if name]
    unknown = set(sets) - set(SETS)
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}")
    only = {word for word in args.only.split(",") if word} or None
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads},
        "scale": scale,
        "reps": reps,
    }
    if args.device in ("auto", "cpu"):
        results, how = _run(sets, _implementations(only), _floor_step, scale, reps)
        report.update(floor={"bytes_per_element": BYTES_PER_ELEMENT, "measured_with": how}, results=results)
        print(_table(report, sets))
        impls = _implementations(None)
        pair = ("composeopt fused (numba)", "torch.optim.Adam fused")
        if all(name in impls for name in pair) and (only is None or any(word in pair[0] for word in only)):
            report["head_to_head"] = _head_to_head(sets, impls[pair[0]], impls[pair[1]], scale, reps)
            print(_head_to_head_line(report["head_to_head"]))
    if args.device == "gpu" and not bench_gpu.gpu_available():
        parser.error("--device gpu: CuPy sees no GPU")
    if args.device in ("auto", "gpu") and bench_gpu.gpu_available():
        report["gpu"] = _gpu_report(sets, only, scale, reps)
        print(_table(report["gpu"], sets))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return report


def _run(
    sets: list[str],
    impls: dict[str, Callable[[str, list[tuple[int, ...]]], Step | None]],
    floor_step: Callable[[int], tuple[Step, str]],
    scale: float,
    reps: int,
) -> tuple[list[dict[str, Any]], str]:
    """Every implementation on every set, each timed alternately with the set's floor."""
    results: list[dict[str, Any]] = []
    how = ""
    for set_name in sets:
        shapes = _shapes(set_name, scale)
        elements = sum(int(np.prod(shape)) for shape in shapes)
        floor, how = floor_step(elements)
        for impl, make in impls.items():
            step = make(set_name, shapes)
            if step is None:
                continue
            seconds, floor_seconds = _time_beside(step, floor, reps, settle=(False, _spins(impl)))
            ms, floor_ms = 1e3 * seconds, 1e3 * floor_seconds
            results.append(
                {
                    "impl": impl,
                    "set": set_name,
                    "arrays": len(shapes),
                    "elements": elements,
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "GB/s": BYTES_PER_ELEMENT * elements / seconds / 1e9,
                    "floor_GB/s": BYTES_PER_ELEMENT * elements / floor_seconds / 1e9,
                    "x_floor": ms / floor_ms,
                }
            )
            del step
            gc.collect()
        del floor
    return results, how


def _head_to_head(
    sets: list[str],
    ours: Callable[[str, list[tuple[int, ...]]], Step | None],
    theirs: Callable[[str, list[tuple[int, ...]]], Step | None],
    scale: float,
    reps: int,
) -> list[dict[str, Any]]:
    """composeopt's fused step and torch's, timed alternately with each other on every set:
    rows of the main table are timed one after the other, so on a shared machine they drift
    apart by more than the few per cent between these two."""
    rows = []
    for set_name in sets:
        shapes = _shapes(set_name, scale)
        step, other = ours(set_name, shapes), theirs(set_name, shapes)
        if step is None or other is None:
            continue
        # Both wait before their turn: torch's threads go idle, and each starts from the same state.
        their_seconds, our_seconds = _time_beside(other, step, reps, settle=(True, True))
        rows.append(
            {
                "set": set_name,
                "composeopt_ms": 1e3 * our_seconds,
                "torch_fused_ms": 1e3 * their_seconds,
                "ratio": our_seconds / their_seconds,
            }
        )
        del step, other
        gc.collect()
    return rows


def _head_to_head_line(rows: list[dict[str, Any]]) -> str:
    cells = ", ".join(
        f"{row['set']} {row['composeopt_ms']:.2f} / {row['torch_fused_ms']:.2f} ms = {row['ratio']:.2f}×"
        for row in rows
    )
    return f"composeopt fused (numba) / torch.optim.Adam fused, timed alternately: {cells}"


def _gpu_report(sets: list[str], only: set[str] | None, scale: float, reps: int) -> dict[str, Any]:
    """The GPU sets, and each row's share of the device's copy bandwidth."""
    import cupy

    impls = bench_gpu.implementations((LR, CLIP, DECAY), (B1, B2), EPS)
    if only:
        impls = {name: make for name, make in impls.items() if any(word in name for word in only)}
    copy = bench_gpu.copy_bandwidth(int(np.prod(_shapes("big", scale)[0])), reps)
    results, how = _run(sets, impls, bench_gpu.floor_step, scale, reps)
    for row in results:
        row["of_copy_bandwidth"] = row["GB/s"] / copy
    return {
        "machine": {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "threads": "GPU"},
        "floor": {"bytes_per_element": BYTES_PER_ELEMENT, "measured_with": how, "copy_GB/s": copy},
        "results": results,
    }


def _table(report: dict[str, Any], sets: list[str]) -> str:
    cells: dict[str, dict[str, str]] = {}
    for row in report["results"]:
        cell = f"{row['ms']:.2f} ms ({row['x_floor']:.2f}×"
        if "of_copy_bandwidth" in row:
            cell += f", {100 * row['of_copy_bandwidth']:.0f} % of copy"
        cells.setdefault(row["impl"], {})[row["set"]] = cell + ")"
    floors: dict[str, list[float]] = {}
    for row in report["results"]:
        floors.setdefault(row["set"], []).append(row["floor_ms"])
    header = [
        "implementation",
        *(f"{name} (floor {statistics.median(floors.get(name, [0.0])):.2f} ms)" for name in sets),
    ]
    where = report["machine"].get("device") or f"{report['machine']['threads']} threads"
    copy = report["floor"].get("copy_GB/s")
    lines = [
        f"Adam float32, ms per step (× floor, the floor timed alternately with each row); floor: "
        f"{BYTES_PER_ELEMENT} B/element, {report['floor']['measured_with']}; {where}"
        + (f"; device copy bandwidth {copy:.0f} GB/s" if copy else ""),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for impl, row in cells.items():
        lines.append("| " + " | ".join([impl, *(row.get(name, "—") for name in sets)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
