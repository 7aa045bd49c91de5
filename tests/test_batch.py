"""The batched fused step (many arrays, one call; `composeopt._fused.batch`) equals the per-array one.

Once the same tree has taken two fused numba steps in a row, `update_` takes the step from a
table of addresses.  Whatever happens between steps (freezing, a reset, a checkpoint loaded, a
state or a parameter replaced by hand, odd or wrong gradients, a failing schedule), the
result must be exactly that of the per-array path, which the other fused tests hold to the
generic path.  The reference here is the same code with batching switched off.

A plan of several stages (norm clips, skips, trust ratios, groups, Adafactor) is not
batched; its repeat steps replay the last step's jobs (`composeopt._fused.replay`).  The
same holds of them, against the same code with replaying switched off.
"""

from __future__ import annotations

import gc
import importlib.util
import tracemalloc
import weakref

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt._fused import batch, replay, threads
from composeopt.errors import ShapeMismatchError, UnsupportedArrayError
from composeopt.registry import CASES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")

STEPS = 7
# Groups select by name, and their registry selectors name parameters of another tree.
FAST_CASES = [case for case in CASES if _fused.make_plan(CASES[case]()) is not None and "Groups" not in case]


def generic_steps(make, params, steps, grads):
    opt = make()
    saved, _fused.MODE = _fused.MODE, "off"
    try:
        for step in range(steps):
            co.update_(opt, params, grads(params, step))
    finally:
        _fused.MODE = saved


def assert_close(actual, expected):
    """float64: 1e-12 relative; float32: a few ulps of the values' scale (as in test_fused)."""
    for a, e in zip(leaves(actual), leaves(expected), strict=True):
        assert a.dtype == e.dtype
        if e.dtype == np.float64:
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-300)
        else:
            scale = float(np.max(np.abs(e), initial=1.0))
            eps = np.finfo(e.dtype).eps
            np.testing.assert_allclose(a, e, rtol=4 * eps, atol=4 * eps * scale)


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setattr(_fused, "MODE", "auto")


def spy_on(monkeypatch, module, name, taken=lambda result: result is not None):
    """Replace `module.name` by a spy; returns its list of `taken(result)`, one per call."""
    results = []
    original = getattr(module, name)

    def spy(*args):
        result = original(*args)
        results.append(taken(result))
        return result

    monkeypatch.setattr(module, name, spy)
    return results


@pytest.fixture
def batched(monkeypatch):
    """Per call of the batched step: True where it took the step."""
    return spy_on(monkeypatch, batch, "step_", bool)


def model(dtype=np.float32, seed=0):
    """24 arrays: nested dicts and lists, a 0-d array and an empty one."""
    rng = np.random.default_rng(seed)

    def array(*shape):
        return np.asarray(rng.uniform(-2, 2, shape), dtype=dtype)

    return {
        "layers": [{"W": array(5, 7), "b": array(7)} for _ in range(10)],
        "scale": array(),
        "empty": array(0, 3),
        "embed": (array(33), array(2, 3, 4)),
    }


def leaves(tree):
    if isinstance(tree, np.ndarray):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [leaf for value in values for leaf in leaves(value)]


def gradients(params, step, dtype=None):
    def grad(x):
        return np.asarray(np.sin(3 * x + step) + 0.1 * step, dtype=dtype or x.dtype)

    def walk(tree):
        if isinstance(tree, np.ndarray):
            return grad(tree)
        if isinstance(tree, dict):
            return {key: walk(value) for key, value in tree.items()}
        return type(tree)(walk(value) for value in tree)

    return walk(params)


