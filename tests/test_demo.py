"""Tests of the worked examples (``composeopt.demo``) and ``python -m composeopt``."""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import composeopt as co
from composeopt import demo
from composeopt.demo import cli, plots, runs

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
    two_left = demo.format_table(["a", "b", "n"], [["x", "yy", "1"], ["xx", "y", "22"]], left=2)
    assert two_left.splitlines() == ["a   b    n", "--  --  --", "x   yy   1", "xx  y   22"]


def test_main_demo_prints_the_three_parts(capsys, tmp_path):
    assert demo.main(["demo", "--quiet", "--steps", "40", "--plots", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "1. Linear regression" in out
    assert "2. Convergence test" in out
    assert "3. Rules side by side" in out
    assert "loss before" in out and "|x - x*|" in out
    assert "final eta: 0.001," in out
    assert "passes" in out and "fails" not in out
    assert out.count("exploded at iteration 5") == 2
    assert "converged in" in out
    table = [line for line in out.splitlines() if line.startswith(("Rosenbrock", "Beale", "Quartic", "MLP"))]
    assert len(table) == 4 * 7
    assert all(line.split()[-4] == "40" for line in table)  # the steps column
    assert captured.err == ""  # --quiet: no progress bar


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


# --------------------------------------------------------------------------
# 3. Rules side by side
# --------------------------------------------------------------------------


def numerical_gradient(f, p, h=1e-6):
    p = np.asarray(p, dtype=float)
    grad = np.zeros_like(p)
    for k in range(p.size):
        step = np.zeros_like(p)
        step[k] = h
        grad[k] = (float(np.sum(f(p + step))) - float(np.sum(f(p - step)))) / (2 * h)
    return grad


@pytest.mark.parametrize(
    ("f", "gradient", "point"),
    [
        (demo.rosenbrock, demo.rosenbrock_gradient, [-1.5, 2.0]),
        (demo.rosenbrock, demo.rosenbrock_gradient, [0.3, -0.7]),
        (demo.beale, demo.beale_gradient, [1.0, 1.5]),
        (demo.beale, demo.beale_gradient, [-0.4, 0.9]),
        (demo.quartic, demo.quartic_gradient, [2.0]),
        (demo.quartic, demo.quartic_gradient, [-0.6]),
    ],
)
def test_test_function_gradients_match_finite_differences(f, gradient, point):
    np.testing.assert_allclose(gradient(np.array(point)), numerical_gradient(f, point), rtol=1e-6, atol=1e-6)


def test_test_functions_vanish_at_their_minima():
    assert demo.rosenbrock(np.array([1.0, 1.0])) == 0
    assert demo.beale(np.array([3.0, 0.5])) == 0
    np.testing.assert_array_equal(demo.rosenbrock_gradient(np.array([1.0, 1.0])), [0, 0])
    np.testing.assert_array_equal(demo.beale_gradient(np.array([3.0, 0.5])), [0, 0])
    assert demo.quartic_gradient(np.array([demo.X_STAR]))[0] == 0
    assert demo.rosenbrock(np.array([-1.5, 2.0])) == pytest.approx(2.5**2 + 100 * 0.25**2)


def test_test_functions_take_grids():
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 3), np.linspace(0, 2, 4)))
    values = demo.beale(grid)
    assert values.shape == (4, 3)
    assert values[2, 1] == pytest.approx(float(demo.beale(grid[:, 2, 1])))


def test_mlp_gradient_matches_finite_differences():
    X, y = demo.two_spirals(n_per_arm=8, seed=5)
    params = demo.mlp_init(seed=5)
    _, grads = demo.mlp_loss_and_gradient(params, X, y)
    for name, value in params.items():
        index = (0,) * value.ndim
        saved = value[index]
        value[index] = saved + 1e-6
        up = demo.mlp_loss_and_gradient(params, X, y)[0]
        value[index] = saved - 1e-6
        down = demo.mlp_loss_and_gradient(params, X, y)[0]
        value[index] = saved
        assert grads[name][index] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-10), name


