"""A smoke test of the benchmark at a tiny size (timings are never asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from composeopt import bench
from composeopt.bench import gpu as bench_gpu


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


def test_python_dash_m_composeopt_bench_keeps_its_options():
    done = subprocess.run(
        [sys.executable, "-m", "composeopt.bench", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m composeopt.bench")
    for option in ("--sets", "--quick", "--scale", "--reps", "--threads", "--only", "--json", "--device"):
        assert option in done.stdout


def test_an_unknown_set_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--sets", "big,huge"])
    assert info.value.code == 2
    assert "unknown sets ['huge']" in capsys.readouterr().err


def test_gpu_sets_are_refused_without_a_gpu(capsys):
    if bench_gpu.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--device", "gpu", "--scale", "0.0005", "--reps", "1"])
    assert "sees no GPU" in capsys.readouterr().err


@pytest.mark.cupy
def test_gpu_sets_run_and_report_copy_bandwidth(tmp_path, capsys):
    if not bench_gpu.gpu_available():
        pytest.skip("needs CuPy and a GPU")
    path = tmp_path / "bench.json"
    report = bench.main(["--device", "gpu", "--scale", "0.001", "--reps", "2", "--json", str(path)])
    assert "of copy" in capsys.readouterr().out
    gpu = json.loads(path.read_text())["gpu"]
    assert gpu["floor"]["copy_GB/s"] > 0 and gpu == report["gpu"]
    assert {row["impl"] for row in gpu["results"]} >= {"composeopt fused (CuPy)", "composeopt generic (CuPy)"}
    assert all(row["of_copy_bandwidth"] > 0 for row in gpu["results"])


def test_the_torch_adapter_row_times_both_optimizers():
    pytest.importorskip("torch")
    from composeopt.bench import adapter

    row = adapter.adapter_report(scale=1 / 256, reps=2)
    assert row["tensors"] == 8 and row["composeopt_ms"] > 0 and row["torch_fused_ms"] > 0
    assert "torch.optim.Adam(fused=True)" in adapter.adapter_line(row)
