"""Params trees of dataclasses and NamedTuples: paths, pairing, rebuilding, checkpoints.

JAX's registered pytree nodes are in test_jax.py.  The expected values are hand-computed
`Descent` and `Momentum` steps, or the same step over a tree of plain dicts.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import TreeStructureError, UnsupportedArrayError
from composeopt.tree import array_leaves, rebuild, zip_leaves


@dataclasses.dataclass
class Linear:
    weight: Any
    bias: Any


@dataclasses.dataclass
class Model:
    layer: Linear
    head: Linear
    name: str = "mlp"  # not an array: passed over with a None gradient


@dataclasses.dataclass(frozen=True)
class Frozen:
    w: Any
    scale: Any = dataclasses.field(default=None, init=False)  # not an __init__ field: left alone

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", 2.0)


class Pair(NamedTuple):
    left: Any
    right: Any


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def model() -> Model:
    return Model(Linear(arr(1.0, 2.0), arr(0.5)), Linear(arr(3.0), arr(-1.0)))


def grads_of(params: Model) -> Model:
    return Model(Linear(arr(1.0, -1.0), arr(2.0)), Linear(arr(4.0), None), name=None)


def test_dataclass_paths_read_as_attributes():
    params = model()
    paths = [(str(path), path.key) for path, _, _ in zip_leaves(params, grads_of(params))]
    assert paths == [
        ("params.layer.weight", "layer/weight"),
        ("params.layer.bias", "layer/bias"),
        ("params.head.weight", "head/weight"),
    ]
    assert [str(path) for path, _ in array_leaves(params)] == [
        "params.layer.weight",
        "params.layer.bias",
        "params.head.weight",
        "params.head.bias",
    ]


def test_dataclass_update_in_place():
    params = model()
    layer_weight = params.layer.weight
    assert co.update_(co.Descent(0.5), params, grads_of(params)) is params
    assert params.layer.weight is layer_weight
    np.testing.assert_array_equal(params.layer.weight, [0.5, 2.5])
    np.testing.assert_array_equal(params.layer.bias, [-0.5])
    np.testing.assert_array_equal(params.head.weight, [1.0])
    np.testing.assert_array_equal(params.head.bias, [-1.0])  # None gradient


def test_dataclass_functional_update_rebuilds_the_dataclasses():
    opt, params = co.Momentum(0.1, 0.5), model()
    new = co.update(opt, params, grads_of(params))
    assert type(new) is Model and type(new.layer) is Linear and new.name == "mlp"
    np.testing.assert_array_equal(params.layer.weight, [1.0, 2.0])  # the input is untouched
    np.testing.assert_allclose(new.layer.weight, [0.9, 2.1])
    assert new.head.bias is params.head.bias
    # The state moved to the new arrays: the second step has momentum (v = 0.5 v + 0.1 g).
    newer = co.update(opt, new, grads_of(new))
    np.testing.assert_allclose(newer.layer.weight, [0.9 - 0.15, 2.1 + 0.15])


def test_frozen_dataclass_is_rebuilt_through_its_init():
    params = Frozen(arr(1.0))
    new = co.update(co.Descent(1.0), params, Frozen(arr(1.0)))
    assert type(new) is Frozen and new.scale == 2.0
    np.testing.assert_array_equal(new.w, [0.0])


def test_dataclass_steps_equal_the_same_steps_over_dicts():
    as_dicts = {"layer": {"weight": arr(1.0, 2.0), "bias": arr(0.5)}, "head": {"weight": arr(3.0)}}
    params = model()
    on_dicts, on_dataclasses = co.Adam(0.1), co.Adam(0.1)
    for step in range(3):
        g = arr(1.0, -2.0) * (step + 1)
        co.update_(
            on_dicts, as_dicts, {"layer": {"weight": g, "bias": arr(1.0)}, "head": {"weight": arr(-1.0)}}
        )
        co.update_(on_dataclasses, params, Model(Linear(g, arr(1.0)), Linear(arr(-1.0), None), name=None))
    np.testing.assert_array_equal(params.layer.weight, as_dicts["layer"]["weight"])
    np.testing.assert_array_equal(params.layer.bias, as_dicts["layer"]["bias"])
    np.testing.assert_array_equal(params.head.weight, as_dicts["head"]["weight"])


def test_namedtuple_paths_and_rebuild():
    params = {"pair": Pair(arr(1.0), arr(2.0))}
    paths = [str(path) for path, _, _ in zip_leaves(params, {"pair": Pair(arr(1.0), arr(1.0))})]
    assert paths == ["params['pair'].left", "params['pair'].right"]
    new = co.update(co.Descent(1.0), params, {"pair": Pair(arr(1.0), None)})
    assert type(new["pair"]) is Pair
    np.testing.assert_array_equal(new["pair"].left, [0.0])
    assert new["pair"].right is params["pair"].right


@pytest.mark.parametrize(
    ("grads", "message"),
    [
        ({"m": {"layer": None}}, r"params\['m'\]: gradient is a dict, parameter is a Model"),
        ({"m": Linear(arr(1.0), arr(1.0))}, r"params\['m'\]: gradient is a Linear, parameter is a Model"),
        (
            {"m": Model(Linear(arr(1.0, 1.0), arr(1.0)), [arr(1.0), arr(1.0)])},
            r"params\['m'\]\.head: gradient is a list, parameter is a Linear",
        ),
        (
            {"m": Model(Linear(arr(1.0, 1.0), {"b": arr(1.0)}), None)},
            r"params\['m'\]\.layer\.bias: gradient is a dict, not an array",
        ),
    ],
)
def test_mismatched_dataclass_structure_names_the_path(grads, message):
    params = {"m": model()}
    with pytest.raises((TreeStructureError, UnsupportedArrayError), match=message):
        co.update_(co.Descent(), params, grads)


def test_refused_dataclass_step_changes_nothing():
    opt, params = co.Adam(0.1), model()
    co.update_(opt, params, grads_of(params))
    before = params.layer.weight.copy()
    bad = grads_of(params)
    bad.head = Linear(arr(1.0, 2.0), None)  # the wrong shape, after a good leaf
    with pytest.raises(co.errors.ShapeMismatchError, match=re.escape("params.head.weight: gradient shape")):
        co.update_(opt, params, bad)
    np.testing.assert_array_equal(params.layer.weight, before)
    assert co.state_store(opt).step == 1


def test_rebuild_keeps_sharing_inside_dataclasses():
    tied = arr(1.0)
    shared = Linear(tied, tied)
    tree = {"a": shared, "b": shared}
    calls = []
    new = rebuild(tree, lambda x: calls.append(x) or x + 1)
    assert new["a"] is new["b"] and new["a"].weight is new["a"].bias
    assert len(calls) == 1


def test_a_dataclass_class_is_a_leaf_not_a_node():
    with pytest.raises(UnsupportedArrayError, match=r"params\['kind'\]: parameter is a type"):
        co.update_(co.Descent(), {"kind": Linear}, {"kind": arr(1.0)})


def test_groups_select_dataclass_fields_by_key_path():
    params = model()
    opt = co.Groups(("*/bias", co.Descent(0.0)), default=co.Descent(1.0))
    co.update_(opt, params, Model(Linear(arr(1.0, 1.0), arr(1.0)), Linear(arr(1.0), arr(1.0)), name=None))
    np.testing.assert_array_equal(params.layer.weight, [0.0, 1.0])
    np.testing.assert_array_equal(params.layer.bias, [0.5])
    np.testing.assert_array_equal(params.head.bias, [-1.0])


def test_checkpoint_of_dataclass_leaves_round_trips(tmp_path):
    opt, params = co.Adam(0.1), model()
    grads = Model(Linear(arr(1.0, 2.0), arr(1.0)), Linear(arr(1.0), arr(1.0)), name=None)
    co.update_(opt, params, grads)
    saved = co.state_dict(opt, params)
    assert set(saved["states"]) == {
        "params.layer.weight",
        "params.layer.bias",
        "params.head.weight",
        "params.head.bias",
    }
    co.save(tmp_path / "opt.npz", opt, params)
    restored_params = copy.deepcopy(params)  # the same values in other arrays, as after a restart
    restored = co.load(tmp_path / "opt.npz", co.Adam(0.1), restored_params)
    co.update_(opt, params, grads)
    co.update_(restored, restored_params, grads)
    np.testing.assert_array_equal(restored_params.layer.weight, params.layer.weight)
    np.testing.assert_array_equal(restored_params.head.bias, params.head.bias)
    assert co.state_store(restored).step == 2


def test_walking_trees_does_not_import_jax():
    # JAX's registry is asked only where JAX is already imported: a NumPy user never pays for it.
    code = (
        "import dataclasses, sys, numpy as np, composeopt as co\n"
        "L = dataclasses.make_dataclass('L', ['w'])\n"
        "new = co.update(co.Descent(1.0), {'l': L(np.ones(2)), 'n': 'x'}, {'l': L(np.ones(2)), 'n': None})\n"
        "co.state_dict(co.Descent(), new)\n"
        "assert new['l'].w.tolist() == [0.0, 0.0]\n"
        "assert 'jax' not in sys.modules, 'composeopt imported jax'\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