def test_problems_have_seven_rules_each_and_distinct_names():
    problems = demo.problems()
    assert [p.name for p in problems] == ["rosenbrock", "beale", "quartic", "mlp"]
    for problem in problems:
        labels = [demo.run_rule(problem, factory(), steps=1).rule for factory in problem.rules]
        assert len(labels) == 7 == len(set(labels))
        assert [label.split("(")[0] for label in labels] == [
            "Descent",
            "Momentum",
            "Nesterov",
            "RMSProp",
            "AdaGrad",
            "Adam",
            "AdaBelief",
        ]


def test_run_rule_records_losses_and_path_of_plain_descent():
    problem = demo.problems()[0]  # Rosenbrock from (-1.5, 2)
    run = demo.run_rule(problem, co.Descent(1e-4), steps=3)
    x = np.array([-1.5, 2.0])
    expected_path = [x.copy()]
    for _ in range(3):
        x = x - 1e-4 * demo.rosenbrock_gradient(x)
        expected_path.append(x)
    np.testing.assert_allclose(run.path, expected_path, rtol=1e-12)
    np.testing.assert_allclose(run.losses, [demo.rosenbrock(p) for p in expected_path], rtol=1e-12)
    assert run.steps == 3 and run.final_loss == run.losses[-1] and run.seconds >= 0
    assert run.problem == "rosenbrock" and run.rule == "Descent(0.0001)"


def test_a_diverging_run_stops_and_is_reported(capsys):
    problem = demo.problems()[0]
    run = demo.run_rule(problem, co.Descent(1.0), steps=100)  # far too large a step
    assert run.steps < 100 and not np.isfinite(run.final_loss)
    rows = demo.format_table(["rule"], [[run.rule]])
    assert "Descent(1)" in rows


def test_full_runs_reach_the_minima():
    problems = {p.name: p for p in demo.problems()}
    adam = demo.run_rule(problems["rosenbrock"], co.Adam(0.05))
    assert adam.steps == 3000 and adam.final_loss < 1e-12
    np.testing.assert_allclose(adam.path[-1], [1.0, 1.0], atol=1e-6)
    momentum = demo.run_rule(problems["quartic"], co.Momentum(0.01))
    assert momentum.path[-1][0] == pytest.approx(demo.X_STAR, abs=1e-6)
    descent = demo.run_rule(problems["quartic"], co.Descent(0.01))
    assert 0 < descent.path[-1][0] < 0.1  # stuck near the saddle at 0
    assert momentum.final_loss == pytest.approx(problems["quartic"].min_loss)


def test_mlp_problem_learns_with_adam():
    mlp = demo.problems()[3]
    run = demo.run_rule(mlp, co.Adam(0.01), steps=300)
    assert run.path is None
    assert run.losses[0] > 0.6 and run.final_loss < 0.3


def test_compare_rules_reports_progress_for_every_step():
    problems = demo.problems()[:2]
    seen = []
    results = demo.compare_rules(problems, steps=250, progress=seen.append)
    assert len(results) == 14
    assert sum(seen) == 250 * 14
    assert all(r.steps == 250 for r in results)


def test_save_plots_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    problems = demo.problems()
    results = demo.compare_rules(problems, steps=30)
    files = demo.save_plots(results, problems, tmp_path / "plots")
    assert [f.name for f in files] == [
        "rosenbrock_paths.png",
        "rosenbrock_loss.png",
        "beale_paths.png",
        "beale_loss.png",
        "quartic_paths.png",
        "quartic_loss.png",
        "mlp_loss.png",
    ]
    for file in files:
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and file.stat().st_size > 10_000


def comparison(name, steps=None):
    """One problem of the comparison and the runs of its seven rules."""
    problem = {p.name: p for p in demo.problems()}[name]
    return problem, [demo.run_rule(problem, factory(), steps) for factory in problem.rules]


def drawn(axes, rule):
    """The line that `axes` draws for `rule` (its gid)."""
    (line,) = [line for line in axes.get_lines() if line.get_gid() == rule]
    return line


def test_loss_plot_draws_the_gaps_that_the_table_reports():
    # The table says Adam ends at 7e-29 and AdaBelief at 2e-31: no floor may cut the curves.
    pytest.importorskip("matplotlib")
    problem, results = comparison("rosenbrock")
    assert min(run.final_loss for run in results) < 1e-30
    figure = plots.loss_figure(problem, results)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    for run in results:
        np.testing.assert_array_equal(drawn(axes, run.rule).get_ydata(), run.losses)
    assert axes.get_ylim()[0] <= min(run.final_loss for run in results)
    assert len(figure.axes) == 1  # no loss is 0 here: no strip for zeros


