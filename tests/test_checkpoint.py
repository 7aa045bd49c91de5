"""Checkpoints: plain data keyed by path, npz files without pickle, strict checks, resume."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import composeopt as co
from composeopt.errors import CheckpointError
from composeopt.registry import CASES

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("resume_run", HERE / "resume_run.py")
assert _spec is not None and _spec.loader is not None
resume_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_run)


def chain():
    return co.Optimiser(co.ClipNorm(10.0), co.ExpDecay(1.0, 0.5, 3), co.Adam(eta=co.Warmup(0.1, 4)))


def trained(opt, steps=7):
    params = resume_run.make_params()
    resume_run.train(opt, params, 0, steps)
    return params


def is_plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, np.ndarray))


def test_state_dict_is_plain_data_keyed_by_path():
    opt = chain()
    params = trained(opt)
    sd = co.state_dict(opt, params)
    assert is_plain(sd)
    assert sd["step"] == 7 and sd["version"] == co.checkpoint.VERSION and sd["optimiser"] == repr(opt)
    assert set(sd["states"]) == {"params['W']", "params['b']", "params['s']"}
    assert sd["params"]["params['W']"] == {"shape": [3, 4], "dtype": "float64"}
    adam_state = sd["states"]["params['W']"]["__tuple__"][2]["__state__"]
    np.testing.assert_array_equal(adam_state["mu"], co.state_store(opt).get(params["W"])[2].mu)
    assert adam_state["t"] == 7
    assert sd["hyperparameters"][2] == {"eta": 0.25, "decay": 0.5, "decay_step": 3, "clip": 1e-4, "start": 0}
    assert "eta" not in sd["hyperparameters"][3]  # scheduled: the step count gives it back


def test_load_state_dict_resumes_exactly_in_process():
    reference, params = chain(), resume_run.make_params()
    resume_run.train(reference, params, 0, 12)
    opt = chain()
    resumed = trained(opt, 7)
    fresh = chain()
    co.load_state_dict(fresh, resumed, co.state_dict(opt, resumed))
    assert fresh[1].eta == opt[1].eta == 0.25
    resume_run.train(fresh, resumed, 7, 12)
    for key in params:
        np.testing.assert_array_equal(resumed[key], params[key])


def test_save_and_load_a_file_without_pickle(tmp_path):
    opt = chain()
    params = trained(opt)
    target = tmp_path / "opt.npz"
    co.save(target, opt, params)
    assert os.listdir(tmp_path) == ["opt.npz"]  # the temporary file was renamed
    with np.load(target, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
    fresh = chain()
    co.load(target, fresh, params)
    assert co.state_store(fresh).step == 7
    np.testing.assert_array_equal(
        co.state_store(fresh).get(params["b"])[2].nu, co.state_store(opt).get(params["b"])[2].nu
    )


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    opt = chain()
    params = trained(opt)
    target = tmp_path / "opt.npz"
    co.save(target, opt, params)
    before = target.read_bytes()
    resume_run.train(opt, params, 7, 8)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        co.save(target, opt, params)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["opt.npz"]


def test_mismatches_are_clear_errors_and_change_nothing():
    opt = chain()
    params = trained(opt)
    sd = co.state_dict(opt, params)
    fresh = chain()
    bigger = {**resume_run.make_params(), "extra": np.zeros(2)}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \[\"params\['extra'\]\"\]"):
        co.load_state_dict(fresh, bigger, sd)
    smaller = {"W": params["W"], "b": params["b"]}
    with pytest.raises(CheckpointError, match=r"unexpected in it: \[\"params\['s'\]\"\]"):
        co.load_state_dict(fresh, smaller, sd)
    co.load_state_dict(fresh, smaller, sd, strict=False)
    assert co.state_store(fresh).get(smaller["W"])[2].t == 7
    reshaped = {**resume_run.make_params(), "b": np.zeros(5)}
    with pytest.raises(
        CheckpointError, match=r"params\['b'\]: checkpoint has shape \(4,\) and dtype float64"
    ):
        co.load_state_dict(chain(), reshaped, sd)
    retyped = {k: v.astype(np.float32) for k, v in resume_run.make_params().items()}
    with pytest.raises(CheckpointError, match="dtype float64, the parameter has shape .* dtype float32"):
        co.load_state_dict(chain(), retyped, sd)
    other = co.Optimiser(co.ClipNorm(10.0), co.Adam())
    with pytest.raises(CheckpointError, match="the rules or the chain differ"):
        co.load_state_dict(other, params, sd)
    assert len(co.state_store(other)) == 0
    with pytest.raises(CheckpointError, match="not a composeopt checkpoint"):
        co.load_state_dict(chain(), params, {"format": "something else"})
    with pytest.raises(CheckpointError, match="newer"):
        co.load_state_dict(chain(), params, {**sd, "version": 99})


def test_frozen_marks_travel_with_the_checkpoint():
    opt = co.Adam()
    params = trained(opt, 2)
    co.freeze_(opt, params, where="b")
    sd = co.state_dict(opt, params)
    assert sd["frozen"] == ["params['b']"]
    fresh = co.load_state_dict(co.Adam(), params, sd)
    before = params["b"].copy()
    resume_run.train(fresh, params, 2, 3)
    np.testing.assert_array_equal(params["b"], before)


def test_tied_parameter_is_saved_once():
    shared = np.ones(3)
    params = {"enc": shared, "dec": shared}
    opt = co.Adam()
    co.update_(opt, params, {"enc": np.ones(3), "dec": np.ones(3)})
    sd = co.state_dict(opt, params)
    assert list(sd["states"]) == ["params['enc']"]
    fresh = co.load_state_dict(co.Adam(), params, sd)
    assert co.state_store(fresh).get(shared).t == 1


def test_unsupported_state_is_refused():
    class Odd(co.Rule):
        def init(self, x):
            return object()

        def apply_(self, state, x, dx):
            return dx

    opt = Odd()
    x = np.ones(1)
    co.update_(opt, x, np.ones(1))
    with pytest.raises(CheckpointError, match="params: cannot checkpoint a state of type object"):
        co.state_dict(opt, x)


def test_state_moves_between_devices_and_modules():
    strict = pytest.importorskip("array_api_strict")
    other = strict.Device("device1")
    params = {"w": strict.asarray([1.0, 2.0], dtype=strict.float64, device=other)}
    opt = co.Adam(0.1)
    co.update_(opt, params, {"w": strict.asarray([1.0, -1.0], dtype=strict.float64, device=other)})
    sd = co.state_dict(opt, params)
    assert isinstance(sd["states"]["params['w']"]["__state__"]["mu"], np.ndarray)
    host = {"w": np.array([1.0, 2.0])}
    on_host = co.load_state_dict(co.Adam(0.1), host, sd)
    np.testing.assert_allclose(co.state_store(on_host).get(host["w"]).mu, [0.1, -0.1])
    back = {"w": strict.asarray([1.0, 2.0], dtype=strict.float64, device=other)}
    on_device = co.load_state_dict(co.Adam(0.1), back, co.state_dict(on_host, host))
    assert co.state_store(on_device).get(back["w"]).mu.device == other


def test_state_moves_from_gpu_to_cpu_and_back(cupy_backend):
    cupy = cupy_backend.xp
    params = {"w": cupy.ones(4)}
    opt = co.Adam(0.1)
    co.update_(opt, params, {"w": cupy.ones(4)})
    host = {"w": np.ones(4)}
    co.load_state_dict(on_host := co.Adam(0.1), host, co.state_dict(opt, params))
    assert isinstance(co.state_store(on_host).get(host["w"]).mu, np.ndarray)
    again = {"w": cupy.ones(4)}
    co.load_state_dict(on_gpu := co.Adam(0.1), again, co.state_dict(on_host, host))
    assert isinstance(co.state_store(on_gpu).get(again["w"]).mu, cupy.ndarray)


def test_resume_in_a_fresh_process_is_bit_identical_for_every_registry_case(tmp_path):
    script = str(HERE / "resume_run.py")
    # The fresh processes import the same composeopt as this one (source tree or installed wheel).
    env = {**os.environ, "PYTHONPATH": str(Path(co.__file__).parent.parent)}
    for mode in ("first", "second"):
        subprocess.run([sys.executable, script, mode, str(tmp_path)], check=True, env=env)
    for index, (name, make) in enumerate(CASES.items()):
        params = resume_run.make_params()
        resume_run.train(make(), params, 0, resume_run.TOTAL)
        with np.load(tmp_path / f"final-{index}.npz") as resumed:
            for key in params:
                assert np.array_equal(resumed[key], params[key], equal_nan=True), (name, key)


# --- a refused checkpoint changes nothing -----------------------------------------


def snapshot(opt, params):
    """Everything a load could change, as bytes and exact values: compare with ==."""

    def describe(value):
        if isinstance(value, np.ndarray):
            return ("array", value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, co.State):
            return ("State", sorted((name, describe(item)) for name, item in vars(value).items()))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, [describe(item) for item in value])
        if isinstance(value, dict):
            return ("dict", sorted((str(key), describe(item)) for key, item in value.items()))
        if isinstance(value, co.Rule):
            return ("rule", id(value))
        return (type(value).__name__, repr(value))

    store = co.state_store(opt)
    rules = [
        sorted((name, describe(value)) for name, value in vars(rule).items() if name != "_composeopt_state")
        for rule in co.rule.walk_rules(opt)
    ]
    leaves = [(str(path), x) for path, x in co.tree.array_leaves(params)]
    return (
        rules,
        store.step,
        len(store),
        [(path, describe(store.get(x, "no state")), x in store.frozen) for path, x in leaves],
        [(path, describe(x)) for path, x in leaves],
    )


def adam_checkpoint():
    """A trained Adam's checkpoint, and a second Adam with other state to load it onto."""
    opt = co.Adam(0.1)
    params = trained(opt, 3)
    sd = co.state_dict(opt, params)
    target = co.Adam(0.2)
    other = resume_run.make_params()
    resume_run.train(target, other, 10, 12)
    co.freeze_(target, other, where="s")
    return sd, target, other


