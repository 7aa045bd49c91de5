"""The recipes benchmark: composeopt's common configurations beside what a user would pick instead.

Each recipe is one composeopt configuration and its references (torch.optim,
optax under `jax.jit`, or composeopt's plain `Adam(1e-3)`, "Adam alone"),
built from the same float32 arrays and timed in one interleaved loop: every
repetition steps each of them once, each after `timing.settle`, so all see
the same machine and start with idle cores.  A row is the median ms per step
of composeopt and of one reference, their ratio, and the target for it.

Arrays (the first axis multiplied by the set scale, so `--quick` is small):

* ResNet-50's 161 parameter arrays in their own shapes (`resnet50_shapes`),
  as a dict with torch-like names (`"007.weight"`, `"008.bias"`), so
  per-array rules see kernels, vectors and the fc matrix as they are;
* for Muon, ResNet-50's 54 matrices: the 53 convolution kernels laid out as
  `(out, in*kh*kw)`, the way Muon is given convolutions in practice, and the
  fc weight `(1000, 2048)`; Muon and `torch.optim.Muon` take only these;
* 1000 separate arrays of 1000 elements for Adam, timed beside the
  memory-traffic floor (`timing.floor_step`); its target is in ms, for 1000
  arrays (scaled with their number).

Before timing, every contender's first elements must equal the others' (the
same start); after the warm-up steps every array of every contender must
have moved (a configuration that does nothing would look fast).  Peers that
are not installed are skipped, with the reason in the report.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..chain import Optimiser
from ..engine import update_
from ..groups import Groups
from ..hyper import Hyper
from ..kernel import Kernel
from ..rule import Rule
from ..rules.adam import Adam, AdamW
from ..rules.clip import ClipGlobalNorm, ClipNorm
from ..rules.factored import Adafactor
from ..rules.layerwise import Fromage, Lamb, Lars, Novograd
from ..rules.muon import Muon
from ..rules.steps import SkipNonFinite
from ..tree import Path
from .sets import arrays, resnet50_shapes
from .timing import floor_step, settle, time_beside

__all__ = ["ScaleGradient", "recipes_report"]

Shapes = list[tuple[int, ...]]

LR = 1e-3
BOUT_SECONDS = 2.0
"""A bout's timed repetitions stop after this many seconds (with at least `MIN_REPS`, at most
`--reps`), so that the slow configurations of today keep the whole run near two minutes."""
MIN_REPS = 3
WARM_UP_ROUNDS = 3
"""Untimed rounds first: the first step compiles and allocates; the fast path's repeat-step
cache learns a tree in two steps and compiles its loop on the third."""
SLOW_ROUND_SECONDS = 5.0
"""A round of steps this slow ends the warm-up: what the later rounds warm up costs
milliseconds, which a step that slow does not show."""
MANY_ARRAYS_TARGET_MS = 0.7
"""The target for Adam on 1000 arrays of 1000 elements, in ms per step."""

MUON: dict[str, Any] = {
    "lr": LR,
    "weight_decay": 0.1,
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "eps": 1e-7,
}
"""torch.optim.Muon's defaults in torch 2.13, written out so that both sides are given the same."""


class ScaleGradient(Rule):
    """A rule as a user writes one: `ScaleGradient(factor=0.5)`, the update `factor * dx`.

    Its math is written once, in the kernel language; the generic path
    interprets it, and the fast path fuses it with the rules around it.
    """

    factor: Hyper[float] = Hyper(default=0.5)
    kernel = Kernel("return factor * dx")


def _is_vector(path: Path, x: Any) -> bool:
    """The selector of the no-weight-decay group: biases and batch-norm scales, torch's usual split."""
    return bool(x.ndim == 1)


# The arrays.


def _scaled(shapes: Shapes, scale: float) -> Shapes:
    return [(max(1, int(shape[0] * scale)), *shape[1:]) for shape in shapes]


def resnet50(scale: float) -> Shapes:
    """ResNet-50's parameter shapes, the first axis (output channels, classes) times `scale`."""
    return _scaled(resnet50_shapes(), scale)


def resnet50_matrices(scale: float) -> Shapes:
    """ResNet-50's kernels as `(out, in*kh*kw)` matrices and its fc weight, rows times `scale`."""
    matrices: Shapes = [(shape[0], math.prod(shape[1:])) for shape in resnet50_shapes() if len(shape) > 1]
    return _scaled(matrices, scale)


@functools.lru_cache(maxsize=4)
def _drawn(shapes: tuple[tuple[int, ...], ...], seed: int) -> list[np.ndarray]:
    return arrays(list(shapes), seed)


