"""Plain-dict row trees: dotted keys, deep merges, Hydra overrides applied with Hydra's rules,
sweep points, and OmegaConf interpolation resolved on the parts of a row that take part."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from kd import config as C


def sweep_points(overrides: Sequence[Any]) -> list[list[tuple[Any, Any]]]:
    """Each sweep override (`train.lr=1e-4,5e-4`) is one more axis; return the product."""
    axes = []
    for ov in overrides:
        if ov.is_sweep_override():
            axes.append([(ov, value) for value in ov.sweep_iterator()])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def slug(value: Any) -> str:
    """A value as a short id-safe name: `1e-4` -> '0.0001', `resnet_50.a1` -> 'resnet_50.a1'."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "", text)[:40] or "x"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def del_dotted(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def has_dotted(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def apply_override(
    tree: dict[str, Any], ov: Any, value: Any, known: set[str], where: str, problems: list[str]
) -> None:
    """Apply one parsed Hydra override to a plain dict, with Hydra's rules: `key=v` sets a key
    that exists, `+key=v` adds one that does not, `++key=v` sets one either way, `~key`
    removes one. A key of the schema (`known`) exists in every row, with its default."""
    key = ov.key_or_group
    if ov.is_delete():
        if not del_dotted(tree, key) and key not in known:
            problems.append(
                f"{where}: override '{ov.input_line}': there is no key '{key}' to delete"
            )
        return
    exists = has_dotted(tree, key) or key in known
    if ov.is_force_add():
        set_dotted(tree, key, value)
        return
    if ov.is_add():
        if exists:
            how = "" if has_dotted(tree, key) else " (kd/config.py gives every row a default)"
            problems.append(
                f"{where}: override '{ov.input_line}': key '{key}' already exists{how}, and '+' "
                f"only adds a new key; write '{key}=...' to change it (or '++{key}=...' to set "
                "it whether or not it exists)"
            )
            return
        set_dotted(tree, key, value)
        return
    if not exists:
        hint = C.closest(key, known)
        problems.append(
            f"{where}: override '{ov.input_line}' names no existing key '{key}'{hint}; "
            f"use '+{key}=...' to add a key"
        )
        return
    set_dotted(tree, key, value)


def merge(*layers: Any) -> dict[str, Any]:
    """Deep-merge plain mappings; later layers win, lists and scalars are replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        if not isinstance(layer, Mapping):
            continue
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy_tree(value)
    return out


def copy_tree(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value  # the common leaves, without the slower Mapping check
    if kind is dict or isinstance(value, Mapping):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_tree(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------


_REFERENCE = re.compile(r"[^\s${}:,'\"\[\]()=]+")  # a key path, or a word of a resolver's text
# a relative key (`${.x}`, `${oc.select:.x,0}`) or a quoted argument: resolve on the whole tree
_WHOLE_TREE = re.compile(r"[{:,\s]\.|['\"]")


def interpolated(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with its OmegaConf interpolations (`${name}`, `${oc.env:X,default}`) resolved.

    OmegaConf resolves on a node it builds of the whole tree, and building one of a row's ~90
    keys was half the time to validate a large grid. This builds it of what takes part only:
    the strings holding `${`, and the keys their text names (a superset of what they reference;
    a relative reference, `${.x}`, or a quoted argument takes the whole tree). Same values,
    same errors, same keys.
    """
    if not _has_interpolation(tree):  # most rows: no walk over every leaf's path
        return copy_tree(tree)
    strings = [(path, v) for path, v in _leaves(tree) if isinstance(v, str) and "${" in v]
    part: dict[str, Any] = {}
    if any(_WHOLE_TREE.search(text) for _, text in strings):
        part = tree
    else:
        for path, text in strings:
            _put(part, path, text)
            for name in _REFERENCE.findall(text):
                found, value = _lookup(tree, name.strip(".").split("."))
                if found:
                    _put(part, tuple(name.split(".")), copy_tree(value))
    values = OmegaConf.to_container(OmegaConf.create(part), resolve=True)
    out = copy_tree(tree)
    for path, _ in strings:
        _put(out, path, _lookup(values, list(path))[1])
    return out


def _has_interpolation(tree: Any) -> bool:
    """Whether a string leaf holds `${`: what `_leaves` finds, without building paths."""
    if isinstance(tree, str):
        return "${" in tree
    if type(tree) is dict or isinstance(tree, Mapping):
        return any(_has_interpolation(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_interpolation(v) for v in tree)
    return False


def _leaves(tree: Any, path: tuple = ()) -> Iterable[tuple[tuple, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _leaves(value, (*path, index))
    else:
        yield path, tree


def _lookup(tree: Any, path: Sequence[Any]) -> tuple[bool, Any]:
    for key in path:
        if isinstance(tree, Mapping):
            inside = key in tree
        else:
            inside = isinstance(tree, list) and isinstance(key, int) and 0 <= key < len(tree)
        if not inside:
            return False, None
        tree = tree[key]
    return True, tree


def _put(tree: Any, path: Sequence[Any], value: Any) -> None:
    """Set `path` in a tree of dicts and lists (created as dicts where missing)."""
    for key, next_key in zip(path[:-1], path[1:], strict=True):
        if isinstance(tree, list):  # a list made here is filled up to the index (a list of lists)
            while len(tree) <= key:
                tree.append(None)
            if tree[key] is None:
                tree[key] = [] if isinstance(next_key, int) else {}
        elif key not in tree:
            tree[key] = [] if isinstance(next_key, int) else {}
        tree = tree[key]
    if isinstance(tree, list):
        while len(tree) <= path[-1]:
            tree.append(None)
    tree[path[-1]] = value
