"""`dist.ShardedOptimiser` (ZeRO stage 1): in one process (`LocalComm`, and a communicator
whose other rank fails), and on 2 and 4 MPI ranks against one process (tests/dist/sharded.py)."""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import pytest

import composeopt as co
from composeopt import dist
from composeopt.errors import (
    DistributedError,
    HyperparameterError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedArrayError,
)


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_matches_one_process_on_mpi_ranks(mpirun: Any, ranks: int) -> None:
    done = mpirun("sharded.py", ranks, timeout=240)
    passed = re.findall(r"rank (\d+): (\d+) checks passed", done.stdout)
    assert sorted(int(rank) for rank, _ in passed) == list(range(ranks)), done.stdout
    # Every rank ran every check (a failed one aborts the job); the ranks' "ok" lines may
    # reach the pipe interleaved, so the counts the ranks report are what is compared.
    counts = {int(count) for _, count in passed}
    assert len(counts) == 1 and min(counts) >= 40, done.stdout
    assert "SkipNonFinite: the skip is counted" in done.stdout
    # Each rank caught the error it should have: its own where it failed, the others' else.
    assert "rank 1: shape fault: ShapeMismatchError" in done.stdout
    assert "rank 0: shape fault: DistributedError: rank 1 of" in done.stdout


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((5, 3)),
        "t": np.asfortranarray(rng.standard_normal((4, 3))),  # not C-contiguous
        "h": rng.standard_normal(6).astype(np.float16),
        "f": rng.standard_normal(7).astype(np.float32),
        "s": np.array(0.5),
        "e": np.zeros(0),
    }


def _grads(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(100 + step)
    params = _params()
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    grads["w"] = np.ascontiguousarray(grads["w"].T).T  # a strided gradient is packed
    return grads


RULES = [
    ("flat", co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-2))),
    ("flat", co.SkipNonFinite(co.Optimiser(co.ClipGlobalNorm(1.0), co.Momentum(1e-2)))),
    ("whole", co.Optimiser(co.ClipNorm(1.0), co.Adam(1e-2))),
    ("whole", co.Lamb(1e-2)),
    ("whole", co.Adafactor(1e-2)),
    ("whole", co.Muon(1e-2)),
    ("whole", co.LBFGS(0.1, memory=3)),
    ("whole", co.Groups(("w", co.Adam(1e-2)), default=co.Descent(0.1))),
    ("whole", co.Optimiser(co.AccumGrad(2), co.Adam(1e-2))),
]


@pytest.mark.parametrize(("mode", "rule"), RULES, ids=[repr(rule)[:40] for _, rule in RULES])
def test_one_rank_is_the_ordinary_chain_bit_for_bit(mode: str, rule: co.Rule) -> None:
    reference = copy.deepcopy(rule)
    zopt = dist.ShardedOptimiser(rule, dist.LocalComm())
    # C order for the reference: a norm sums a Fortran-ordered array in another order.
    params, ref_params = _params(), {k: v.copy(order="C") for k, v in _params().items()}
    for step in range(4):
        co.update_(zopt, params, _grads(step))
        # Contiguous for the reference: a norm sums a strided array in another order.
        contiguous = {k: g.copy(order="C") for k, g in _grads(step).items()}
        co.update_(reference, ref_params, contiguous)
    assert zopt.mode == mode
    for key in params:
        assert params[key].dtype == ref_params[key].dtype
        np.testing.assert_array_equal(params[key], ref_params[key], err_msg=key)
    assert co.state_store(zopt.rule).step == 4
    assert set(zopt.local_tree()) == {f"params[{k!r}]" for k in params}


