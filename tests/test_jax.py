"""composeopt with JAX: eager steps on registered pytrees, and a clear refusal under jit.

References: optax, run eagerly on the same trees (it is written independently of
composeopt and accepts any registered pytree), and hand-computed Adam steps.  The code
blocks of docs/pages/jax.md are fenced as ```py, so test_docs.py shows them without
running them (they need JAX); this module runs them, in order, and checks what they print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import composeopt as co  # noqa: E402
from composeopt.errors import TreeStructureError, UnsupportedArrayError  # noqa: E402
from composeopt.tree import array_leaves, zip_leaves  # noqa: E402

tree_util = jax.tree_util
PAGE = Path(__file__).resolve().parents[1] / "docs" / "pages" / "jax.md"


def f32(*values: float) -> Any:
    return jnp.asarray(values, dtype=jnp.float32)


# --- jit: refused, naming the path, changing nothing ---------------------------------

# Adam(0.01) on one weight whose gradient alternates +1, -1: the first step is -eta * sign(g),
# the next ones are small since the first moment nearly cancels.
EAGER_DELTAS = [-0.01, 0.000526, -0.003358, 0.000526]


def alternating(step: int) -> dict[str, Any]:
    return {"w": f32(1.0 if step % 2 == 0 else -1.0)}


def deltas(step_fn: Any, params: dict[str, Any], steps: int = 4) -> list[float]:
    out = []
    for step in range(steps):
        new = step_fn(params, alternating(step))
        out.append(float(new["w"][0] - params["w"][0]))
        params = new
    return out


def test_eager_update_takes_the_adam_steps():
    opt = co.Adam(0.01)
    ours = deltas(lambda p, g: co.update(opt, p, g), {"w": f32(0.0)})
    np.testing.assert_allclose(ours, EAGER_DELTAS, atol=2e-6)


def test_eager_update_agrees_with_optax():
    optax = pytest.importorskip("optax")
    reference = optax.adam(0.01)
    state = [reference.init({"w": f32(0.0)})]

    def optax_step(params: Any, grads: Any) -> Any:
        updates, state[0] = reference.update(grads, state[0], params)
        return optax.apply_updates(params, updates)

    opt = co.Adam(0.01)
    ours = deltas(lambda p, g: co.update(opt, p, g), {"w": f32(0.0)})
    np.testing.assert_allclose(ours, deltas(optax_step, {"w": f32(0.0)}), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_place", [False, True], ids=["update", "update_"])
def test_update_under_jit_is_refused(in_place):
    opt = co.Adam(0.01)
    step = co.update_ if in_place else co.update
    jitted = jax.jit(lambda p, g: step(opt, p, g))
    with pytest.raises(UnsupportedArrayError) as caught:
        jitted({"w": f32(0.0)}, alternating(0))
    message = str(caught.value)
    assert message.startswith("params['w']: parameter is a JAX tracer")
    assert "jax.jit" in message and "outside" in message and "optax" in message
    assert "read-only" not in message


def test_refused_jitted_call_changes_no_state():
    opt = co.Adam(0.01)
    params = {"w": f32(0.0), "b": f32(1.0, 2.0)}
    for step in range(2):
        params = co.update(opt, params, {"w": alternating(step)["w"], "b": f32(1.0, 1.0)})
    store = co.state_store(opt)
    before = {name: store.get(x) for name, x in params.items()}
    before_values = {name: [np.asarray(a).copy() for a in (s.mu, s.nu)] for name, s in before.items()}
    with pytest.raises(UnsupportedArrayError, match=r"params\['b'\]: parameter is a JAX tracer"):
        jax.jit(lambda p, g: co.update(opt, p, g))(params, {"w": f32(1.0), "b": f32(1.0, 1.0)})
    assert store.step == 2 and len(store) == 2
    for name, x in params.items():
        state = store.get(x)
        assert state is before[name] and state.t == 2
        for array, value in zip((state.mu, state.nu), before_values[name]):
            np.testing.assert_array_equal(np.asarray(array), value)
    # The eager path goes on from where it was: the third step of the alternating sequence.
    new = co.update(opt, params, {"w": alternating(2)["w"], "b": f32(1.0, 1.0)})
    np.testing.assert_allclose(float(new["w"][0] - params["w"][0]), EAGER_DELTAS[2], atol=2e-6)


def test_traced_gradient_with_concrete_params_is_refused():
    params = {"w": f32(1.0, 2.0)}
    opt = co.Descent(0.1)
    with pytest.raises(UnsupportedArrayError, match=r"params\['w'\]: gradient is a JAX tracer"):
        jax.jit(lambda g: co.update(opt, params, g))({"w": f32(1.0, 1.0)})
    assert co.state_store(opt).step == 0


def test_vmap_and_grad_through_the_optimiser_are_refused():
    opt = co.Descent(0.1)
    with pytest.raises(UnsupportedArrayError, match="JAX tracer"):
        jax.vmap(lambda x, g: co.update(opt, x, g))(jnp.ones((3, 2)), jnp.ones((3, 2)))

    def loss_after_step(x: Any) -> Any:
        return jnp.sum(co.update(opt, {"x": x}, {"x": x})["x"])

    with pytest.raises(UnsupportedArrayError, match=r"params\['x'\]: parameter is a JAX tracer"):
        jax.grad(loss_after_step)(jnp.ones(2))
    assert co.state_store(opt).step == 0


def test_jit_of_the_gradient_only_works():
    def loss(params: Any) -> Any:
        return jnp.sum((params["w"] - 3.0) ** 2)

    grad = jax.jit(jax.grad(loss))
    params, opt = {"w": f32(0.0, 1.0)}, co.Adam(0.1)
    for _ in range(200):
        params = co.update(opt, params, grad(params))
    np.testing.assert_allclose(np.asarray(params["w"]), 3.0, atol=0.05)


# --- registered pytree nodes --------------------------------------------------------


@tree_util.register_dataclass
@dataclasses.dataclass
class Lin:
    w: Any
    b: Any
    activation: str = dataclasses.field(default="tanh", metadata={"static": True})


@tree_util.register_pytree_node_class
class Affine:
    """A node with custom flattening and static data (its `name`): JAX keys it by position."""

    def __init__(self, scale: Any, shift: Any, name: str = "affine") -> None:
        self.scale, self.shift, self.name = scale, shift, name

    def tree_flatten(self) -> tuple[tuple[Any, Any], str]:
        return (self.scale, self.shift), self.name

    @classmethod
    def tree_unflatten(cls, name: str, children: Any) -> Affine:
        return cls(*children, name=name)


class Bag:
    """A node flattened with dict keys, as `register_pytree_with_keys` allows."""

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items


tree_util.register_pytree_with_keys(
    Bag,
    lambda bag: ([(tree_util.DictKey(k), v) for k, v in sorted(bag.items.items())], tuple(sorted(bag.items))),
    lambda keys, children: Bag(dict(zip(keys, children))),
)


@tree_util.register_dataclass
@dataclasses.dataclass
class Dense:
    params: dict[str, Any]  # {"kernel": ..., "bias": ...}, as flax keeps them
    features: int = dataclasses.field(default=0, metadata={"static": True})


@tree_util.register_dataclass
@dataclasses.dataclass
class MLP:
    layers: list[Dense]
    norm: Affine
    extra: Bag


def mlp(seed: int = 0) -> MLP:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> Any:
        return jnp.asarray(rng.normal(size=shape), dtype=jnp.float32)

    return MLP(
        layers=[
            Dense({"kernel": normal(3, 4), "bias": normal(4)}, features=4),
            Dense({"kernel": normal(4, 1), "bias": normal(1)}, features=1),
        ],
        norm=Affine(normal(1), normal(1)),
        extra=Bag({"temperature": normal(1), "offset": normal(2)}),
    )


def mlp_loss(model: MLP, x: Any) -> Any:
    h = x
    for layer in model.layers:
        h = jnp.tanh(h @ layer.params["kernel"] + layer.params["bias"])
    h = h * model.norm.scale + model.norm.shift
    return jnp.mean(h**2) * model.extra.items["temperature"][0] + jnp.sum(model.extra.items["offset"] ** 2)


def test_register_dataclass_node_is_accepted():
    params = Lin(f32(1.0, 2.0), f32(0.5))
    grads = Lin(f32(1.0, -1.0), f32(2.0))
    assert [str(path) for path, _, _ in zip_leaves(params, grads)] == ["params.w", "params.b"]
    new = co.update(co.Descent(0.5), params, grads)
    assert type(new) is Lin and new.activation == "tanh"
    np.testing.assert_array_equal(np.asarray(new.w), [0.5, 2.5])
    np.testing.assert_array_equal(np.asarray(new.b), [-0.5])


def test_register_pytree_node_class_keeps_its_static_data():
    params = {"norm": Affine(f32(2.0), f32(1.0), name="ln")}
    paths = [str(path) for path, _ in array_leaves(params)]
    assert paths == ["params['norm'][0]", "params['norm'][1]"]
    new = co.update(co.Descent(1.0), params, {"norm": Affine(f32(1.0), None, name="ln")})
    assert type(new["norm"]) is Affine and new["norm"].name == "ln"
    np.testing.assert_array_equal(np.asarray(new["norm"].scale), [1.0])
    assert new["norm"].shift is params["norm"].shift


def test_flax_like_model_matches_optax_step_for_step():
    optax = pytest.importorskip("optax")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), dtype=jnp.float32)
    grad = jax.jit(jax.grad(mlp_loss))
    ours, theirs = mlp(), mlp()
    opt, reference = (
        co.Optimiser(co.ClipGlobalNorm(1.0), co.Adam(0.01)),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01)),
    )
    state = reference.init(theirs)
    for _ in range(20):
        ours = co.update(opt, ours, grad(ours, x))
        updates, state = reference.update(grad(theirs, x), state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    assert tree_util.tree_structure(ours) == tree_util.tree_structure(theirs)
    for mine, other in zip(tree_util.tree_leaves(ours), tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(other), rtol=1e-5, atol=1e-6)


def test_jax_key_paths_read_as_python_and_feed_groups():
    model = mlp()
    keys = [(str(path), path.key) for path, _ in array_leaves(model)]
    assert keys == [
        ("params.layers[0].params['kernel']", "layers/0/params/kernel"),
        ("params.layers[0].params['bias']", "layers/0/params/bias"),
        ("params.layers[1].params['kernel']", "layers/1/params/kernel"),
        ("params.layers[1].params['bias']", "layers/1/params/bias"),
        ("params.norm[0]", "norm/0"),
        ("params.norm[1]", "norm/1"),
        ("params.extra['offset']", "extra/offset"),
        ("params.extra['temperature']", "extra/temperature"),
    ]
    opt = co.Groups(("*/bias", co.Descent(0.0)), ("norm/*", co.Descent(0.0)), default=co.Descent(1.0))
    grads = tree_util.tree_map(jnp.ones_like, model)
    new = co.update(opt, model, grads)
    np.testing.assert_array_equal(
        np.asarray(new.layers[0].params["bias"]), np.asarray(model.layers[0].params["bias"])
    )
    np.testing.assert_array_equal(np.asarray(new.norm.scale), np.asarray(model.norm.scale))
    np.testing.assert_allclose(
        np.asarray(new.layers[1].params["kernel"]), np.asarray(model.layers[1].params["kernel"]) - 1
    )
    np.testing.assert_allclose(
        np.asarray(new.extra.items["offset"]), np.asarray(model.extra.items["offset"]) - 1
    )


def test_registered_nodes_with_numpy_leaves_update_in_place():
    params = Lin(np.array([1.0, 2.0]), np.array([0.5]))
    weight = params.w
    co.update_(co.Descent(0.5), params, Lin(np.array([1.0, 1.0]), None))
    assert params.w is weight
    np.testing.assert_array_equal(weight, [0.5, 1.5])
    np.testing.assert_array_equal(params.b, [0.5])


@pytest.mark.parametrize(
    ("grads", "message"),
    [
        ({"m": {"w": f32(1.0), "b": f32(1.0)}}, r"params\['m'\]: gradient is a dict, parameter is a Lin"),
        (
            {"m": Lin(f32(1.0), f32(1.0), activation="relu")},
            r"params\['m'\]: the gradient's Lin has another structure than the parameter's",
        ),
        ({"m": Lin(f32(1.0), [f32(1.0)])}, r"params\['m'\]\.b: gradient is a list, not an array"),
        (
            {"m": Lin(f32(1.0, 2.0), f32(1.0))},
            r"params\['m'\]\.w: gradient shape \(2,\) != parameter shape \(1,\)",
        ),
    ],
)
def test_mismatched_registered_structure_names_the_path(grads, message):
    params = {"m": Lin(f32(1.0), f32(1.0))}
    opt = co.Adam()
    with pytest.raises(
        (TreeStructureError, UnsupportedArrayError, co.errors.ShapeMismatchError), match=message
    ):
        co.update(opt, params, grads)
    assert co.state_store(opt).step == 0


def test_mismatched_custom_node_static_data_is_a_structure_error():
    with pytest.raises(TreeStructureError, match=r"params: the gradient's Affine has another structure"):
        co.update(co.Descent(), Affine(f32(1.0), f32(1.0), name="a"), Affine(f32(1.0), f32(1.0), name="b"))


def test_checkpoint_paths_of_registered_nodes_round_trip(tmp_path):
    x = jnp.ones((2, 3), dtype=jnp.float32)
    grad = jax.grad(mlp_loss)
    model, opt = mlp(), co.Adam(0.01)
    for _ in range(2):
        model = co.update(opt, model, grad(model, x))
    saved = co.state_dict(opt, model)
    assert "params.layers[1].params['kernel']" in saved["states"] and "params.norm[0]" in saved["states"]
    co.save(tmp_path / "opt.npz", opt, model)
    restored = co.load(tmp_path / "opt.npz", co.Adam(0.01), model)
    g = grad(model, x)
    after_ours, after_restored = co.update(opt, model, g), co.update(restored, model, g)
    for mine, other in zip(tree_util.tree_leaves(after_ours), tree_util.tree_leaves(after_restored)):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(other))


# --- the page "Using composeopt with JAX" -----------------------------------------------

BLOCK = re.compile(r"^```py\n(.*?)^```$", re.S | re.M)


def test_code_on_the_jax_page_runs(monkeypatch):
    blocks = BLOCK.findall(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    page = types.ModuleType("page_jax")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, page.__name__, page)
    namespace = page.__dict__
    for number, code in enumerate(blocks, start=1):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            # dont_inherit: the page's code is run as written, without this module's __future__ imports
            exec(compile(code, f"docs/pages/jax.md, py block {number}", "exec", dont_inherit=True), namespace)
        # Every print, at any depth, is followed by a comment that starts with what it prints.
        commented = [
            line.split("  # ", 1)[1] for line in code.splitlines() if line.lstrip().startswith("print(")
        ]
        printed = output.getvalue().splitlines()
        assert len(printed) == len(commented), f"block {number} printed {printed}"
        for got, comment in zip(printed, commented):
            assert comment.startswith(got.rstrip()), (
                f"block {number}: printed {got!r}, the comment says {comment!r}"
            )


def test_the_timed_comparison_takes_the_same_steps_as_optax(monkeypatch):
    pytest.importorskip("optax")
    monkeypatch.syspath_prepend(str(PAGE.parents[1] / "examples"))
    for name in ("jax_mlp", "numpy_mlp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    example = importlib.import_module("jax_mlp")
    compared = example.compare_with_optax(steps=10)
    assert set(compared["ms_per_step"]) == {"composeopt, eager", "optax, eager", "optax, jax.jit"}
    assert all(ms > 0 for ms in compared["ms_per_step"].values())
    runs = compared["params"]
    for name in runs["optax, jax.jit"]:
        reference = np.asarray(runs["optax, eager"][name])
        np.testing.assert_allclose(
            np.asarray(runs["composeopt, eager"][name]), reference, rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(runs["optax, jax.jit"][name]), reference, rtol=1e-4, atol=1e-5)
