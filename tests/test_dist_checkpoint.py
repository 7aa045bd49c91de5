"""Sharded checkpoints (`dist.save`, `dist.load`, `dist.consolidate`): resumed on other
numbers of ranks, joined into an ordinary checkpoint, and refused whole when damaged.

The reference is the unsharded chain run in one process for all the steps."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys
from typing import Any

import numpy as np
import pytest

import composeopt as co
from composeopt import dist
from composeopt.errors import CheckpointError

sys.path.insert(0, str(pathlib.Path(__file__).parent / "dist"))
import ckpt_cases as cases  # noqa: E402

K, M = cases.STEPS_BEFORE, cases.STEPS_AFTER


def trained(mode: str, steps: int, comm: Any = None) -> tuple[Any, dict[str, Any]]:
    zopt = dist.ShardedOptimiser(cases.rule(mode), comm or dist.LocalComm(), mode=mode)
    tree = cases.params()
    for step in range(steps):
        co.update_(zopt, tree, cases.grads(step))
    return zopt, tree


def resume(source: Any, mode: str, tree: dict[str, Any]) -> dict[str, Any]:
    zopt = dist.ShardedOptimiser(cases.rule(mode), dist.LocalComm(), mode=mode)
    dist.load(source, zopt, tree)
    for step in range(K, K + M):
        co.update_(zopt, tree, cases.grads(step))
    return tree


def assert_same(got: Any, want: Any) -> None:
    got, want = cases.flat(got), cases.flat(want)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].tobytes() == want[path].tobytes(), path


@pytest.mark.parametrize("mode", cases.MODES)
def test_one_rank_save_load_consolidate(tmp_path: pathlib.Path, mode: str) -> None:
    zopt, tree = trained(mode, K)
    dist.save(tmp_path / "ckpt", zopt, tree)
    manifest = json.loads((tmp_path / "ckpt" / dist.checkpoint.MANIFEST).read_text())
    assert manifest["ranks"] == 1 and manifest["mode"] == mode and manifest["step"] == K
    assert len(list((tmp_path / "ckpt").glob("rank-*.npz"))) == 1
    want = cases.reference(mode, K + M)
    assert_same(resume(tmp_path / "ckpt", mode, cases.unflat(cases.flat(tree))), want)

    dist.consolidate(tmp_path / "ckpt", tmp_path / "one.npz")
    opt, again = cases.rule(mode), cases.unflat(cases.flat(tree))
    co.load(tmp_path / "one.npz", opt, again)
    for step in range(K, K + M):
        co.update_(opt, again, cases.grads(step))
    assert_same(again, want)


@pytest.mark.parametrize("mode", cases.MODES)
def test_ordinary_checkpoint_loads_sharded(tmp_path: pathlib.Path, mode: str) -> None:
    opt, tree = cases.rule(mode), cases.params()
    for step in range(K):
        co.update_(opt, tree, cases.grads(step))
    co.save(tmp_path / "plain.npz", opt, tree)
    assert_same(resume(tmp_path / "plain.npz", mode, tree), cases.reference(mode, K + M))


def test_saving_again_replaces_the_files(tmp_path: pathlib.Path) -> None:
    zopt, tree = trained("flat", K)
    dist.save(tmp_path, zopt, tree)
    first = {p.name for p in tmp_path.glob("rank-*.npz")}
    co.update_(zopt, tree, cases.grads(K))
    dist.save(tmp_path, zopt, tree)
    second = {p.name for p in tmp_path.glob("rank-*.npz")}
    assert len(second) == 1 and first != second
    assert json.loads((tmp_path / "manifest.json").read_text())["step"] == K + 1


# --- damaged checkpoints: refused, nothing changed ------------------------------------------


def damaged(tmp_path: pathlib.Path, harm: Any) -> pathlib.Path:
    zopt, tree = trained("flat", K)
    dist.save(tmp_path / "good", zopt, tree)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    harm(bad, manifest)
    if (bad / "manifest.json").exists():
        (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def rank_file(folder: pathlib.Path, manifest: dict[str, Any], rank: int = 0) -> pathlib.Path:
    return folder / manifest["files"][rank]["name"]


def flip_byte(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    file = rank_file(folder, manifest)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


def truncate_with_digest(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    file = rank_file(folder, manifest)
    data = file.read_bytes()[:-40]
    file.write_bytes(data)
    manifest["files"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def set_piece(**entries: Any) -> Any:
    def harm(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
        manifest["layout"]["pieces"][0].update(entries)

    return harm


def overlap(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    manifest["layout"]["pieces"].append(dict(manifest["layout"]["pieces"][0]))


def entry(**entries: Any) -> Any:
    def harm(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
        manifest.update(entries)

    return harm


def shape(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    manifest["layout"]["shapes"][0] = [3, 4]


def shape_and_fingerprint(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    from composeopt.dist.agree import fingerprint

    layout = manifest["layout"]
    layout["shapes"][0] = [3, 4]
    manifest["fingerprint"] = fingerprint(layout["paths"], layout["shapes"], layout["dtypes"]).hex()


HARMS = {
    "flipped byte": (flip_byte, r"SHA-256 is not the one in the manifest"),
    "missing rank file": (lambda f, m: rank_file(f, m).unlink(), r"cannot be read"),
    "missing manifest": (lambda f, m: (f / "manifest.json").unlink(), r"manifest.json: cannot be read"),
    "truncated npz": (truncate_with_digest, r"not a \.npz archive|cannot be read|ends"),
    "overlapping pieces": (overlap, r"pieces of .* overlap|a rank has two pieces"),
    "negative offset": (set_piece(start=-1), r"non-negative integers"),
    "piece past the end": (set_piece(stop=10**6), r"not a range of"),
    "piece of a float": (set_piece(rank=0.0), r"non-negative integers"),
    "wrong shape": (shape, r"'fingerprint' .* is not the fingerprint of its layout"),
    "wrong shape, fingerprint to match": (shape_and_fingerprint, r"not for these params: .*shape \(3, 4\)"),
    "wrong fingerprint": (entry(fingerprint="00" * 32), r"not the fingerprint of its layout"),
    "newer version": (entry(version=2), r"version 2 is newer than 1"),
    "version as text": (entry(version="1"), r"'version' must be a positive integer"),
    "other format": (entry(format="zip"), r"not a composeopt sharded checkpoint"),
    "step differs": (entry(step=K + 1), r"'step' must be the rule's step count"),
    "ranks of another type": (entry(ranks=[1]), r"'ranks' must be an integer"),
    "file name with a folder": (
        lambda f, m: m["files"][0].update(name="../x.npz"),
        r"is not the name of a rank file",
    ),
    "extra entry": (entry(comment="hi"), r"unexpected: \['comment'\]"),
}


@pytest.mark.parametrize("case", sorted(HARMS))
def test_damaged_checkpoint_changes_nothing(tmp_path: pathlib.Path, case: str) -> None:
    harm, message = HARMS[case]
    bad = damaged(tmp_path, harm)
    zopt, tree = trained("flat", K + 1)  # a run with its own state, which must stay as it is
    before = cases.snapshot(zopt, tree)
    with pytest.raises(CheckpointError, match=message):
        dist.load(bad, zopt, tree)
    assert cases.snapshot(zopt, tree) == before
    # Consolidating knows no params: a folder consistent in itself but for another tree is
    # joined, and then refused by composeopt.load.
    with pytest.raises(CheckpointError):
        dist.consolidate(bad, tmp_path / "out.npz")
        co.load(tmp_path / "out.npz", cases.rule("flat"), cases.params())
    assert not (tmp_path / "out.npz").exists() or case == "wrong shape, fingerprint to match"


def test_params_of_another_layout_are_refused(tmp_path: pathlib.Path) -> None:
    zopt, tree = trained("flat", K)
    dist.save(tmp_path, zopt, tree)
    other = cases.params()
    other["out"].append(np.zeros(2))
    fresh = dist.ShardedOptimiser(cases.rule("flat"), dist.LocalComm(), mode="flat")
    with pytest.raises(
        CheckpointError, match=r"not for these params: parameters missing .*params\['out'\]\[1\]"
    ):
        dist.load(tmp_path, fresh, other)
    assert fresh.layout is None and len(co.state_store(fresh.rule)) == 0
    before = cases.snapshot(zopt, tree)
    other = cases.params()
    other["layer"]["b"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(
        CheckpointError, match=r"params\['layer'\]\['b'\]: checkpoint has shape \(3,\) and dtype float64"
    ):
        dist.load(tmp_path, zopt, other)
    assert cases.snapshot(zopt, tree) == before


def test_a_checkpoint_of_another_chain_is_refused(tmp_path: pathlib.Path) -> None:
    zopt, tree = trained("flat", K)
    dist.save(tmp_path, zopt, tree)
    other = dist.ShardedOptimiser(
        co.Optimiser(co.ClipGlobalNorm(1.0), co.Momentum()), dist.LocalComm(), mode="flat"
    )
    with pytest.raises(CheckpointError, match=r"the rules or the chain differ"):
        dist.load(tmp_path, other, tree)
    assert len(co.state_store(other.rule)) == 0


# --- under MPI: saved on 4 ranks, resumed on 4, 2 and 1 -------------------------------------


def test_resharded_resume_under_mpi(tmp_path: pathlib.Path, mpirun: Any) -> None:
    mpirun("ckpt_save.py", 4, str(tmp_path))
    for mode in cases.MODES:
        opt, tree = cases.rule(mode), cases.params()
        for step in range(K):
            co.update_(opt, tree, cases.grads(step))
        co.save(tmp_path / f"plain-{mode}.npz", opt, tree)
    (tmp_path / "damage").touch()
    mpirun("ckpt_resume.py", 2, str(tmp_path))
    (tmp_path / "damage").unlink()
    for name in ("plain-flat", "plain-whole"):
        (tmp_path / f"{name}.npz").unlink()
    mpirun("ckpt_resume.py", 4, str(tmp_path))

    for rank in range(2):
        refused = (tmp_path / f"refused-{rank}.txt").read_text()
        for case in ("flipped-byte", "missing-file", "overlap", "fingerprint", "other-params"):
            assert f"refused {case} |" in refused, (case, rank, refused)
        assert "SHA-256 is not the one in the manifest" in refused
    # The flipped byte is in the last old rank's file, which only the last new rank reads.
    assert "rank 1 of 2 failed" in (tmp_path / "refused-0.txt").read_text()
    for mode in cases.MODES:
        want = cases.reference(mode, K + M)
        for name in (f"{mode}-resumed-4", f"{mode}-resumed-2", f"plain-{mode}-resumed-2"):
            with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as saved:
                assert_same(cases.unflat(saved), want)
        with np.load(tmp_path / f"{mode}-params.npz", allow_pickle=False) as saved:
            assert_same(resume(tmp_path / mode, mode, cases.unflat(saved)), want)  # on one rank
        dist.consolidate(tmp_path / mode, tmp_path / f"{mode}-one.npz")
        opt = cases.rule(mode)
        with np.load(tmp_path / f"{mode}-params.npz", allow_pickle=False) as saved:
            tree = cases.unflat(saved)
        co.load(tmp_path / f"{mode}-one.npz", opt, tree)
        for step in range(K, K + M):
            co.update_(opt, tree, cases.grads(step))
        assert_same(tree, want)