def test_local_tree_prepare_and_state_dict() -> None:
    zopt = dist.ShardedOptimiser(co.Adam(), dist.LocalComm())
    assert zopt.layout is None and zopt.local_tree() == {}
    params = {"a": np.ones((2, 3)), "b": np.arange(4.0)}
    layout = zopt.prepare(params)
    assert zopt.layout is layout and layout.mode == "flat" and layout.ranks == 1
    local = zopt.local_tree()
    np.testing.assert_array_equal(local["params['a']"], np.ones(6))  # flat: 1-d pieces
    co.update_(zopt, params, {"a": np.ones((2, 3)), "b": np.ones(4)})
    assert all(local[k] is v for k, v in zopt.local_tree().items())  # the same views, step after step
    saved = co.state_dict(zopt.rule, zopt.local_tree())
    assert set(saved["states"]) == {"params[\"params['a']\"]", "params[\"params['b']\"]"}
    whole = dist.ShardedOptimiser(co.Lamb(), dist.LocalComm())
    whole.prepare(params)
    assert whole.local_tree()["params['a']"].shape == (2, 3)  # whole: shaped as the leaf
    assert "mode='whole'" in repr(whole)


def test_a_new_tree_cuts_a_new_layout_and_starts_the_state_again() -> None:
    zopt = dist.ShardedOptimiser(co.Adam(), dist.LocalComm())
    co.update_(zopt, {"a": np.ones(3)}, {"a": np.ones(3)})
    first = zopt.layout
    params = {"a": np.ones(3), "b": np.ones(2)}
    co.update_(zopt, params, {"a": np.ones(3), "b": np.ones(2)})
    assert zopt.layout is not first and zopt.layout.paths == ("params['a']", "params['b']")
    assert co.state_store(zopt.rule).step == 1


@pytest.mark.parametrize(
    "rule",
    [
        co.Groups(("a", co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam())), default=co.Adam()),
        co.Groups(("a", co.LBFGS()), default=co.Adam()),
        co.Optimiser(co.ClipNorm(1.0), co.ClipGlobalNorm(1.0), co.Adam()),
        co.Optimiser(co.ClipNorm(1.0), co.SkipNonFinite(co.Adam())),
        co.Optimiser(dist.AllReduceMean(dist.LocalComm()), co.Adam()),
    ],
)
def test_chains_that_could_leave_ranks_waiting_are_refused(rule: co.Rule) -> None:
    with pytest.raises(HyperparameterError, match="ShardedOptimiser"):
        dist.ShardedOptimiser(rule, dist.LocalComm())


def test_a_user_tree_rule_and_flat_mode_for_whole_arrays_are_refused() -> None:
    class Centre(co.Rule):
        def apply_tree_(self, states, xs, dxs, paths):  # type: ignore[no-untyped-def]
            mean = sum(float(dx.sum()) for dx in dxs) / sum(dx.size for dx in dxs)
            return [dx - mean for dx in dxs]

    with pytest.raises(HyperparameterError, match="overrides apply_tree_"):
        dist.ShardedOptimiser(Centre(), dist.LocalComm())
    with pytest.raises(HyperparameterError, match="needs whole arrays"):
        dist.ShardedOptimiser(co.Lamb(), dist.LocalComm(), mode="flat")
    with pytest.raises(HyperparameterError, match="mode"):
        dist.ShardedOptimiser(co.Adam(), dist.LocalComm(), mode="rows")
    with pytest.raises(TypeError, match="Rule"):
        dist.ShardedOptimiser("adam", dist.LocalComm())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Comm"):
        dist.ShardedOptimiser(co.Adam(), None)  # type: ignore[arg-type]
    assert dist.ShardedOptimiser(co.Adam(), dist.LocalComm(), mode="whole").mode == "whole"


def test_a_throw_switched_on_later_is_refused_at_the_step() -> None:
    chain = co.Optimiser(co.ClipNorm(1.0, throw=False), co.ClipGlobalNorm(1.0), co.Adam())
    zopt = dist.ShardedOptimiser(chain, dist.LocalComm())
    chain[0].throw = True
    params = {"a": np.ones(2)}
    with pytest.raises(HyperparameterError, match="may raise on one rank"):
        co.update_(zopt, params, {"a": np.ones(2)})
    np.testing.assert_array_equal(params["a"], np.ones(2))


