"""The check phase of a step: pair params with grads and refuse anything a step cannot take.

Every path of a step (generic, fused, batched) starts from what `collect` returns,
and nothing is written before it has looked at every leaf: structure, array modules
and devices, dtypes, shapes (also against the shape the parameter had when its state
was made), JAX tracers (a step inside `jax.jit` would lose its state), and, for an
in-place step, writability and memory: a parameter that shares memory with another,
or whose elements overlap each other, cannot be updated in place.  Each error starts
with the parameter's path.

A step over a big tree that comes back step after step (the batched step, see
`composeopt._fused.batch`) asks `unchanged` first: a proof, from one table of the
arrays' headers, that parameters and gradients are what `collect` last accepted
for this store in every way that it looks at.  Whenever that proof fails,
`collect` runs and gives its errors; the proof only ever says "as before".
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

import array_api_compat
import numpy as np

from . import _memory
from ._dispatch import backend_name, is_array, is_tracer, namespace
from ._memory import extent, first_overlap, overlaps_itself, owns_memory
from .errors import AliasingError, ShapeMismatchError, UnsupportedArrayError
from .store import StateStore
from .tree import Path, zip_leaves

__all__ = ["Leaf", "collect", "as_array", "MISSING", "Seen", "watch", "seen", "unchanged", "unchanged_leaves"]

MISSING: Any = object()
"""The state of a leaf that has none yet."""


class Leaf:
    """One distinct parameter of this step, its gradient and its state (or `MISSING`)."""

    __slots__ = ("path", "x", "dx", "state")

    def __init__(self, path: Path, x: Any, dx: Any, state: Any) -> None:
        self.path = path
        self.x = x
        self.dx = dx
        self.state = state


def collect(store: StateStore, params: Any, grads: Any, *, copy: bool, in_place: bool) -> list[Leaf]:
    """Every (parameter, gradient) pair, checked; one leaf per distinct array.

    Frozen parameters ([freeze_][composeopt.freeze_]) are left out, as if their gradient
    were `None`.  Gradients of another dtype (integers and booleans too) are cast to the
    parameter's; tied parameters get the sum of their gradients.  With `copy`, every
    gradient is the engine's own copy (the generic rules write to it); without, a
    gradient that already has the parameter's dtype is passed as it is.  `in_place`: the
    step writes into the parameters, so they must be writable and must not share memory.
    """
    frozen = store.frozen
    by_id: dict[int, Leaf] = {}
    reference: tuple[str, Any, Any] | None = None  # the first parameter, and its namespace
    for path, x, g in zip_leaves(params, grads):
        if type(x) is not np.ndarray and is_tracer(x):
            _refuse_tracer(path, "parameter")
        if type(g) is not np.ndarray and is_tracer(g):
            _refuse_tracer(path, "gradient")
        if frozen and x in frozen:
            continue
        xp = namespace(x)
        _check_parameter(path, x, xp)
        if reference is None:
            reference = (path, x, xp)
        elif xp is not reference[2]:
            raise UnsupportedArrayError(
                f"{path}: parameter is a {backend_name(x)} array but {reference[0]} "
                f"is a {backend_name(reference[1])} array; one tree must use one array module"
            )
        g = as_array(g)  # NumPy hands 0-d gradients over as scalars
        _check_gradient(path, x, g, xp)
        leaf = by_id.get(id(x))
        if leaf is None:
            by_id[id(x)] = Leaf(path, x, xp.astype(g, x.dtype, copy=copy), store.get(x, MISSING))
        else:  # the same array twice in the tree: one update from the summed gradients
            leaf.dx = leaf.dx + xp.astype(g, x.dtype)
    leaves = list(by_id.values())
    for leaf in leaves:
        if leaf.state is MISSING:
            store.claim(leaf.path, leaf.x)
        else:
            _check_layout(store, leaf)
    if in_place:
        for leaf in leaves:
            _check_writable(leaf.path, leaf.x)
        _check_disjoint(leaves)
        if store in _watched:
            _remember(store, params, grads, leaves)
    return leaves


# --- the proof that a tree is as the last full check saw it ------------------------------


class Seen:
    """What `collect` accepted of one tree for an in-place step, and when.

    Held per store: the store's versions then (no state added, replaced or removed since,
    nothing frozen or thawed, no parameter collected), the tree's containers, and the
    headers of its parameters (`parameters`, a table as `composeopt._memory.read_headers`
    fills) and the dtypes of its gradients.  It keeps the dtypes alive, so that no other
    dtype can take one's address; it does not keep the parameters alive (the store's
    versions move when one is collected).

    `gradients` holds the data addresses (row 0) and flags (row 1) of the gradients of the
    last step that `unchanged` proved, for a step that reads them where they are.
    """

    def __init__(
        self, store: StateStore, skeleton: Any, parameters: Any, gradients: Any, dtypes: list[Any]
    ) -> None:
        self.versions = (store.version, store.frozen.version)
        self.skeleton = skeleton
        self.count = len(parameters)
        self.parameters = parameters
        self.gradient_dtypes = gradients[:, _memory.DTYPE].copy()
        # What a gradient's header must show: its parameter's ndim and shape, its own dtype
        # as then (which also says that it is a NumPy array: the column is zero else).
        self._expected = parameters.copy()
        self._expected[:, _memory.DTYPE] = self.gradient_dtypes
        self.dtypes = dtypes
        self.gradients = np.zeros((2, self.count), dtype=np.int64)
        self._found = np.zeros_like(self.gradients)

    def proves(self, xs: Iterable[Any], gs: Iterable[Any]) -> bool:
        """Whether `xs` (`count` of them) are the same arrays with the same headers (address,
        flags: writable, shape, strides, dtype), and `gs` NumPy arrays of their shapes with
        the same dtypes as then: the leaves, in tree order, of a tree with these containers."""
        count = self.count
        return _memory.headers_agree(
            xs, count, self.parameters, slice(0, _memory.WIDTH), self._found
        ) and _memory.headers_agree(gs, count, self._expected, _GRADIENT_COLUMNS, self.gradients)


_GRADIENT_COLUMNS = slice(_memory.DTYPE, _memory.STRIDES)  # dtype, ndim, shape


_watched: weakref.WeakSet[StateStore] = weakref.WeakSet()
_seen: weakref.WeakKeyDictionary[StateStore, Seen] = weakref.WeakKeyDictionary()


def watch(store: StateStore) -> None:
    """From now on, `collect` remembers what it accepts of `store`'s trees, for `unchanged`
    (where NumPy's headers can be read here)."""
    if _memory.headers_readable():
        _watched.add(store)


def seen(store: StateStore) -> Seen | None:
    """What `collect` last remembered of `store`, if nothing in the store has changed since."""
    memo = _seen.get(store)
    if memo is None or memo.versions != (store.version, store.frozen.version):
        return None
    return memo


def unchanged(store: StateStore, params: Any, grads: Any) -> Seen | None:
    """The fast check of a repeat step: `seen(store)` if `params` and `grads` are, in every way
    that `collect` looks at, as in the tree it remembers, so that `collect` would accept them
    with the same leaves, all with their states; else `None` (then `collect` decides)."""
    memo = seen(store)
    if memo is None:
        return None
    leaves = _leaves(memo.skeleton, params, grads)
    if leaves is None or not memo.proves(*leaves):
        return None
    return memo


def unchanged_leaves(store: StateStore, params: Any, grads: Any) -> tuple[Seen, list[Any], list[Any]] | None:
    """`unchanged`, with the parameters and gradients in the order of `collect`'s leaves."""
    memo = seen(store)
    if memo is None:
        return None
    leaves = _leaves(memo.skeleton, params, grads)
    if leaves is None:
        return None
    xs, gs = (list(side) for side in leaves)  # read twice: once to prove, once to use
    if not memo.proves(xs, gs):
        return None
    return memo, xs, gs


def _remember(store: StateStore, params: Any, grads: Any, leaves: list[Leaf]) -> None:
    """Keep what `collect` has just accepted, if `unchanged` can prove it again: a tree of
    dicts, lists and tuples with NumPy arrays for leaves, each with its gradient and its state,
    none twice, none frozen."""
    xs: list[Any] = []
    gs: list[Any] = []
    skeleton = _skeleton(params, grads, xs, gs)
    count = len(xs)
    if skeleton is None or count != len(leaves):
        return  # another kind of tree; or tied, frozen or skipped leaves: collect's leaves differ
    if any(leaf.state is MISSING for leaf in leaves):
        return  # states made by this step move the store's version anyway
    parameters = np.empty((count, _memory.WIDTH), dtype=np.int64)
    gradients = np.empty_like(parameters)
    _memory.read_headers(xs, count, parameters)
    _memory.read_headers(gs, count, gradients)
    if np.any(parameters[:, _memory.NDIM] > _memory.MAX_NDIM):
        return
    dtypes = list({id(a.dtype): a.dtype for a in (*xs, *gs)}.values())
    _seen[store] = Seen(store, skeleton, parameters, gradients, dtypes)


def _skeleton(params: Any, grads: Any, xs: list[Any], gs: list[Any]) -> Any:
    """The containers of `params` as `_leaves` checks them, appending the leaves and their
    gradients (NumPy arrays both) in the order of `zip_leaves`; `None` for any other tree.

    A container is `(type, keys or length, children)`; `children` is `None` if all its
    children are leaves, else one entry per child, `None` for a leaf."""
    kind = type(params)
    if kind is dict:
        if type(grads) is not dict or grads.keys() != params.keys():
            return None
        keys: Any = tuple(params)
        pairs: Any = ((value, grads[key]) for key, value in params.items())
    elif kind is list or kind is tuple:
        if type(grads) not in (list, tuple) or len(grads) != len(params):
            return None
        keys = len(params)
        pairs = zip(params, grads)
    else:
        return None
    children: list[Any] = []
    for x, g in pairs:
        if type(x) is np.ndarray:
            if type(g) is not np.ndarray:
                return None
            xs.append(x)
            gs.append(g)
            children.append(None)
        else:
            child = _skeleton(x, g, xs, gs)
            if child is None:
                return None
            children.append(child)
    return kind, keys, None if all(child is None for child in children) else tuple(children)


def _leaves(node: Any, params: Any, grads: Any) -> tuple[Iterable[Any], Iterable[Any]] | None:
    """The leaves of `params` and `grads`, in the order of `zip_leaves`, if their containers
    are those of `node` (see `_skeleton`), so that there are as many as then; `None` else.
    Only the containers: the leaves are whatever they are, for the headers to tell."""
    kind, keys, children = node
    if type(params) is not kind:
        return None
    if kind is dict:
        if type(grads) is not dict or len(params) != len(keys) or tuple(params) != keys:
            return None
        if tuple(grads) != keys and grads.keys() != params.keys():  # the same order is quicker to tell
            return None
        values: Any = params.values()
        gradients: Any = map(grads.__getitem__, keys)
    else:
        if type(grads) not in (list, tuple) or len(params) != keys or len(grads) != keys:
            return None
        values, gradients = params, grads
    if children is None:  # all leaves: read where they are, without a copy of the containers
        return values, gradients
    xs: list[Any] = []
    gs: list[Any] = []
    for child, x, g in zip(children, values, gradients):
        if child is None:
            xs.append(x)
            gs.append(g)
        else:
            inner = _leaves(child, x, g)
            if inner is None:
                return None
            xs.extend(inner[0])
            gs.extend(inner[1])
    return xs, gs


def as_array(value: Any) -> Any:
    """NumPy turns 0-d results into scalars (`np.float64`); make them arrays again."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def _refuse_tracer(path: str, role: str) -> None:
    # The optimiser's state lives in Python objects between calls.  A transformed function
    # runs its Python once, to trace it: the state it reads is baked into the compiled
    # function as constants, and the state it makes is never seen again.
    raise UnsupportedArrayError(
        f"{path}: {role} is a JAX tracer, so composeopt was called inside jax.jit, vmap or grad, "
        "where its optimiser state cannot change from one call to the next; call composeopt."
        "update outside the transformed function (jit only the gradient function, e.g. "
        "jax.jit(jax.grad(loss)), and update eagerly), or use optax for a jitted training loop"
    )


def _kind_of(xp: Any, dtype: Any) -> str:
    """`f` for real floating point, `i` for integers and booleans, `?` for anything else."""
    if isinstance(dtype, np.dtype):  # NumPy's and CuPy's dtypes: cheaper than isdtype
        if dtype.kind == "f" or dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has kind "V"
            return "f"
        return "i" if dtype.kind in "iub" else "?"
    if xp.isdtype(dtype, "real floating"):
        return "f"
    return "i" if xp.isdtype(dtype, ("integral", "bool")) else "?"


def _check_parameter(path: str, x: Any, xp: Any) -> None:
    if _kind_of(xp, x.dtype) != "f":
        raise UnsupportedArrayError(
            f"{path}: parameter has dtype {x.dtype}; only real floating-point arrays can be optimised"
        )


def _check_gradient(path: str, x: Any, g: Any, xp: Any) -> None:
    if not (type(g) is np.ndarray and type(x) is np.ndarray):  # two NumPy arrays share module and device
        if not is_array(g):
            raise UnsupportedArrayError(f"{path}: gradient is a {type(g).__name__}, not an array")
        if namespace(g) is not xp:
            raise UnsupportedArrayError(
                f"{path}: gradient is a {backend_name(g)} array but the parameter is a "
                f"{backend_name(x)} array; move one of them explicitly"
            )
        if array_api_compat.device(g) != array_api_compat.device(x):
            raise UnsupportedArrayError(
                f"{path}: gradient is on device {array_api_compat.device(g)} but the parameter "
                f"is on device {array_api_compat.device(x)}"
            )
    if tuple(g.shape) != tuple(x.shape):
        raise ShapeMismatchError(
            f"{path}: gradient shape {tuple(g.shape)} != parameter shape {tuple(x.shape)}"
        )
    if _kind_of(xp, g.dtype) == "?":
        raise UnsupportedArrayError(
            f"{path}: gradient has dtype {g.dtype}; expected a real (floating-point, integer "
            "or boolean) array"
        )


def _check_layout(store: StateStore, leaf: Leaf) -> None:
    layout = store.layout(leaf.x)
    if layout is not None and (tuple(leaf.x.shape), leaf.x.dtype) != layout:
        shape, dtype = layout
        raise ShapeMismatchError(
            f"{leaf.path}: parameter has shape {tuple(leaf.x.shape)} and dtype {leaf.x.dtype} but "
            f"its optimiser state was made for shape {shape} and dtype {dtype} (was it changed "
            "in place?); composeopt.reset_(opt) starts every state again"
        )


def _check_writable(path: str, x: Any) -> None:
    """Refuse a parameter that an in-place step cannot write, before anything is written."""
    read_only = not x.flags.writeable if isinstance(x, np.ndarray) else array_api_compat.is_jax_array(x)
    if read_only:
        raise UnsupportedArrayError(
            f"{path}: parameter is a read-only {backend_name(x)} array; update_ changes arrays in "
            "place, use composeopt.update(opt, params, grads), which returns new ones"
        )
    if array_api_compat.is_torch_array(x):
        _check_torch_writable(path, x)
    flags = getattr(x, "flags", None)
    contiguous = (
        x.is_contiguous() if array_api_compat.is_torch_array(x) else getattr(flags, "c_contiguous", True)
    )
    if not contiguous:
        e = extent(x)
        if e is not None and overlaps_itself(e.shape, e.strides, e.itemsize):
            raise AliasingError(
                f"{path}: parameter's elements share memory (a broadcast or expanded view, "
                f"strides {e.strides}); an in-place step needs an array whose elements are distinct"
            )


def _check_torch_writable(path: str, x: Any) -> None:
    torch = sys.modules["torch"]
    if x.requires_grad and torch.is_grad_enabled():
        raise UnsupportedArrayError(
            f"{path}: parameter is a torch tensor that requires grad, which torch does not "
            "let change in place while autograd records; call update_ inside `with torch.no_grad():`"
        )
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise UnsupportedArrayError(
            f"{path}: parameter is a torch inference tensor, which can only change in place "
            "inside `torch.inference_mode()`; clone it outside inference mode to train it"
        )


def _check_disjoint(leaves: list[Leaf]) -> None:
    """Refuse two distinct parameters that share memory (disjoint views of a buffer are fine)."""
    if all(owns_memory(leaf.x) for leaf in leaves):
        return  # distinct arrays that own their memory are disjoint
    pair = first_overlap([extent(leaf.x) for leaf in leaves])
    if pair is not None:
        first, second = leaves[pair[0]], leaves[pair[1]]
        raise AliasingError(
            f"{first.path} and {second.path}: the two parameters share memory (views of one "
            "array, such as W and W.T, or overlapping slices), so an in-place step would update "
            "it twice with two states; pass one of them, or disjoint views"
        )
