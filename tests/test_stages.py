"""The staged fast path: reductions between stages, parameter groups, decisive reductions.

Every fast registry case is run inside `Groups` and behind each tree-level rule
(`ClipGlobalNorm`, `ClipNorm`, `SkipNonFinite`), fused and generic, and the two
must agree (float64: 1e-12 relative; float32: a few ulps).  A decisive reduction
(a norm that must be finite, a finite flag) raises or skips with nothing changed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt.errors import NonFiniteError
from composeopt.registry import CASES

HAS_NUMBA = importlib.util.find_spec("numba") is not None
FAST_CASES = [case for case in CASES if _fused.make_plan(CASES[case]()) is not None]
STEPS = 5


@pytest.fixture(params=["numba", "numpy"])
def mode(request, monkeypatch):
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_fused, "MODE", "auto" if request.param == "numba" else "numpy")
    return request.param


@pytest.fixture
def taken(monkeypatch):
    results = []
    original = _fused.step_

    def spy(*args):
        results.append(original(*args))
        return results[-1]

    monkeypatch.setattr(_fused, "step_", spy)
    return results


def tree(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W": rng.uniform(-2, 2, (6, 5)).astype(dtype),
        "b": rng.uniform(-2, 2, 5).astype(dtype),
        "s": np.asarray(rng.uniform(-2, 2), dtype=dtype),
        "empty": np.zeros((2, 0), dtype=dtype),
        "zero": np.zeros(3, dtype=dtype),  # a zero parameter: trust ratios take 1
    }


def gradients(params, step):
    return {k: np.asarray(np.sin(3 * v + step) + 0.1 * step, dtype=v.dtype) for k, v in params.items()}


def generic(make, params, steps, grads=gradients):
    opt = make()
    saved = _fused.MODE
    _fused.MODE = "off"
    try:
        for step in range(steps):
            co.update_(opt, params, grads(params, step))
    finally:
        _fused.MODE = saved
    return params, opt


def assert_close(actual, expected):
    for key in expected:
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        assert a.dtype == e.dtype
        if e.dtype == np.float64:
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-300, err_msg=key)
        else:
            scale = float(np.max(np.abs(e), initial=1.0))
            eps = np.finfo(e.dtype).eps
            np.testing.assert_allclose(a, e, rtol=4 * eps, atol=4 * eps * scale, err_msg=key)


def state_arrays(opt, params):
    """Every number of every parameter's state, in tree order."""
    store = co.state_store(opt)

    def flat(state):
        if isinstance(state, tuple):
            return [v for part in state for v in flat(part)]
        if hasattr(state, "__dict__"):
            return [v for name in sorted(vars(state)) for v in flat(getattr(state, name))]
        return [np.array(state, copy=True)] if state is not None else []

    return [store.step] + [v for key in sorted(params) for v in flat(store.get(params[key], None))]


WRAPS = {
    "Groups": lambda inner: co.Groups(("W", inner), ("s", co.Adam(0.01)), default=co.Momentum(0.01)),
    "ClipGlobalNorm": lambda inner: co.Optimiser(co.ClipGlobalNorm(1.0), inner),
    "ClipNorm": lambda inner: co.Optimiser(co.ClipNorm(1.0), inner),
    "SkipNonFinite": lambda inner: co.SkipNonFinite(inner),
}


@pytest.mark.parametrize("case", FAST_CASES)
@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_fast_case_in_groups_and_behind_tree_rules(mode, taken, case, wrap, dtype):
    if wrap == "Groups" and "Groups" in case:
        pytest.skip("the inner groups' selectors name parameters this group does not get")
    make = lambda: WRAPS[wrap](CASES[case]())  # noqa: E731
    if _fused.make_plan(make()) is None:
        pytest.skip("not planned (a rule that cannot be wrapped this way)")
    params = tree(dtype)
    opt = make()
    for step in range(STEPS):
        co.update_(opt, params, gradients(params, step))
    expected, reference = generic(make, tree(dtype), STEPS)
    assert_close(params, expected)
    assert co.state_store(opt).step == STEPS
    assert taken and all(taken), "the fast path did not take the step"