def test_update_not_in_place_is_refused() -> None:
    zopt = dist.ShardedOptimiser(co.Adam(), dist.LocalComm())
    with pytest.raises(TypeError, match="call update_"):
        co.update(zopt, {"a": np.ones(2)}, {"a": np.ones(2)})


def test_bad_input_raises_and_changes_nothing() -> None:
    zopt = dist.ShardedOptimiser(co.Optimiser(co.ClipNorm(1.0), co.Adam()), dist.LocalComm())
    params = {"a": np.ones(2), "b": np.ones((2, 2))}
    co.update_(zopt, params, {"a": np.ones(2), "b": np.ones((2, 2))})
    kept = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ShapeMismatchError, match="params\\['b'\\]"):
        co.update_(zopt, params, {"a": np.ones(2), "b": np.ones(4)})
    with pytest.raises(NonFiniteError):
        co.update_(zopt, params, {"a": np.ones(2), "b": np.full((2, 2), np.inf)})
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(UnsupportedArrayError, match="takes numpy arrays"):
        co.update_(zopt, {"a": strict.ones(2)}, {"a": strict.ones(2)})
    for key in params:
        np.testing.assert_array_equal(params[key], kept[key])
    assert co.state_store(zopt.rule).step == 1


class OtherRankFails(dist.LocalComm):
    """One process that hears, at its `failing`-th agreement, that another rank failed."""

    def __init__(self, failing: int) -> None:
        self.calls, self.failing = 0, failing

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        self.calls += 1
        if self.calls == self.failing:
            return [bytes(data), b"\x01NonFiniteError: params['b']: gradient has 2-norm inf"]
        return [bytes(data), bytes(data)]


@pytest.mark.parametrize("fallible", [True, False])
def test_another_ranks_inner_failure_puts_this_ranks_state_back(fallible: bool) -> None:
    # Agreements: step 1 check (1), step 1 after the inner step (2), step 2 check (3), then 4.
    comm = OtherRankFails(failing=4)
    rule = co.Optimiser(co.ClipNorm(10.0, throw=fallible), co.Adam(1e-2), co.ExpDecay(1.0, decay=0.5))
    zopt = dist.ShardedOptimiser(rule, comm, mode="whole")
    params = {"a": np.ones(3)}
    co.update_(zopt, params, {"a": np.ones(3)})
    store = co.state_store(zopt.rule)
    x = zopt.local_tree()["params['a']"]
    before = copy.deepcopy(store.get(x)), params["a"].copy(), copy.deepcopy(vars(rule[2]))
    with pytest.raises(DistributedError, match="rank 1 of 1 failed"):
        co.update_(zopt, params, {"a": np.full(3, 2.0)})
    np.testing.assert_array_equal(params["a"], before[1])
    np.testing.assert_array_equal(x, params["a"])  # the local tree shows the params again
    assert store.step == 1 and vars(rule[2]) == before[2]
    if fallible:  # a chain that can raise keeps a copy to put back
        np.testing.assert_array_equal(store.get(x)[1].mu, before[0][1].mu)


def test_another_ranks_failure_on_the_first_step_leaves_no_state() -> None:
    zopt = dist.ShardedOptimiser(co.Adam(), OtherRankFails(failing=2), mode="flat")
    params = {"a": np.ones(3)}
    with pytest.raises(DistributedError):
        co.update_(zopt, params, {"a": np.ones(3)})
    assert len(co.state_store(zopt.rule)) == 0 and co.state_store(zopt.rule).step == 0
    np.testing.assert_array_equal(params["a"], np.ones(3))


def test_reduce_dtype() -> None:
    zopt = dist.ShardedOptimiser(co.Descent(1.0), dist.LocalComm(), reduce_dtype="float64")
    params = {"h": np.ones(3, dtype=np.float16)}
    co.update_(zopt, params, {"h": np.full(3, 0.5, dtype=np.float16)})
    assert params["h"].dtype == np.float16 and float(params["h"][0]) == 0.5
    with pytest.raises(HyperparameterError):
        dist.ShardedOptimiser(co.Adam(), dist.LocalComm(), reduce_dtype="int32")