def refused(target, params, checkpoint, match, **kwargs):
    before = snapshot(target, params)
    with pytest.raises(CheckpointError, match=match):
        co.load_state_dict(target, params, checkpoint, **kwargs)
    assert snapshot(target, params) == before


def adam_state(sd, path="params['W']"):
    return sd["states"][path]["__state__"]


def test_only_declared_hyperparameters_load():
    chained = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1))
    params = trained(chained, 2)
    sd = co.state_dict(chained, params)
    for bad in ({"rules": []}, {"fallible": True}, {"init": 1}, {"_composeopt_state": None}):
        for index in (0, 2):
            hyper = [dict(values) for values in sd["hyperparameters"]]
            hyper[index].update(bad)
            (name,) = bad
            refused(chained, params, {**sd, "hyperparameters": hyper}, rf"hyperparameters.*{name}")
    assert len(chained.rules) == 2 and type(chained[1]).fallible is False


def test_every_hyperparameter_is_checked_before_any_is_set():
    sd, target, params = adam_checkpoint()
    for eta in (-1.0, "abc", None, float("nan"), [0.1], {"a": 1}):
        hyper = [{**sd["hyperparameters"][0], "epsilon": 1e-3, "eta": eta}]
        refused(target, params, {**sd, "hyperparameters": hyper}, r"hyperparameters.*Adam\.eta")
    hyper = [{**sd["hyperparameters"][0], "eta": 0.5, "beta": [0.9, 1.5]}]
    refused(target, params, {**sd, "hyperparameters": hyper}, r"Adam\.beta")
    for hyper in ([], [{}, {}], None, {"eta": 0.1}, [None], [[0.1]]):
        refused(target, params, {**sd, "hyperparameters": hyper}, "hyperparameters")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("t", -1, r"params\['W'\]: .*\.t: expected a non-negative integer"),
        ("t", "3", r"\.t: expected a non-negative integer"),
        ("t", 2.5, r"\.t: expected a non-negative integer"),
        ("t", True, r"\.t: expected a non-negative integer"),
        ("t", None, r"\.t: expected a non-negative integer"),
        ("t", 2**64, r"\.t: expected a non-negative integer"),
        ("mu", np.zeros((4, 3)), r"\.mu: expected a float64 array of shape \(3, 4\)"),
        ("mu", np.zeros((3, 4), np.float32), r"\.mu: expected a float64 array of shape \(3, 4\)"),
        ("mu", [[0.0] * 4] * 3, r"\.mu: expected a float64 array"),
        ("mu", None, r"\.mu: expected a float64 array"),
    ],
)
def test_state_values_must_match_what_init_makes(field, value, match):
    sd, target, params = adam_checkpoint()
    state = {**adam_state(sd), field: value}
    states = {**sd["states"], "params['W']": {"__state__": state}}
    refused(target, params, {**sd, "states": states}, match)