def run(make, steps=STEPS, *, batching=True, replaying=True, between=None, grads=gradients, dtype=np.float32):
    """The optimiser and params after `steps` steps; `between(step, opt, params)` runs before
    each step and may return a new params dict."""
    saved = batch.BATCH_MIN, replay.ENABLED
    batch.BATCH_MIN = batch.BATCH_MIN if batching else 10**9
    replay.ENABLED = replaying
    try:
        opt, params = make(), model(dtype)
        for step in range(steps):
            changed = between(step, opt, params) if between is not None else None
            params = changed if isinstance(changed, dict) else params
            co.update_(opt, params, grads(params, step))
    finally:
        batch.BATCH_MIN, replay.ENABLED = saved
    return opt, params


def assert_same_either_way(taken, make, off, **options):
    """`make`'s steps with `options`, then with the way they were taken switched `off` (a
    `run` option): the same parameters and states, bit for bit.  `taken` (a spy's list) must
    show that the way was live from the third step on."""
    opt, params = run(make, **options)
    assert taken[2:4] == [True, True]
    reference_opt, reference = run(make, **options, **off)
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)


def both_ways(make_params, make_grads):
    """Adam(0.1) for STEPS steps, with and without batching: the two params trees."""
    results = []
    for batching in (True, False):
        saved, batch.BATCH_MIN = batch.BATCH_MIN, batch.BATCH_MIN if batching else 10**9
        try:
            opt, params = co.Adam(0.1), make_params()
            for step in range(STEPS):
                co.update_(opt, params, make_grads(params, step))
        finally:
            batch.BATCH_MIN = saved
        results.append(params)
    return results


def assert_same(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype


def state_values(opt, params):
    """Every parameter's state as a flat list of arrays and numbers, in tree order."""

    def flat(state):
        if isinstance(state, np.ndarray):
            return [state.copy()]
        if isinstance(state, co.State):
            return [value for name in sorted(vars(state)) for value in flat(getattr(state, name))]
        if isinstance(state, (tuple, list)):
            return [value for item in state for value in flat(item)]
        return [state]

    store = co.state_store(opt)
    return [store.step] + [value for x in leaves(params) for value in flat(store.get(x, "none"))]


def assert_same_states(opt_a, params_a, opt_b, params_b):
    for a, b in zip(state_values(opt_a, params_a), state_values(opt_b, params_b), strict=True):
        np.testing.assert_array_equal(a, b)


# --- equal to the per-array path ----------------------------------------------------------


@pytest.mark.parametrize("case", FAST_CASES)
def test_every_fast_case_batched_equals_per_array(case, batched):
    opt, params = run(CASES[case])
    reference_opt, reference = run(CASES[case], batching=False)
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "make",
    [co.Adam, lambda: co.Optimiser(co.ClipValue(1.0), co.WeightDecay(1e-2), co.Adam(1e-2)), co.Lion],
    ids=["Adam", "ClipValue-WeightDecay-Adam", "Lion"],
)
def test_batched_steps_are_taken_and_match_generic(make, dtype, batched):
    _, params = run(make, dtype=dtype)
    assert batched == [False, False] + [True] * (STEPS - 2)
    expected = model(dtype)
    generic_steps(make, expected, STEPS, gradients)
    assert_close(params, expected)


def test_norm_clips_and_few_arrays_are_not_batched(batched, monkeypatch):
    run(lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam()))
    monkeypatch.setattr(batch, "BATCH_MIN", 100)
    run(co.Adam)
    assert not any(batched)


