"""`python -m composeopt.bench`: the command line, and the report it prints and saves."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from typing import Any

from . import adapter, gpu
from .peers import implementations
from .report import head_to_head_line, recipes_table, table
from .sets import BYTES_PER_ELEMENT, DISTRIBUTED, RECIPES, SETS
from .timing import floor_step, head_to_head, run

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m composeopt.bench`."""
    parser = argparse.ArgumentParser(
        prog="python -m composeopt.bench",
        description="ms per optimiser step, against the memory-traffic floor and peers.",
    )
    every = ",".join((*SETS, RECIPES, DISTRIBUTED))
    parser.add_argument(
        "--sets", default=every, help=f"comma-separated, from {every} (recipes: see composeopt.bench.recipes)"
    )
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
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with the command-line arguments `argv`; print and return its report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (1 / 16 if args.quick else 1.0)
    reps = args.reps or (5 if args.quick else 15)
    if args.threads:
        os.environ["COMPOSEOPT_NUM_THREADS"] = str(args.threads)
    from .._fused.threads import thread_count

    threads = thread_count()
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)
    sets = [name for name in args.sets.split(",") if name]
    unknown = set(sets) - {*SETS, RECIPES, DISTRIBUTED}
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}")
    adam_sets = [name for name in sets if name not in (RECIPES, DISTRIBUTED)]
    only = {word for word in args.only.split(",") if word} or None
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads},
        "scale": scale,
        "reps": reps,
    }
    if args.device in ("auto", "cpu") and adam_sets:
        results, how = run(adam_sets, implementations(only), floor_step, scale, reps)
        report.update(floor={"bytes_per_element": BYTES_PER_ELEMENT, "measured_with": how}, results=results)
        print(table(report, adam_sets))
        impls = implementations(None)
        pair = ("composeopt fused (numba)", "torch.optim.Adam fused")
        if all(name in impls for name in pair) and (only is None or any(word in pair[0] for word in only)):
            report["head_to_head"] = head_to_head(adam_sets, impls[pair[0]], impls[pair[1]], scale, reps)
            print(head_to_head_line(report["head_to_head"]))
        if adapter.available() and (only is None or "torch" in only):
            report["torch_adapter"] = adapter.adapter_report(scale, reps)
            print(adapter.adapter_line(report["torch_adapter"]))
    if args.device in ("auto", "cpu") and RECIPES in sets:
        from .recipes import recipes_report

        report["recipes"] = recipes_report(scale, reps)
        print(recipes_table(report["recipes"]))
    if args.device in ("auto", "cpu") and DISTRIBUTED in sets:
        from .distributed import distributed_report, distributed_table

        report["distributed"] = distributed_report(scale, reps)
        print(distributed_table(report["distributed"]))
    if args.device == "gpu" and not gpu.gpu_available():
        parser.error("--device gpu: CuPy sees no GPU")
    if args.device in ("auto", "gpu") and adam_sets and gpu.gpu_available():
        report["gpu"] = gpu.gpu_report(adam_sets, only, scale, reps)
        print(table(report["gpu"], adam_sets))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return report