def test_state_fields_must_be_those_init_makes():
    sd, target, params = adam_checkpoint()
    fields = adam_state(sd)
    for state, match in (
        ({**fields, "extra": 1}, r"params\['W'\]: .*unexpected fields \['extra'\]"),
        ({k: v for k, v in fields.items() if k != "nu"}, r"params\['W'\]: .*missing fields \['nu'\]"),
    ):
        states = {**sd["states"], "params['W']": {"__state__": state}}
        refused(target, params, {**sd, "states": states}, match)
    for wrong in (None, 3, {"__tuple__": [fields]}, {"__state__": fields, "__tuple__": []}, [fields]):
        refused(target, params, {**sd, "states": {**sd["states"], "params['b']": wrong}}, r"params\['b'\]")


@pytest.mark.parametrize("step", [-3, "abc", 2.5, True, None, 10**400, 2**63])
def test_step_must_be_a_sane_non_negative_integer(step):
    sd, target, params = adam_checkpoint()
    refused(target, params, {**sd, "step": step}, "'step'")


@pytest.mark.parametrize("version", [True, "1", 1.0, None, 0])
def test_version_must_be_a_known_integer(version):
    sd, target, params = adam_checkpoint()
    refused(target, params, {**sd, "version": version}, "version")


def test_version_one_is_not_called_newer_than_one():
    sd, target, params = adam_checkpoint()
    before = snapshot(target, params)
    with pytest.raises(CheckpointError) as error:
        co.load_state_dict(target, params, {**sd, "version": "1"})
    assert "newer" not in str(error.value) and "'1'" in str(error.value)
    assert snapshot(target, params) == before