def test_parameters_sharing_memory(batched):
    """Overlapping views (not one array twice) cannot be updated in place: refused on every
    path, after good steps on the same store, and the refused step changes nothing."""
    base = np.linspace(-1, 1, 620, dtype=np.float32)
    params = [base[20 * i : 20 * i + 20] for i in range(31)]  # disjoint views: fine
    opt = co.Adam(0.1)
    for step in range(4):
        co.update_(opt, params, [np.cos(x + step) for x in params])
    assert batched[-2:] == [True, True]
    before, states = base.copy(), state_values(opt, params)
    kept, params[30] = params[30], base[590:610]  # overlaps params[29]; kept keeps its state
    with pytest.raises(
        co.errors.AliasingError, match=r"params\[29\] and params\[30\]: the two parameters share memory"
    ):
        co.update_(opt, params, [np.cos(x) for x in params])
    np.testing.assert_array_equal(base, before)
    params[30] = kept
    for a, b in zip(state_values(opt, params), states, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gradients_overlapping_the_parameters(batched):
    """Each gradient a view of the buffer the parameters live in, 3 elements before its
    parameter: read in place it would see updated values; it must act as a copy, which the
    per-array path makes."""
    flat = []

    def make():
        flat[:] = [co.flatten([np.linspace(-1, 1, 50, dtype=np.float32) + i for i in range(30)])]
        return flat[0].tree

    def grads(params, step):
        return [flat[0].data[max(50 * i - 3, 0) :][:50] for i in range(30)]

    assert_same(*both_ways(make, grads))
    assert not any(batched)


@pytest.mark.parametrize("owner", ["parameter", "state"])
def test_a_gradient_overlapping_what_the_step_writes_is_not_read_in_place(owner, batched):
    """After good batched steps, one gradient late in the tree is another parameter or
    another parameter's first moment: the step is the per-array one, which reads a copy."""

    def grads(params, step):
        tree = gradients(params, step)
        if step == STEPS - 1:
            x = params["layers"][9]["W"]
            tree["layers"][8]["W"] = x if owner == "parameter" else co.state_store(opts[-1]).get(x).mu
        return tree

    opts: list = []

    def make():
        opts.append(co.Adam(0.1))
        return opts[-1]

    opt, params = run(make, grads=grads)
    assert batched[2 : STEPS - 1] == [True] * (STEPS - 3) and batched[-1] is False
    reference_opt, reference = run(make, batching=False, grads=grads)
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)


def test_gradients_are_read_where_they_are(batched):
    opt, params = run(co.Adam)
    assert batched[-1]
    grads = gradients(params, STEPS)
    co.update_(opt, params, grads)
    assert batched[-1]
    taken = batch._batches[co.state_store(opt)].gradients
    assert taken.tolist() == [g.__array_interface__["data"][0] for g in leaves(grads)]


def test_arrays_split_between_threads(batched, monkeypatch):
    monkeypatch.setattr(threads, "PARALLEL_MIN", 100)
    monkeypatch.setenv("COMPOSEOPT_NUM_THREADS", "3")
    assert len(threads.shares([35] * 20 + [33, 24])) == 3  # shares end inside arrays
    _, params = run(co.Adam)
    assert batched[-1]
    monkeypatch.setenv("COMPOSEOPT_NUM_THREADS", "1")
    assert_same(params, run(co.Adam, batching=False)[1])


def _fortran(params, step):
    return [np.array(g, order="F") for g in leaves(gradients(params, step))]


def _read_only(params, step):
    grads = leaves(gradients(params, step))
    for g in grads:
        g.flags.writeable = False
    return grads


def _a_view_of_one_buffer(params, step):
    flat = co.flatten(gradients(params, step))
    return flat.tree


def _unaligned(params, step):
    grads = []
    for g in leaves(gradients(params, step)):
        view = np.empty(g.nbytes + 1, np.uint8)[1:].view(g.dtype).reshape(g.shape)  # an odd address
        view[...] = g
        grads.append(view)
    return grads


UNUSUAL_GRADIENTS = {
    "float64": lambda params, step: gradients(params, step, np.float64),
    "the-parameters": lambda params, step: params,  # the loss |x|^2 / 2
    "fortran": _fortran,
    "read-only": _read_only,
    "unaligned": _unaligned,
    "views-of-one-buffer": _a_view_of_one_buffer,
}


@pytest.mark.parametrize("grads", UNUSUAL_GRADIENTS)
def test_unusual_gradients(grads, batched):
    make_grads = UNUSUAL_GRADIENTS[grads]
    make_params = (lambda: leaves(model())) if grads in ("fortran", "read-only", "unaligned") else model
    assert_same(*both_ways(make_params, make_grads))


