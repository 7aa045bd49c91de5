"""The check phase: what every path of a step refuses before writing, and aliasing it copes with.

Each test runs on every path a step can take: the generic one (the reference), the
fused per-array steps on numba and on blocked NumPy, and the batched step of a tree
that comes back (with a few good steps taken first so that the batch is live).
"""

from __future__ import annotations

import gc
import threading
import warnings

import numpy as np
import pytest

import composeopt as co
from composeopt import _fused
from composeopt._fused import batch
from composeopt.errors import AliasingError, ShapeMismatchError, StateResetWarning, UnsupportedArrayError

PATHS = ["generic", "numpy", "numba", "batched"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    name = request.param
    if name in ("numba", "batched"):
        pytest.importorskip("numba")
    monkeypatch.setattr(_fused, "MODE", {"generic": "off", "numpy": "numpy"}.get(name, "auto"))
    if name != "batched":
        monkeypatch.setattr(batch, "BATCH_MIN", 10**9)
    return name


def tree(n=20, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {f"p{i:02d}": rng.uniform(-1, 1, 6).astype(dtype) for i in range(n)}


def grads_of(params, step):
    return {key: np.cos(x + step).astype(x.dtype) for key, x in params.items()}


def snapshot(opt, params):
    """Bytes of every parameter, the step count and every state value."""

    def flat(state):
        if isinstance(state, np.ndarray):
            return [(state.dtype.str, state.shape, state.tobytes())]
        if isinstance(state, co.State):
            return [v for name in sorted(vars(state)) for v in flat(getattr(state, name))]
        if isinstance(state, (tuple, list)):
            return [v for item in state for v in flat(item)]
        return [repr(state)]

    store = co.state_store(opt)
    return (
        store.step,
        [(key, x.tobytes()) for key, x in params.items()],
        [flat(store.get(x, "none")) for x in params.values()],
    )


def warm(opt, params, steps=4):
    for step in range(steps):
        co.update_(opt, params, grads_of(params, step))


def generic_reference(make, params, grads_for_last):
    """The generic path's answer, with every gradient copied before anything is written."""
    saved, _fused.MODE = _fused.MODE, "off"
    try:
        opt = make()
        warm(opt, params)
        co.update_(opt, params, {key: np.array(g) for key, g in grads_for_last(params).items()})
    finally:
        _fused.MODE = saved
    return params


CHAINS = {
    "Descent": lambda: co.Descent(0.1),
    "Adam": lambda: co.Adam(0.1),
    "ClipNorm-Adam": lambda: co.Optimiser(co.ClipNorm(0.5), co.Adam(0.1)),
    "ClipGlobalNorm-Momentum": lambda: co.Optimiser(co.ClipGlobalNorm(1.0), co.Momentum(0.1)),
}


# --- a gradient that is, or overlaps, another parameter ---------------------------------


def test_the_issue_example_swapped_gradients(path):
    p = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0])}
    co.update_(co.Descent(0.1), p, {"a": p["b"], "b": p["a"]})
    np.testing.assert_array_equal(p["a"], [0.7, 1.6])
    np.testing.assert_array_equal(p["b"], [2.9, 3.8])


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("alias", ["other-parameter", "overlapping-view", "itself"])
def test_gradients_aliasing_parameters_give_the_generic_answer(path, chain, alias):
    def make_params():
        if alias != "overlapping-view":
            return tree()
        flat = co.flatten(list(tree().values()))  # disjoint views of one buffer
        return {f"p{i:02d}": x for i, x in enumerate(flat.tree)}

    def last(params):
        grads = grads_of(params, 9)
        if alias == "other-parameter":  # a bilinear loss: d(a.b)/da = b
            grads["p18"], grads["p19"] = params["p19"], params["p18"]
        elif alias == "itself":
            grads["p19"] = params["p19"]
        else:  # each gradient starts 3 elements into the previous parameter
            base = params["p00"].base
            grads = {key: base[max(6 * i - 3, 0) :][:6] for i, key in enumerate(params)}
        return grads

    expected = generic_reference(CHAINS[chain], make_params(), last)
    opt, params = CHAINS[chain](), make_params()
    warm(opt, params)
    co.update_(opt, params, last(params))
    # A norm is summed in another order by the fused reductions: a few ulps apart, no more.
    ulps = 4 * np.finfo(np.float32).eps if "Clip" in chain else 0
    for key in params:
        np.testing.assert_allclose(params[key], expected[key], rtol=ulps, atol=ulps, err_msg=key)


# --- parameters sharing memory ----------------------------------------------------------


