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


# --- the fast check of a repeat step (check.unchanged) -----------------------------------------

from composeopt import _memory, check  # noqa: E402


def _watched_tree():
    """A store whose last full check remembered a nested tree, and that tree and its gradients."""
    pytest.importorskip("numba")
    if not _memory.headers_readable():
        pytest.skip("NumPy's headers cannot be read here")
    params = {"a": [np.ones((2, 3), np.float32) for _ in range(3)], "b": (np.zeros(4), np.ones(()))}
    opt = co.Adam()
    store = co.state_store(opt)
    check.watch(store)
    for step in range(2):
        grads = {"a": [np.full((2, 3), step, np.float32) for _ in range(3)], "b": (np.ones(4), np.ones(()))}
        check.collect(store, params, grads, copy=False, in_place=True)
        saved, _fused.MODE = _fused.MODE, "off"
        try:
            co.update_(opt, params, grads)
        finally:
            _fused.MODE = saved
    check.collect(store, params, grads, copy=False, in_place=True)
    return opt, store, params, grads


def _read_only(opt, params, grads):
    params["a"][2].flags.writeable = False


def _reshaped(opt, params, grads):
    params["a"][1].shape = (3, 2)


def _transposed(opt, params, grads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # as NumPy 2.4 deprecates it
        params["a"][1].strides = (4, 8)  # the same bytes, read in another order


def _dtype_in_place(opt, params, grads):
    params["b"][0].dtype = np.int64


def _another_parameter(opt, params, grads):
    params["a"][0] = params["a"][0].copy()


def _swapped(opt, params, grads):
    params["a"][0], params["a"][1] = params["a"][1], params["a"][0]


def _tied(opt, params, grads):
    params["a"][0] = params["a"][1]


def _gradient_shape(opt, params, grads):
    grads["a"][2] = np.ones((3, 2), np.float32)


def _gradient_dtype(opt, params, grads):
    grads["a"][2] = grads["a"][2].astype(np.float64)


def _gradient_int(opt, params, grads):
    grads["a"][2] = grads["a"][2].astype(np.int32)


def _gradient_scalar(opt, params, grads):
    grads["b"] = (grads["b"][0], np.float64(1.0))


def _gradient_list(opt, params, grads):
    grads["b"] = (grads["b"][0].tolist(), grads["b"][1])


def _gradient_none(opt, params, grads):
    grads["a"][2] = None


def _gradient_subclass(opt, params, grads):
    grads["a"][2] = grads["a"][2].view(np.ma.MaskedArray)


def _container(opt, params, grads):
    params["b"] = list(params["b"])


def _key_order(opt, params, grads):
    params["a"] = params.pop("a")


def _extra_key(opt, params, grads):
    grads["c"] = np.ones(1)


def _frozen(opt, params, grads):
    co.freeze_(opt, params["a"][0])


def _state_replaced(opt, params, grads):
    store = co.state_store(opt)
    store.set(params["a"][0], co.Adam().init(params["a"][0]))


def _reset(opt, params, grads):
    co.reset_(opt)


CHANGES = {
    "read-only": _read_only,
    "reshaped-in-place": _reshaped,
    "strides-set-in-place": _transposed,
    "dtype-set-in-place": _dtype_in_place,
    "another-parameter": _another_parameter,
    "swapped-parameters": _swapped,
    "tied-parameters": _tied,
    "gradient-shape": _gradient_shape,
    "gradient-dtype": _gradient_dtype,
    "gradient-int": _gradient_int,
    "gradient-numpy-scalar": _gradient_scalar,
    "gradient-list": _gradient_list,
    "gradient-none": _gradient_none,
    "gradient-subclass": _gradient_subclass,
    "container-type": _container,
    "key-order": _key_order,
    "extra-gradient-key": _extra_key,
    "frozen": _frozen,
    "state-replaced": _state_replaced,
    "reset": _reset,
}


def test_the_fast_check_proves_a_repeat_step():
    _, store, params, grads = _watched_tree()
    seen = check.unchanged(store, params, grads)
    assert seen is not None and seen is check.seen(store)
    gradients = [g for g in (*grads["a"], *grads["b"])]
    assert seen.gradients[0].tolist() == [g.__array_interface__["data"][0] for g in gradients]
    fresh = {"a": [np.ones((2, 3), np.float32) for _ in range(3)], "b": [np.ones(4), np.ones(())]}
    assert check.unchanged(store, params, fresh) is not None  # new gradients, a list for a tuple


@pytest.mark.parametrize("change", CHANGES)
def test_the_fast_check_proves_nothing_once_anything_changed(change):
    """Anything that the full check looks at, changed since it ran: no proof (the full check
    then runs and decides), whether or not the full check would take the step."""
    opt, store, params, grads = _watched_tree()
    CHANGES[change](opt, params, grads)
    assert check.unchanged(store, params, grads) is None


def test_headers_read_in_place_are_numpys():
    pytest.importorskip("numba")
    if not _memory.headers_readable():
        pytest.skip("NumPy's headers cannot be read here")
    rng = np.random.default_rng(0)
    base = np.arange(4096, dtype=np.float64)
    arrays = [
        base[: rng.integers(1, 60)].reshape(-1, 1)[:: rng.integers(1, 3)],
        base.reshape(8, 8, 8, 8)[::2, 1:, ::-1].T,
        np.asfortranarray(np.ones((3, 5), np.float32)),
        np.frombuffer(bytes(33), np.uint8)[1:].view(np.float32),  # unaligned, read-only
        np.zeros(()),
        np.ones(0),
    ]
    objects = [*arrays, "text", 3, np.float32(2.0), None]
    table = np.zeros((len(objects), _memory.WIDTH), dtype=np.int64)
    _memory.read_headers(objects, len(objects), table)
    for row, a in zip(table, objects):
        assert (row[_memory.OBJECT], row[_memory.TYPE]) == (id(a), id(type(a)))
        if type(a) is not np.ndarray:
            assert not row[_memory.DATA :].any()
            continue
        assert row[_memory.DATA] == a.__array_interface__["data"][0]
        assert row[_memory.FLAGS] == a.flags.num and row[_memory.DTYPE] == id(a.dtype)
        assert row[_memory.NDIM] == a.ndim
        assert tuple(row[_memory.SHAPE : _memory.SHAPE + a.ndim]) == a.shape
        assert tuple(row[_memory.STRIDES : _memory.STRIDES + a.ndim]) == a.strides
    found = np.zeros((2, len(objects)), dtype=np.int64)
    assert _memory.headers_agree(objects, len(objects), table, slice(0, _memory.WIDTH), found)
    table[3, _memory.FLAGS] ^= _memory.ALIGNED
    assert not _memory.headers_agree(objects, len(objects), table, slice(0, _memory.WIDTH), found)