def _fresh(shapes: Shapes, seed: int) -> list[np.ndarray]:
    """`arrays(shapes, seed)`, copied from the first draw: copying is ten times faster than drawing."""
    return [x.copy() for x in _drawn(tuple(shapes), seed)]


def _names(shapes: Shapes) -> list[str]:
    return [f"{index:03d}.{'weight' if len(shape) > 1 else 'bias'}" for index, shape in enumerate(shapes)]


# The contenders: each built from `arrays(shapes, 0)` and gradients `arrays(shapes, 1)`.


@dataclass
class Contender:
    """One timed step, and the arrays it updates (to check that it starts where the others do
    and that it moves them)."""

    step: Callable[[], None]
    params: Callable[[], list[Any]]


Build = Callable[[Shapes], Contender]


def composeopt(make_rule: Callable[[], Rule]) -> Build:
    def build(shapes: Shapes) -> Contender:
        opt = make_rule()
        params = dict(zip(_names(shapes), _fresh(shapes, 0)))
        grads = dict(zip(_names(shapes), _fresh(shapes, 1)))

        def step() -> None:
            update_(opt, params, grads)

        return Contender(step, lambda: list(params.values()))

    return build


def _torch_params(shapes: Shapes) -> list[Any]:
    import torch

    params = [torch.from_numpy(x).requires_grad_() for x in _fresh(shapes, 0)]
    for p, g in zip(params, _fresh(shapes, 1)):
        p.grad = torch.from_numpy(g)
    return params


def torch_adam(shapes: Shapes) -> Contender:
    import torch

    params = _torch_params(shapes)
    opt = torch.optim.Adam(params, lr=LR, fused=True)
    return Contender(opt.step, lambda: [p.detach().numpy() for p in params])


def torch_clipped_adamw(shapes: Shapes) -> Contender:
    import torch

    params = _torch_params(shapes)
    groups = [
        {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0},
        {"params": [p for p in params if p.ndim != 1], "weight_decay": 0.01},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, fused=True)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    return Contender(step, lambda: [p.detach().numpy() for p in params])


def torch_muon(shapes: Shapes) -> Contender:
    import torch

    params = _torch_params(shapes)
    opt = torch.optim.Muon(params, **MUON)
    return Contender(opt.step, lambda: [p.detach().numpy() for p in params])


def composeopt_muon() -> Rule:
    """`Muon` doing torch's work: the same momentum, Nesterov, Newton–Schulz steps, eps, decay and
    shape factor (`"original"` is torch's `adjust_lr_fn=None`)."""
    return Muon(
        MUON["lr"],
        rho=MUON["momentum"],
        nesterov=MUON["nesterov"],
        ns_steps=MUON["ns_steps"],
        lambda_=MUON["weight_decay"],
        epsilon=MUON["eps"],
        shape_scaling="original",
    )


def optax_jit(make_transform: Callable[[Any], Any]) -> Build:
    """`make_transform(optax)`'s update and `apply_updates`, in one `jax.jit` with donated buffers."""

    def build(shapes: Shapes) -> Contender:
        import jax
        import optax

        transform = make_transform(optax)
        grads = [jax.device_put(g) for g in _fresh(shapes, 1)]
        params = [jax.device_put(x) for x in _fresh(shapes, 0)]
        box = [params, transform.init(params)]

        def apply(params: Any, state: Any, grads: Any) -> Any:
            updates, state = transform.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        update = jax.jit(apply, donate_argnums=(0, 1))

        def step() -> None:
            box[0], box[1] = update(box[0], box[1], grads)
            jax.block_until_ready(box[0])  # type: ignore[no-untyped-call]

        return Contender(step, lambda: list(box[0]))

    return build


# The optax settings of composeopt's defaults, as each rule's docstring gives them.


def _optax_lamb(optax: Any) -> Any:
    rule = Lamb()
    return optax.lamb(rule.eta, *rule.beta, eps=rule.epsilon, weight_decay=rule.lambda_)


def _optax_lars(optax: Any) -> Any:
    rule = Lars()
    return optax.lars(
        rule.eta,
        weight_decay=rule.lambda_,
        trust_coefficient=rule.trust_coefficient,
        eps=rule.epsilon,
        momentum=rule.momentum,
        nesterov=rule.nesterov,
    )


def _optax_novograd(optax: Any) -> Any:
    rule = Novograd()
    return optax.novograd(rule.eta, *rule.beta, eps=rule.epsilon, weight_decay=rule.lambda_)


