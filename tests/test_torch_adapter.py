"""composeopt.torch.Optimizer against torch.optim: same steps, schedulers, checkpoints, dtypes.

The references are torch's own optimizers and schedulers, trained side by side on the same
model, data and initial weights.  Float64 runs agree to rounding (rtol 1e-12 after 200 steps).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import composeopt as co  # noqa: E402
from composeopt.errors import (  # noqa: E402
    CheckpointError,
    HyperparameterError,
    NonFiniteError,
    ShapeMismatchError,
    TreeStructureError,
    UnsupportedArrayError,
)
from composeopt.torch import Optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread, so that other tests' threads do not slow these down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def data(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    Y = torch.randn(32, 2, generator=generator, dtype=torch.float64)
    return X.to(dtype), Y.to(dtype)


def loss_of(model, dtype=torch.float64):
    X, Y = data(dtype)
    return ((model(X) - Y) ** 2).mean()


def train(model, opt, steps, scheduler=None, lrs=None):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, next(model.parameters()).dtype).backward()
        opt.step()
        if lrs is not None:
            lrs.append([group["lr"] for group in opt.param_groups])
        if scheduler is not None:
            scheduler.step()


def assert_same_weights(ours, theirs, rtol=RTOL, atol=0.0):
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=rtol, atol=atol, err_msg=name)


def assert_equal_weights(ours, theirs):
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model, before):
    return all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def decay_groups(model):
    """torch's usual split: weight decay for the weights, none for the biases."""
    named = list(model.named_parameters())
    return [n for n in named if not n[0].endswith("bias")], [n for n in named if n[0].endswith("bias")]


# --- the same steps as torch.optim -------------------------------------------------------


def test_adam_takes_torch_adams_steps():
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours.named_parameters(), co.Adam(1e-2, (0.9, 0.99), 1e-8))
    train(ours, opt, 200)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8), 200)
    assert_same_weights(ours, theirs)
    assert not unchanged(ours, snapshot(make_model()))