def test_loss_plot_marks_the_steps_where_the_loss_reaches_the_minimum():
    # On the quartic, loss - minimum reaches 0 (and rounding takes it below): those steps
    # cannot sit on a log scale, so a strip under it marks them, rule by rule.
    pytest.importorskip("matplotlib")
    problem, results = comparison("quartic")
    figure = plots.loss_figure(problem, results)
    curves, strip = figure.axes[:2]
    reached = 0
    for run in results:
        gap = np.asarray(run.losses) - problem.min_loss
        y = np.asarray(drawn(curves, run.rule).get_ydata())
        np.testing.assert_array_equal(np.isnan(y), gap <= 0)
        np.testing.assert_array_equal(y[gap > 0], gap[gap > 0])
        at_minimum = [line for line in strip.get_lines() if line.get_gid() == run.rule]
        steps = np.flatnonzero(gap <= 0)
        if steps.size:
            reached += 1
            np.testing.assert_array_equal(at_minimum[0].get_xdata(), steps)
        else:
            assert at_minimum == []
    assert reached == 3  # Momentum, Nesterov and AdaBelief roll through to the minimum
    notes = [text.get_text() for text in figure.legends[0].get_texts()]
    assert any("float64 spacing" in note for note in notes)


def test_loss_plot_tells_every_rule_apart_where_curves_coincide():
    # Descent, RMSProp, AdaGrad and Adam all stall at the quartic's saddle: one curve on the
    # log scale.  Each rule has its own colour, line style and marker, and the markers of
    # different rules fall on different steps, so that each stays visible.
    pytest.importorskip("matplotlib")
    problem, results = comparison("quartic")
    axes = plots.loss_figure(problem, results).axes[0]
    lines = [drawn(axes, run.rule) for run in results]
    for attribute in ("get_color", "get_marker"):
        assert len({str(getattr(line, attribute)()) for line in lines}) == 7, attribute
    assert len({str(linestyle) for _, linestyle, _ in plots.RULE_STYLES}) == 7
    marked = [frozenset(np.arange(len(line.get_xdata()))[line.get_markevery()]) for line in lines]
    assert all(a.isdisjoint(b) for k, a in enumerate(marked) for b in marked[k + 1 :])


@pytest.mark.parametrize("name", ["rosenbrock", "beale", "quartic"])
def test_path_plot_gives_every_rule_a_panel_with_the_start_and_the_minimum(name):
    pytest.importorskip("matplotlib")
    problem, results = comparison(name, steps=None if name == "quartic" else 300)
    figure = plots.paths_figure(problem, results)
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title().split("\n")[0] for axes in panels] == [run.rule for run in results]
    for axes, run in zip(panels, results):
        assert [
            line.get_gid() for line in axes.get_lines() if line.get_gid() in {r.rule for r in results}
        ] == [run.rule]
        path = drawn(axes, run.rule)
        np.testing.assert_array_equal(path.get_xdata(), run.path[:, 0])
        (x0, x1), (y0, y1) = axes.get_xlim(), axes.get_ylim()
        y = path.get_ydata()
        assert x0 <= run.path[:, 0].min() and run.path[:, 0].max() <= x1  # nothing drawn off the panel
        assert y0 <= np.min(y) and np.max(y) <= y1
    legend = [
        text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()
    ]
    assert any(text.startswith("start") for text in legend) and any(
        text.startswith("minimum") for text in legend
    )


@pytest.fixture
def short_regression(monkeypatch):
    """The demo's first part with 50 steps per case instead of 5000 to 20000."""
    cases = tuple((label, factory, 50) for label, factory, _ in demo.REGRESSION_CASES)
    monkeypatch.setattr(runs, "REGRESSION_CASES", cases)