@pytest.mark.parametrize("frozen", [None, 5, "params['b']", {"params['b']": True}, [3], ["params['x']"]])
def test_a_bad_frozen_list_changes_nothing(frozen):
    sd, target, params = adam_checkpoint()
    refused(target, params, {**sd, "frozen": frozen}, "frozen")


def test_missing_or_extra_entries_are_refused():
    sd, target, params = adam_checkpoint()
    for key in sd:
        if key != "format":
            refused(target, params, {k: v for k, v in sd.items() if k != key}, f"'{key}'")
    refused(target, params, {**sd, "comment": "hello"}, "'comment'")
    for wrong in ([], None, "text", 3):
        refused(target, params, wrong, "checkpoint")


def test_states_must_be_a_mapping_of_known_paths():
    sd, target, params = adam_checkpoint()
    refused(target, params, {**sd, "states": list(sd["states"].values())}, "'states'")
    refused(target, params, {**sd, "states": {**sd["states"], "params['x']": None}}, r"params\['x'\]")


def test_params_entries_are_checked():
    sd, target, params = adam_checkpoint()
    for entry in (
        None,
        {"shape": [3, 4]},
        {"shape": [3, 4], "dtype": "float64", "more": 1},
        {"shape": "3, 4", "dtype": "float64"},
        {"shape": [3, True], "dtype": "float64"},
        {"shape": [3, 4], "dtype": 8},
    ):
        refused(target, params, {**sd, "params": {**sd["params"], "params['W']": entry}}, r"params\['W'\]")


