"""Adversarial steps: every registry case, on every path, fed bad, odd and aliased input.

A messy training script hands `update_` a tree of arrays after a few good steps
(so that the fused and batched paths are live), with one leaf late in the tree
spoilt: a wrong shape or dtype, a missing or extra key, a gradient that is another
parameter or overlaps one, a parameter made read-only, reshaped in place, swapped
for an integer array or for a view that overlaps another.  Whatever the path
(generic, fused per array, batched), the step must do what the generic path does
with copies of the gradients taken before anything is written (the reference):

* the same result, parameters and states, to the last bit where the math is the
  same (a few ulps where a fused reduction sums in another order); or
* the same error, of the library's own kind, naming the spoilt parameter's path,
  and then every parameter and every state byte for byte as before.

The reference run itself is held to the second half too.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import composeopt as co
from composeopt import _fused
from composeopt._fused import batch, replay
from composeopt.errors import ComposeoptError, StateResetWarning
from composeopt.registry import CASES

PATHS = ("generic", "fused", "fused-numpy", "replayed", "batched")
MODES = {  # _fused.MODE, batching, replaying
    "generic": ("off", False, False),
    "fused": ("auto", False, False),
    "fused-numpy": ("numpy", False, False),  # the blocked NumPy backend, used without numba
    "replayed": ("auto", False, True),  # staged plans: the jobs of the last step again
    "batched": ("auto", True, True),
}
LATE = (("layers", 8, "W"), ("layers", 8, "b"), ("layers", 7, "W"), ("s",))
WARM_STEPS = 3


def model(seed: int = 0, layers: int = 9) -> dict:
    """21 float32 arrays (3 + 2 per layer): 2-D, 1-D and 0-d, nested in dicts and a list."""
    rng = np.random.default_rng(seed)

    def array(*shape):
        return rng.uniform(-1, 1, shape).astype(np.float32)

    return {
        "W": array(4, 5),
        "b": array(5),
        "s": np.asarray(np.float32(0.5)),
        "layers": [{"W": array(3, 4), "b": array(4)} for _ in range(layers)],
    }


def big_model(seed: int = 0) -> dict:
    """303 arrays of the same kinds."""
    return model(seed, layers=150)


def leaves(tree):
    if isinstance(tree, np.ndarray):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [leaf for value in values for leaf in leaves(value)]


def gradients(params, step):
    def walk(tree):
        if isinstance(tree, np.ndarray):
            return np.asarray(np.sin(3 * tree + step) + 0.1, dtype=tree.dtype)
        if isinstance(tree, dict):
            return {key: walk(value) for key, value in tree.items()}
        return [walk(value) for value in tree]

    return walk(params)


def get(tree, where):
    for key in where:
        tree = tree[key]
    return tree


def put(tree, where, value):
    get(tree, where[:-1])[where[-1]] = value


def path_text(where):
    return "params" + "".join(f"[{key!r}]" for key in where)


def flat_state(state):
    if isinstance(state, np.ndarray):
        return [(state.dtype.str, state.shape, state.tobytes())]
    if isinstance(state, co.State):
        return [value for name in sorted(vars(state)) for value in flat_state(getattr(state, name))]
    if isinstance(state, (tuple, list)):
        return [value for item in state for value in flat_state(item)]
    return [repr(state)]


def snapshot(opt, arrays):
    store = co.state_store(opt)
    return (
        store.step,
        [(x.dtype.str, x.shape, x.tobytes()) for x in arrays],
        [flat_state(store.get(x, "none")) for x in arrays],
        repr(opt),
    )


# --- the perturbations ------------------------------------------------------------------------
# Each takes (params, grads, where, keep, opt) and spoils one leaf; `keep` holds arrays that
# must stay alive (a replaced parameter keeps its state, so nothing else is lost).


def _grad(value_of):
    def spoil(params, grads, where, keep, opt):
        put(grads, where, value_of(get(params, where), get(grads, where), params))

    return spoil


def _param(change):
    def spoil(params, grads, where, keep, opt):
        x = get(params, where)
        keep.append(x)
        new = change(x, params)
        if new is not None:
            put(params, where, new)
            put(grads, where, np.ones(np.shape(new), np.float32))

    return spoil


def _read_only(x, params):
    x.flags.writeable = False


def _reshape(x, params):
    if x.ndim:
        x.shape = (x.size,) if x.ndim > 1 else (1, x.size)
    else:
        x.shape = (1,)


def _overlapping(x, params):
    other = params["W"]
    return other.reshape(-1)[: max(x.size, 1)].reshape(x.shape)


def _state_arrays(opt, x):
    """The arrays of `x`'s state, in a fixed order."""

    def arrays(state):
        if isinstance(state, np.ndarray):
            return [state]
        if isinstance(state, co.State):
            return [a for name in sorted(vars(state)) for a in arrays(getattr(state, name))]
        if isinstance(state, (tuple, list)):
            return [a for item in state for a in arrays(item)]
        return []

    return arrays(co.state_store(opt).get(x))