def test_adamw_with_a_decay_and_a_no_decay_group_takes_torch_adamws_steps():
    ours, theirs = make_model(), make_model()
    decay, no_decay = decay_groups(ours)
    opt = Optimizer(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        co.AdamW(1e-2, lambda_=0.1),
    )
    assert [group["weight_decay"] for group in opt.param_groups] == [0.1, 0.0]
    theirs_decay, theirs_no_decay = decay_groups(theirs)
    reference = torch.optim.AdamW(
        [
            {"params": [p for _, p in theirs_decay], "weight_decay": 0.1},
            {"params": [p for _, p in theirs_no_decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    train(ours, opt, 200)
    train(theirs, reference, 200)
    assert_same_weights(ours, theirs)


def test_the_same_split_with_groups_selecting_torch_names():
    ours, theirs = make_model(), make_model()
    rule = co.Groups(("*/bias", co.AdamW(1e-2, lambda_=0.0)), default=co.AdamW(1e-2, lambda_=0.1))
    opt = Optimizer(ours.named_parameters(), rule)
    decay, no_decay = decay_groups(theirs)
    reference = torch.optim.AdamW(
        [{"params": [p for _, p in decay]}, {"params": [p for _, p in no_decay], "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.1,
    )
    train(ours, opt, 200)
    train(theirs, reference, 200)
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_momentum_and_weight_decay_takes_torch_sgds_steps(nesterov):
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours.parameters(), co.SGD(0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3))
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-3
    train(ours, opt, 200)
    reference = torch.optim.SGD(
        theirs.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3
    )
    train(theirs, reference, 200)
    assert_same_weights(ours, theirs)


def test_a_shared_global_norm_clip_sees_every_group():
    ours, theirs = make_model(), make_model()
    decay, no_decay = decay_groups(ours)
    rule = co.Optimiser(co.ClipGlobalNorm(0.05), co.AdamW(1e-2, lambda_=0.1))
    opt = Optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], rule)
    assert isinstance(opt.rule[0], co.ClipGlobalNorm) and isinstance(opt.rule[1], co.Groups)
    theirs_decay, theirs_no_decay = decay_groups(theirs)
    reference = torch.optim.AdamW(
        [
            {"params": [p for _, p in theirs_decay]},
            {"params": [p for _, p in theirs_no_decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    for _ in range(50):
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            loss_of(model).backward()
        # torch's clip divides by the norm + 1e-6; composeopt's by the norm: clip theirs as ours does.
        grads = [p.grad for p in theirs.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        if norm > 0.05:
            for g in grads:
                g.mul_(0.05 / norm)
        opt.step()
        reference.step()
    assert_same_weights(ours, theirs)


def test_parameters_without_a_gradient_are_left_alone():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    loss_of(model).backward()
    model[2].bias.grad = None
    before = snapshot(model)
    opt.step()
    assert torch.equal(model[2].bias, before["2.bias"]) and not torch.equal(
        model[0].weight, before["0.weight"]
    )
    assert co.state_store(opt.rule).get(opt._arrays["2.bias"]) is None


def test_step_calls_the_closure_with_gradients_and_returns_its_loss():
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours.parameters(), co.Adam(1e-2))
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    for model, optimizer in ((ours, opt), (theirs, reference)):

        def closure(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            loss = loss_of(model)
            loss.backward()
            return loss

        with torch.no_grad():
            losses = [optimizer.step(closure) for _ in range(3)]
        assert all(isinstance(loss, torch.Tensor) for loss in losses)
    assert_same_weights(ours, theirs)


# --- param groups drive the rule ---------------------------------------------------------------


def test_param_groups_are_torchs_dicts_read_from_the_rule():
    model = make_model()
    opt = Optimizer(model.parameters(), co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(3e-4, lambda_=0.01)))
    (group,) = opt.param_groups
    assert all(p is q for p, q in zip(group["params"], model.parameters(), strict=True))
    assert group["lr"] == 3e-4 and group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.01
    assert opt.defaults == {"lr": 3e-4, "betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-8}
    assert opt.rule[1].eta == 3e-4  # one group: the rule itself
    group["lr"] = 1e-3
    loss_of(model).backward()
    opt.step()
    assert opt.rule[1].eta == 1e-3


def test_a_group_key_the_rule_does_not_have_is_an_error():
    model = make_model()
    with pytest.raises(HyperparameterError, match=r"param group 0 sets 'weight_decay' .*'lambda_'.* Adam"):
        Optimizer([{"params": model.parameters(), "weight_decay": 0.1}], co.Adam())
    with pytest.raises(HyperparameterError, match=r"'momentum'"):
        Optimizer([{"params": model.parameters(), "momentum": 0.9}], co.RMSProp())  # RMSProp's rho is alpha
    with pytest.raises(HyperparameterError, match=r"param_groups\[0\]\['lr'\]: Adam\.eta"):
        Optimizer([{"params": model.parameters(), "lr": -1.0}], co.Adam())


def test_other_keys_stay_in_the_groups():
    model = make_model()
    opt = Optimizer([{"params": model.parameters(), "name": "all"}], co.Adam())
    assert opt.param_groups[0]["name"] == "all"


def test_each_group_has_its_own_copy_of_the_rule():
    model = make_model()
    rule = co.Adam(1e-3)
    opt = Optimizer([{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters()}], rule)
    groups = opt.rule
    assert isinstance(groups, co.Groups) and groups[0] is rule and groups[1] is not rule
    assert (groups[0].eta, groups[1].eta) == (1e-2, 1e-3)
    opt.param_groups[1]["lr"] = 5e-4
    loss_of(model).backward()
    opt.step()
    assert (groups[0].eta, groups[1].eta) == (1e-2, 5e-4)


def test_differing_learning_rates_of_one_rule_scale_together():
    model = torch.nn.Linear(3, 2).double()
    rule = co.Muon(0.02, fallback=co.AdamW(3e-4))
    opt = Optimizer(model.named_parameters(), rule)
    assert opt.param_groups[0]["lr"] == 0.02
    opt.param_groups[0]["lr"] = 0.01
    loss_of(torch.nn.Sequential(model, torch.nn.Linear(2, 2).double())).backward()
    opt.step()
    assert rule.eta == 0.01 and rule.fallback.eta == pytest.approx(1.5e-4)


def test_a_composeopt_schedule_shows_in_the_group():
    model = make_model()
    opt = Optimizer(model.parameters(), co.Adam(co.Exponential(1e-2, 0.5)))
    train(model, opt, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)


def test_add_param_group_later_as_torch_does():
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours[0].named_parameters(prefix="0"), co.Adam(1e-2))
    reference = torch.optim.Adam(theirs[0].parameters(), lr=1e-2)
    train(ours, opt, 5)
    train(theirs, reference, 5)
    opt.add_param_group({"params": list(ours[2].named_parameters(prefix="2")), "lr": 1e-3})
    reference.add_param_group({"params": list(theirs[2].parameters()), "lr": 1e-3})
    assert isinstance(opt.rule, co.Groups) and [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    train(ours, opt, 20)
    train(theirs, reference, 20)
    assert_same_weights(ours, theirs)
    assert co.state_store(opt.rule).step == 25


def test_a_group_that_cannot_be_added_changes_nothing():
    model = make_model()
    opt = Optimizer(model[0].named_parameters(prefix="0"), co.Adam(1e-2))
    train(model, opt, 2)
    rule = opt.rule
    for bad in ({"weight_decay": 0.1}, {"lr": -1.0}):
        with pytest.raises(HyperparameterError):
            opt.add_param_group({"params": list(model[2].named_parameters(prefix="2")), **bad})
        assert len(opt.param_groups) == 1 and opt.rule is rule and rule.eta == 1e-2
    opt.add_param_group({"params": list(model[2].named_parameters(prefix="2"))})
    train(model, opt, 1)
    assert len(opt.param_groups) == 2 and co.state_store(opt.rule).step == 3


def test_the_optimizer_is_not_pickled_but_its_state_dict_is():
    import copy
    import pickle

    opt = Optimizer(make_model().parameters(), co.Adam())
    with pytest.raises(TypeError, match=r"save opt\.state_dict\(\)"):
        pickle.dumps(opt)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.deepcopy(opt)
    pickle.loads(pickle.dumps(opt.state_dict()))


def test_an_empty_parameter_list_is_an_error_as_in_torch():
    with pytest.raises(ValueError, match="empty parameter list"):
        Optimizer([], co.Adam())
    with pytest.raises(TypeError, match="composeopt Rule"):
        Optimizer(make_model().parameters(), torch.optim.Adam)


# --- torch's LR schedulers ---------------------------------------------------------------


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=150, eta_min=1e-4),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=200),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + 0.05 * n)),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_torch_schedulers_drive_the_learning_rate(name):
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours.named_parameters(), co.Adam(1e-2))
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    our_lrs, their_lrs = [], []
    train(ours, opt, 200, SCHEDULERS[name](opt), our_lrs)
    train(theirs, reference, 200, SCHEDULERS[name](reference), their_lrs)
    assert our_lrs == their_lrs and len(set(map(tuple, our_lrs))) > 1
    assert_same_weights(ours, theirs)


def test_a_scheduler_scales_the_groups_of_a_groups_rule_together():
    ours, theirs = make_model(), make_model()
    rule = co.Groups(("*.bias", co.Adam(1e-3)), default=co.Adam(1e-2))
    opt = Optimizer(ours.named_parameters(), rule)
    assert opt.param_groups[0]["lr"] == 1e-2  # the largest; the biases' keeps its ratio to it
    weights, biases = decay_groups(theirs)
    reference = torch.optim.Adam(
        [{"params": [p for _, p in weights], "lr": 1e-2}, {"params": [p for _, p in biases], "lr": 1e-3}]
    )
    train(ours, opt, 100, torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5))
    train(theirs, reference, 100, torch.optim.lr_scheduler.StepLR(reference, step_size=20, gamma=0.5))
    assert rule[0].eta == pytest.approx(1e-3 * 0.5**4) and rule.default.eta == 1e-2 * 0.5**4
    assert_same_weights(ours, theirs)


def test_one_cycle_cycles_adams_beta1():
    model = make_model()
    opt = Optimizer(model.parameters(), co.Adam(1e-2))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    betas = []
    for _ in range(10):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        betas.append(opt.rule.beta)
        scheduler.step()
    assert len({beta[0] for beta in betas}) == 10 and all(beta[1] == 0.999 for beta in betas)


def test_one_cycle_cycles_sgds_momentum():
    model = make_model()
    opt = Optimizer(model.parameters(), co.SGD(0.01, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    train(model, opt, 4, scheduler)
    train(model, opt, 1)  # a step with the values the scheduler set last
    assert opt.rule.rho == opt.param_groups[0]["momentum"] < 0.9
    assert opt.rule.eta == opt.param_groups[0]["lr"] > 0.01


def test_a_scheduler_warns_of_nothing_when_used_in_order():
    model = make_model()
    opt = Optimizer(model.parameters(), co.Adam())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    train(model, opt, 2, scheduler)  # filterwarnings=error: torch's "step order" warning would fail this


# --- checkpoints -------------------------------------------------------------------------------


def resumable(model):
    opt = Optimizer(
        model.named_parameters(), co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-2, lambda_=0.1))
    )
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    straight = make_model()
    opt, scheduler = resumable(straight)
    train(straight, opt, 20, scheduler)

    first = make_model()
    opt, scheduler = resumable(first)
    train(first, opt, 10, scheduler)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"model": first.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()}, path
    )

    saved = torch.load(path, weights_only=True)
    resumed = make_model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt, scheduler = resumable(resumed)
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["scheduler"])
    train(resumed, opt, 10, scheduler)
    assert_equal_weights(resumed, straight)


