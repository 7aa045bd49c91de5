"""Walking params trees: dicts (any Mapping), lists, tuples, namedtuples, dataclasses,
JAX pytree nodes, nesting.

Leaves are arrays.  Each leaf is named by its [Path][composeopt.tree.Path], written as Python
would index it: `params['layer1']['W']`, `params[0]`, `params.weight`.

Besides the built-in containers, two kinds of node are walked:

* a node in JAX's pytree registry (`jax.tree_util.register_dataclass`,
  `register_pytree_node_class`, `register_pytree_with_keys`, ...), with the children and
  the keys that JAX gives it: an attribute (`GetAttrKey`) reads as `.name`, a dict key as
  `['k']`, a position as `[i]`.  The registry is only asked when JAX is already imported,
  since only then can a node be registered; composeopt never imports JAX;
* a `dataclasses.dataclass` instance, by the fields its `__init__` takes
  (`params.layer.weight`), rebuilt with `dataclasses.replace`.

Either is matched to a gradient node of the same type and (for JAX) the same static data.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from ._dispatch import is_array, is_tracer
from .errors import TreeStructureError, UnsupportedArrayError

__all__ = ["Path", "zip_leaves", "array_leaves", "rebuild"]

ROOT = "params"


class Path(str):
    """Where a leaf sits in the params tree.

    As a string it reads as Python indexing (`params['layer1']['W']`), for
    messages; `keys` holds the raw keys (`('layer1', 'W')`) and
    `key` joins them with `/` (`layer1/W`), the form that patterns
    in groups and [freeze_][composeopt.freeze_] match.
    """

    keys: tuple[Any, ...]

    def __new__(cls, text: str = ROOT, keys: tuple[Any, ...] = ()) -> Path:
        path = super().__new__(cls, text)
        path.keys = keys
        return path

    @property
    def key(self) -> str:
        return "/".join(str(k) for k in self.keys)

    def child(self, key: Any, *, attribute: bool = False) -> Path:
        text = f"{self}.{key}" if attribute else f"{self}[{key!r}]"
        return Path(text, (*self.keys, key))


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _kind(obj: Any) -> str:
    return type(obj).__name__


def zip_leaves(params: Any, grads: Any, path: Path | None = None) -> Iterator[tuple[Path, Any, Any]]:
    """Yield `(path, x, dx)` for every array `x` of `params` whose gradient is not `None`.

    A `None` gradient, at a leaf or in place of a whole subtree, skips it.
    Raises `TreeStructureError` where the two trees differ.
    """
    if path is None:
        path = Path()
    if grads is None:
        return
    if is_array(params):
        yield path, params, grads
    elif isinstance(params, Mapping):
        if not isinstance(grads, Mapping):
            raise TreeStructureError(f"{path}: gradient is a {_kind(grads)}, parameter is a {_kind(params)}")
        missing = [key for key in params if key not in grads]
        unexpected = [key for key in grads if key not in params]
        if missing or unexpected:
            raise TreeStructureError(
                f"{path}: gradient keys differ from parameter keys "
                f"(missing {missing}, unexpected {unexpected})"
            )
        for key, value in params.items():
            yield from zip_leaves(value, grads[key], path.child(key))
    elif isinstance(params, (list, tuple)):
        if not isinstance(grads, (list, tuple)) or len(grads) != len(params):
            described = f"a {_kind(grads)}"
            if isinstance(grads, (list, tuple)):
                described += f" of length {len(grads)}"
            raise TreeStructureError(
                f"{path}: gradient is {described}, parameter is a {_kind(params)} of length {len(params)}"
            )
        names: tuple[str, ...] | None = getattr(params, "_fields", None)
        for index, (value, grad) in enumerate(zip(params, grads)):
            child = path.child(names[index], attribute=True) if names else path.child(index)
            yield from zip_leaves(value, grad, child)
    elif params is None:
        raise TreeStructureError(f"{path}: gradient given for a None parameter")
    else:
        node = _node(params)
        if node is None:
            if is_tracer(params):  # the check phase refuses it, saying why
                yield path, params, grads
                return
            raise UnsupportedArrayError(
                f"{path}: parameter is a {_kind(params)}, not an array "
                "(give it a None gradient to leave it alone)"
            )
        entries, structure = node
        grad_node = _node(grads) if type(grads) is type(params) else None
        if grad_node is None:
            raise TreeStructureError(f"{path}: gradient is a {_kind(grads)}, parameter is a {_kind(params)}")
        grad_entries, grad_structure = grad_node
        if grad_structure != structure:
            raise TreeStructureError(
                f"{path}: the gradient's {_kind(grads)} has another structure than the parameter's "
                f"({grad_structure} against {structure})"
            )
        for (key, attribute, value), (_, _, grad) in zip(entries, grad_entries):
            yield from zip_leaves(value, grad, path.child(key, attribute=attribute))


def array_leaves(params: Any, path: Path | None = None) -> Iterator[tuple[Path, Any]]:
    """Yield `(path, x)` for every array of `params`; other leaves are passed over."""
    if path is None:
        path = Path()
    if is_array(params):
        yield path, params
    elif isinstance(params, Mapping):
        for key, value in params.items():
            yield from array_leaves(value, path.child(key))
    elif isinstance(params, (list, tuple)):
        names: tuple[str, ...] | None = getattr(params, "_fields", None)
        for index, value in enumerate(params):
            yield from array_leaves(
                value, path.child(names[index], attribute=True) if names else path.child(index)
            )
    elif params is not None:
        node = _node(params)
        if node is not None:
            for key, attribute, value in node[0]:
                yield from array_leaves(value, path.child(key, attribute=attribute))


def rebuild(tree: Any, replace: Callable[[Any], Any]) -> Any:
    """A copy of `tree` with every array leaf `x` replaced by `replace(x)`.

    Containers are rebuilt with their own type where it can be (dict
    subclasses, namedtuples, list and tuple subclasses, dataclasses through
    `dataclasses.replace`, JAX pytree nodes through `jax.tree_util.tree_unflatten`);
    non-array leaves are kept as they are.  Each distinct array and container is rebuilt once, so
    what the input shares (the same list under two keys, a tied array) the
    output shares too, and `replace` is called once per distinct array.
    """
    done: dict[int, Any] = {}
    kept: list[Any] = []  # holds the inputs, so that no id in `done` is reused meanwhile

    def copy_of(node: Any) -> Any:
        key = id(node)
        if key in done:
            return done[key]
        if is_array(node):
            new = replace(node)
        elif isinstance(node, (Mapping, list, tuple)):
            new = _rebuilt(node, copy_of)
        else:
            found = None if node is None else _node(node)
            if found is None:
                return node
            entries, structure = found
            children = [copy_of(value) for _, _, value in entries]
            if isinstance(structure, type):
                fields = {name: child for (name, _, _), child in zip(entries, children)}
                new = dataclasses.replace(node, **fields)
            else:
                new = structure.unflatten(children)
        kept.append(node)
        done[key] = new
        return new

    return copy_of(tree)


def _rebuilt(node: Any, copy_of: Callable[[Any], Any]) -> Any:
    if isinstance(node, Mapping):
        return _same_mapping(node, {key: copy_of(value) for key, value in node.items()})
    if _is_namedtuple(node):
        return type(node)(*(copy_of(value) for value in node))
    items = [copy_of(value) for value in node]
    try:
        return type(node)(items)
    except TypeError:
        return tuple(items) if isinstance(node, tuple) else items


def _node(obj: Any) -> tuple[list[tuple[Any, bool, Any]], Any] | None:
    """`(entries, structure)` of a JAX pytree node or a dataclass, else `None`.

    `entries` are the children as `(key, attribute, child)`, `attribute` telling whether
    the path writes the key as `.key` or as `[key]`; `structure` is the node's JAX treedef
    (one level: its type and static data) or, for a dataclass, its type.  Two nodes fit
    each other when their structures are equal.
    """
    jax = sys.modules.get("jax")
    if jax is not None:
        tree_util = jax.tree_util
        pairs, treedef = tree_util.tree_flatten_with_path(obj, is_leaf=lambda child: child is not obj)
        if not (len(pairs) == 1 and not pairs[0][0]):  # a leaf comes back whole, with no key
            return [(*_jax_key(tree_util, keys[0]), child) for keys, child in pairs], treedef
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [field.name for field in dataclasses.fields(obj) if field.init]
        return [(name, True, getattr(obj, name)) for name in fields], type(obj)
    return None


def _jax_key(tree_util: Any, entry: Any) -> tuple[Any, bool]:
    """The key of a child as [Path.child][composeopt.tree.Path.child] takes it, from JAX's."""
    if isinstance(entry, tree_util.GetAttrKey):
        return entry.name, True
    if isinstance(entry, tree_util.DictKey):
        return entry.key, False
    if isinstance(entry, tree_util.SequenceKey):
        return entry.idx, False
    if isinstance(entry, tree_util.FlattenedIndexKey):
        return entry.key, False
    return entry, False


def _same_mapping(original: Mapping[Any, Any], items: dict[Any, Any]) -> Mapping[Any, Any]:
    if type(original) is dict:
        return items
    if isinstance(original, MutableMapping):
        new = copy.copy(original)  # keeps the type and extras such as a defaultdict's factory
        new.update(items)
        return new
    try:
        return type(original)(items)  # type: ignore[call-arg]
    except TypeError:
        return items