# --- whatever changes between steps -------------------------------------------------------


def _replace_state_array(opt, params):
    state = co.state_store(opt).get(params["layers"][3]["W"])[1]  # (WeightDecay, Adam)
    state.mu = np.full_like(state.mu, 0.5)


def _replace_counter(opt, params):
    co.state_store(opt).get(params["layers"][3]["b"])[1].t = 1


def _replace_parameter(opt, params):
    params["layers"][2]["W"] = np.ones((5, 7), dtype=np.float32)


def _drop_and_add_parameters(opt, params):
    params["layers"].pop(4)
    gc.collect()  # its state goes; a new array may take its id
    params["layers"].append({"W": np.zeros((5, 7), np.float32), "b": np.zeros(7, np.float32)})


def _checkpoint_round_trip(opt, params):
    saved = co.state_dict(opt, params)
    co.update_(opt, params, gradients(params, 100))  # a step the checkpoint forgets
    co.load_state_dict(opt, params, saved)


def _reorder_parameters(opt, params):
    layers = params["layers"]
    layers[0], layers[1] = layers[1], layers[0]  # the same arrays, each with its state, elsewhere


def _tie_parameters(opt, params):
    params["layers"][5]["b"] = params["layers"][6]["b"]  # one array twice: summed gradients


def _rebuilt_tree(opt, params):
    return {**params, "layers": list(params["layers"])}  # new containers, same arrays


