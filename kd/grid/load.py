"""`load_grid`: a grid file and overrides -> validated, frozen, named rows (or a GridError that
lists every problem at once)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd import config as C
from kd.grid import trees
from kd.grid.axes import expand_axes
from kd.grid.checks import check_distinct, check_rows
from kd.grid.compose import (
    GRID_LEVEL_OVERRIDES,
    check_structure,
    compose_row,
    suffix_ids,
    where_row,
)
from kd.grid.keys import content_keys, resolve_teacher_models, topological_order
from kd.grid.parse import load_yaml, parse_overrides
from kd.grid.replicates import check_seeds, replicate, replicate_id, reserved_id_problem
from kd.grid.rows import Grid, GridError, Row, row_dependencies
from kd.smoke import smoke_row

GRID_KEYS = {
    "name",
    "experiment",
    "tracking_uri",
    "description",
    "code_version",
    "defaults",
    "recipes",
    "axes",
    "rows",
    "seeds",
}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused inside: a large grid's rows (loaded, or read
    back from the grid cache) are hundreds of thousands of new objects that live on, which it
    would otherwise walk again and again (~15 % of a 10,000-row grid's time); the trees made
    here hold no cycles to collect. Also a decorator (`@gc_paused()`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def load_grid(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    smoke: bool = False,
    check_data: bool = True,
    check_models: bool = True,
    seeds: int | None = None,
) -> Grid:
    """Load, expand and validate a grid file. Raises `GridError` listing every problem.

    With `smoke`, the full-size rows are validated (model names, KD terms, references) and
    then shrunk by `kd.smoke.smoke_row`; dataset roots and checkpoint files are not checked.
    `check_data` reads the inputs on disk: dataset copies (their index files) and the contents
    of `init.file`/`teacher.file` (with `check_models`); without it, only whether those files
    exist is checked (what `launch/status.py` and `launch/table.py` need).
    `seeds` (`--seeds N`) replaces the grid's `seeds:`: N replicates of every row
    (kd/grid/replicates.py).
    """
    path = Path(path)
    file = str(path)
    raw = load_yaml(path)
    problems: list[str] = [
        f"{file}: top-level key '{key}': unknown key{C.closest(str(key), GRID_KEYS)}"
        for key in raw
        if key not in GRID_KEYS
    ]
    expanded = expand_rows(raw, parse_overrides(overrides, file), file, problems, seeds)
    grid_raw = expanded.grid_raw
    name = str(grid_raw.get("name") or path.stem)
    experiment = str(grid_raw.get("experiment") or f"kdgrid-{name}")
    if smoke:
        experiment = f"{experiment}-smoke"
    configs, bad_data = validate_rows(expanded.rows, file, problems)
    if not configs and not problems:
        problems.append(f"{file}: the grid has no rows: add `rows:` or `axes:`")
    problems.extend(
        check_rows(
            configs,
            file,
            smoke,
            check_data,
            check_models,
            unresolved=expanded.unresolved,
            skip=bad_data,
        )
    )
    configs = resolve_teacher_models(configs)
    order = topological_order(configs, file, problems)
    if not problems:
        keys = content_keys(configs, order, code_version=grid_raw.get("code_version"))
        problems.extend(check_distinct(configs, keys, file))
    if problems:
        raise GridError(list(dict.fromkeys(problems)))  # a sweep can repeat a grid-level problem
    if smoke:
        configs, keys = shrink(configs, keys, order, name)
    return Grid(
        name=name,
        experiment=experiment,
        file=file,
        rows=tuple(freeze_rows(configs, keys, name, file, experiment, smoke)),
        tracking_uri=grid_raw.get("tracking_uri"),
        smoke=smoke,
        sweep_of=expanded.sweep_of,
        overrides=tuple(overrides),
        replicate_of=expanded.replicate_of,
        seeds_flag=seeds,
    )


@dataclass
class Expanded:
    """A grid's rows as raw trees, after recipes, axes, overrides and sweeps."""

    grid_raw: dict[str, Any]  # the grid's sections (of the last sweep point)
    rows: list[dict[str, Any]]
    sweep_of: dict[str, tuple[str, str]]  # a sweep variant's id -> its row's id and label
    unresolved: set[str]  # ids of rows whose interpolation failed
    # a replicate's id -> the id and label of its row (after any sweep suffix), its seed index
    replicate_of: dict[str, tuple[str, str, int]] = dataclasses.field(default_factory=dict)


def _grid_level(ov: Any) -> bool:
    return ov.key_or_group.split(".")[0] in GRID_LEVEL_OVERRIDES