def test_without_matplotlib_the_demo_explains_how_to_get_plots(
    monkeypatch, tmp_path, capsys, short_regression
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    files = demo.run_demo(plots=tmp_path / "plots", steps=5)
    out = capsys.readouterr().out
    assert files == []
    assert "pip install 'composeopt[demo]'" in out
    assert "3. Rules side by side" in out
    assert not (tmp_path / "plots").exists()


class Terminal(io.StringIO):
    """Standard error as a terminal: what is written to it stays readable."""

    def isatty(self):
        return True


def test_progress_bar_goes_to_stderr_on_a_terminal(monkeypatch, capsys, short_regression):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    demo.main(["demo", "--steps", "20", "--no-plots"])
    assert "comparison" in terminal.getvalue() and "linear regression" in terminal.getvalue()
    assert "comparison" not in capsys.readouterr().out


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys, short_regression):
    # capsys's standard error is no terminal, like a log file or a pipe: a bar redrawn with
    # carriage returns would only litter it.
    pytest.importorskip("tqdm")
    demo.main(["demo", "--steps", "20", "--no-plots"])
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "3. Rules side by side" in captured.out


def test_quiet_turns_the_bar_off_on_a_terminal_too(monkeypatch, short_regression):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    demo.main(["demo", "--steps", "5", "--no-plots", "--quiet"])
    assert terminal.getvalue() == ""


def test_progress_without_tqdm_is_silent(monkeypatch, short_regression):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    demo.main(["demo", "--steps", "5", "--no-plots"])
    assert terminal.getvalue() == ""


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        demo.main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--seed", "--steps", "--plots", "--no-plots", "--quiet"):
        assert option in out


def test_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["demo", "--steps", "0"])
    assert info.value.code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Bad arguments are refused before any work
# --------------------------------------------------------------------------


def refused(capsys, argv):
    """Run the command line with `argv`; return its error output after checking that it
    exited with status 2 and printed nothing of the demo."""
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("seed", ["-1", "-42"])
def test_a_negative_seed_is_refused_before_any_output(capsys, seed):
    err = refused(capsys, ["demo", "--quiet", "--no-plots", "--seed", seed])
    assert f"--seed must be a non-negative integer, got {seed}" in err


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_non_positive_step_count_is_refused_before_any_output(capsys, steps):
    err = refused(capsys, ["demo", "--quiet", "--no-plots", "--steps", steps])
    assert f"--steps must be at least 1, got {steps}" in err


def test_a_plots_directory_under_a_regular_file_is_refused_before_any_output(
    capsys, tmp_path, short_regression
):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    err = refused(capsys, ["demo", "--quiet", "--steps", "5", "--plots", str(blocker / "plots")])
    assert "--plots" in err and "cannot create" in err and "notes.txt" in err and "not a directory" in err


def test_a_plots_path_that_is_a_file_is_refused_before_any_output(capsys, tmp_path, short_regression):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "plots"
    blocker.write_text("a file, not a directory")
    err = refused(capsys, ["demo", "--quiet", "--steps", "5", "--plots", str(blocker)])
    assert "--plots" in err and "not a directory" in err


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_plots_directory_is_refused_before_any_output(capsys, tmp_path, short_regression):
    pytest.importorskip("matplotlib")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = refused(capsys, ["demo", "--quiet", "--steps", "5", "--plots", str(locked / "plots")])
    finally:
        locked.chmod(0o700)
    assert "--plots" in err and "cannot write" in err


def test_checking_the_plots_directory_creates_nothing(tmp_path):
    target = tmp_path / "new" / "plots"
    demo.check_plots_directory(target)
    assert list(tmp_path.iterdir()) == []


def test_run_demo_refuses_bad_arguments_before_printing(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    bad = [dict(seed=-1), dict(steps=0), dict(seed=True), dict(steps=2.5)]
    if cli._plots_possible():
        bad.append(dict(plots=blocker / "plots"))
    for arguments in bad:
        with pytest.raises(ValueError, match=f"--{next(iter(arguments))}"):
            demo.run_demo(**arguments)
    assert capsys.readouterr().out == ""


def test_without_matplotlib_the_plots_directory_is_not_checked(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    demo.check_arguments(plots=blocker / "plots")  # nothing will be written there


def test_python_dash_m_composeopt_refuses_a_negative_seed():
    done = subprocess.run(
        [sys.executable, "-m", "composeopt", "demo", "--quiet", "--seed", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--seed must be a non-negative integer" in done.stderr and "Traceback" not in done.stderr