CHANGES = {
    "freeze": lambda opt, params: co.freeze_(opt, params["layers"][1]),
    "freeze-then-thaw": lambda opt, params: co.thaw_(co.freeze_(opt, params), params),
    "reset": lambda opt, params: co.reset_(opt),
    "adjust": lambda opt, params: co.adjust_(opt, 0.5),
    "state-array-replaced": _replace_state_array,
    "counter-replaced": _replace_counter,
    "parameter-replaced": _replace_parameter,
    "parameters-dropped-and-added": _drop_and_add_parameters,
    "checkpoint": _checkpoint_round_trip,
    "new-containers": _rebuilt_tree,
    "reordered": _reorder_parameters,
    "tied": _tie_parameters,
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.filterwarnings("ignore::composeopt.errors.StateResetWarning")  # parameter-replaced
def test_changes_between_steps(change, batched):
    def between(step, opt, params):
        return CHANGES[change](opt, params) if step == 4 else None

    make = lambda: co.Optimiser(co.WeightDecay(1e-2), co.Adam(0.1))  # noqa: E731
    assert_same_either_way(batched, make, {"batching": False}, between=between)


def test_a_missing_gradient_skips_its_parameter(batched):
    def grads(params, step):
        tree = gradients(params, step)
        if step >= 4:
            tree["layers"][0]["W"] = None
        return tree

    _, params = run(co.Adam, grads=grads)
    assert_same(params, run(co.Adam, batching=False, grads=grads)[1])


def test_two_trees_taking_turns(batched):
    opt, a, b = co.Adam(0.1), model(seed=1), model(seed=2)
    reference_opt, ra, rb = co.Adam(0.1), model(seed=1), model(seed=2)
    for step in range(8):
        co.update_(opt, a if step % 2 else b, gradients(a if step % 2 else b, step))
        batch.BATCH_MIN, saved = 10**9, batch.BATCH_MIN
        co.update_(reference_opt, ra if step % 2 else rb, gradients(ra if step % 2 else rb, step))
        batch.BATCH_MIN = saved
    assert_same((a, b), (ra, rb))


class _Switch(co.RMSProp):
    """RMSProp that turns centred from step 5 on: a kernel change made by begin_step."""

    def begin_step(self, step):
        self.centred = step >= 5


_Switch._kernel = co.RMSProp.__dict__["_kernel"]  # claims the fast path all the same


def test_a_kernel_change_made_by_begin_step(batched):
    _, params = run(_Switch)
    assert batched[:4] == [False, False, True, True] and not any(batched[4:])
    expected = model()
    generic_steps(_Switch, expected, STEPS, gradients)
    assert_close(params, expected)


# --- errors: the ordinary path names the parameter, and nothing is changed ----------------


class _Failing(co.Adam):
    """Adam whose schedule fails at one step."""

    def begin_step(self, step):
        if step == 5:
            raise RuntimeError("schedule failed")


_Failing._kernel = co.Adam.__dict__["_kernel"]


@pytest.mark.parametrize(
    "spoil, error, message",
    [
        (lambda g: g["layers"][6].update(W=np.ones((7, 5), np.float32)), ShapeMismatchError, r"\['W'\]"),
        (lambda g: g["layers"][6].update(b=np.ones(7, np.complex64)), UnsupportedArrayError, "complex64"),
        (lambda g: g["layers"][6].update(b=[1.0] * 7), UnsupportedArrayError, r"\['b'\]"),
        (lambda g: g.pop("scale"), co.errors.TreeStructureError, "scale"),
        (None, RuntimeError, "schedule failed"),
    ],
    ids=["shape", "complex", "list", "missing-key", "failing-schedule"],
)
def test_a_bad_step_changes_nothing(spoil, error, message, batched):
    opt, params = run(co.Adam if spoil else _Failing, steps=4)  # _Failing's schedule fails at step 5
    assert batched[-2:] == [True, True]
    before, states = [x.copy() for x in leaves(params)], state_values(opt, params)
    grads = gradients(params, 4)
    if spoil is not None:
        spoil(grads)
    with pytest.raises(error, match=message):
        co.update_(opt, params, grads)
    assert_same(params_list := leaves(params), before)
    for a, b in zip(state_values(opt, params), states, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(params_list) == 24


# --- memory ---------------------------------------------------------------------------


def test_no_allocation_per_batched_step(batched):
    params = [np.ones(1000, dtype=np.float32) for _ in range(200)]
    grads = [np.full(1000, 0.5, dtype=np.float32) for _ in range(200)]
    opt = co.Optimiser(co.ClipValue(1.0), co.WeightDecay(1e-4), co.Adam())
    for _ in range(3):
        co.update_(opt, params, grads)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            co.update_(opt, params, grads)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batched[-3:] == [True] * 3
    assert peak - base < 64 * 1024, f"a step allocated {peak - base} bytes"
    assert current - base < 4 * 1024


def test_a_batch_keeps_neither_parameters_nor_the_optimiser_alive(batched):
    opt, params = run(co.Adam)
    assert batched[-1]
    alive = [weakref.ref(x) for x in leaves(params)]
    opt_alive = weakref.ref(opt)
    del params
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert len(co.state_store(opt)) == 0
    del opt
    gc.collect()
    assert opt_alive() is None


_FAIL = [False]


def _fragile_scalars(rule, state, dtype):
    if _FAIL[0]:
        raise RuntimeError("scalars failed")
    return co.Adam._kernel.scalars(rule, state, dtype)


class _FragileAdam(co.Adam):
    """Adam whose fast path's scalars fail on demand (a bug in a user's kernel)."""

    _kernel = _fused.Kernel(co.Adam._kernel.math, _fragile_scalars, state=("mu", "nu"), counter="t")


def test_a_batched_step_whose_scalars_fail_changes_nothing(batched):
    opt, params = run(_FragileAdam, steps=4)
    assert batched[-1]
    before, states = [x.copy() for x in leaves(params)], state_values(opt, params)
    _FAIL[0] = True
    try:
        with pytest.raises(RuntimeError, match="scalars failed"):
            co.update_(opt, params, gradients(params, 4))
    finally:
        _FAIL[0] = False
    assert_same(leaves(params), before)
    for a, b in zip(state_values(opt, params), states, strict=True):
        np.testing.assert_array_equal(a, b)
    co.update_(opt, params, gradients(params, 4))  # and the batch goes on
    assert batched[-1]


def test_mixed_dtypes_or_step_counts_are_not_batched(batched):
    opt, params = co.Adam(), model()
    params["embed"] = (params["embed"][0].astype(np.float64), params["embed"][1])
    for step in range(5):
        co.update_(opt, params, gradients(params, step))
    opt, params = co.Adam(), model()
    co.update_(opt, params["layers"], gradients(params, 0)["layers"])  # the layers one step ahead
    for step in range(5):
        co.update_(opt, params, gradients(params, step))
    assert not any(batched)


def test_a_state_attribute_deleted_by_hand(batched):
    opt, params = run(co.Adam, steps=4)
    assert batched[-1]
    del co.state_store(opt).get(params["layers"][0]["W"]).mu
    with pytest.raises(AttributeError, match="mu"):
        co.update_(opt, params, gradients(params, 4))
    assert batched[-1] is False


# --- the replayed step of a plan of several stages ----------------------------------------

STAGED_CASES = [
    case
    for case in CASES
    if (plan := _fused.make_plan(CASES[case]())) is not None
    and len(plan.stages) != 1
    and "Groups" not in case
]


@pytest.fixture
def replayed(monkeypatch):
    """Per step that had a replay: True where it proved the step the one it kept."""
    return spy_on(monkeypatch, replay, "proof")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", STAGED_CASES)
def test_every_staged_case_replayed_equals_the_ordinary_step(case, dtype, replayed):
    assert_same_either_way(replayed, CASES[case], {"replaying": False}, dtype=dtype)


def test_groups_are_replayed(replayed):
    def make():
        return co.Optimiser(
            co.ClipGlobalNorm(1.0),
            co.Groups(
                (lambda path, x: x.ndim < 2, co.AdamW(0.1, lambda_=0.0)), default=co.AdamW(0.1, lambda_=0.01)
            ),
        )

    assert_same_either_way(replayed, make, {"replaying": False})


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.filterwarnings("ignore::composeopt.errors.StateResetWarning")  # parameter-replaced
def test_changes_between_replayed_steps(change, replayed):
    def between(step, opt, params):
        return CHANGES[change](opt, params) if step == 4 else None

    # Adam's state second in the chain's, where the changes reach for it.
    make = lambda: co.Optimiser(co.WeightDecay(1e-2), co.Adam(0.1), co.ClipNorm(0.05, throw=False))  # noqa: E731
    assert_same_either_way(replayed, make, {"replaying": False}, between=between)


def test_a_skipped_step_and_a_refused_one_leave_the_replay_right(replayed):
    def grads(params, step):
        tree = gradients(params, step)
        if step == 3:
            tree["layers"][2]["W"] = np.full_like(tree["layers"][2]["W"], np.nan)  # skipped
        if step == 5:
            tree["layers"][2]["W"] = np.ones(3)  # refused
        return tree

    def steps(replaying):
        saved, replay.ENABLED = replay.ENABLED, replaying
        try:
            opt, params = co.SkipNonFinite(co.Adam(0.1)), model()
            for step in range(STEPS):
                if step == 5:
                    before = [x.copy() for x in leaves(params)]
                    with pytest.raises(ShapeMismatchError, match=r"params\['layers'\]\[2\]\['W'\]"):
                        co.update_(opt, params, grads(params, step))
                    for x, y in zip(leaves(params), before):
                        np.testing.assert_array_equal(x, y)
                else:
                    co.update_(opt, params, grads(params, step))
        finally:
            replay.ENABLED = saved
        return opt, params

    opt, params = steps(True)
    assert True in replayed
    reference_opt, reference = steps(False)
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)


def test_a_replay_keeps_neither_parameters_nor_gradients_alive():
    opt, params = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1)), model()
    for step in range(4):
        co.update_(opt, params, gradients(params, step))
    assert co.state_store(opt)._fused_replay is not None
    watched = weakref.ref(params["layers"][0]["W"])
    grads = gradients(params, 4)
    watched_gradient = weakref.ref(grads["layers"][0]["W"])
    co.update_(opt, params, grads)
    del params, grads
    gc.collect()
    assert watched() is None and watched_gradient() is None
    dying = weakref.ref(opt)
    del opt
    gc.collect()
    assert dying() is None