def test_a_loaded_array_does_not_share_memory_with_the_checkpoint():
    sd, _, params = adam_checkpoint()
    one, two = co.load_state_dict(co.Adam(0.1), params, sd), co.Adam(0.1)
    co.load_state_dict(two, params, sd)
    mu = adam_state(sd)["mu"].copy()
    resume_run.train(one, params, 0, 1)
    np.testing.assert_array_equal(adam_state(sd)["mu"], mu)
    np.testing.assert_array_equal(co.state_store(two).get(params["W"]).mu, mu)


def test_a_parameter_without_state_in_the_checkpoint_has_none_after_loading():
    opt, params = co.Adam(0.1), resume_run.make_params()
    co.update_(opt, params, {"W": np.ones((3, 4)), "b": None, "s": None})
    sd = co.state_dict(opt, params)
    assert list(sd["states"]) == ["params['W']"]
    target = co.Adam(0.1)
    resume_run.train(target, params, 0, 2)
    co.load_state_dict(target, params, sd)
    assert params["b"] not in co.state_store(target) and params["W"] in co.state_store(target)


# --- parameter groups -------------------------------------------------------------


def grouped(selector="b"):
    return co.Groups((selector, co.Momentum(0.1)), default=co.Descent(0.1))


def test_a_grouping_with_other_selectors_is_refused():
    opt = grouped("b")
    params = trained(opt, 2)
    sd = co.state_dict(opt, params)
    for other in (grouped("W"), grouped(["b"]), grouped(lambda path, x: path.key == "b")):
        refused(other, params, sd, "'groups'.*selectors")
    co.load_state_dict(grouped("b"), params, sd)


def test_the_group_index_in_a_state_must_be_the_current_group():
    opt = grouped("b")
    params = trained(opt, 2)
    sd = co.state_dict(opt, params)
    saved = sd["states"]["params['W']"]["__tuple__"]
    assert saved[0] == 1  # W falls to the default, whose (Descent) state is None
    for index in (0, 2, -1, True, "1"):
        states = {**sd["states"], "params['W']": {"__tuple__": [index, saved[1]]}}
        refused(grouped("b"), params, {**sd, "states": states}, r"params\['W'\]: .*\[0\]")


def test_groups_fingerprint_names_patterns_and_predicates():
    import re

    def is_bias(path, x):
        return path.key == "b"

    opt = co.Groups(
        ("W", co.Adam()), (["a", "b*"], co.Adam()), (re.compile("^s$"), co.Adam()), (is_bias, co.Adam())
    )
    described = opt.describe_selectors()
    text = repr(described)
    assert "'W'" in text and "'b*'" in text and "'^s$'" in text and "is_bias" in text
    assert described == co.Groups(*opt.groups).describe_selectors()


# --- files ----------------------------------------------------------------------


def test_archive_members_are_named_by_parameter_path(tmp_path):
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1))
    params = trained(opt, 2)
    co.save(tmp_path / "opt.npz", opt, params)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as archive:
        assert "params['W']/1/mu" in archive.files and "params['s']/1/nu" in archive.files
        np.testing.assert_array_equal(archive["params['b']/1/nu"], co.state_store(opt).get(params["b"])[1].nu)


def test_member_names_are_safe_and_unique_for_any_key(tmp_path):
    import zipfile

    keys = ["a/b", "a%2Fb", "..", "x\\y", "/root", "tab\there", "", "é"]
    params = {key: np.ones(2) for key in keys}
    opt = co.Momentum(0.1)
    co.update_(opt, params, {key: np.ones(2) for key in keys})
    co.save(tmp_path / "opt.npz", opt, params)
    with zipfile.ZipFile(tmp_path / "opt.npz") as archive:
        names = archive.namelist()
    assert len(names) == len(set(names)) == len(keys) + 1
    for name in names:
        parts = name.split("/")
        assert not name.startswith("/")
        assert "\\" not in name and ".." not in parts and "" not in parts
        assert all(ord(c) >= 32 for c in name)
    restored = co.Momentum(0.1)
    co.load(tmp_path / "opt.npz", restored, params)
    for key in keys:
        assert co.state_store(restored).get(params[key]).v.tolist() == [0.1, 0.1]