def test_the_state_dict_is_tensors_and_python_data():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    train(model, opt, 2)
    sd = opt.state_dict()
    assert set(sd) == {"format", "version", "state", "param_groups"}
    assert sd["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    mu = sd["state"]["states"]["params['0.weight']"]["__state__"]["mu"]
    assert isinstance(mu, torch.Tensor) and mu.shape == (8, 3)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["state"]["step"] == 2


def saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def refused(opt, model, state_dict, match):
    before, eta = snapshot(model), opt.param_groups[0]["lr"]
    store = co.state_store(opt.rule)
    states = len(store)
    with pytest.raises(CheckpointError, match=match):
        opt.load_state_dict(state_dict)
    assert unchanged(model, before) and opt.param_groups[0]["lr"] == eta and len(store) == states


def test_mismatched_state_dicts_are_refused_and_change_nothing():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    train(model, opt, 2)
    good = saved(opt)

    other = make_model()
    target = Optimizer(other.named_parameters(), co.Adam(1e-2))
    train(other, target, 1)
    torch_adam = torch.optim.Adam(make_model().parameters()).state_dict()
    refused(target, other, torch_adam, "not a state dict of composeopt.torch.Optimizer")
    refused(target, other, {**good, "version": 7}, "version 7")
    refused(
        target, other, {**good, "param_groups": good["param_groups"] * 2}, "2 param groups, this optimizer 1"
    )
    renamed = [{**good["param_groups"][0], "params": ["a", "b", "c", "d"]}]
    refused(target, other, {**good, "param_groups": renamed}, r"param group 0: .*\['a', 'b', 'c', 'd'\]")
    bad_lr = [{**good["param_groups"][0], "lr": -1.0}]
    refused(target, other, {**good, "param_groups": bad_lr}, r"'lr'.*Adam\.eta")
    refused(Optimizer(other.named_parameters(), co.Lion()), other, good, "structure")
    float32 = make_model(torch.float32)
    refused(Optimizer(float32.named_parameters(), co.Adam(1e-2)), float32, good, "dtype float64")
    target.load_state_dict(good)
    assert co.state_store(target.rule).step == 2


# --- storage changes keep the state --------------------------------------------------------------


def test_new_data_of_the_same_kind_keeps_the_state():
    straight, changed = make_model(), make_model()
    opt_straight = Optimizer(straight.named_parameters(), co.Adam(1e-2))
    opt_changed = Optimizer(changed.named_parameters(), co.Adam(1e-2))
    train(straight, opt_straight, 10)
    train(changed, opt_changed, 5)
    for p in changed.parameters():
        p.data = p.data.clone()
    train(changed, opt_changed, 5)
    assert_equal_weights(changed, straight)
    weight = opt_changed._arrays["0.weight"]
    assert np.shares_memory(weight, changed[0].weight.detach().numpy())
    assert co.state_store(opt_changed.rule).get(weight).t == 10


def test_a_model_moved_to_another_dtype_keeps_its_state_in_that_dtype():
    model = make_model(torch.float32)
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    train(model, opt, 5)
    mu = co.state_store(opt.rule).get(opt._arrays["0.weight"]).mu.copy()
    model.to(torch.float64)
    before = snapshot(model)
    train(model, opt, 1)
    weight = opt._arrays["0.weight"]
    state = co.state_store(opt.rule).get(weight)
    assert weight.dtype == np.float64 and state.mu.dtype == np.float64 and state.t == 6
    assert np.shares_memory(weight, model[0].weight.detach().numpy())
    assert not np.array_equal(state.mu, mu.astype(np.float64)) and not unchanged(model, before)
    np.testing.assert_allclose(state.mu, 0.9 * mu + 0.1 * model[0].weight.grad.numpy(), rtol=1e-6)


def test_a_new_shape_is_an_error():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    train(model, opt, 1)
    model[2].bias.data = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(
        ShapeMismatchError, match=r"params\['2.bias'\]: the tensor's shape changed from \(2,\) to \(3,\)"
    ):
        opt.step()


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps_track_float32_steps(dtype):
    """Five steps on a quadratic, as the registry's low-precision test: each stays within a few
    units of the dtype's epsilon of the float32 steps rounded to it."""
    if dtype is torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    low = make_model(dtype)
    wide = make_model(torch.float32)
    with torch.no_grad():
        for p, q in zip(low.parameters(), wide.parameters()):
            q.copy_(p.float())
    opts = [Optimizer(model.named_parameters(), co.Adam(1e-2)) for model in (low, wide)]
    for _ in range(5):
        for model, opt in zip((low, wide), opts):
            for p in model.parameters():
                p.grad = 2 * p.detach()
            opt.step()
    eps = torch.finfo(dtype).eps
    for (name, p), q in zip(low.named_parameters(), wide.parameters()):
        assert p.dtype == dtype
        want = q.detach().to(dtype).double().numpy()
        np.testing.assert_allclose(
            p.detach().double().numpy(), want, rtol=6 * eps, atol=6 * eps, err_msg=name
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_trains(dtype):
    if dtype is torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    model = make_model(dtype)
    opt = Optimizer(model.named_parameters(), co.Adam(1e-2))
    first = loss_of(model, dtype).item()
    train(model, opt, 50)
    assert loss_of(model, dtype).item() < 0.8 * first
    weight = opt._arrays["0.weight"]
    assert weight.dtype.name == ("bfloat16" if dtype is torch.bfloat16 else "float16")
    assert weight.ctypes.data == model[0].weight.data_ptr()


def test_views_share_the_tensors_memory():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Descent(0.5))
    for name, p in model.named_parameters():
        assert opt._arrays[name].ctypes.data == p.data_ptr(), name
    before = snapshot(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name] - 0.5), name
        assert p.requires_grad and isinstance(p, torch.nn.Parameter)