def _a_state(params, grads, where, keep, opt):
    """The gradient is a state array of its own parameter (or the parameter, for rules with none)."""
    x = get(params, where)
    same = [a for a in _state_arrays(opt, x) if a.shape == x.shape]
    put(grads, where, same[0] if same else x)


def _overlapping_a_state(params, grads, where, keep, opt):
    """The gradient is a view into a state array of params["W"], from its second element."""
    x = get(params, where)
    bigger = [a for a in _state_arrays(opt, params["W"]) if a.size > x.size]
    put(grads, where, bigger[0].reshape(-1)[1 : 1 + x.size].reshape(x.shape) if bigger else x)


def _frozen(params, grads, where, keep, opt):
    co.freeze_(opt, get(params, where))


def _dtype_in_place(x, params):
    x.dtype = np.int32  # the same bytes, read as integers


def _missing_key(params, grads, where, keep, opt):
    if isinstance(where[-1], str):
        del get(grads, where[:-1])[where[-1]]
    else:
        get(grads, where[:-1]).pop()


def _extra_key(params, grads, where, keep, opt):
    get(grads, where[:-1] if isinstance(where[-1], str) else where[:-2])["unexpected"] = np.ones(2)


def _dropped_subtree(params, grads, where, keep, opt):
    grads["layers"] = grads["layers"][:-1]


PERTURBATIONS = {
    # refused
    "grad-wrong-shape": _grad(lambda x, g, p: np.ones((*x.shape, 2), np.float32)),
    "grad-transposed": _grad(
        lambda x, g, p: (
            np.ascontiguousarray(g.T)
            if x.ndim == 2 and x.shape[0] != x.shape[1]
            else np.ones(x.size + 1, np.float32)
        )
    ),
    "grad-complex": _grad(lambda x, g, p: g.astype(np.complex64)),
    "grad-list": _grad(lambda x, g, p: g.tolist()),
    "grad-string": _grad(lambda x, g, p: "gradient"),
    "grad-missing-key": _missing_key,
    "grad-extra-key": _extra_key,
    "grad-list-too-short": _dropped_subtree,
    "param-read-only": _param(_read_only),
    "param-reshaped-in-place": _param(_reshape),
    "param-integer": _param(lambda x, p: np.zeros(x.shape, np.int32)),
    "param-overlaps-another": _param(_overlapping),
    "param-expanded-view": _param(
        lambda x, p: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), x.shape, (0,) * x.ndim)
    ),
    "param-dtype-changed-in-place": _param(_dtype_in_place),
    # taken
    "grad-int": _grad(lambda x, g, p: np.round(4 * g).astype(np.int64)),
    "grad-bool": _grad(lambda x, g, p: g > 0),
    "grad-float64": _grad(lambda x, g, p: g.astype(np.float64)),
    "grad-float16": _grad(lambda x, g, p: g.astype(np.float16)),
    "grad-fortran-order": _grad(lambda x, g, p: np.asfortranarray(g)),
    "grad-strided": _grad(lambda x, g, p: np.repeat(g, 2).reshape(*g.shape, 2)[..., 0] if g.ndim else g),
    "grad-read-only": _grad(lambda x, g, p: _frozen(g)),
    "grad-scalar-0d": _grad(lambda x, g, p: g[()] if g.ndim == 0 else g),
    "grad-none": _grad(lambda x, g, p: None),
    "grad-is-the-parameter": _grad(lambda x, g, p: x),
    "grad-is-another-parameter": _grad(lambda x, g, p: _another(p, x)),
    "grad-overlaps-a-parameter": _grad(lambda x, g, p: _overlapping_gradient(p, x)),
    "grad-is-a-state": _a_state,
    "grad-overlaps-a-state": _overlapping_a_state,
    "frozen-parameter": _frozen,
    "grad-nan": _grad(lambda x, g, p: np.full_like(g, np.nan)),
    "grad-inf": _grad(lambda x, g, p: np.full_like(g, np.inf)),
    "grad-huge": _grad(lambda x, g, p: np.full_like(g, 3e38)),
}


