"""Corrupted checkpoints, field by field, over the registry: each is refused with a
CheckpointError naming what is wrong, and leaves the optimiser and the parameters bit-identical.

Every case of the registry is trained three steps and its state_dict taken; then each entry of
that plain dict is in turn deleted, retyped, put out of range, reshaped or given company, down to
every field of every parameter's state.  Saved files are damaged too: members dropped, renamed,
added, reshaped; the manifest broken; headers that claim huge sizes; random bytes flipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import composeopt as co
from composeopt.errors import CheckpointError, HyperparameterError
from composeopt.registry import CASES
from composeopt.rule import walk_rules
from composeopt.tree import array_leaves

DELETE: Any = object()
PATHS = ("params['W']", "params['b']", "params['s']")


def make_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.uniform(-1, 1, (3, 4)), "b": rng.uniform(-1, 1, 4), "s": np.array(rng.uniform(-1, 1))}


def train(opt: co.Rule, params: dict[str, np.ndarray], steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        co.update_(
            opt, params, {key: value + rng.standard_normal(value.shape) for key, value in params.items()}
        )


def setup(name: str) -> tuple[dict[str, Any], co.Rule, dict[str, np.ndarray]]:
    """A checkpoint of case `name` after 3 steps, and another optimiser of the case, with its
    own state and a frozen parameter, to load it onto."""
    opt, params = CASES[name](), make_params(1)
    train(opt, params, 3, 10)
    target, other = CASES[name](), make_params(2)
    train(target, other, 2, 20)
    co.freeze_(target, other, where="s")
    return co.state_dict(opt, params), target, other


def describe(value: Any) -> Any:
    """A value as exact, comparable data: arrays by dtype, shape and bytes; numbers by type and repr."""
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


def snapshot(opt: co.Rule, params: Any) -> Any:
    store = co.state_store(opt)
    leaves = [(str(path), x) for path, x in array_leaves(params)]
    return (
        [
            describe({k: v for k, v in vars(rule).items() if k != "_composeopt_state"})
            for rule in walk_rules(opt)
        ],
        store.step,
        len(store),
        [(path, describe(store.get(x, "none")), x in store.frozen) for path, x in leaves],
        [(path, describe(x)) for path, x in leaves],
    )


def assert_refused(target: co.Rule, params: Any, load: Any, needles: list[str], label: str) -> None:
    before = snapshot(target, params)
    try:
        load()
    except CheckpointError as err:
        message = str(err)
        for needle in needles:
            assert needle in message, (label, needle, message)
    else:
        raise AssertionError(f"{label}: loaded")
    assert snapshot(target, params) == before, label


def replaced(plain: Any, route: tuple[Any, ...], value: Any) -> Any:
    """`plain` with the item at `route` replaced by `value` (or deleted), sharing the rest."""
    if not route:
        return value
    key, rest = route[0], route[1:]
    if isinstance(plain, dict):
        new = dict(plain)
        if rest:
            new[key] = replaced(plain[key], rest, value)
        elif value is not DELETE:
            new[key] = value
        else:
            del new[key]
        return new
    items = list(plain)
    if rest or value is not DELETE:
        items[key] = replaced(plain[key], rest, value)
    else:
        del items[key]
    return items


# --- the mutations ----------------------------------------------------------------

BAD_COUNTERS = [-1, "3", 2.5, True, None, 2**63, [1]]
BAD_NAMES = ["bogus", "fallible", "rules", "groups", "default", "inner", "init", "_hyper_names"]
BAD_HYPER = [-1.0, "abc", None, math.nan, math.inf, 1e300, True, [0.1] * 5, [[[[0.1]]]], {"a": 1}, 7]


def state_mutations(
    plain: Any, route: tuple[Any, ...], where: str, in_groups: bool
) -> Iterator[tuple[Any, str]]:
    """(route, value, where) for corruptions of one state, `where` as the message spells it."""
    if isinstance(plain, np.ndarray):
        for bad in (
            np.zeros((*plain.shape, 2)),
            np.zeros(plain.shape, np.float32),
            np.zeros(plain.shape, np.int64),
            plain.tolist(),
            None,
            0.0,
            {"__array__": "x"},
        ):
            yield route, bad, where
        if plain.ndim:
            yield route, plain[..., :-1], where
    elif isinstance(plain, dict):
        ((kind, content),) = plain.items()
        yield route, {"__other__": content}, where
        yield route, {kind: content, "__more__": 1}, where
        if kind == "__tuple__":
            if content:
                yield route, {kind: content[:-1]}, where
            yield route, {kind: [*content, None]}, where
            yield route, content, where
            if in_groups and content and type(content[0]) is int:
                yield route + (kind, 0), content[0] + 1, f"{where}[0]"
                yield route + (kind, 0), content[0] - 1, f"{where}[0]"
            for i, item in enumerate(content):
                yield from state_mutations(item, route + (kind, i), f"{where}[{i}]", in_groups)
        else:
            yield route, {kind: {**content, "extra": 1}}, where
            yield route, [content], where
            for key, item in content.items():
                yield route + (kind, key), DELETE, where
                sub = f"{where}.{key}" if kind == "__state__" else f"{where}[{key!r}]"
                yield from state_mutations(item, route + (kind, key), sub, in_groups)
    elif isinstance(plain, list):
        if plain:
            yield route, plain[:-1], where
        yield route, [*plain, None], where
        yield route, {"__tuple__": plain}, where
        for i, item in enumerate(plain):
            yield from state_mutations(item, route + (i,), f"{where}[{i}]", in_groups)
    elif isinstance(plain, bool) or plain is None:
        for bad in (0, "x", np.zeros(1), [None]):
            yield route, bad, where
    elif isinstance(plain, int):
        for bad in BAD_COUNTERS:
            yield route, bad, where


def mutations(sd: dict[str, Any], opt: co.Rule) -> Iterator[tuple[str, Any, list[str]]]:
    """(label, corrupted checkpoint, what the message must name)."""
    for key in sd:
        if key != "format":
            yield f"no {key}", replaced(sd, (key,), DELETE), [repr(key)]
    yield "extra entry", {**sd, "extra": 1}, ["'extra'"]
    for bad in ([sd], None, "text"):
        yield f"checkpoint {bad!r:.20}", bad, ["checkpoint"]
    for bad in ("x", None, 1):
        yield f"format {bad!r}", {**sd, "format": bad}, ["format"]
    for bad in (True, "2", 2.0, None, 0, -1, co.checkpoint.VERSION + 1):
        yield f"version {bad!r}", {**sd, "version": bad}, ["version"]
    yield "version 1 with groups", {**sd, "version": 1}, ["'groups'"]
    for bad in (5, None, ["x"]):
        yield f"optimiser {bad!r}", {**sd, "optimiser": bad}, ["optimiser"]
    for bad in (
        [],
        "x",
        [sd["structure"][0] + "X", sd["structure"][1]],
        [sd["structure"][0], [*sd["structure"][1], []]],
    ):
        yield f"structure {bad!r:.30}", {**sd, "structure": bad}, ["structure"]
    for bad in (None, [["x"]], [*sd["groups"], []], "x"):
        yield f"groups {bad!r}", {**sd, "groups": bad}, ["'groups'"]
    for bad in (-1, "abc", 2.5, True, None, 10**400, 2**63, math.nan, [3]):
        yield f"step {bad!r:.20}", {**sd, "step": bad}, ["'step'"]

    hyper = sd["hyperparameters"]
    for bad in (None, {}, hyper[:-1], [*hyper, {}], "x"):
        yield f"hyperparameters {bad!r:.30}", {**sd, "hyperparameters": bad}, ["hyperparameters"]
    for index, rule in enumerate(walk_rules(opt)):
        for bad in (None, [], "x"):
            yield (
                f"hyperparameters[{index}] {bad!r}",
                replaced(sd, ("hyperparameters", index), bad),
                ["hyperparameters"],
            )
        for name in BAD_NAMES:
            if name not in type(rule)._hyper_names:
                changed = replaced(sd, ("hyperparameters", index, name), [])
                yield f"hyperparameters[{index}].{name}", changed, ["hyperparameters", name]
        for name in hyper[index]:
            descriptor = getattr(type(rule), name)
            for bad in BAD_HYPER:
                if not isinstance(bad, dict):
                    try:
                        descriptor.validate(rule, tuple(bad) if isinstance(bad, list) else bad)
                        continue  # a value this hyperparameter accepts
                    except HyperparameterError:
                        pass
                changed = replaced(sd, ("hyperparameters", index, name), bad)
                yield (
                    f"{type(rule).__name__}.{name}={bad!r:.20}",
                    changed,
                    ["hyperparameters", f"{type(rule).__name__}.{name}"],
                )

    for bad in (None, [], "x"):
        yield f"params {bad!r}", {**sd, "params": bad}, ["'params'"]
    yield (
        "extra param",
        replaced(sd, ("params", "params['zz']"), {"shape": [1], "dtype": "float64"}),
        ["params['zz']"],
    )
    for path in PATHS:
        entry = sd["params"][path]
        yield f"no param {path}", replaced(sd, ("params", path), DELETE), [path]
        for bad in (
            None,
            {"shape": entry["shape"]},
            {**entry, "more": 1},
            {**entry, "shape": [*entry["shape"], 1]},
            {**entry, "shape": [-1]},
            {**entry, "shape": [True] * len(entry["shape"]) or [True]},
            {**entry, "shape": "3"},
            {**entry, "dtype": "float32"},
            {**entry, "dtype": 5},
        ):
            yield f"param {path} {bad!r:.30}", replaced(sd, ("params", path), bad), [path]

    for bad in (None, list(sd["states"].values()), "x"):
        yield f"states {bad!r:.20}", {**sd, "states": bad}, ["'states'"]
    yield "state of no param", replaced(sd, ("states", "params['zz']"), None), ["params['zz']"]
    grouped = any(isinstance(rule, co.Groups) for rule in walk_rules(opt))
    for path, plain in sd["states"].items():
        for route, bad, where in state_mutations(plain, (), "", grouped):
            label = f"state {path}{where} <- {bad!r:.30}"
            yield label, replaced(sd, ("states", path, *route), bad), [path, f"checkpoint state{where}"]

    for bad in (None, 5, "params['W']", {"params['W']": True}, [3], ["params['zz']"], ["params['W']"] * 2):
        yield f"frozen {bad!r:.20}", {**sd, "frozen": bad}, ["frozen"]


# --- plain dicts ------------------------------------------------------------------


def test_registry_cases_cover_every_kind_of_state():
    kinds = set()
    for make in CASES.values():
        opt, params = make(), make_params(1)
        train(opt, params, 1, 0)
        for _, _, where in state_mutations(co.state_dict(opt, params)["states"].get(PATHS[0]), (), "", True):
            kinds.add(where.rpartition(".")[2] if "." in where else where[:3])
    assert {"mu", "t", "count", "inner", "accumulators", "[0]"} <= kinds


@pytest.mark.parametrize("name", list(CASES))
def test_every_corrupted_field_is_refused_and_changes_nothing(name):
    sd, target, params = setup(name)
    count = 0
    for label, corrupted, needles in mutations(sd, target):
        assert_refused(
            target,
            params,
            lambda corrupted=corrupted: co.load_state_dict(target, params, corrupted),
            needles,
            label,
        )
        count += 1
    assert count > 40
    # The checkpoint itself, and its lenient variants, still load.
    co.load_state_dict(target, params, sd)
    assert co.state_store(target).step == 3 and params["s"] not in co.state_store(target).frozen
    np.testing.assert_equal(co.state_dict(target, params)["states"], sd["states"])


@pytest.mark.parametrize(
    "name", ["Adam()", "Groups(b: Adam, default: AdamW)", "Optimiser(AccumGrad(3), Adam)"]
)
def test_what_may_be_left_out_still_loads(name):
    sd, target, params = setup(name)
    without = replaced(sd, ("states", "params['b']"), DELETE)
    co.load_state_dict(target, params, without)
    assert params["b"] not in co.state_store(target) and params["W"] in co.state_store(target)
    extra = replaced(sd, ("params", "params['zz']"), {"shape": [1], "dtype": "float64"})
    co.load_state_dict(CASES[name](), params, extra, strict=False)
    hyper = [{} for _ in sd["hyperparameters"]]  # hyperparameters a schedule gives are left out
    co.load_state_dict(CASES[name](), params, {**sd, "hyperparameters": hyper})


NOT_A_COUNTER = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63),
    st.floats(),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None)
@given(step=NOT_A_COUNTER, t=NOT_A_COUNTER, which=st.sampled_from(["step", "t", "both"]))
def test_no_bad_counter_loads(step, t, which):
    sd, target, params = setup_cached("Adam()")
    corrupted = sd
    if which in ("step", "both"):
        corrupted = {**corrupted, "step": step}
    if which in ("t", "both"):
        corrupted = replaced(corrupted, ("states", "params['b']", "__state__", "t"), t)
    assert_refused(target, params, lambda: co.load_state_dict(target, params, corrupted), [], which)


_cache: dict[str, Any] = {}


def setup_cached(name: str) -> tuple[dict[str, Any], co.Rule, dict[str, np.ndarray]]:
    if name not in _cache:
        _cache[name] = setup(name)
    return _cache[name]


# --- files ------------------------------------------------------------------------

FILE_CASES = [
    "Adam()",
    "Optimiser(ClipNorm, WeightDecay, Adam)",
    "Groups(W: Lookahead(Momentum), default: Descent)",
    "SM3()",
    "Optimiser(AccumGrad(3), Adam)",
    "MixedPrecision(Adam)",
    "LBFGS(0.5, memory=2)",
    "Adafactor(factored, momentum, lambda_)",
]


def members(file: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(file) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write(file: Path, contents: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(file, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return file


def npy(array: Any, allow_pickle: bool = False) -> bytes:
    with tempfile.TemporaryFile() as stream:
        np.save(stream, np.asarray(array), allow_pickle=allow_pickle)
        stream.seek(0)
        return stream.read()


def header_only(shape: tuple[int, ...], dtype: str) -> bytes:
    with tempfile.TemporaryFile() as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": dtype, "fortran_order": False, "shape": shape})
        stream.seek(0)
        return stream.read()


def manifest_of(contents: dict[str, bytes]) -> dict[str, Any]:
    with tempfile.TemporaryFile() as stream:
        stream.write(contents["__composeopt__.npy"])
        stream.seek(0)
        return json.loads(str(np.load(stream, allow_pickle=False)))


def file_corruptions(contents: dict[str, bytes]) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    meta = manifest_of(contents)
    arrays = [name for name in contents if name != "__composeopt__.npy"]
    assert arrays, "the case has state arrays"
    for name in arrays:
        member = name[:-4]
        yield f"drop {member}", {k: v for k, v in contents.items() if k != name}, [member]
        renamed = {(k + ".old" if k == name else k): v for k, v in contents.items()}
        yield f"rename {member}", renamed, [member]
        with tempfile.TemporaryFile() as stream:
            stream.write(contents[name])
            stream.seek(0)
            array = np.load(stream, allow_pickle=False)
        for bad in (np.zeros((*array.shape, 2)), array.astype(np.float32), np.zeros(3, np.int8)):
            yield f"reshape {member} {bad.shape} {bad.dtype}", {**contents, name: npy(bad)}, [member]
        yield f"huge {member}", {**contents, name: header_only((2**40,), "<f8")}, [member]
        yield f"lying {member}", {**contents, name: header_only(array.shape, array.dtype.str)}, [member]
        yield f"cut {member}", {**contents, name: contents[name][:-3]}, [member]
        yield f"longer {member}", {**contents, name: contents[name] + b"\0" * 8}, [member]
        yield f"not npy {member}", {**contents, name: b"hello"}, [member]
        yield (
            f"pickle {member}",
            {**contents, name: npy(np.array([None, 1], dtype=object), allow_pickle=True)},
            [member],
        )
    yield "extra member", {**contents, "stray.npy": npy(np.zeros(2))}, ["stray"]
    yield "extra non-npy member", {**contents, "README": b"hi"}, ["README"]
    no_manifest = {k: v for k, v in contents.items() if k != "__composeopt__.npy"}
    yield "no manifest", no_manifest, ["not a composeopt checkpoint"]

    def with_manifest(text: Any) -> dict[str, bytes]:
        return {**contents, "__composeopt__.npy": npy(np.array(text))}

    for text, needles in (
        ("{not json", ["manifest"]),
        ("", ["manifest"]),
        (json.dumps([meta]), ["manifest"]),
        ("[" * 100_000 + "]" * 100_000, ["manifest"]),
        ('{"format": 1, "format": 2}', ["manifest", "twice"]),
        (json.dumps({**meta, "step": "1"}), ["'step'"]),
        (json.dumps(meta).replace('"step": 3', '"step": NaN'), ["'step'"]),
        (json.dumps(meta).replace('"step": 3', '"step": ' + "9" * 5000), ["manifest"]),
        (json.dumps({**meta, "version": "1"}), ["version"]),
    ):
        yield f"manifest {text[:20]!r}", with_manifest(text), needles
    yield "manifest not text", {**contents, "__composeopt__.npy": npy(np.zeros(3))}, ["manifest"]
    huge = header_only((), f"<U{2**28}")
    yield "manifest huge", {**contents, "__composeopt__.npy": huge}, ["manifest"]
    text = json.dumps(meta)
    first, second = [name[:-4] for name in arrays[:2]] if len(arrays) > 1 else (arrays[0][:-4], "x")
    twice = text.replace(json.dumps(second), json.dumps(first))
    yield "a member referred to twice", with_manifest(twice), ["'states'", first]
    elsewhere = text.replace(json.dumps(first), json.dumps("elsewhere"))
    yield "a reference to no member", with_manifest(elsewhere), ["'states'", "elsewhere"]


@pytest.mark.parametrize("name", FILE_CASES)
def test_every_damaged_file_is_refused_and_changes_nothing(name, tmp_path):
    _, target, params = setup(name)
    opt, trained = CASES[name](), make_params(1)
    train(opt, trained, 3, 10)
    good = tmp_path / "good.npz"
    co.save(good, opt, trained)
    contents = members(good)
    for index, (label, damaged, needles) in enumerate(file_corruptions(contents)):
        file = write(tmp_path / f"bad-{index}.npz", damaged)
        assert_refused(
            target, params, lambda file=file: co.load(file, target, params), [str(file), *needles], label
        )
        file.unlink()
    for index, length in enumerate((0, 10, good.stat().st_size // 2, good.stat().st_size - 1)):
        cut = tmp_path / f"cut-{index}.npz"
        cut.write_bytes(good.read_bytes()[:length])
        assert_refused(
            target,
            params,
            lambda cut=cut: co.load(cut, target, params),
            ["not a composeopt checkpoint"],
            "cut",
        )
    np.save(tmp_path / "array.npy", np.ones(3))
    assert_refused(target, params, lambda: co.load(tmp_path / "array.npy", target, params), ["not a"], "npy")
    co.load(good, target, params)
    assert co.state_store(target).step == 3


def same(a: Any, b: Any) -> bool:
    return describe(a) == describe(b)


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flips")
    name = "Optimiser(ClipNorm, WeightDecay, Adam)"
    opt, params = CASES[name](), make_params(1)
    train(opt, params, 3, 10)
    co.save(folder / "good.npz", opt, params)
    return folder, name, co.state_dict(opt, params)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_byte_is_refused_or_changes_no_value(saved_file, data):
    folder, name, sd = saved_file
    raw = bytearray((folder / "good.npz").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= data.draw(st.integers(1, 255))
    file = folder / "flipped.npz"
    file.write_bytes(bytes(raw))
    target, params = CASES[name](), make_params(2)
    train(target, params, 2, 20)
    before = snapshot(target, params)
    try:
        co.load(file, target, params)
    except CheckpointError:
        assert snapshot(target, params) == before
    else:
        assert same(co.state_dict(target, params), sd)


def test_unreferenced_members_are_never_read(tmp_path, monkeypatch):
    _, target, params = setup("Adam()")
    opt, trained = co.Adam(), make_params(1)
    train(opt, trained, 3, 10)
    good = tmp_path / "good.npz"
    co.save(good, opt, trained)
    opened = []
    original = zipfile.ZipFile.open

    def spying(self, name, *args, **kwargs):
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return original(self, name, *args, **kwargs)

    shutil.copy(good, tmp_path / "extra.npz")
    with zipfile.ZipFile(tmp_path / "extra.npz", "a") as archive:
        archive.writestr("stray.npy", npy(np.zeros(4)))
    monkeypatch.setattr(zipfile.ZipFile, "open", spying)
    assert_refused(
        target, params, lambda: co.load(tmp_path / "extra.npz", target, params), ["stray"], "extra"
    )
    assert "stray.npy" not in opened
    opened.clear()
    co.load(good, target, params, strict=False)
    assert sorted(opened) == sorted(members(good))
    assert all(os.path.basename(name) for name in opened)