def test_a_step_marks_the_tensors_as_changed_in_place():
    model = make_model()
    opt = Optimizer(model.parameters(), co.Descent(0.1))
    loss = loss_of(model)
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- CUDA through CuPy (without a GPU: a stand-in tensor) ------------------------------------------


class CudaLike:
    """What `_view` reads of a CUDA tensor."""

    layout = torch.strided
    device = torch.device("cuda")

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype

    def detach(self):
        return self


def test_a_cuda_tensor_without_cupy_is_a_clear_error(monkeypatch):
    from composeopt.torch import _view

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(
        UnsupportedArrayError,
        match=r"w is a CUDA tensor: composeopt updates CUDA tensors through CuPy, which is not installed",
    ):
        _view(CudaLike(), "w")


def test_a_cuda_tensor_goes_through_dlpack(monkeypatch):
    from composeopt.torch import _view

    seen = []
    fake = types.SimpleNamespace(from_dlpack=lambda tensor: seen.append(tensor) or "cupy view")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    tensor = CudaLike()
    assert _view(tensor, "w") == "cupy view" and seen == [tensor]
    with pytest.raises(UnsupportedArrayError, match="bfloat16 CUDA tensor"):
        _view(CudaLike(torch.bfloat16), "w")


def test_other_devices_and_sparse_tensors_are_refused():
    meta = torch.nn.Parameter(torch.empty(2, device="meta"))
    with pytest.raises(UnsupportedArrayError, match=r"0 is on device meta; composeopt updates CPU tensors"):
        Optimizer([meta], co.Adam())
    from composeopt.torch import _view

    with pytest.raises(UnsupportedArrayError, match="sparse"):
        _view(torch.eye(2).to_sparse(), "w")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for torch")
