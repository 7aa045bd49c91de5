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
    assert sd["step"] == 7 and sd["version"] == 1 and sd["optimiser"] == repr(opt)
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