@pytest.mark.parametrize(
    "alias",
    [
        lambda base: (base, base.T),
        lambda base: (base[:3], base[2:]),
        lambda base: (base[:, :3], base[:, 2:]),
        lambda base: (base.reshape(-1), base[1]),
    ],
    ids=["W-and-W.T", "overlapping-rows", "overlapping-columns", "view-of-a-part"],
)
def test_parameters_sharing_memory_are_refused_naming_both(path, alias):
    params = tree()
    opt = co.Adam(0.1)
    warm(opt, params)
    before = snapshot(opt, params)
    base = np.ones((5, 5), dtype=np.float32)
    copy_of_base = base.copy()
    first, second = alias(base)
    params["z1"], params["z2"] = first, second
    grads = grads_of(params, 5)
    with pytest.raises(
        AliasingError, match=r"params\['z1'\] and params\['z2'\]: the two parameters share memory"
    ):
        co.update_(opt, params, grads)
    np.testing.assert_array_equal(base, copy_of_base)
    del params["z1"], params["z2"]
    assert snapshot(opt, params) == before


@pytest.mark.parametrize(
    "views",
    [
        lambda base: [base[i] for i in range(5)],
        lambda base: [base[:, ::2], base[:, 1::2]],
        lambda base: [base[::2], base[1::2]],
    ],
    ids=["rows", "interleaved-columns", "interleaved-rows"],
)
def test_disjoint_views_of_one_buffer_are_fine(path, views):
    base = np.arange(40, dtype=np.float64).reshape(5, 8)
    expected = base - 0.5  # Descent(0.5) with unit gradients: every element once
    params = views(base)
    co.update_(co.Descent(0.5), params, [np.ones(x.shape) for x in params])
    np.testing.assert_array_equal(base, expected)


def test_elements_sharing_memory_are_refused(path):
    params = tree()
    opt = co.Adam()
    warm(opt, params)
    before = snapshot(opt, params)
    params["zz"] = np.lib.stride_tricks.as_strided(np.zeros(3), (3, 4), (8, 0))
    with pytest.raises(AliasingError, match=r"params\['zz'\]: parameter's elements share memory"):
        co.update_(opt, params, grads_of(params, 5))
    del params["zz"]
    assert snapshot(opt, params) == before


# --- what changes between steps ------------------------------------------------------------


def test_a_parameter_made_read_only_since_the_last_step_is_refused(path):
    params = tree()
    opt = co.Adam(0.1)
    warm(opt, params)
    params["p17"].flags.writeable = False
    before = snapshot(opt, params)
    with pytest.raises(UnsupportedArrayError, match=r"params\['p17'\]: parameter is a read-only numpy array"):
        co.update_(opt, params, grads_of(params, 5))
    assert snapshot(opt, params) == before


def test_a_parameter_reshaped_in_place_is_refused(path):
    params = tree()
    opt = co.Adam(0.1)
    warm(opt, params)
    before = snapshot(opt, params)
    old_grads = grads_of(params, 5)
    params["p18"].shape = (2, 3)
    with pytest.raises(
        ShapeMismatchError, match=r"params\['p18'\]: gradient shape \(6,\) != parameter shape \(2, 3\)"
    ):
        co.update_(opt, params, old_grads)
    new_grads = grads_of(params, 5)
    with pytest.raises(
        ShapeMismatchError,
        match=r"params\['p18'\]: parameter has shape \(2, 3\).*state was made for shape \(6,\)",
    ):
        co.update_(opt, params, new_grads)
    params["p18"].shape = (6,)
    assert snapshot(opt, params) == before
    co.reset_(opt)  # the way out the message names
    params["p18"].shape = (2, 3)
    co.update_(opt, params, new_grads)


# --- a rule that raises on a late leaf -------------------------------------------------------


class _Boom(Exception):
    pass


@pytest.mark.parametrize(
    "make",
    [co.Rprop, co.Adam, co.Momentum, lambda: co.Optimiser(co.ClipNorm(1.0), co.AdaGrad()), co.Lamb],
    ids=["Rprop", "Adam", "Momentum", "ClipNorm-AdaGrad", "Lamb"],
)
def test_a_rule_raising_on_a_late_leaf_changes_no_state(make, monkeypatch):
    """As an array library raising on one dtype would: the earlier leaves' states are put back."""
    monkeypatch.setattr(_fused, "MODE", "off")
    params = tree(50)
    opt = make()
    warm(opt, params)
    before = snapshot(opt, params)
    inner = opt[-1] if isinstance(opt, co.Optimiser) else opt
    original = type(inner).apply_
    late = params["p45"]

    def apply_(state, x, dx):
        if x is late:
            raise _Boom("the array library refused")
        return original(inner, state, x, dx)

    monkeypatch.setattr(inner, "apply_", apply_)
    with pytest.raises(_Boom):
        co.update_(opt, params, grads_of(params, 5))
    assert snapshot(opt, params) == before