def test_cuda_tensors_train_as_cpu_ones():
    pytest.importorskip("cupy")
    ours, theirs = make_model().cuda(), make_model()
    opt = Optimizer(ours.named_parameters(), co.Adam(1e-2))
    reference = Optimizer(theirs.named_parameters(), co.Adam(1e-2))
    X, Y = (t.cuda() for t in data())
    for _ in range(20):
        opt.zero_grad()
        ((ours(X) - Y) ** 2).mean().backward()
        opt.step()
    train(theirs, reference, 20)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        np.testing.assert_allclose(p.detach().cpu().numpy(), q.detach().numpy(), rtol=1e-10)


# --- selectors, failures, zero_grad ---------------------------------------------------------


def test_dotted_groups_selectors_match_torch_names():
    model = make_model()
    rule = co.Groups(("*.bias", co.Descent(0.0)), ("2/*", co.Descent(1.0)), default=co.Descent(0.5))
    opt = Optimizer(model.named_parameters(), rule)
    before = snapshot(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(model[0].bias, before["0.bias"]) and torch.equal(model[2].bias, before["2.bias"])
    assert torch.equal(model[2].weight, before["2.weight"] - 1.0)
    assert torch.equal(model[0].weight, before["0.weight"] - 0.5)


def test_a_selector_that_takes_nothing_raises_and_changes_nothing():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Groups(("*.norm", co.Adam()), default=co.AdamW(lambda_=0.1)))
    loss_of(model).backward()
    before = snapshot(model)
    with pytest.raises(TreeStructureError, match=r"the selector '\*\.norm' of group 0 takes none of the 4"):
        opt.step()
    assert unchanged(model, before) and len(co.state_store(opt.rule)) == 0


