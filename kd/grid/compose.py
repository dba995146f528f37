"""One row's raw tree: defaults <- its recipe <- the row <- the overrides, interpolated; and the
grid's own sections checked for shape, so the rest of the grid is still checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from kd import config as C
from kd.grid import trees

# Grid-level keys an override can name; everything else applies to each row.
GRID_LEVEL_OVERRIDES = {
    "name",
    "experiment",
    "tracking_uri",
    "description",
    "code_version",
    "recipes",
    "defaults",
    "axes",
    "seeds",
}


def check_structure(raw: dict[str, Any], file: str, problems: list[str]) -> dict[str, Any]:
    """The grid's own sections have the right shapes; wrong ones are reported and emptied, so
    that the rest of the grid is still checked (and nothing below trips over them)."""
    for key in ("name", "experiment", "tracking_uri", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            problems.append(f"{file}: {key}: must be a string, got {raw[key]!r}")
            raw[key] = None
    version = raw.get("code_version")
    if version is not None:  # a version the user bumps: `2`, `2b` and `"2"` alike
        if isinstance(version, (str, int, float)) and not isinstance(version, bool):
            raw["code_version"] = str(version)
        else:
            problems.append(f"{file}: code_version: must be a string, got {version!r}")
            raw["code_version"] = None
    if not isinstance(raw.get("defaults") or {}, Mapping):
        problems.append(
            f"{file}: defaults: must be a mapping (the base row), got {raw['defaults']!r}"
        )
        raw["defaults"] = {}
    recipes = raw.get("recipes") or {}
    if not isinstance(recipes, Mapping):
        problems.append(f"{file}: recipes: must be a mapping name -> partial row, got {recipes!r}")
        recipes = {}
    for recipe_name, recipe in list(recipes.items()):
        if not isinstance(recipe, Mapping):
            problems.append(
                f"{file}: recipes.{recipe_name}: must be a mapping (a partial row), got {recipe!r}"
            )
            recipes[recipe_name] = {}
    raw["recipes"] = recipes
    rows = raw.get("rows") or []
    if not isinstance(rows, list):
        problems.append(f"{file}: rows: must be a list of rows")
        rows = []
    raw["rows"] = rows
    return raw


def where_row(file: str, row: Mapping[str, Any]) -> str:
    label = f" ({row.get('label')})" if row.get("label") else ""
    return f"{file}: row '{row.get('id', '?')}'{label}"


def compose_row(
    grid_raw: Mapping[str, Any],
    row: Any,
    overrides: Sequence[Any],
    point: Sequence[tuple[Any, Any]],
    known: set[str],
    file: str,
    problems: list[str],
) -> dict[str, Any] | None:
    """defaults <- recipe <- row <- overrides, then OmegaConf interpolation."""
    if not isinstance(row, Mapping):
        problems.append(
            f"{file}: rows: each row must be a mapping with at least `id` and `label`, got {row!r}"
        )
        return None
    recipes = grid_raw.get("recipes") or {}
    recipe_name = row.get("recipe", (grid_raw.get("defaults") or {}).get("recipe"))
    recipe = {}
    if isinstance(recipe_name, str):  # another type is reported by the schema check
        if recipe_name not in recipes:
            problems.append(
                f"{where_row(file, row)}: recipe: unknown recipe '{recipe_name}'{C.closest(str(recipe_name), recipes)}; "
                f"the grid defines: {', '.join(recipes) or 'none'}"
            )
        else:
            recipe = recipes[recipe_name]
    merged = trees.merge(grid_raw.get("defaults") or {}, recipe, row)
    swept = dict((id(ov), v) for ov, v in point)
    for ov in overrides:
        if ov.key_or_group.split(".")[0] in GRID_LEVEL_OVERRIDES:
            continue
        value = (
            swept[id(ov)] if ov.is_sweep_override() else (None if ov.is_delete() else ov.value())
        )
        trees.apply_override(merged, ov, value, known, where_row(file, merged), problems)
    context = {k: grid_raw.get(k) for k in ("name", "experiment") if k in grid_raw}
    try:
        resolved = trees.interpolated({**context, **merged})
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "interpolation"
        message = str(exc).splitlines()[0]
        hint = (
            "export it, or give a default: ${oc.env:NAME,default}"
            if "Environment variable" in message
            else "fix the ${...} expression (OmegaConf interpolation)"
        )
        problems.append(f"{where_row(file, merged)}: {key}: {message}; {hint}")
        return None
    for key in context:
        resolved.pop(key, None)
    return resolved


def suffix_ids(row: dict[str, Any], suffix: str, point: Sequence[tuple[Any, Any]]) -> None:
    """A sweep point is a parallel copy of the grid: ids, labels and row references get its suffix."""
    row["id"] = f"{row.get('id', '')}-{suffix}"
    tag = ", ".join(f"{ov.key_or_group}={v}" for ov, v in point)
    row["label"] = f"{row.get('label', '')} [{tag}]"
    for section, key in (("teacher", "row"), ("init", "row"), ("paper", "baseline")):
        ref = row.get(section)
        if isinstance(ref, dict) and isinstance(ref.get(key), str):
            ref[key] = f"{ref[key]}-{suffix}"