@pytest.mark.parametrize(
    "make",
    [
        co.Lamb,
        lambda: co.Lars(lambda_=1e-3, nesterov=True),
        co.Novograd,
        co.Fromage,
        lambda: co.Optimiser(co.ClipNorm(1.0), co.Adam()),
        lambda: co.Optimiser(co.ClipGlobalNorm(0.5), co.Lamb()),
        lambda: co.Optimiser(co.Adam(), co.ClipNorm(1e-3, throw=False), co.Descent(0.5)),
        lambda: co.Optimiser(
            co.ClipGlobalNorm(1.0),
            co.Groups(("b", co.AdamW(1e-2, lambda_=0.0)), default=co.AdamW(1e-2, lambda_=0.01)),
        ),
        lambda: co.SkipNonFinite(co.Optimiser(co.ClipGlobalNorm(1.0), co.Lars())),
    ],
    ids=[
        "Lamb",
        "Lars",
        "Novograd",
        "Fromage",
        "ClipNorm-Adam",
        "ClipGlobalNorm-Lamb",
        "Adam-ClipNorm",
        "ClipGlobalNorm-Groups-AdamW",
        "SkipNonFinite-ClipGlobalNorm-Lars",
    ],
)
def test_staged_recipes_on_big_arrays_split_between_threads(mode, taken, make):
    """Arrays big enough to be split between threads: the measures of their chunks combine."""
    rng = np.random.default_rng(3)
    shapes = {"a": (700, 300), "b": (4000,), "c": (3, 3), "d": (200_000,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    expected = {k: v.copy() for k, v in params.items()}
    grads = lambda params, step: {k: np.cos(v + step) for k, v in params.items()}  # noqa: E731
    opt = make()
    for step in range(3):
        co.update_(opt, params, grads(params, step))
    assert all(taken)
    generic(make, expected, 3, grads)
    assert_close(params, expected)


# --- decisive reductions ---------------------------------------------------------


def big_tree(dtype=np.float64, count=40):
    rng = np.random.default_rng(5)
    return {f"layer{i:02d}": rng.standard_normal((i % 5) + 3).astype(dtype) for i in range(count)}


def good(params, step):
    return {k: np.cos(v + step) for k, v in params.items()}


@pytest.mark.parametrize(
    "make",
    [
        lambda: co.Optimiser(co.ClipNorm(1.0), co.Adam()),
        lambda: co.Optimiser(co.WeightDecay(0.1), co.ClipNorm(1.0), co.Lamb()),
        lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.ClipNorm(1.0), co.Adam()),
        lambda: co.Groups(("layer0*", co.Adam()), default=co.Optimiser(co.ClipNorm(1.0), co.Momentum())),
    ],
    ids=["ClipNorm-Adam", "WeightDecay-ClipNorm-Lamb", "ClipGlobalNorm-ClipNorm-Adam", "Groups-ClipNorm"],
)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_gradient_late_in_the_tree_raises_with_nothing_changed(mode, taken, make, bad):
    params = big_tree()
    opt = make()
    for step in range(3):  # the fast path is live
        co.update_(opt, params, good(params, step))
    assert all(taken)
    before = {k: v.copy() for k, v in params.items()}
    states = state_arrays(opt, params)
    grads = good(params, 3)
    grads["layer38"][1] = bad
    with pytest.raises(NonFiniteError, match=r"params\[.layer\d\d.\]"):
        co.update_(opt, params, grads)
    for key in params:
        assert params[key].tobytes() == before[key].tobytes(), key
    after = state_arrays(opt, params)
    assert len(after) == len(states)
    for a, b in zip(after, states):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # and the generic path raises the same error
    reference = make()
    reference_params = big_tree()
    _fused_off = _fused.MODE
    _fused.MODE = "off"
    try:
        for step in range(3):
            co.update_(reference, reference_params, good(reference_params, step))
        with pytest.raises(NonFiniteError) as generic_error:
            co.update_(reference, reference_params, grads)
    finally:
        _fused.MODE = _fused_off
    with pytest.raises(NonFiniteError) as fused_error:
        co.update_(opt, params, grads)
    assert str(fused_error.value) == str(generic_error.value)


@pytest.mark.parametrize("late", [False, True])
def test_skip_non_finite_gives_up_with_nothing_changed(mode, taken, late):
    params = big_tree()
    inner = co.Optimiser(co.ClipGlobalNorm(1.0), co.ClipNorm(1.0), co.Adam()) if late else co.Adam()
    opt = co.SkipNonFinite(inner, max_consecutive=1)
    for step in range(2):
        co.update_(opt, params, good(params, step))
    bad = good(params, 2)
    bad["layer37"][0] = np.nan
    co.update_(opt, params, bad)  # skipped, streak 1
    before = {k: v.copy() for k, v in params.items()}
    states = state_arrays(opt, params)
    with pytest.raises(NonFiniteError, match=r"layer37.*after 1 skipped steps"):
        co.update_(opt, params, bad)
    assert all(taken)
    assert all(params[k].tobytes() == before[k].tobytes() for k in params)
    assert all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(state_arrays(opt, params), states)
    )