# --- threads -----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", ["auto", "off"])
def test_one_optimiser_shared_by_threads_counts_every_step(monkeypatch, fused):
    monkeypatch.setattr(_fused, "MODE", fused)
    opt = co.Optimiser(co.ExpDecay(1.0, 0.5, 100), co.Descent(1.0))
    trees = [tree(20, np.float64, seed) for seed in range(4)]
    failures = []

    def work(params):
        try:
            for _ in range(100):
                co.update_(opt, params, {key: np.ones(6) for key in params})
        except BaseException as err:  # pragma: no cover - reported below
            failures.append(err)

    threads = [threading.Thread(target=work, args=(params,)) for params in trees]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert co.state_store(opt).step == 400
    assert opt[0].eta == 1.0 * 0.5**4  # decayed at steps 100, 200, 300 and 400


# --- arrays replaced between steps ----------------------------------------------------------


def test_a_new_array_in_place_of_a_collected_one_warns_once(path):
    opt = co.Adam(0.1)
    params = tree()
    warm(opt, params)
    params["p03"] = params["p03"].copy()  # the old array dies, and its state with it
    gc.collect()
    with pytest.warns(StateResetWarning, match=r"params\['p03'\]: a new array has taken the place"):
        co.update_(opt, params, grads_of(params, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params = {key: x.copy() for key, x in params.items()}  # every step Adam's first, said once
        co.update_(opt, params, grads_of(params, 6))


def test_a_warning_turned_into_an_error_changes_nothing(path):
    opt = co.Adam(0.1)
    params = tree()
    warm(opt, params)
    params["p19"] = params["p19"].copy()
    gc.collect()
    before = snapshot(opt, params)
    with pytest.raises(StateResetWarning):
        co.update_(opt, params, grads_of(params, 5))
    assert snapshot(opt, params) == before


@pytest.mark.filterwarnings("error::composeopt.errors.StateResetWarning")
def test_no_warning_where_nothing_was_lost(path):
    opt = co.Adam(0.1)
    params = tree()
    warm(opt, params)
    other = tree(seed=1)  # a second tree taking turns: its arrays are new, nothing was lost
    warm(opt, other)
    params["p00"] = np.ones(3, np.float32)  # a different shape: a new parameter, not a rebuilt one
    co.update_(opt, params, grads_of(params, 5))
    co.reset_(opt)
    co.update_(opt, {key: x.copy() for key, x in params.items()}, grads_of(params, 6))


def test_the_functional_update_moves_state_without_warning():
    opt = co.Adam(0.1)
    params = tree(4, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            params = co.update(opt, params, grads_of(params, step))
    assert co.state_store(opt).get(params["p00"]).t == 3


# --- torch tensors that refuse in-place updates ------------------------------------------------


def _torch_tree(torch, n=50):
    torch.manual_seed(0)
    return {f"t{i:02d}": torch.rand(4, dtype=torch.float64) for i in range(n)}


def _torch_snapshot(opt, params):
    store = co.state_store(opt)
    return (
        store.step,
        [x.clone() for x in params.values()],
        [[v.clone() for v in vars(store.get(x)).values() if hasattr(v, "clone")] for x in params.values()],
    )


def _assert_same_torch(torch, a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        assert torch.equal(x, y)
    for xs, ys in zip(a[2], b[2], strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("kind", ["requires-grad-leaf", "view-of-a-leaf", "inference", "expanded"])
def test_torch_tensors_that_refuse_in_place_updates_are_refused_first(kind):
    torch = pytest.importorskip("torch")
    params = _torch_tree(torch)
    opt = co.Adam(0.1)
    for _ in range(3):
        co.update_(opt, params, {key: torch.ones(4, dtype=torch.float64) for key in params})
    before = _torch_snapshot(opt, params)
    original = params["t40"]
    if kind == "requires-grad-leaf":
        original.requires_grad_(True)
        message = r"params\['t40'\]: parameter is a torch tensor that requires grad.*torch.no_grad"
    elif kind == "view-of-a-leaf":
        leaf = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
        params["t40"] = leaf[1]
        message = r"params\['t40'\]: parameter is a torch tensor that requires grad"
    elif kind == "inference":
        with torch.inference_mode():
            params["t40"] = torch.zeros(4, dtype=torch.float64)
        message = r"params\['t40'\]: parameter is a torch inference tensor"
    else:
        params["t40"] = torch.zeros(1, dtype=torch.float64).expand(4)
        message = r"params\['t40'\]: parameter's elements share memory"
    with pytest.raises(co.errors.ComposeoptError, match=message):
        co.update_(opt, params, {key: torch.ones(4, dtype=torch.float64) for key in params})
    original.requires_grad_(False)
    params["t40"] = original
    _assert_same_torch(torch, _torch_snapshot(opt, params), before)


def test_torch_parameters_update_under_no_grad():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        co.update_(co.Descent(0.5), {"w": w}, {"w": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(w.detach(), torch.full((3,), 0.5, dtype=torch.float64))