def _optax_fromage(optax: Any) -> Any:
    rule = Fromage()
    return optax.fromage(rule.eta, rule.min_norm)


def _optax_adafactor(optax: Any) -> Any:
    rule = Adafactor()
    return optax.adafactor(
        rule.eta,
        min_dim_size_to_factor=rule.min_dim_size_to_factor,
        decay_rate=rule.decay_rate,
        decay_offset=rule.decay_offset,
        multiply_by_parameter_scale=rule.multiply_by_parameter_scale,
        clipping_threshold=rule.clipping_threshold,
        momentum=rule.momentum or None,
        weight_decay_rate=rule.lambda_ or None,
        eps=rule.epsilon,
        factored=rule.factored,
    )


# The recipes.


@dataclass(frozen=True)
class Reference:
    """What a recipe is timed against, and the ratio composeopt should reach."""

    name: str
    build: Build
    needs: tuple[str, ...]  # the packages it imports
    target: float | None  # composeopt's ms over the reference's, at most; None: shown only


@dataclass(frozen=True)
class Recipe:
    """A composeopt configuration, its references, and the arrays they step."""

    name: str
    ours: Build
    references: tuple[Reference, ...]
    shapes: Callable[[float], Shapes] = resnet50


ADAM_ALONE = "composeopt Adam(1e-3)"
TORCH, OPTAX = ("torch",), ("jax", "optax")


def _alone(target: float) -> Reference:
    return Reference(ADAM_ALONE, composeopt(lambda: Adam(LR)), (), target)


def recipes() -> list[Recipe]:
    """Every recipe, in the order of the report."""
    layerwise = [
        (f"{rule.__name__}()", rule, optax_rule, target)
        for rule, optax_rule, target in (
            (Lamb, _optax_lamb, 1.6),
            (Lars, _optax_lars, 1.6),
            (Novograd, _optax_novograd, 1.6),
            (Fromage, _optax_fromage, 1.6),
            (Adafactor, _optax_adafactor, 1.2),
        )
    ]
    return [
        Recipe(
            "Adam(1e-3)",
            composeopt(lambda: Adam(LR)),
            (Reference("torch.optim.Adam(fused=True)", torch_adam, TORCH, None),),
        ),
        Recipe(
            "ClipGlobalNorm(1) + Groups(1-D: AdamW wd 0, rest: AdamW wd 0.01)",
            composeopt(
                lambda: Optimiser(
                    ClipGlobalNorm(1.0),
                    Groups((_is_vector, AdamW(LR, lambda_=0.0)), default=AdamW(LR, lambda_=0.01)),
                )
            ),
            (
                Reference(
                    "torch clip_grad_norm_(foreach) + AdamW(fused), 2 groups", torch_clipped_adamw, TORCH, 0.9
                ),
            ),
        ),
        Recipe(
            "ClipNorm(1) + Adam()", composeopt(lambda: Optimiser(ClipNorm(1.0), Adam(LR))), (_alone(1.3),)
        ),
        Recipe("SkipNonFinite(Adam())", composeopt(lambda: SkipNonFinite(Adam(LR))), (_alone(1.25),)),
        *(
            Recipe(
                name,
                composeopt(rule),
                (
                    _alone(target),
                    Reference(f"optax.{rule.__name__.lower()}, jax.jit", optax_jit(optax_rule), OPTAX, None),
                ),
            )
            for name, rule, optax_rule, target in layerwise
        ),
        Recipe(
            "Muon() on ResNet-50's 54 matrices",
            composeopt(composeopt_muon),
            (Reference("torch.optim.Muon (its NS in bfloat16)", torch_muon, TORCH, 1.0),),
            resnet50_matrices,
        ),
        Recipe(
            "ScaleGradient(0.5) (a user rule) + Adam()",
            composeopt(lambda: Optimiser(ScaleGradient(0.5), Adam(LR))),
            (_alone(1.15),),
        ),
    ]


# Timing.


def _start(params: list[Any]) -> list[np.ndarray]:
    """The first and last four elements of every array, in float64."""
    flats = [np.asarray(x).reshape(-1) for x in params]
    return [np.concatenate([flat[:4], flat[-4:]]).astype(np.float64) for flat in flats]


def _check_moved(name: str, before: list[np.ndarray], after: list[np.ndarray]) -> None:
    still = sum(np.array_equal(old, new) for old, new in zip(before, after))
    if still:
        raise RuntimeError(f"recipes: {name} left {still} of {len(before)} arrays unchanged")