def test_skip_non_finite_skips_on_the_fast_path_and_counts(mode, taken):
    params = big_tree(np.float32)
    opt = co.SkipNonFinite(co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam()))
    expected = {k: v.copy() for k, v in params.items()}
    reference = co.SkipNonFinite(co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam()))

    def grads(params, step):
        g = good(params, step)
        if step in (2, 3):
            g["layer30"][0] = np.nan
        return g

    for step in range(6):
        co.update_(opt, params, grads(params, step))
    assert all(taken)
    _fused.MODE, saved = "off", _fused.MODE
    try:
        for step in range(6):
            co.update_(reference, expected, grads(expected, step))
    finally:
        _fused.MODE = saved
    assert_close(params, expected)
    for key in params:
        fused_state = co.state_store(opt).get(params[key])
        generic_state = co.state_store(reference).get(expected[key])
        assert (
            (fused_state.skipped, fused_state.streak)
            == (generic_state.skipped, generic_state.streak)
            == (2, 0)
        )
        assert fused_state.inner[1].t == generic_state.inner[1].t == 4


def test_a_skipped_step_changes_neither_parameters_nor_inner_state(mode, taken):
    params = big_tree()
    opt = co.SkipNonFinite(co.Lamb())
    for step in range(2):
        co.update_(opt, params, good(params, step))
    before = {k: v.copy() for k, v in params.items()}
    inner = {k: (s.inner.mu.copy(), s.inner.t) for k in params for s in [co.state_store(opt).get(params[k])]}
    grads = good(params, 2)
    grads["layer39"][-1] = np.inf
    co.update_(opt, params, grads)
    assert all(taken)
    for key in params:
        state = co.state_store(opt).get(params[key])
        assert params[key].tobytes() == before[key].tobytes()
        assert state.inner.mu.tobytes() == inner[key][0].tobytes() and state.inner.t == inner[key][1]
        assert (state.skipped, state.streak) == (1, 1)


def test_a_decisive_reduction_after_state_takes_the_generic_path(mode, taken):
    """ClipNorm(throw=True) after Adam could raise after Adam wrote its moments: generic."""
    params = big_tree()
    make = lambda: co.Optimiser(co.Adam(), co.ClipNorm(1e-3))  # noqa: E731
    opt = make()
    for step in range(3):
        co.update_(opt, params, good(params, step))
    assert taken == [False] * 3
    expected, _ = generic(make, big_tree(), 3, good)
    assert_close(params, expected)


def test_a_host_state_replaced_by_hand_takes_the_generic_path(mode, taken):
    params = big_tree()
    opt = co.Novograd()
    co.update_(opt, params, good(params, 0))
    co.state_store(opt).get(params["layer07"]).nu = 0.5  # a float, not a 0-d array
    co.update_(opt, params, good(params, 1))
    assert taken == [True, False]


def test_hyperparameters_changed_between_steps_are_planned_again(mode, taken):
    """`throw` turned on after Adam makes the clip decisive after state: the generic path."""
    params = big_tree()
    opt = co.Optimiser(co.Adam(), co.ClipNorm(1e-3, throw=False))
    co.update_(opt, params, good(params, 0))
    opt[1].throw = True
    co.update_(opt, params, good(params, 1))
    opt[1].throw = False
    co.update_(opt, params, good(params, 2))
    assert taken == [True, False, True]


def test_adafactor_momentum_turned_on_later_takes_the_generic_path_once(mode, taken):
    params = big_tree(np.float32)
    opt = co.Adafactor()
    co.update_(opt, params, good(params, 0))
    opt.momentum = 0.9
    co.update_(opt, params, good(params, 1))  # the generic path makes the momentum
    co.update_(opt, params, good(params, 2))
    assert taken == [True, False, True]
