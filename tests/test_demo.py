"""Tests of the worked examples (``composeopt.demo``) and ``python -m composeopt``."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import composeopt as co
from composeopt import demo

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# 1. Linear regression (Flux.jl)
# --------------------------------------------------------------------------


def test_linear_regression_loss_drops_a_hundredfold():
    result = demo.linear_regression(steps=2000)
    assert result["steps"] == 2000
    assert result["loss_before"] > 1.0
    assert result["loss_after"] < result["loss_before"] / 100


def test_linear_regression_is_reproducible():
    first = demo.linear_regression(steps=50, seed=7)
    second = demo.linear_regression(steps=50, seed=7)
    other = demo.linear_regression(steps=50, seed=8)
    assert first == second
    assert first["loss_before"] != other["loss_before"]


def test_expdecay_reaches_the_clip_at_steps_1000_to_4000_as_in_flux():
    result = demo.linear_regression(steps=5000)
    expected = []
    eta = 1.0
    for step in (1000, 2000, 3000, 4000):
        # the rule multiplies eta in place, so the expected values are the same
        # running products (1.0 * 0.1 * 0.1 * 0.1 rounds a little above 1e-3)
        new = max(eta * 0.1, 1e-3)
        expected.append((step, eta, new))
        eta = new
    assert result["eta_changes"] == expected
    assert result["eta"] == 1e-3


def test_expdecay_with_a_short_decay_step_follows_the_closed_form():
    # decay by 0.5 every 10 steps from 0.1, clipped at 1e-3: powers of two keep it exact
    opt = co.Optimiser(co.ExpDecay(0.1, 0.5, 10, 1e-3), co.Descent(1.0))
    result = demo.linear_regression(opt, steps=100)
    steps = [step for step, _, _ in result["eta_changes"]]
    assert steps == [10, 20, 30, 40, 50, 60, 70]
    assert [after for _, _, after in result["eta_changes"]] == [max(0.1 * 0.5**k, 1e-3) for k in range(1, 8)]
    assert opt[0].eta == 1e-3


def test_linear_regression_without_a_decay_reports_no_eta():
    result = demo.linear_regression(co.Descent(0.5), steps=200)
    assert "eta" not in result and "eta_changes" not in result
    assert result["loss_after"] < result["loss_before"]


# --------------------------------------------------------------------------
# 2. Convergence test (TensorFlow Core)
# --------------------------------------------------------------------------


def test_quartic_gradient_overflows_quietly():
    grad = demo.quartic_gradient(np.array([1e30, -1e30], dtype=np.float32))
    assert not np.isfinite(grad).any()


def test_descent_first_steps_by_hand():
    # x = 2: gradient 8*8 + 9*4 = 100, x -> 2 - 0.1*100 = -8;
    # x = -8: gradient 8*(-512) + 9*64 = -3520, x -> -8 + 352 = 344.
    one = demo.convergence_test(co.Descent, 0.1, max_iters=1)
    assert (one.outcome, one.iterations, one.x) == ("exceeded", 1, -8.0)
    two = demo.convergence_test(co.Descent, 0.1, max_iters=2)
    assert two.x == pytest.approx(344.0, rel=1e-6)


@pytest.mark.parametrize("factory", [co.Descent, co.Momentum])
def test_rate_one_tenth_explodes_at_iteration_5(factory):
    # 344 -> about -3.3e7 -> about 2.8e22, whose cube overflows float32 at iteration 5.
    result = demo.convergence_test(factory, 0.1)
    assert (result.outcome, result.iterations) == ("exploded", 5)
    assert result.describe() == "exploded at iteration 5"


@pytest.mark.parametrize(("factory", "lr"), [(co.Adam, 0.1), (co.Momentum, 0.01), (co.Momentum, 0.001)])
def test_converging_runs_reach_the_minimiser(factory, lr):
    result = demo.convergence_test(factory, lr)
    assert result.outcome == "converged"
    assert result.iterations < 2000
    assert result.describe() == f"converged in {result.iterations} iterations"
    assert result.error < 1e-4
    assert abs(result.x - (-1.125)) == result.error


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_small_rate_descent_stalls_near_the_saddle(lr):
    result = demo.convergence_test(co.Descent, lr)
    assert (result.outcome, result.iterations) == ("exceeded", 2000)
    assert result.describe() == "exceeded 2000 iterations"
    assert 0 < result.x < 0.1


def test_convergence_table_has_the_nine_runs():
    results = demo.convergence_table(max_iters=20)
    assert [(r.rule, r.lr) for r in results] == [
        (name, lr) for name in ("Descent", "Momentum", "Adam") for lr in (1e-3, 1e-2, 1e-1)
    ]


# --------------------------------------------------------------------------
# Printing and the command line
# --------------------------------------------------------------------------


def test_format_table_aligns_columns():
    text = demo.format_table(["name", "n"], [["a", "1"], ["bbb", "22"]])
    assert text.splitlines() == ["name   n", "----  --", "a      1", "bbb   22"]


def test_main_demo_prints_both_tables(capsys):
    assert demo.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1. Linear regression" in out
    assert "2. Convergence test" in out
    assert "loss before" in out and "|x - x*|" in out
    assert "final eta: 0.001," in out
    assert "passes" in out and "fails" not in out
    assert out.count("exploded at iteration 5") == 2
    assert "converged in" in out


def test_main_without_a_command_prints_help(capsys):
    assert demo.main([]) == 0
    assert "usage: python -m composeopt" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_python_dash_m_composeopt_help():
    done = subprocess.run(
        [sys.executable, "-m", "composeopt", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout


def test_dunder_main_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "composeopt.__main__", raising=False)
    monkeypatch.setattr(sys, "argv", ["composeopt"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("composeopt", run_name="__main__")
    assert info.value.code == 0
    assert "usage: python -m composeopt" in capsys.readouterr().out