def time_bout(contenders: dict[str, Contender], reps: int) -> tuple[dict[str, float], int]:
    """Median seconds per step of each contender, stepped in turn, and the rounds timed: `reps`,
    or fewer once `BOUT_SECONDS` have passed (never fewer than `MIN_REPS`)."""
    starts = {name: _start(contender.params()) for name, contender in contenders.items()}
    first = next(iter(starts.values()))
    for name, start in starts.items():
        if len(start) != len(first) or not all(map(np.array_equal, start, first)):
            raise RuntimeError(f"recipes: {name} does not start from the same arrays as the others")
    for _ in range(WARM_UP_ROUNDS):
        began = time.perf_counter()
        for contender in contenders.values():
            settle()
            contender.step()
        if time.perf_counter() - began > SLOW_ROUND_SECONDS:
            break
    for name, contender in contenders.items():
        _check_moved(name, starts[name], _start(contender.params()))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    began = time.perf_counter()
    taken = 0
    while taken < reps and (taken < MIN_REPS or time.perf_counter() - began < BOUT_SECONDS):
        for name, contender in contenders.items():
            settle()  # torch's and XLA's threads spin after their step: each starts with idle cores
            tick = time.perf_counter()
            contender.step()
            samples[name].append(time.perf_counter() - tick)
        taken += 1
    return {name: statistics.median(times) for name, times in samples.items()}, taken


def _missing(needs: tuple[str, ...]) -> list[str]:
    return [package for package in needs if importlib.util.find_spec(package) is None]


def _met(value: float, target: float | None) -> bool | None:
    return None if target is None else value <= target


def run_recipe(recipe: Recipe, scale: float, reps: int) -> list[dict[str, Any]]:
    """The rows of one recipe: composeopt against each of its installed references."""
    shapes = recipe.shapes(scale)
    common = {
        "recipe": recipe.name,
        "arrays": len(shapes),
        "elements": sum(math.prod(shape) for shape in shapes),
    }
    rows: list[dict[str, Any]] = []
    present = []
    for reference in recipe.references:
        missing = _missing(reference.needs)
        if missing:
            rows.append(
                {
                    **common,
                    "reference": reference.name,
                    "target": reference.target,
                    "skipped": f"{', '.join(missing)} not installed",
                }
            )
        else:
            present.append(reference)
    if not present:
        return rows
    contenders = {"composeopt": recipe.ours(shapes), **{ref.name: ref.build(shapes) for ref in present}}
    seconds, taken = time_bout(contenders, reps)
    del contenders
    gc.collect()
    for reference in present:
        ratio = seconds["composeopt"] / seconds[reference.name]
        rows.append(
            {
                **common,
                "reference": reference.name,
                "composeopt_ms": 1e3 * seconds["composeopt"],
                "reference_ms": 1e3 * seconds[reference.name],
                "ratio": ratio,
                "target": reference.target,
                "met": _met(ratio, reference.target),
                "reps": taken,
            }
        )
    return rows


def many_arrays_row(scale: float, reps: int) -> dict[str, Any]:
    """Adam on 1000 arrays of 1000 elements (their number times `scale`), beside the floor."""
    count = max(1, int(1000 * scale))
    shapes: Shapes = [(1000,)] * count
    contender = composeopt(lambda: Adam(LR))(shapes)
    before = _start(contender.params())
    floor, how = floor_step(1000 * count)
    contender.step()  # with time_beside's two warm-up steps, the repeat-step cache is built
    # A small step is cheap to repeat, and its median needs more samples to settle.
    seconds, floor_seconds = time_beside(contender.step, floor, 5 * reps, wait=(False, False))
    _check_moved("Adam on many arrays", before, _start(contender.params()))
    target = MANY_ARRAYS_TARGET_MS * count / 1000
    return {
        "recipe": f"Adam(1e-3) on {count} arrays of 1000",
        "arrays": count,
        "elements": 1000 * count,
        "reference": "memory-traffic floor",
        "floor_measured_with": how,
        "composeopt_ms": 1e3 * seconds,
        "reference_ms": 1e3 * floor_seconds,
        "ratio": seconds / floor_seconds,
        "target_ms": target,
        "met": _met(1e3 * seconds, target),
        "reps": 5 * reps,
    }


def recipes_report(scale: float, reps: int) -> dict[str, Any]:
    """Every recipe's rows, then Adam on many arrays; float32 throughout."""
    rows = [row for recipe in recipes() for row in run_recipe(recipe, scale, reps)]
    rows.append(many_arrays_row(scale, reps))
    _drawn.cache_clear()
    return {
        "scale": scale,
        "versions": {name: _version(name) for name in ("numpy", "torch", "jax", "optax")},
        "rows": rows,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
