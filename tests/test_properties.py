"""Property-based checks with hypothesis: invariants that hold for any input."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import composeopt as co

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), elements=finite)
norm_orders = st.sampled_from([1, 2, 3, math.inf])


def p_norm(values, p):
    flat = np.abs(np.concatenate([np.ravel(v) for v in values])) if values else np.zeros(0)
    if flat.size == 0:
        return 0.0
    return float(flat.max()) if p == math.inf else float(np.sum(flat**p) ** (1 / p))


@settings(max_examples=60, deadline=None)
@given(dx=arrays, omega=st.floats(1e-3, 1e3), p=norm_orders)
def test_clip_norm_bounds_the_norm_and_keeps_the_direction(dx, omega, p):
    rule = co.ClipNorm(omega, p)
    out = np.asarray(rule.apply_(None, np.zeros_like(dx), dx.copy()))
    norm = p_norm([dx], p)
    assert p_norm([out], p) <= omega * (1 + 1e-9) + 1e-300
    if norm <= omega:
        np.testing.assert_array_equal(out, dx)
    else:
        np.testing.assert_allclose(out, dx * (omega / norm), rtol=1e-9, atol=1e-300)


@settings(max_examples=40, deadline=None)
@given(grads=st.lists(arrays, min_size=1, max_size=4), omega=st.floats(1e-3, 1e3), p=norm_orders)
def test_clip_global_norm_bounds_the_joint_norm(grads, omega, p):
    params = [np.zeros_like(g) for g in grads]
    co.update_(co.ClipGlobalNorm(omega, p), params, [g.copy() for g in grads])
    updates = [-x for x in params]
    assert p_norm(updates, p) <= omega * (1 + 1e-9) + 1e-300
    scale = min(1.0, omega / p_norm(grads, p)) if p_norm(grads, p) > 0 else 1.0
    for update, g in zip(updates, grads):
        np.testing.assert_allclose(update, g * scale, rtol=1e-9, atol=1e-300)


leaf = hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=3), elements=finite)
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("abcdef", min_size=1, max_size=3), children, max_size=3),
    ),
    max_leaves=8,
)


def same_structure(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_structure(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))


def copy_tree(tree):
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    return type(tree)(copy_tree(v) for v in tree)


@settings(max_examples=60, deadline=None)
@given(params=trees)
def test_any_tree_descends_to_zero_with_its_own_gradient(params):
    grads = copy_tree(params)
    new = co.update(co.Descent(1.0), params, grads)
    assert same_structure(new, params)
    co.update_(co.Descent(1.0), params, grads)
    for tree in (new, params):
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, np.ndarray):
                assert not np.any(node)
            else:
                stack.extend(node.values() if isinstance(node, dict) else node)


def test_importing_composeopt_imports_no_gpu_or_framework_module():
    code = "import sys, composeopt; print(sorted(m for m in ('cupy', 'jax', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