def _frozen(g):
    g = g.copy()
    g.flags.writeable = False
    return g


def _another(params, x):
    for other in leaves(params):
        if other is not x and other.shape == x.shape:
            return other
    return x


def _overlapping_gradient(params, x):
    """A view of a parameter's buffer that starts inside another parameter."""
    flat = params["W"].reshape(-1)
    return flat[1 : 1 + x.size].reshape(x.shape) if x.size + 1 <= flat.size else x


# --- running a step both ways --------------------------------------------------------------


def _spoilt_step(make, path, perturbation, where, tree=model):
    """Warm up, spoil one leaf, take the step: (error or None, opt, arrays, their snapshot
    before); `LIVE` notes whether the spoilt step met a batch."""
    mode, batching, replaying = MODES[path]
    saved = (_fused.MODE, batch.BATCH_MIN, replay.ENABLED)
    _fused.MODE = mode
    batch.BATCH_MIN = batch.BATCH_MIN if batching else 10**9
    replay.ENABLED = replaying
    try:
        opt, params = make(), tree()
        for step in range(WARM_STEPS):
            co.update_(opt, params, gradients(params, step))
        store = co.state_store(opt)
        LIVE[path] = store in batch._batches or getattr(store, "_fused_replay", None) is not None
        keep: list = []
        grads = gradients(params, WARM_STEPS)
        PERTURBATIONS[perturbation](params, grads, where, keep, opt)
        arrays = leaves(params) + keep
        before = snapshot(opt, arrays)
        if mode == "off":  # the reference reads copies taken before anything is written
            grads = _copies(grads)
        try:
            co.update_(opt, params, grads)
        except ComposeoptError as err:
            return err, opt, arrays, before
        return None, opt, arrays, before
    finally:
        _fused.MODE, batch.BATCH_MIN, replay.ENABLED = saved


def _copies(tree):
    if isinstance(tree, np.ndarray):
        return np.array(tree, copy=True, order="K")
    if isinstance(tree, dict):
        return {key: _copies(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_copies(value) for value in tree]
    return tree


LIVE: dict[str, bool] = {}


def check(case, paths, perturbation, where, spoilt=None, tree=model):
    """Run the spoilt step on each of `paths` against the generic reference; "refused" or "taken".

    An error must name one of the `spoilt` leaves (`[where]` by default), or a container of one."""
    make = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateResetWarning)  # nothing here loses a state
        expected, ref_opt, ref_arrays, ref_before = _spoilt_step(make, "generic", perturbation, where, tree)
        if expected is not None:
            assert snapshot(ref_opt, ref_arrays) == ref_before, "the generic path changed something"
            # The spoilt leaf's path, or its container's for a structure error.
            named = [path_text(at[:k]) for at in spoilt or [where] for k in range(len(at), -1, -1)]
            message = str(expected)
            assert any(
                message.startswith((f"{p}:", f"{p} and ")) or f" and {p}:" in message for p in named
            ), f"no path in {expected!r}"
        want = snapshot(ref_opt, ref_arrays)
        for path in paths:
            error, opt, arrays, before = _spoilt_step(make, path, perturbation, where, tree)
            if expected is not None:
                assert error is not None, f"{path} took a step the generic path refuses: {expected}"
                assert type(error) is type(expected) and str(error) == str(expected)
                assert snapshot(opt, arrays) == before, f"{path} changed something before raising"
                continue
            assert error is None, f"{path} refused a step the generic path takes: {error}"
            got = snapshot(opt, arrays)
            assert got[0] == want[0] and got[3] == want[3]
            if got[1:3] != want[1:3]:  # a fused reduction may sum in another order: a few ulps
                for (dtype, _, a), (_, _, b) in zip(got[1], want[1], strict=True):
                    _assert_ulps_close(np.frombuffer(a, dtype), np.frombuffer(b, dtype))
                assert [len(s) for s in got[2]] == [len(s) for s in want[2]]
    return "taken" if expected is None else "refused"