def rewrite(source, target, manifest=None, drop=(), add=None, rename=None):
    """A copy of the archive `source` with its manifest or members changed."""
    import json

    arrays, meta = {}, None
    with np.load(source, allow_pickle=False) as archive:
        for name in archive.files:
            if name == "__composeopt__":
                meta = json.loads(str(archive[name]))
            elif name not in drop:
                arrays[(rename or {}).get(name, name)] = archive[name]
    if manifest is not None:
        meta = manifest(meta)
    text = meta if isinstance(meta, str) else json.dumps(meta)
    np.savez(target, __composeopt__=np.array(text), **arrays, **(add or {}))
    return target


def saved_adam(tmp_path):
    sd, target, params = adam_checkpoint()
    opt = co.Adam(0.1)
    source = tmp_path / "good.npz"
    co.save(source, opt, trained(opt, 3))
    return source, target, params


def refused_file(file, target, params, match):
    before = snapshot(target, params)
    with pytest.raises(CheckpointError, match=match):
        co.load(file, target, params)
    assert snapshot(target, params) == before


def test_malformed_files_raise_checkpoint_errors(tmp_path):
    source, target, params = saved_adam(tmp_path)
    cases = {
        "a list": (lambda meta: [meta], "manifest"),
        "no step": (lambda meta: {k: v for k, v in meta.items() if k != "step"}, "'step'"),
        "bad json": (lambda meta: "{not json", "manifest"),
        "string version": (lambda meta: {**meta, "version": "1"}, "version"),
        "a missing member": (lambda meta: meta, None),
    }
    for label, (manifest, match) in cases.items():
        if match is None:
            continue
        refused_file(rewrite(source, tmp_path / f"{label}.npz", manifest), target, params, match)
    np.save(tmp_path / "array.npy", np.ones(3))
    refused_file(tmp_path / "array.npy", target, params, "not a composeopt checkpoint")
    (tmp_path / "text.npz").write_text("hello")
    refused_file(tmp_path / "text.npz", target, params, "not a composeopt checkpoint")
    with pytest.raises(FileNotFoundError):
        co.load(tmp_path / "absent.npz", target, params)


def test_members_must_be_exactly_those_the_manifest_names(tmp_path):
    source, target, params = saved_adam(tmp_path)
    name = "params['W']/mu"
    refused_file(rewrite(source, tmp_path / "drop.npz", drop=[name]), target, params, "params\\['W'\\]/mu")
    renamed = rewrite(source, tmp_path / "rename.npz", rename={name: "a0"})
    refused_file(renamed, target, params, r"params\['W'\]/mu")
    extra = rewrite(source, tmp_path / "extra.npz", add={"stray": np.zeros(3)})
    refused_file(extra, target, params, "stray")
    wrong = rewrite(source, tmp_path / "shape.npz", drop=[name], add={name: np.zeros((4, 3))})
    refused_file(wrong, target, params, r"params\['W'\]/mu.*shape \(4, 3\)")


