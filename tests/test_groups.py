"""Selectors: globs over `/` and `.` key paths, and selectors that take nothing are errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import TreeStructureError
from composeopt.groups import matches
from composeopt.tree import Path


def path(*keys):
    text = "params" + "".join(f"[{key!r}]" for key in keys)
    return Path(text, keys)


def torch_names():
    """A flat dict named as `torch.nn.Module.named_parameters()` names a model."""
    return {
        "0.weight": np.ones((2, 2)),
        "0.bias": np.ones(2),
        "layer1.weight": np.ones((2, 2)),
        "layer1.bias": np.ones(2),
    }


def nested():
    return {"layer1": {"W": np.ones((2, 2)), "bias": np.ones(2)}, "head": {"W": np.ones(2)}}


def ones_like(tree):
    return {k: ones_like(v) if isinstance(v, dict) else np.ones_like(v) for k, v in tree.items()}


# --- globs over both separators -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "keys", "expected"),
    [
        ("*/bias", ("0.bias",), True),  # a slash pattern on torch's dotted name
        ("*.bias", ("0.bias",), True),
        ("*.bias", ("layer1", "bias"), True),  # a dotted pattern on a nested dict
        ("*/bias", ("layer1", "bias"), True),
        ("layer1.*", ("layer1.weight",), True),
        ("layer1/*", ("layer1.weight",), True),
        ("layer1.*", ("layer1", "W"), True),
        ("layer1.*", ("layer10.weight",), False),
        ("*/bias", ("0.weight",), False),
        ("layers/0/weight", ("layers.0.weight",), True),
        ("W", ("W",), True),
        ("W", ("layer1", "W"), False),  # a glob still matches the whole path
    ],
)
def test_a_glob_separates_keys_with_slashes_or_dots(pattern, keys, expected):
    assert matches(pattern, path(*keys), None) is expected


def test_a_regex_searches_the_key_path_as_written():
    assert matches(re.compile(r"\.bias$"), path("0.bias"), None)
    assert not matches(re.compile(r"/bias$"), path("0.bias"), None)
    assert matches(re.compile(r"^layer1/"), path("layer1", "W"), None)


def test_groups_take_torch_names_with_either_separator():
    params = torch_names()
    opt = co.Groups(("*/bias", co.Descent(0.0)), ("layer1.*", co.Descent(1.0)), default=co.Descent(0.5))
    co.update_(opt, params, ones_like(params))
    assert params["0.bias"][0] == 1.0 and params["layer1.bias"][0] == 1.0  # no step for biases
    assert params["layer1.weight"][0, 0] == 0.0 and params["0.weight"][0, 0] == 0.5


# --- a selector that takes nothing ----------------------------------------------------------


def test_a_group_whose_selector_takes_nothing_is_an_error_at_the_first_step():
    params = torch_names()
    before = {name: x.copy() for name, x in params.items()}
    opt = co.Groups(("*.norm", co.Adam()), default=co.AdamW(lambda_=0.1))
    with pytest.raises(TreeStructureError, match=r"Groups: the selector '\*\.norm' of group 0 takes none of"):
        co.update_(opt, params, ones_like(params))
    for name, x in params.items():
        np.testing.assert_array_equal(x, before[name])
    assert len(co.state_store(opt)) == 0


def test_the_error_names_each_selector_that_takes_nothing_and_some_paths():
    params = nested()
    opt = co.Groups(("*/W", co.Adam()), (["enc/*", "dec/*"], co.Adam()), default=co.Descent())
    with pytest.raises(
        TreeStructureError, match=r"\['enc/\*', 'dec/\*'\] of group 1 .*params\['layer1'\]\['W'\]"
    ):
        co.update_(opt, params, ones_like(params))


def test_an_empty_group_is_allowed_when_asked_for():
    params = nested()
    opt = co.Groups(("encoder/*", co.Adam()), default=co.Descent(1.0), allow_empty=True)
    co.update_(opt, params, ones_like(params))
    assert params["head"]["W"][0] == 0.0
    assert "allow_empty=True" in repr(opt)
    assert opt != co.Groups(("encoder/*", co.Adam()), default=co.Descent(1.0))


def test_only_the_first_assignment_needs_every_group():
    # Parameters that arrive later (a layer added, a gradient that was None) may fall in one group.
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    opt = co.Groups(("a", co.Descent(1.0)), ("b", co.Descent(2.0)))
    co.update_(opt, params, {"a": np.ones(1), "b": np.ones(1)})
    params["c"] = np.zeros(1)
    opt.groups = (*opt.groups, ("c", co.Descent(3.0)))
    co.update_(opt, params, {"a": None, "b": None, "c": np.ones(1)})
    np.testing.assert_array_equal([params["a"][0], params["b"][0], params["c"][0]], [-1.0, -2.0, -3.0])


def test_a_failed_first_step_checks_again():
    params = {"a": np.zeros(1), "b": np.zeros(1)}
    opt = co.Groups(("a", co.Descent(1.0)), ("b", co.Descent(2.0)))
    with pytest.raises(TreeStructureError, match="'b' of group 1"):
        co.update_(opt, params, {"a": np.ones(1), "b": None})
    with pytest.raises(TreeStructureError, match="'b' of group 1"):
        co.update_(opt, params, {"a": np.ones(1), "b": None})
    co.update_(opt, params, {"a": np.ones(1), "b": np.ones(1)})


def test_a_nested_groups_is_checked_on_the_parameters_it_is_given():
    params = nested()
    inner = co.Groups(("*/bias", co.Descent(0.0)), ("*/norm", co.Descent(0.0)), default=co.Descent(1.0))
    opt = co.Groups(("layer1/*", inner), default=co.Descent(1.0))
    with pytest.raises(TreeStructureError, match=r"'\*/norm' of group 1"):
        co.update_(opt, params, ones_like(params))


def test_init_of_one_parameter_does_not_check_the_groups():
    # `init(x)` knows one array, not the tree: every other group is empty there.
    opt = co.Groups(("*", co.Momentum()), ("b", co.Descent()))
    index, state = opt.init(np.zeros(2))
    assert index == 0 and state.v.shape == (2,)


# --- freeze_ and thaw_ ------------------------------------------------------------------


def test_freeze_and_thaw_refuse_a_selector_that_takes_nothing():
    params = torch_names()
    opt = co.Adam()
    with pytest.raises(TreeStructureError, match=r"freeze_: the selector 'encoder\.\*' takes none of the 4"):
        co.freeze_(opt, params, where="encoder.*")
    assert len(co.state_store(opt).frozen) == 0
    with pytest.raises(TreeStructureError, match=r"thaw_: the selector"):
        co.thaw_(opt, params, where=re.compile("^encoder"))


def test_freeze_takes_torch_names_with_a_slash_pattern():
    params = torch_names()
    opt = co.freeze_(co.Descent(1.0), params, where="*/bias")
    co.update_(opt, params, ones_like(params))
    assert params["0.bias"][0] == 1.0 and params["0.weight"][0, 0] == 0.0
    co.thaw_(opt, params, where="layer1.*")
    co.update_(opt, params, ones_like(params))
    assert params["layer1.bias"][0] == 0.0 and params["0.bias"][0] == 1.0


def test_freezing_a_whole_subtree_needs_no_selector():
    params = nested()
    opt = co.freeze_(co.Descent(1.0), params["head"])
    co.update_(opt, params, ones_like(params))
    assert params["head"]["W"][0] == 1.0
