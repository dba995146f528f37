"""`axes:`: more rows as a product of named values, filtered by include/exclude patterns, with
ids and labels from templates."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from kd import config as C
from kd.grid.trees import copy_tree, set_dotted, slug

AXES_KEYS = {"values", "id", "label", "row", "include", "exclude"}


def _axis_choices(name: str, spec: Any) -> list[tuple[str, Any]]:
    """An axis is a list of values (named by their text) or a mapping name -> value."""
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, list):
        return [(slug(v), v) for v in spec]
    return [(slug(spec), spec)]


def _matches(choice: Mapping[str, tuple[str, Any]], pattern: Mapping[str, Any]) -> bool:
    """An include/exclude pattern matches when each named axis has that name or that value."""
    for key, wanted in pattern.items():
        if str(key) not in choice:
            return False
        name, value = choice[str(key)]
        same_value = wanted == value and isinstance(wanted, bool) == isinstance(value, bool)
        if str(wanted) != name and not same_value:
            return False
    return True


def _patterns(axes: Mapping[str, Any], key: str, file: str, problems: list[str]) -> list[Any]:
    patterns = axes.get(key) or []
    if not isinstance(patterns, list) or not all(isinstance(p, Mapping) for p in patterns):
        problems.append(
            f"{file}: axes.{key}: must be a list of mappings axis -> value, "
            f"e.g. [{{lr: 0.001, model: resnet50}}], got {patterns!r}"
        )
        return []
    return patterns


def expand_axes(axes: Any, file: str, problems: list[str]) -> list[dict[str, Any]]:
    """`axes:` -> raw rows (with id and label from the templates)."""
    if axes is None:
        return []
    if not isinstance(axes, Mapping) or "values" not in axes:
        problems.append(
            f"{file}: axes: must be a mapping with `values` (and optional id, label, row, include, exclude)"
        )
        return []
    for key in axes:
        if key not in AXES_KEYS:
            problems.append(f"{file}: axes.{key}: unknown key{C.closest(str(key), AXES_KEYS)}")
    values = axes["values"]
    if not isinstance(values, Mapping) or not values:
        problems.append(f"{file}: axes.values: must be a non-empty mapping of dotted key -> values")
        return []
    base = axes.get("row") or {}
    if not isinstance(base, Mapping):
        problems.append(f"{file}: axes.row: must be a mapping (a partial row), got {base!r}")
        return []
    names = [str(n) for n in values]
    short = {n: n.split(".")[-1] for n in names}
    id_template = axes.get("id") or "_".join("{" + short[n] + "}" for n in names)
    label_template = axes.get("label") or id_template
    if not isinstance(id_template, str) or not isinstance(label_template, str):
        problems.append(f"{file}: axes.id/label: must be templates such as 'r_{{lr}}'")
        return []
    exclude = _patterns(axes, "exclude", file, problems)
    include = _patterns(axes, "include", file, problems)
    rows = []
    for combo in itertools.product(*(_axis_choices(n, values[n]) for n in names)):
        choice = {n: c for n, c in zip(names, combo, strict=True)}
        choice |= {short[n]: c for n, c in zip(names, combo, strict=True)}
        if any(_matches(choice, p) for p in exclude):
            continue
        if include and not any(_matches(choice, p) for p in include):
            continue
        row = copy_tree(base)
        for n, (_, value) in zip(names, combo, strict=True):
            set_dotted(row, n, copy_tree(value))
        fields = {k.replace(".", "_"): c[0] for k, c in choice.items()}
        try:
            row["id"] = id_template.format(**fields)
            row["label"] = label_template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(
                f"{file}: axes.id/label: template names unknown axis {exc}; axes are {names}"
            )
            return []
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