def _assert_ulps_close(a, b):
    finite = np.isfinite(b)
    np.testing.assert_array_equal(np.isfinite(a), finite)
    scale = float(np.max(np.abs(b[finite]), initial=1.0))
    eps = float(np.finfo(b.dtype).eps)
    np.testing.assert_allclose(a[finite], b[finite], rtol=64 * eps, atol=64 * eps * scale)


# --- every case x path x perturbation at the last leaf ---------------------------------------

pytest.importorskip("numba")  # without it, "fused" and "batched" are the blocked NumPy path

REFUSED = {
    name
    for name in PERTURBATIONS
    if name.startswith("param-")
    or name
    in (
        "grad-wrong-shape",
        "grad-transposed",
        "grad-complex",
        "grad-list",
        "grad-string",
        "grad-missing-key",
        "grad-extra-key",
        "grad-list-too-short",
    )
}


# A case without a fast path takes the generic path whatever the mode: one run says so.
FAST = {case for case in CASES if _fused.make_plan(CASES[case]()) is not None}


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_case_on_every_path(case, perturbation):
    outcome = check(case, PATHS[1:] if case in FAST else PATHS[1:2], perturbation, LATE[0])
    if perturbation in REFUSED:
        assert outcome == "refused"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(sorted(CASES)),
    path=st.sampled_from(PATHS[1:]),
    perturbations=st.lists(st.sampled_from(sorted(PERTURBATIONS)), min_size=1, max_size=3, unique=True),
    where=st.sampled_from(LATE),
)
def test_generated_spoilt_steps(case, path, perturbations, where):
    """Up to three spoilt leaves at once, anywhere late in the tree."""
    name = "+".join(perturbations)
    if name not in PERTURBATIONS:
        spoils = [PERTURBATIONS[p] for p in perturbations]
        wheres = [where, *(w for w in LATE if w != where)]

        def spoil(params, grads, _where, keep, opt):
            for one, at in zip(spoils, wheres):
                try:
                    get(grads, at)
                except (KeyError, IndexError):
                    continue  # an earlier spoil removed it
                one(params, grads, at, keep, opt)

        PERTURBATIONS[name] = spoil
    try:
        check(case, [path], name, where, [where, *LATE])
    finally:
        if len(perturbations) > 1:
            del PERTURBATIONS[name]


def test_the_sweep_takes_the_batched_path():
    """The batched runs of the sweep are batched: the good steps before the spoilt one run the
    batch, so the spoilt step meets a live one."""
    runs = []
    original = batch.Batch.run

    def run(self, k):
        runs.append(k)
        return original(self, k)

    batch.Batch.run = run
    try:
        check("Adam()", ["batched"], "grad-is-another-parameter", LATE[0])
    finally:
        batch.Batch.run = original
    assert runs


# --- the batched path over a big tree ---------------------------------------------------------

BATCHED_CASES = [
    "Adam()",
    "Lion(eta=0.01)",
    "Optimiser(ExpDecay, Descent)",
    "Adam(eta=Warmup(CosineAnnealing))",
]
BIG_LATE = ("layers", 148, "W")


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
@pytest.mark.parametrize("case", BATCHED_CASES)
def test_a_spoilt_leaf_late_in_a_big_tree_meets_a_live_batch(case, perturbation):
    """Good steps first, so that the batch is live; then one leaf of 303 spoilt: the batched
    path refuses what the generic one refuses, with the same error and nothing changed, and
    takes what it takes, with the same result."""
    outcome = check(case, ["batched"], perturbation, BIG_LATE, tree=big_model)
    assert LIVE["batched"]
    if perturbation in REFUSED:
        assert outcome == "refused"


# --- the replayed step over a big tree ----------------------------------------------------------

STAGED_CASES = [
    "Optimiser(ClipNorm, WeightDecay, Adam)",
    "SkipNonFinite(Optimiser(ClipGlobalNorm, Momentum), max_consecutive=3)",
    "Optimiser(ClipGlobalNorm, Groups(W: Momentum, default: Descent))",
    "Lamb()",
    "Adafactor(factored, momentum, lambda_)",
]


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
@pytest.mark.parametrize("case", STAGED_CASES)
def test_a_spoilt_leaf_late_in_a_big_tree_meets_a_live_replay(case, perturbation):
    """The same for plans of several stages, whose repeat steps replay the last step's jobs."""
    outcome = check(case, ["replayed"], perturbation, BIG_LATE, tree=big_model)
    assert LIVE["replayed"]
    if perturbation in REFUSED:
        assert outcome == "refused"