def test_a_step_that_raises_leaves_every_tensor_and_state_as_it_was():
    ours, straight = make_model(), make_model()
    opt = Optimizer(ours.named_parameters(), co.Optimiser(co.ClipNorm(1.0, throw=True), co.Adam(1e-2)))
    opt_straight = Optimizer(
        straight.named_parameters(), co.Optimiser(co.ClipNorm(1.0, throw=True), co.Adam(1e-2))
    )
    train(ours, opt, 3)
    train(straight, opt_straight, 6)
    opt.zero_grad()
    loss_of(ours).backward()
    ours[2].weight.grad[0, 0] = math.nan
    before = snapshot(ours)
    with pytest.raises(NonFiniteError):
        opt.step()
    assert unchanged(ours, before)
    opt.param_groups[0]["lr"] = -1.0
    opt.zero_grad()
    loss_of(ours).backward()
    with pytest.raises(HyperparameterError, match=r"param_groups\[0\]\['lr'\]: Adam\.eta"):
        opt.step()
    assert unchanged(ours, before) and opt.rule[1].eta == 1e-2
    opt.param_groups[0]["lr"] = 1e-2
    train(ours, opt, 3)
    assert_equal_weights(ours, straight)  # the failed steps left no trace


def test_skip_non_finite_skips_a_nan_step():
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.SkipNonFinite(co.Adam(1e-2)))
    assert opt.param_groups[0]["lr"] == 1e-2
    train(model, opt, 2)
    opt.zero_grad()
    loss_of(model).backward()
    model[0].bias.grad[1] = math.inf
    before = snapshot(model)
    opt.step()
    assert unchanged(model, before)
    state = co.state_store(opt.rule).get(opt._arrays["0.weight"])
    assert state.skipped == 1 and state.inner.t == 2
    train(model, opt, 1)
    assert not unchanged(model, before)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = make_model()
    opt = Optimizer(model.named_parameters(), co.Momentum(0.1, 0.5))
    train(model, opt, 2)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))
    before = snapshot(model)
    opt.step()  # no gradients, or zero ones: momentum alone moves the weights, or nothing does
    assert unchanged(model, before) is set_to_none


# --- the package and the docs ------------------------------------------------------------------


def test_import_composeopt_does_not_import_torch():
    code = "import sys, composeopt; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
try:
    import composeopt.torch
except ModuleNotFoundError as err:
    print(err.name, err)
"""


def test_without_torch_the_adapter_says_what_to_install():
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "torch composeopt.torch needs PyTorch: pip install 'composeopt[torch]'"


def test_public_names_are_in_the_reference():
    import composeopt.torch

    pages = "".join(page.read_text(encoding="utf-8") for page in (REPO / "docs/pages/reference").glob("*.md"))
    for name in composeopt.torch.__all__:
        assert f"::: composeopt.torch.{name}" in pages, name


TORCH_PAGE = REPO / "docs" / "pages" / "torch.md"


def test_the_torch_page_runs(tmp_path, monkeypatch):
    """The page's ```py blocks run in order in one namespace (but those for a GPU): the
    documentation tests show them without running them, as they need torch."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```py\n(.*?)^```$", TORCH_PAGE.read_text(encoding="utf-8"), re.S | re.M)
    ran = 0
    namespace: dict[str, object] = {"__name__": "torch_page"}
    for number, code in enumerate(blocks, start=1):
        if "cuda" in code:
            continue
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(code, f"torch.md, block {number}", "exec"), namespace)
        comments = [line.split("  # ", 1)[1] for line in code.splitlines() if line.startswith("print(")]
        for printed, comment in zip(output.getvalue().splitlines(), comments, strict=True):
            assert comment.startswith(printed.rstrip()), (number, printed, comment)
        ran += 1
    assert ran >= 5