def _bomb(file, member, shape, dtype="<f8", payload=b"", compress=True):
    """Add to `file` a member whose header says `shape` and `dtype`; only `payload` follows it."""
    import zipfile

    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(file, "a", compression=method) as archive:
        with archive.open(member + ".npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_1_0(stream, header)
            stream.write(payload)


def test_unreferenced_and_oversized_members_are_not_read(tmp_path):
    import shutil
    import tracemalloc

    source, target, params = saved_adam(tmp_path)
    extra = tmp_path / "extra.npz"
    shutil.copy(source, extra)
    _bomb(extra, "stray", (2**24,), payload=bytes(2**27))  # 128 MiB of zeros, deflated to ~128 KiB
    assert extra.stat().st_size < 2**20
    huge = tmp_path / "huge.npz"
    rewrite(source, huge, drop=["params['W']/mu"])
    _bomb(huge, "params['W']/mu", (2**40,))
    for file, match in ((extra, "stray"), (huge, r"params\['W'\]/mu")):
        tracemalloc.start()
        try:
            refused_file(file, target, params, match)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**23, peak


def test_the_manifest_is_size_bounded(tmp_path):
    import tracemalloc

    source, target, params = saved_adam(tmp_path)
    bomb = tmp_path / "bomb.npz"
    rewrite(source, bomb, drop=[])
    import zipfile

    with zipfile.ZipFile(bomb) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != "__composeopt__.npy"}
    with zipfile.ZipFile(bomb, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    _bomb(bomb, "__composeopt__", (), dtype=f"<U{2**28}", payload=bytes(2**24))
    tracemalloc.start()
    try:
        refused_file(bomb, target, params, "manifest")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**23, peak


# --- schedules after a load --------------------------------------------------------


def test_scheduled_hyperparameters_read_their_value_at_the_loaded_step():
    opt = chain()
    params = trained(opt, 3)
    fresh = co.load_state_dict(chain(), params, co.state_dict(opt, params))
    assert co.hyperparameters(fresh) == co.hyperparameters(opt)
    assert co.hyperparameters(fresh)["[2].eta"] == co.Warmup(0.1, 4)(3) != co.Warmup(0.1, 4)(4)


def test_a_checkpoint_before_any_step_reads_like_a_fresh_optimiser():
    untouched = chain()
    params = resume_run.make_params()
    fresh = co.load_state_dict(chain(), params, co.state_dict(untouched, params))
    assert co.state_store(fresh).step == 0
    assert co.hyperparameters(fresh) == co.hyperparameters(chain())


def test_a_schedule_that_cannot_reach_the_loaded_step_is_refused():
    def eta(step):
        return 0.1 if step < 5 else -1.0

    opt = co.Adam(0.1)
    params = trained(opt, 7)
    sd = co.state_dict(opt, params)
    del sd["hyperparameters"][0]["eta"]  # as if it had been scheduled when saved
    refused(co.Adam(eta), params, sd, r"'step'.*step 7.*Adam\.eta")


def test_version_one_checkpoints_still_load(tmp_path):
    import json

    opt = grouped("b")
    params = trained(opt, 3)
    sd = co.state_dict(opt, params)
    old = {key: value for key, value in sd.items() if key != "groups"} | {"version": 1}
    restored = co.load_state_dict(grouped("b"), params, old)
    assert co.state_store(restored).step == 3
    # Version 1 files named their members a0, a1, ...
    arrays: dict[str, np.ndarray] = {}

    def numbered(plain):
        if isinstance(plain, np.ndarray):
            arrays[f"a{len(arrays)}"] = plain
            return {"__array__": f"a{len(arrays) - 1}"}
        if isinstance(plain, dict):
            return {key: numbered(value) for key, value in plain.items()}
        if isinstance(plain, list):
            return [numbered(item) for item in plain]
        return plain

    np.savez(tmp_path / "v1.npz", __composeopt__=np.array(json.dumps(numbered(old))), **arrays)
    restored = co.load(tmp_path / "v1.npz", grouped("b"), params)
    assert (
        co.state_store(restored).get(params["b"])[1].v.tolist()
        == co.state_store(opt).get(params["b"])[1].v.tolist()
    )


def test_a_file_loads_onto_another_module_and_device(tmp_path):
    strict = pytest.importorskip("array_api_strict")
    other = strict.Device("device1")
    params = {"w": strict.asarray([1.0, 2.0], dtype=strict.float64, device=other)}
    opt = co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1))
    co.update_(opt, params, {"w": strict.asarray([1.0, -1.0], dtype=strict.float64, device=other)})
    co.save(tmp_path / "opt.npz", opt, params)
    host = {"w": np.array([1.0, 2.0])}
    on_host = co.load(tmp_path / "opt.npz", co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1)), host)
    assert type(co.state_store(on_host).get(host["w"])[1].mu) is np.ndarray
    back = {"w": strict.asarray([1.0, 2.0], dtype=strict.float64, device=other)}
    on_device = co.load(tmp_path / "opt.npz", co.Optimiser(co.ClipNorm(1.0), co.Adam(0.1)), back)
    mu = co.state_store(on_device).get(back["w"])[1].mu
    assert mu.device == other
    np.testing.assert_array_equal(np.from_dlpack(mu), co.state_store(on_host).get(host["w"])[1].mu)
