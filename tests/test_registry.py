"""Generic contract tests: every registry case, on every backend and float dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

import composeopt as co
from composeopt.registry import ALIASES, CASES, RULES

CASE_IDS = list(CASES)

# Cases whose state holds reductions of x rather than arrays shaped like it: Novograd's second
# moment is one number per array, Adafactor's factored moments are a row and a column vector,
# SM3 keeps one vector per axis.  Their state must still have x's dtype and module.
REDUCED_STATE_CASES = {
    "Novograd()",
    "Novograd(lambda_=1e-3)",
    "Adafactor(factored, momentum, lambda_)",
    "SM3()",
    "SM3(momentum=0.0)",
}


def make_params(backend, dtype):
    rng = np.random.default_rng(0)
    return {
        "W": backend.asarray(rng.uniform(-2, 2, (3, 4)), dtype),
        "b": backend.asarray(rng.uniform(-2, 2, (4,)), dtype),
        "s": backend.asarray(rng.uniform(-2, 2, ()), dtype),  # 0-d: NumPy likes to turn these into scalars
    }


def quadratic_grads(backend, params):
    """Gradient of ``0.5 * sum(x**2)`` over the tree: ``x`` itself, as fresh arrays."""
    return {k: backend.copy(v) for k, v in params.items()}


def loss(backend, params):
    return sum(float(np.sum(backend.to_numpy(v).astype(np.float64) ** 2)) for v in params.values())


def state_dtype(backend, opt, x):
    """The dtype of every state array: x's, except under MixedPrecision, which keeps
    the state of narrower parameters in its master dtype."""
    if isinstance(opt, co.MixedPrecision):
        master = getattr(backend.xp, opt.dtype)
        if backend.xp.finfo(master).bits > backend.xp.finfo(x.dtype).bits:
            return master
    return x.dtype


def state_arrays(state):
    if isinstance(state, co.State):
        state = list(vars(state).values())
    if isinstance(state, (tuple, list)):
        for item in state:
            yield from state_arrays(item)
    elif hasattr(state, "shape") and hasattr(state, "dtype"):
        yield state


def test_registry_and_public_names_list_the_same_rules():
    public_rules = {
        name
        for name in co.__all__
        if isinstance(getattr(co, name), type)
        and issubclass(getattr(co, name), co.Rule)
        and name != "Rule"
        and name not in ALIASES
    }
    assert public_rules == set(RULES)
    for alias, cls in ALIASES.items():
        assert getattr(co, alias) is cls
        assert alias in co.__all__


def test_every_rule_class_has_a_case_and_a_docstring():
    covered = {type(factory()).__name__ for factory in CASES.values()}
    assert covered == set(RULES)
    for cls in RULES.values():
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, cls


@pytest.mark.parametrize("case", CASE_IDS)
def test_repr_round_trips(case):
    rule = CASES[case]()
    namespace = {name: getattr(co, name) for name in co.__all__}
    assert eval(repr(rule), namespace) == rule


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_step_keeps_arrays_shape_dtype_module_and_grads(backend, case, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    opt = CASES[case]()
    params = make_params(backend, dtype)
    originals = dict(params)
    grads = quadratic_grads(backend, params)
    grads_before = {k: backend.to_numpy(v).copy() for k, v in grads.items()}
    for _ in range(3):
        assert co.update_(opt, params, grads) is params
    for key, x in params.items():
        assert x is originals[key]
        assert x.dtype == getattr(backend.xp, dtype)
        assert x.shape == originals[key].shape
        assert co.namespace(x) is co.namespace(backend.asarray([1.0], dtype))
        np.testing.assert_array_equal(backend.to_numpy(grads[key]), grads_before[key])
        for array in state_arrays(co.state_store(opt).get(x)):
            assert array.dtype == state_dtype(backend, opt, x)
            # LBFGS keeps its (s, y) history as arrays of shape (memory, *x.shape).
            assert x.shape in (array.shape, array.shape[1:]) or case in REDUCED_STATE_CASES
            assert co.namespace(array) is co.namespace(x)


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_every_case_decreases_a_quadratic(backend, case, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    opt = CASES[case]()
    params = make_params(backend, dtype)
    before = loss(backend, params)
    for _ in range(30):
        co.update_(opt, params, quadratic_grads(backend, params))
    after = loss(backend, params)
    assert math.isfinite(after)
    assert after < before


@pytest.mark.parametrize("case", CASE_IDS)
def test_functional_update_equals_in_place_and_leaves_input(backend, case):
    in_place_opt, functional_opt = CASES[case](), CASES[case]()
    params = make_params(backend, "float64")
    frozen = make_params(backend, "float64")
    for _ in range(4):
        grads = quadratic_grads(backend, params)
        co.update_(in_place_opt, params, grads)
        before = {k: backend.to_numpy(v).copy() for k, v in frozen.items()}
        new = co.update(functional_opt, frozen, quadratic_grads(backend, frozen))
        for key in frozen:
            np.testing.assert_array_equal(backend.to_numpy(frozen[key]), before[key])
        frozen = new
    for key in params:
        np.testing.assert_allclose(backend.to_numpy(frozen[key]), backend.to_numpy(params[key]), rtol=1e-12)


# --- no host reads ---------------------------------------------------------------------

READS_ON_THE_HOST = {
    # Deciding needs a value on the host: whether to raise, or whether to take the step.
    "ClipNorm()": "throw=True checks the norm",
    "Optimiser(ClipNorm, WeightDecay, Adam)": "throw=True checks the norm",
    "SkipNonFinite(Adam)": "one flag per step",
    "SkipNonFinite(Optimiser(ClipGlobalNorm, Momentum), max_consecutive=3)": "one flag per step",
}
"""Registry cases that read an array value on the host (a GPU sync), and why; every other
case must keep its scalars (norms, trust ratios, means) as 0-d device arrays."""


@pytest.fixture
def no_host_reads(monkeypatch):
    """array_api_strict arrays that raise when Python asks for their values (bool, float, NumPy)."""
    strict = pytest.importorskip("array_api_strict")

    def refuse(self, *args, **kwargs):
        raise AssertionError("a rule read an array's value on the host")

    for method in ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__array__", "__dlpack__"):
        monkeypatch.setattr(type(strict.asarray(0.0)), method, refuse)
    return strict


def _strict_params(strict):
    rng = np.random.default_rng(0)
    return {
        "W": strict.asarray(rng.uniform(-2, 2, (3, 4)).tolist()),
        "b": strict.asarray(rng.uniform(-2, 2, 4).tolist()),
        "z": strict.zeros((2, 2)),  # zero norms: the trust ratios' where branch
    }


@pytest.mark.parametrize("case", CASE_IDS)
def test_no_array_value_is_read_on_the_host(no_host_reads, case):
    params = _strict_params(no_host_reads)
    opt = CASES[case]()
    grads = {k: v * 1.5 for k, v in params.items()}
    if case in READS_ON_THE_HOST:
        with pytest.raises(AssertionError, match="on the host"):
            co.update_(opt, params, grads)
        return
    for _ in range(3):
        co.update_(opt, params, {k: v * 1.5 for k, v in params.items()})
