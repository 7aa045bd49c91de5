"""A smoke test of the benchmark at a tiny size (timings are never asserted)."""

from __future__ import annotations

import json
import math

from composeopt import bench


def test_resnet50_has_its_161_arrays_and_25_6m_parameters():
    shapes = bench.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(math.prod(shape) for shape in shapes) == 25_557_032


def test_bench_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = bench.main(
        ["--scale", "0.0005", "--reps", "1", "--only", "composeopt,NumPy,optax", "--json", str(path)]
    )
    table = capsys.readouterr().out
    assert "ms per step (× floor" in table and "| composeopt generic |" in table
    assert all(row["floor_ms"] > 0 for row in report["results"])
    saved = json.loads(path.read_text())
    assert saved["results"] == report["results"]
    assert {row["set"] for row in saved["results"]} == set(bench.SETS)
    assert all(row["ms"] > 0 and row["x_floor"] > 0 for row in saved["results"])
