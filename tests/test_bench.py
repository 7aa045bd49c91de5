"""A smoke test of the benchmark at a tiny size (timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
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
        [
            "--sets",
            ",".join(bench.SETS),
            "--scale",
            "0.0005",
            "--reps",
            "1",
            "--only",
            "composeopt,NumPy,optax",
        ]
        + ["--json", str(path)]
    )
    table = capsys.readouterr().out
    assert "ms per step (× floor" in table and "| composeopt generic |" in table
    assert all(row["floor_ms"] > 0 for row in report["results"])
    saved = json.loads(path.read_text())
    assert saved["results"] == report["results"]
    assert {row["set"] for row in saved["results"]} == set(bench.SETS)
    assert "recipes" not in saved
    assert all(row["ms"] > 0 and row["x_floor"] > 0 for row in saved["results"])


def test_python_dash_m_composeopt_bench_keeps_its_options():
    done = subprocess.run(
        [sys.executable, "-m", "composeopt.bench", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m composeopt.bench")
    assert "recipes" in done.stdout
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


RECIPES = [
    "Adam(1e-3)",
    "ClipGlobalNorm(1) + Groups(1-D: AdamW wd 0, rest: AdamW wd 0.01)",
    "ClipNorm(1) + Adam()",
    "SkipNonFinite(Adam())",
    "Lamb()",
    "Lars()",
    "Novograd()",
    "Fromage()",
    "Adafactor()",
    "Muon() on ResNet-50's 54 matrices",
    "ScaleGradient(0.5) (a user rule) + Adam()",
]


def _check_recipe_rows(rows, installed):
    """Every recipe in order, then Adam on many arrays; a peer's row timed if `installed[peer]`."""
    assert list(dict.fromkeys(row["recipe"] for row in rows[:-1])) == RECIPES
    for row in rows[:-1]:
        assert {"recipe", "reference", "target", "arrays", "elements"} <= set(row)
        package = row["reference"].replace(".", " ").split()[0]  # "composeopt", "torch" or "optax"
        if package != "composeopt" and not installed[package]:
            assert "skipped" in row and "composeopt_ms" not in row
            continue
        assert "skipped" not in row
        assert row["composeopt_ms"] > 0 and row["reference_ms"] > 0 and row["reps"] >= 1
        assert row["ratio"] == pytest.approx(row["composeopt_ms"] / row["reference_ms"])
        assert row["met"] is (None if row["target"] is None else row["ratio"] <= row["target"])
    many = rows[-1]
    assert many["reference"] == "memory-traffic floor" and many["arrays"] >= 1
    assert many["met"] is (many["composeopt_ms"] <= many["target_ms"])


def test_the_recipes_set_times_every_recipe_beside_its_references(tmp_path, capsys, monkeypatch):
    from composeopt.bench import recipes

    # optax's five jit compilations would take most of a minute: one is timed in the next test.
    installed = recipes._missing
    monkeypatch.setattr(
        recipes,
        "_missing",
        lambda needs: [name for name in needs if name in ("jax", "optax") or name in installed(needs)],
    )
    path = tmp_path / "bench.json"
    report = bench.main(["--sets", "recipes", "--scale", "0.0005", "--reps", "1", "--json", str(path)])
    printed = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["recipes"] == report["recipes"] and "results" not in saved
    _check_recipe_rows(
        report["recipes"]["rows"], {"torch": importlib.util.find_spec("torch") is not None, "optax": False}
    )
    assert "| ClipNorm(1) + Adam() |" in printed and "met" in printed


def test_a_recipe_with_an_optax_reference_times_it_under_jit():
    pytest.importorskip("optax")
    from composeopt.bench import recipes

    lamb = next(recipe for recipe in recipes.recipes() if recipe.name == "Lamb()")
    rows = recipes.run_recipe(lamb, scale=0.0005, reps=1)
    assert [row["reference"] for row in rows] == ["composeopt Adam(1e-3)", "optax.lamb, jax.jit"]
    assert all(row["composeopt_ms"] > 0 and row["reference_ms"] > 0 for row in rows)
    assert rows[0]["target"] == 1.6 and rows[1]["target"] is None and rows[1]["met"] is None


def test_the_recipes_skip_peers_that_are_not_installed(monkeypatch):
    from composeopt.bench import recipes
    from composeopt.bench.report import recipes_table

    monkeypatch.setattr(recipes, "_missing", lambda needs: list(needs))
    report = recipes.recipes_report(scale=0.0005, reps=1)
    _check_recipe_rows(report["rows"], {"torch": False, "optax": False})
    skipped = [row for row in report["rows"] if "skipped" in row]
    assert {row["skipped"] for row in skipped} == {"torch not installed", "jax, optax not installed"}
    assert "skipped: torch not installed" in recipes_table(report)


def test_a_recipe_that_does_not_move_its_arrays_or_starts_elsewhere_is_refused():
    from composeopt.bench.recipes import Contender, time_bout

    moving = np.zeros(3, np.float32)
    still = np.zeros(3, np.float32)

    def step():
        moving[...] += 1

    with pytest.raises(RuntimeError, match="still left 1 of 1 arrays unchanged"):
        time_bout(
            {"moves": Contender(step, lambda: [moving]), "still": Contender(lambda: None, lambda: [still])}, 1
        )
    elsewhere = np.ones(3, np.float32)
    with pytest.raises(RuntimeError, match="elsewhere does not start from the same arrays"):
        time_bout(
            {"here": Contender(step, lambda: [still]), "elsewhere": Contender(step, lambda: [elsewhere])}, 1
        )


@pytest.mark.parametrize("mode", ["auto", "numpy"])
def test_the_bench_user_rule_s_kernel_gives_its_apply_s_result(mode, monkeypatch):
    import composeopt as co
    from composeopt import _fused
    from composeopt.bench.recipes import ScaleGradient

    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (5, 300, 7)]
    results = []
    for chosen in (mode, "off"):
        monkeypatch.setattr(_fused, "MODE", chosen)
        params = [np.linspace(-1, 1, g.size, dtype=np.float32) for g in grads]
        opt = co.Optimiser(ScaleGradient(0.25), co.Adam(0.1))
        for _ in range(3):
            co.update_(opt, params, grads)
        results.append(params)
    # A constant gradient: Adam's bias-corrected step is eta * sign(g) each time (up to epsilon).
    for x, g in zip(results[1], grads):
        start = np.linspace(-1, 1, g.size, dtype=np.float32)
        np.testing.assert_allclose(x, start - 3 * 0.1 * np.sign(g), rtol=1e-5, atol=1e-5)
    for fast, generic in zip(*results):
        np.testing.assert_array_equal(fast, generic)


def test_the_distributed_rows_are_made_and_shown():
    from composeopt.bench.distributed import distributed_report, distributed_table

    report = distributed_report(1 / 256, 2)
    one = report["one_rank"]
    assert one["composeopt_ms"] > 0 and one["reference_ms"] > 0
    if "skipped" not in report:
        assert set(report["ranks"]) == {"1", "2", "4"}
        halves = [report["ranks"][n]["state_MiB"] for n in ("1", "2", "4")]
        assert halves[1] == pytest.approx(halves[0] / 2, rel=0.05)
        assert halves[2] == pytest.approx(halves[0] / 4, rel=0.05)
    assert "AllReduceMean" in distributed_table(report)
