"""The benchmark's printed results: a Markdown table per device, the head-to-head line, the recipes."""

from __future__ import annotations

import statistics
from typing import Any

from .sets import BYTES_PER_ELEMENT

__all__ = ["table", "head_to_head_line", "recipes_table"]


def table(report: dict[str, Any], sets: list[str]) -> str:
    """A Markdown table of `report["results"]`: ms per step and the ratio to the floor, per set."""
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


def head_to_head_line(rows: list[dict[str, Any]]) -> str:
    """One line: composeopt's fused step over torch's fused one, per set."""
    cells = ", ".join(
        f"{row['set']} {row['composeopt_ms']:.2f} / {row['torch_fused_ms']:.2f} ms = {row['ratio']:.2f}×"
        for row in rows
    )
    return f"composeopt fused (numba) / torch.optim.Adam fused, timed alternately: {cells}"


def recipes_table(report: dict[str, Any]) -> str:
    """A Markdown table of `report["rows"]`: composeopt and its reference, their ratio, the target."""
    lines = [
        f"Recipes, float32: median ms per step, each beside its references (scale {report['scale']:g})",
        "| recipe | composeopt ms | reference | reference ms | ratio | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "target_ms" in row:
            target = f"≤ {row['target_ms']:.3g} ms"
        else:
            target = "—" if row["target"] is None else f"≤ {row['target']:.2f}×"
        if "skipped" in row:
            cells = ["—", row["reference"], "—", "—", target, f"skipped: {row['skipped']}"]
        else:
            met = {True: "met", False: "not met", None: ""}[row["met"]]
            times = [f"{row['composeopt_ms']:.2f}", row["reference"], f"{row['reference_ms']:.2f}"]
            cells = [*times, f"{row['ratio']:.2f}×", target, met]
        lines.append("| " + " | ".join([row["recipe"], *cells]) + " |")
    return "\n".join(lines)