def expand_rows(
    raw: dict[str, Any],
    parsed: Sequence[Any],
    file: str,
    problems: list[str],
    seeds: int | None = None,
) -> Expanded:
    """Every row of every sweep point, composed (defaults <- recipe <- row <- overrides), and
    its replicates when the grid asks for several seeds."""
    known = C.schema_keys()
    base_raw = trees.copy_tree(raw)
    for ov in parsed:  # grid-level overrides (`recipes.deit.train.lr=...`) apply once
        if _grid_level(ov) and not ov.is_sweep_override():
            value = None if ov.is_delete() else ov.value()
            trees.apply_override(base_raw, ov, value, set(), file, problems)
    expanded = Expanded(base_raw, [], {}, set())
    for point in trees.sweep_points(parsed):
        point_raw = trees.copy_tree(base_raw)
        for ov, value in point:  # ... and a grid-level sweep value to its own sweep point
            if _grid_level(ov):
                trees.apply_override(point_raw, ov, value, set(), file, problems)
        grid_raw = expanded.grid_raw = check_structure(point_raw, file, problems)
        where = f"{file}: --seeds" if seeds is not None else f"{file}: seeds"
        count = check_seeds(seeds if seeds is not None else grid_raw.get("seeds"), where, problems)
        suffix = "-".join(f"{ov.key_or_group.split('.')[-1]}{trees.slug(v)}" for ov, v in point)
        composed = []  # (row tree, (id, label) before the sweep suffix)
        for row in [*expand_axes(grid_raw.get("axes"), file, problems), *grid_raw["rows"]]:
            merged = compose_row(grid_raw, row, parsed, point, known, file, problems)
            if merged is None:  # reported; its id still exists for other rows' references
                if isinstance(row, Mapping) and row.get("id"):
                    row_id = f"{row['id']}-{suffix}" if suffix else str(row["id"])
                    expanded.unresolved.update(_replicate_ids(row_id, count))
                continue
            reserved = reserved_id_problem(merged, where_row(file, merged))
            if reserved:
                problems.append(reserved)
            base = (str(merged.get("id", "")), str(merged.get("label", "")))
            if suffix:
                suffix_ids(merged, suffix, point)
            composed.append((merged, base))
        _replicate_point(composed, count, bool(suffix), expanded, file, problems)
    return expanded


def _replicate_point(
    composed: Sequence[tuple[dict[str, Any], tuple[str, str]]],
    count: int,
    swept: bool,
    expanded: Expanded,
    file: str,
    problems: list[str],
) -> None:
    """One sweep point's rows, each as its replicates (a row's own `seeds:` wins over the
    grid's), into `expanded`."""
    counts = {}
    for merged, _ in composed:
        own = merged.pop("seeds", None)
        where = f"{where_row(file, merged)}: seeds"
        counts[str(merged.get("id", ""))] = (
            count if own is None else check_seeds(own, where, problems)
        )
    for merged, base in composed:
        row_count = counts[str(merged.get("id", ""))]
        copies = replicate(merged, row_count, counts, where_row(file, merged), problems)
        for copy, index in copies:
            if swept:
                expanded.sweep_of[str(copy["id"])] = base
            if row_count > 1:
                expanded.replicate_of[str(copy["id"])] = (
                    str(merged["id"]),
                    str(merged.get("label", "")),
                    index,
                )
            expanded.rows.append(copy)


def _replicate_ids(row_id: str, count: int) -> list[str]:
    return [row_id] if count == 1 else [replicate_id(row_id, i) for i in range(count)]


def validate_rows(
    raw_rows: Sequence[dict[str, Any]], file: str, problems: list[str]
) -> tuple[list[C.RowConfig], set[str]]:
    """Each raw row checked against kd/config.py; also the ids of rows whose `data` or
    `evaluate` section is wrong (their dataset copies are not checked)."""
    configs: list[C.RowConfig] = []
    bad_data: set[str] = set()
    memo: dict = {}  # each distinct section checked once (an axis's rows share most of them)
    for merged in raw_rows:
        where = where_row(file, merged)
        row_problems: list[C.Problem] = []
        cfg = C.validate_section(C.RowConfig, merged, "", row_problems, memo)
        problems.extend(f"{where}: {p.key}: {p.message}" for p in row_problems)
        if any(p.key.split(".")[0] in ("data", "evaluate") for p in row_problems):
            bad_data.add(cfg.id)
        configs.append(cfg)
    return configs, bad_data


def shrink(
    configs: Sequence[C.RowConfig], keys: Mapping[str, str], order: Sequence[str], name: str
) -> tuple[list[C.RowConfig], dict[str, str]]:
    """The --smoke rows. Validated at full size first (a typo in a model name must not hide
    behind its tiny stand-in); each smoke key derives from its full-size key, so rows that
    shrink to the same tiny config (e.g. ConvNeXt-B and ConvNeXt-L) stay distinct rows."""
    small = [smoke_row(cfg, name) for cfg in configs]
    configs = resolve_teacher_models(small)
    return configs, content_keys(configs, order, full_size=keys)


def freeze_rows(
    configs: Sequence[C.RowConfig],
    keys: Mapping[str, str],
    name: str,
    file: str,
    experiment: str,
    smoke: bool,
) -> list[Row]:
    return [
        Row(
            config=cfg,
            key=keys[cfg.id],
            depends_on=row_dependencies(cfg),
            grid=name,
            grid_file=file,
            experiment=experiment,
            smoke=smoke,
        )
        for cfg in configs
    ]