TABLED_CASES = [
    "ClipNorm()",
    "Optimiser(ClipNorm, WeightDecay, Adam)",
    "Optimiser(Momentum, ClipGlobalNorm, InvDecay)",
    "SkipNonFinite(Adam)",
    "Lamb()",
    "Lars(lambda_=1e-3, epsilon=1e-8, nesterov=True)",
    "Novograd()",
    "Fromage()",
]


@pytest.mark.parametrize("case", TABLED_CASES)
def test_one_route_plans_are_replayed_as_tables(case, monkeypatch):
    """Plans without groups or whole-rule kernels take their repeat steps as tables, one call
    per stage; the result is that of the replay's jobs to the last bit."""
    from composeopt._fused import table  # numba's

    runs = spy_on(monkeypatch, table, "run_table")
    opt, params = run(CASES[case])
    assert runs == [True] * (STEPS - 2)
    monkeypatch.setattr(table, "TABLE_MIN", 10**9)
    reference_opt, reference = run(CASES[case])
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)


MEASURING_ONLY = {
    "Lars": (lambda: co.Lars(0.1, lambda_=1e-3), [True, False]),
    "after a clip": (lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.Lars(0.1)), [False, True, False]),
    "two in a row": (
        lambda: co.Optimiser(co.WeightDecay(0.01), co.ClipNorm(1.0), co.ClipGlobalNorm(0.5), co.Descent(0.1)),
        [True, True, False],
    ),
    "Lamb: its update again from its states": (lambda: co.Lamb(0.1), [True, False]),
    "Adam, then a clip": (lambda: co.Optimiser(co.Adam(0.1), co.ClipNorm(1.0, throw=False)), [True, False]),
    "the tail of the last of two stateful kernels": (
        lambda: co.Optimiser(co.Momentum(0.1), co.Adam(0.1), co.ClipNorm(1.0, throw=False)),
        [True, False],
    ),
    "a tail after a reduction": (
        lambda: co.Optimiser(co.Novograd(0.1), co.ClipNorm(1.0, throw=False), co.Descent(0.1)),
        [False, True, False],
    ),
    "Lars's momentum has no tail": (
        lambda: co.Optimiser(co.Lars(0.1), co.ClipNorm(1.0, throw=False), co.Descent(0.1)),
        [True, False, False],
    ),
}


@pytest.mark.parametrize("case", MEASURING_ONLY)
def test_stateless_measured_stages_are_made_again_by_the_next(case, monkeypatch):
    """A table stage before a reduction only measures if the next stage can make its values
    again: its kernels once more if they keep no state, with the scalars of every reduction
    before it, or its last kernel's update from the states it wrote; to the same bits."""
    from composeopt._fused import table  # numba's

    make, expected = MEASURING_ONLY[case]
    routes = spy_on(
        monkeypatch, table, "make_table", taken=lambda made: made and table.measured_only(made.route)
    )
    runs = spy_on(monkeypatch, table, "run_table")
    opt, params = run(make)
    assert runs == [True] * (STEPS - 2) and routes == [expected]
    monkeypatch.setattr(table, "TABLE_MIN", 10**9)
    reference_opt, reference = run(make)
    assert_same(params, reference)
    assert_same_states(opt, params, reference_opt, reference)
