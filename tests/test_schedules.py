"""Schedules: values against the published formulas, torch.optim.lr_scheduler and optax,
and schedules driving any hyperparameter of any rule, once per optimiser step."""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import HyperparameterError

N = 60

# --- formulas (t = step - 1), written out independently -----------------------------


def test_constant_step_multistep_exponential():
    assert co.Constant(0.3).preview(3) == [0.3, 0.3, 0.3]
    assert co.Step(1.0, 2, 0.5).preview(6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert co.MultiStep(1.0, [2, 5], 0.1).preview(7) == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert co.Exponential(2.0, 0.5).preview(4) == [2.0, 1.0, 0.5, 0.25]


def test_mindspore_style_decays():
    # lr * rate^(t / steps); staircase floors the exponent.  Values at t = 0..5, steps = 2.
    t = np.arange(6)
    np.testing.assert_allclose(co.ExponentialDecay(0.1, 0.9, 2).preview(6), 0.1 * 0.9 ** (t / 2), rtol=1e-15)
    np.testing.assert_allclose(
        co.ExponentialDecay(0.1, 0.9, 2, True).preview(6), 0.1 * 0.9 ** (t // 2), rtol=1e-15
    )
    np.testing.assert_allclose(
        co.InverseTimeDecay(0.1, 0.5, 2).preview(6), 0.1 / (1 + 0.5 * t / 2), rtol=1e-15
    )
    np.testing.assert_allclose(
        co.NaturalExpDecay(0.1, 0.5, 2, True).preview(6), 0.1 * np.exp(-0.5 * (t // 2)), rtol=1e-15
    )


def test_polynomial_decay_with_and_without_cycle():
    # (0.1 - 0.01) * (1 - min(t, 4) / 4)^2 + 0.01
    expected = [0.1, 0.060625, 0.0325, 0.015625, 0.01, 0.01]
    np.testing.assert_allclose(co.PolynomialDecay(0.1, 0.01, 4, 2.0).preview(6), expected, rtol=1e-13)
    # cycle: at t = 5 the horizon becomes 8: (0.09) * (1 - 5/8) + 0.01
    cyclic = co.PolynomialDecay(0.1, 0.01, 4, 1.0, cycle=True)
    assert cyclic(1) == pytest.approx(0.1)
    assert cyclic(5) == pytest.approx(0.01)
    assert cyclic(6) == pytest.approx(0.09 * (1 - 5 / 8) + 0.01)


def test_piecewise_constant_and_join():
    schedule = co.PiecewiseConstant([2, 4], [1.0, 0.5, 0.1])
    assert schedule.preview(6) == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    joined = co.Join([co.Linear(0.0, 1.0, 2), co.Constant(5.0), co.Exponential(1.0, 0.5)], [2, 3])
    assert joined.preview(6) == [0.0, 0.5, 5.0, 1.0, 0.5, 0.25]
    assert co.Sequence is co.Join


def test_cosine_linear_warmup():
    cosine = co.CosineAnnealing(1.0, 4, 0.2)
    expected = [0.2 + 0.8 * (1 + math.cos(math.pi * min(t, 4) / 4)) / 2 for t in range(7)]
    np.testing.assert_allclose(cosine.preview(7), expected, rtol=1e-15)
    assert co.Linear(1.0, 3.0, 4).preview(6) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    warm = co.Warmup(co.Constant(2.0), 4, start=0.0)
    assert warm.preview(6) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert co.Warmup(0.1, 2).preview(3) == [0.0, 0.05, 0.1]


def test_warm_restarts_cycle_lengths_grow():
    schedule = co.CosineAnnealingWarmRestarts(1.0, 2, 2, 0.0)
    # cycles of 2, 4, 8 steps: restarts (value 1.0) at t = 0, 2, 6, 14
    values = schedule.preview(16)
    assert [t for t, v in enumerate(values) if v == 1.0] == [0, 2, 6, 14]
    assert values[4] == pytest.approx(0.0 + (1 + math.cos(math.pi * 2 / 4)) / 2)


def test_triangle_and_cyclic_modes():
    assert co.Triangle(0.0, 1.0, 4).preview(9) == [0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0]
    halving = co.Cyclic(0.0, 1.0, 1, mode="triangular2")
    assert halving.preview(5) == [0.0, 1.0, 0.0, 0.5, 0.0]


def test_bad_schedule_arguments_raise():
    for make in (
        lambda: co.Step(1.0, 0),
        lambda: co.MultiStep(1.0, [5, 2]),
        lambda: co.PiecewiseConstant([1], [1.0]),
        lambda: co.Join([co.Constant(1.0)], [3]),
        lambda: co.OneCycle(1.0, 10, pct_start=1.5),
        lambda: co.Cyclic(0.0, 1.0, mode="sine"),
        lambda: co.Triangle(0.0, 1.0, 3),
    ):
        with pytest.raises(HyperparameterError):
            make()


def test_schedules_print_and_round_trip():
    schedule = co.Warmup(co.Join([co.CosineAnnealing(1e-3, 100), co.Constant(1e-5)], [100]), 10)
    assert eval(repr(schedule), vars(co)) == schedule
    assert repr(co.Step(0.1, 10)) == "Step(value=0.1, step_size=10, gamma=0.1)"


# --- torch.optim.lr_scheduler (an independent implementation; skipped without torch) ----

TORCH_CASES = {
    "StepLR": (lambda s, o: s.StepLR(o, 7, 0.5), co.Step(0.1, 7, 0.5)),
    "MultiStepLR": (lambda s, o: s.MultiStepLR(o, [5, 20, 21], 0.3), co.MultiStep(0.1, [5, 20, 21], 0.3)),
    "ExponentialLR": (lambda s, o: s.ExponentialLR(o, 0.95), co.Exponential(0.1, 0.95)),
    "CosineAnnealingLR": (
        lambda s, o: s.CosineAnnealingLR(o, N - 1, 1e-3),
        co.CosineAnnealing(0.1, N - 1, 1e-3),
    ),
    "CosineAnnealingWarmRestarts": (
        lambda s, o: s.CosineAnnealingWarmRestarts(o, 5, 2, 1e-4),
        co.CosineAnnealingWarmRestarts(0.1, 5, 2, 1e-4),
    ),
    "LinearLR": (lambda s, o: s.LinearLR(o, 0.25, 0.75, 30), co.Linear(0.025, 0.075, 30)),
    "PolynomialLR": (lambda s, o: s.PolynomialLR(o, 40, 2.0), co.PolynomialDecay(0.1, 0.0, 40, 2.0)),
    "OneCycleLR": (lambda s, o: s.OneCycleLR(o, 0.1, total_steps=N), co.OneCycle(0.1, N)),
    "OneCycleLR-linear-3phase": (
        lambda s, o: s.OneCycleLR(
            o, 0.1, total_steps=N, anneal_strategy="linear", three_phase=True, pct_start=0.25
        ),
        co.OneCycle(0.1, N, pct_start=0.25, anneal="linear", three_phase=True),
    ),
    "CyclicLR": (
        lambda s, o: s.CyclicLR(o, 0.01, 0.1, step_size_up=4, step_size_down=6, cycle_momentum=False),
        co.Cyclic(0.01, 0.1, 4, 6),
    ),
    "CyclicLR-triangular2": (
        lambda s, o: s.CyclicLR(o, 0.01, 0.1, step_size_up=5, mode="triangular2", cycle_momentum=False),
        co.Cyclic(0.01, 0.1, 5, mode="triangular2"),
    ),
    "CyclicLR-exp_range": (
        lambda s, o: s.CyclicLR(
            o, 0.01, 0.1, step_size_up=5, mode="exp_range", gamma=0.97, cycle_momentum=False
        ),
        co.Cyclic(0.01, 0.1, 5, mode="exp_range", gamma=0.97),
    ),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_schedule_matches_torch_lr_scheduler(name):
    torch = pytest.importorskip("torch")
    make_scheduler, schedule = TORCH_CASES[name]
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = make_scheduler(torch.optim.lr_scheduler, optimiser)
    torch_values = []
    for _ in range(N):
        torch_values.append(optimiser.param_groups[0]["lr"])  # the rate the step at t uses
        optimiser.step()
        scheduler.step()
    np.testing.assert_allclose(schedule.preview(N), torch_values, rtol=1e-10, atol=1e-15)


# --- optax schedules (an independent implementation; skipped without optax) -------------

OPTAX_CASES = {
    "exponential_decay": (
        lambda o: o.exponential_decay(0.1, 3, 0.8, staircase=True),
        co.ExponentialDecay(0.1, 0.8, 3, True),
    ),
    "cosine_decay_schedule": (
        lambda o: o.cosine_decay_schedule(0.1, 40, alpha=0.1),
        co.CosineAnnealing(0.1, 40, 0.01),
    ),
    "warmup_cosine_decay_schedule": (
        lambda o: o.warmup_cosine_decay_schedule(0.0, 0.1, 10, 50, end_value=0.001),
        co.Warmup(co.CosineAnnealing(0.1, 40, 0.001), 10),
    ),
    "polynomial_schedule": (
        lambda o: o.polynomial_schedule(0.1, 0.01, 3.0, 30),
        co.PolynomialDecay(0.1, 0.01, 30, 3.0),
    ),
    "linear_schedule": (lambda o: o.linear_schedule(0.0, 0.1, 25), co.Linear(0.0, 0.1, 25)),
    "join_schedules": (
        lambda o: o.join_schedules([o.linear_schedule(0.0, 0.1, 10), o.constant_schedule(0.05)], [10]),
        co.Join([co.Linear(0.0, 0.1, 10), co.Constant(0.05)], [10]),
    ),
}


@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_schedule_matches_optax(name):
    optax = pytest.importorskip("optax")
    make, schedule = OPTAX_CASES[name]
    reference = make(optax)
    expected = [float(reference(t)) for t in range(N)]  # optax counts from 0
    np.testing.assert_allclose(schedule.preview(N), expected, rtol=1e-6, atol=1e-9)


# --- schedules on hyperparameters ------------------------------------------------------


def test_learning_rate_schedule_drives_the_step():
    schedule = co.Linear(1.0, 0.0, 4)
    opt = co.Descent(eta=schedule)
    x = np.zeros(1)
    for step in range(1, 7):
        before = x.copy()
        co.update_(opt, x, np.ones(1))
        np.testing.assert_allclose(before - x, [schedule(step)])
        assert opt.eta == schedule(step)


def test_schedule_is_evaluated_once_per_optimiser_step_not_per_parameter():
    calls = []

    def schedule(step):
        calls.append(step)
        return 0.1

    opt = co.Optimiser(co.WeightDecay(0.0), co.Descent(eta=schedule))
    params = {"a": np.ones(2), "b": np.ones(3), "c": [np.ones(1)]}
    assert calls == [1]  # validated at construction
    for _ in range(3):
        co.update_(opt, params, {"a": np.ones(2), "b": np.ones(3), "c": [np.ones(1)]})
    assert calls == [1, 1, 2, 3]


def test_any_hyperparameter_of_any_rule_can_follow_a_schedule():
    opt = co.Optimiser(
        co.ClipValue(thresh=co.Step(1.0, 1, 0.5)),
        co.WeightDecay(lambda_=co.Linear(0.0, 0.2, 2)),
        co.Momentum(eta=0.1, rho=co.Constant(0.5)),
        co.Adam(beta=(co.Linear(0.5, 0.9, 2), 0.999)),
    )
    x = np.array([2.0])
    co.update_(opt, x, np.array([4.0]))
    co.update_(opt, x, np.array([4.0]))
    assert opt[0].thresh == 0.5 and opt[1].lambda_ == pytest.approx(0.1)
    assert opt[3].beta == (0.7, 0.999) and opt[2].rho == 0.5
    values = co.hyperparameters(opt)
    assert values["[0].thresh"] == 0.5 and values["[3].beta"] == (0.7, 0.999) and values["[2].eta"] == 0.1


def test_scheduled_momentum_matches_a_hand_computed_run():
    rho = co.Linear(0.0, 0.5, 1)  # rho = 0 at step 1, 0.5 after
    opt = co.Momentum(eta=1.0, rho=rho)
    x = np.zeros(1)
    co.update_(opt, x, np.array([1.0]))  # v = 1
    co.update_(opt, x, np.array([1.0]))  # v = 0.5 * 1 + 1
    np.testing.assert_allclose(x, [-(1.0 + 1.5)])


def test_assigning_a_number_replaces_the_schedule():
    opt = co.Descent(eta=co.Exponential(1.0, 0.5))
    x = np.zeros(1)
    co.update_(opt, x, np.ones(1))
    opt.eta = 0.01
    assert "Exponential" not in repr(opt)
    co.update_(opt, x, np.ones(1))
    np.testing.assert_allclose(x, [-1.01])


def test_schedule_repr_round_trips_inside_a_rule():
    opt = co.Optimiser(co.Adam(eta=co.CosineAnnealing(1e-3, 100)), co.ClipNorm(1.0))
    assert "CosineAnnealing(value=0.001, t_max=100, eta_min=0.0)" in repr(opt)
    assert eval(repr(opt), vars(co)) == opt


def test_a_schedule_reaching_an_invalid_value_fails_the_step_atomically():
    opt = co.Optimiser(co.ExpDecay(1.0, 0.5, 1), co.Momentum(eta=co.Linear(0.1, -0.1, 2)))
    x = np.array([1.0])
    co.update_(opt, x, np.ones(1))  # eta = 0.1
    co.update_(opt, x, np.ones(1))  # eta = 0.0
    velocity = co.state_store(opt).get(x)[1].v.copy()
    value, decayed = x.copy(), opt[0].eta
    with pytest.raises(
        HyperparameterError, match=r"Momentum\.eta: .*got -0\.1 \(from Linear\(.*\) at step 3\)"
    ):
        co.update_(opt, x, np.ones(1))
    np.testing.assert_array_equal(x, value)
    np.testing.assert_array_equal(co.state_store(opt).get(x)[1].v, velocity)
    assert opt[0].eta == decayed and co.state_store(opt).step == 2
    with pytest.raises(HyperparameterError):
        co.Adam(eta=co.Linear(-1.0, 1.0, 3))  # invalid already at step 1


# --- every field of every schedule is checked at construction ---------------------------

NAN = float("nan")
NOT_A_NUMBER = ["0.1", None, True, NAN, 1j]  # wanted: a finite real number
NOT_A_COUNT = ["5", None, True, 2.5, 5.0, NAN]  # wanted: an integer
NOT_A_FLAG = [1, 0, "yes", None]

VALID_SCHEDULES = {
    "Constant": dict(value=0.1),
    "Step": dict(value=0.1, step_size=10, gamma=0.5),
    "MultiStep": dict(value=0.1, milestones=(5, 10), gamma=0.5),
    "Exponential": dict(value=0.1, gamma=0.9),
    "ExponentialDecay": dict(value=0.1, decay_rate=0.5, decay_steps=10, staircase=False),
    "InverseTimeDecay": dict(value=0.1, decay_rate=0.5, decay_steps=10, staircase=True),
    "NaturalExpDecay": dict(value=0.1, decay_rate=0.5, decay_steps=10, staircase=False),
    "PolynomialDecay": dict(value=0.1, end_value=0.0, decay_steps=10, power=2.0, cycle=False),
    "PiecewiseConstant": dict(boundaries=(5, 10), values=(0.1, 0.01, 0.001)),
    "CosineAnnealing": dict(value=0.1, t_max=10, eta_min=0.0),
    "CosineAnnealingWarmRestarts": dict(value=0.1, t_0=5, t_mult=2, eta_min=0.0),
    "Linear": dict(start=0.0, end=0.1, steps=10),
    "Warmup": dict(schedule=co.Constant(0.1), steps=5, start=0.0),
    "OneCycle": dict(
        max_value=0.1,
        total_steps=100,
        pct_start=0.3,
        anneal="cos",
        div_factor=25.0,
        final_div_factor=1e4,
        three_phase=False,
    ),
    "Cyclic": dict(base=0.01, max_value=0.1, step_size_up=5, step_size_down=6, mode="triangular", gamma=1.0),
    "Triangle": dict(low=0.0, high=0.1, period=10),
    "Join": dict(schedules=(co.Constant(0.1), co.Linear(0.1, 0.0, 10)), boundaries=(5,)),
}

BAD_FIELDS = {
    "Constant": {"value": ["0.1", None, True, NAN]},
    "Step": {
        "value": NOT_A_NUMBER,
        "step_size": [*NOT_A_COUNT, 0, -1],
        "gamma": [*NOT_A_NUMBER, -0.5, math.inf],
    },
    "MultiStep": {
        "value": NOT_A_NUMBER,
        "milestones": [5, None, "5", (5, 2), (-1, 3), (2.5,), (True,), (None,)],
        "gamma": [*NOT_A_NUMBER, -0.5],
    },
    "Exponential": {"value": NOT_A_NUMBER, "gamma": [*NOT_A_NUMBER, -0.9, math.inf]},
    **{
        name: {
            "value": NOT_A_NUMBER,
            "decay_rate": [*NOT_A_NUMBER, -0.5],
            "decay_steps": [*NOT_A_COUNT, 0, -10],
            "staircase": NOT_A_FLAG,
        }
        for name in ("ExponentialDecay", "InverseTimeDecay", "NaturalExpDecay")
    },
    "PolynomialDecay": {
        "value": NOT_A_NUMBER,
        "end_value": NOT_A_NUMBER,
        "decay_steps": [*NOT_A_COUNT, 0],
        "power": [*NOT_A_NUMBER, -1.0],
        "cycle": NOT_A_FLAG,
    },
    "PiecewiseConstant": {
        "boundaries": [5, None, (10, 5), (-1, 5), (2.5, 5), (True, 5)],
        "values": [0.1, None, ("a", 0.1, 0.1), (0.1, None, 0.1), (0.1, NAN, 0.1), (0.1, 0.1)],
    },
    "CosineAnnealing": {"value": NOT_A_NUMBER, "t_max": [*NOT_A_COUNT, 0], "eta_min": NOT_A_NUMBER},
    "CosineAnnealingWarmRestarts": {
        "value": NOT_A_NUMBER,
        "t_0": [*NOT_A_COUNT, 0],
        "t_mult": [*NOT_A_COUNT, 0],
        "eta_min": NOT_A_NUMBER,
    },
    "Linear": {"start": NOT_A_NUMBER, "end": NOT_A_NUMBER, "steps": [*NOT_A_COUNT, 0, -3]},
    "Warmup": {
        "schedule": ["0.1", None, True, NAN],
        "steps": [*NOT_A_COUNT, -1],
        "start": NOT_A_NUMBER,
    },
    "OneCycle": {
        "max_value": NOT_A_NUMBER,
        "total_steps": [*NOT_A_COUNT, 1, 0, -5],
        "pct_start": [*NOT_A_NUMBER, 0.0, 1.0, 1.5, -0.1, 0.005],
        "anneal": ["sine", None, 1, True],
        "div_factor": [*NOT_A_NUMBER, 0.0, -25.0, math.inf],
        "final_div_factor": [*NOT_A_NUMBER, 0.0, -1.0, math.inf],
        "three_phase": NOT_A_FLAG,
    },
    "Cyclic": {
        "base": NOT_A_NUMBER,
        "max_value": NOT_A_NUMBER,
        "step_size_up": [*NOT_A_COUNT, 0],
        "step_size_down": ["5", True, 2.5, 0, -1],
        "mode": ["sine", None, 1],
        "gamma": [*NOT_A_NUMBER, -1.0, 0.0],
    },
    "Triangle": {"low": NOT_A_NUMBER, "high": NOT_A_NUMBER, "period": [*NOT_A_COUNT, 0, 3, -2, 1]},
    "Join": {
        "schedules": [co.Constant(0.1), None, (co.Constant(0.1),), ("0.1", 0.1), (None, 0.1), (0.1, True)],
        "boundaries": [5, None, (-1,), (2.5,), (True,), ("5",)],
    },
}

BAD_CASES = [
    pytest.param(name, field, bad, id=f"{name}.{field}={bad!r}")
    for name, fields in BAD_FIELDS.items()
    for field, values in fields.items()
    for bad in values
]


def test_every_schedule_and_field_is_covered():
    assert sorted(VALID_SCHEDULES) == sorted(
        name for name in co.schedules.__all__ if name not in ("Schedule", "Sequence")
    )
    for name, fields in VALID_SCHEDULES.items():
        assert sorted(BAD_FIELDS[name]) == sorted(fields), name


@pytest.mark.parametrize("name", list(VALID_SCHEDULES))
def test_the_valid_arguments_of_the_table_are_valid(name):
    schedule = getattr(co, name)(**VALID_SCHEDULES[name])
    assert all(math.isfinite(value) for value in schedule.preview(30))


@pytest.mark.parametrize(("name", "field", "bad"), BAD_CASES)
def test_a_wrong_field_names_the_schedule_and_the_field(name, field, bad):
    from composeopt.errors import ScheduleError

    arguments = {**VALID_SCHEDULES[name], field: bad}
    with pytest.raises(ScheduleError, match=rf"^{name}\.{field}: ") as info:
        getattr(co, name)(**arguments)
    assert isinstance(info.value, HyperparameterError) and isinstance(info.value, ValueError)


def test_a_schedule_error_reads_well():
    from composeopt.errors import ScheduleError

    with pytest.raises(ScheduleError, match=r"^Linear\.steps: expected an integer, got 'a'$"):
        co.Linear(0.1, 0.2, "a")
    with pytest.raises(ScheduleError, match=r"^Step\.step_size: must be >= 1, got 0$"):
        co.Step(0.1, 0)
    with pytest.raises(ScheduleError, match=r"^Linear\.start: expected a real number, got None$"):
        co.Linear(None, 0.2, 10)


def test_checked_fields_are_normalised_so_repr_round_trips():
    schedule = co.MultiStep(0.1, [np.int64(5), 10], 0.5)
    assert schedule.milestones == (5, 10) and type(schedule.milestones[0]) is int
    assert eval(repr(schedule), vars(co)) == schedule
    assert co.Linear(np.float32(0.5), 1, np.int32(10)).steps == 10
    assert co.Cyclic(0.0, 1.0, 5, None).step_size_down is None
