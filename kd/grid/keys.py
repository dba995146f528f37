"""The row graph and content keys: teacher models taken from teacher rows, the dependency
order (a cycle is reported with its path), and each row's content key, which hashes what changes
its result with references replaced by the referenced rows' keys."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kd import config as C
from kd.grid.rows import row_dependencies


def resolve_teacher_models(configs: Sequence[C.RowConfig]) -> list[C.RowConfig]:
    """`resolve_teacher_model` of every row (rows found by id: linear in the grid's size)."""
    by_id: dict[str, C.RowConfig] = {}
    for cfg in configs:
        by_id.setdefault(cfg.id, cfg)  # the first of duplicate ids, as a search would find
    memo: dict = {}
    return [resolve_teacher_model(cfg, by_id, memo) for cfg in configs]


def resolve_teacher_model(
    cfg: C.RowConfig, configs: Mapping[str, C.RowConfig], memo: dict | None = None
) -> C.RowConfig:
    """`teacher: {row: X}` takes X's student architecture as the teacher model (`configs`:
    row id -> row). `memo` shares the new teacher section among rows that had the same one."""
    if cfg.teacher is None or cfg.teacher.row is None:
        return cfg
    source = configs.get(cfg.teacher.row)
    if source is None:
        return cfg
    model = source.student.model
    key = (id(cfg.teacher), model)
    if memo is not None and key in memo:
        teacher = memo[key][1]
    else:
        teacher = dataclasses.replace(cfg.teacher, model=model)
        if memo is not None:
            memo[key] = (cfg.teacher, teacher)  # the old section kept alive: its id stays its own
    return dataclasses.replace(cfg, teacher=teacher)


def topological_order(configs: Sequence[C.RowConfig], file: str, problems: list[str]) -> list[str]:
    """Row ids, dependencies first; a cycle is reported with its path."""
    ids = {c.id for c in configs}
    deps = {c.id: [d for d in row_dependencies(c) if d in ids and d != c.id] for c in configs}
    order: list[str] = []
    state: dict[str, str] = {}
    reported: set[frozenset[str]] = set()

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        if state.get(node) == "active":
            cycle = path[path.index(node) :] + [node]
            if frozenset(cycle) not in reported:
                reported.add(frozenset(cycle))
                problems.append(
                    f"{file}: row '{node}': teacher.row/init.row: dependency cycle "
                    f"{' -> '.join(cycle)}; a row cannot (indirectly) depend on itself"
                )
            return
        state[node] = "active"
        for dep in deps[node]:
            visit(dep, [*path, node])
        state[node] = "done"
        order.append(node)

    for cfg in configs:
        visit(cfg.id, [])
    return order


def content_key(
    cfg: C.RowConfig,
    dep_keys: Mapping[str, str],
    full_size: str | None = None,
    code_version: str | None = None,
    memo: dict | None = None,
) -> str:
    """Hash of everything that changes the row's result (not placement, not names).

    References to other rows are replaced by those rows' keys. `full_size` is the key of the
    row a smoke row stands in for: a smoke key is then distinct per full-size row.
    `code_version` (the grid's, bumped by the user when a code change changes results) joins
    the key when set; the code's hash does not: an edit that changes nothing trained (a
    comment, a log line) must not make every finished row stale.
    `memo` (one dict for a grid's rows) keeps each section's part, as the same section object
    (`validate_section` shares equal ones) recurs across rows.
    """
    changed: dict[str, Any] = {}
    for name in _hashed_sections():
        changed |= _section_changes(cfg, name, dep_keys, full_size is None, memo)
    extra: dict[str, Any] = {}
    res = cfg.resources
    world_size = res.nodes * (res.tasks_per_node or max(res.gpus_per_node, 1))
    if world_size != 1:  # batch_size is per process: the global batch, and so the result, change
        extra["world_size"] = world_size
    if full_size is not None:
        extra["smoke_of"] = full_size
    if code_version is not None:
        extra["code_version"] = code_version
    changed |= _changed_from_defaults(extra, ())
    text = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def _hashed_sections() -> tuple[str, ...]:
    return tuple(
        f.name for f in dataclasses.fields(C.RowConfig) if f.name not in C.PLACEMENT_SECTIONS
    )


def _section_changes(
    cfg: C.RowConfig, name: str, dep_keys: Mapping[str, str], full: bool, memo: dict | None
) -> dict[str, Any]:
    """What one section of the row adds to its key: its values (placement fields left out,
    a row reference as that row's key, KD terms of weight 0 left out) that differ from the
    schema's defaults, and its default keys it lacks as "<absent>"."""
    value = getattr(cfg, name)
    ref = getattr(value, "row", None) if name in ("teacher", "init") else None
    keep_root = name == "data" and cfg.data.dataset == "imagefolder" and full
    memo_key = None
    if memo is not None and dataclasses.is_dataclass(value):
        memo_key = (name, id(value), keep_root, dep_keys[ref] if ref else None)
        if memo_key in memo:
            return memo[memo_key][1]
    plain = C.to_dict(value)
    for dotted in C.PLACEMENT_FIELDS:
        section, field = dotted.split(".")
        if section == name and not (dotted == "data.root" and keep_root):
            plain.pop(field, None)
    if isinstance(plain, dict) and plain.get("row") and name in ("teacher", "init"):
        plain["row"] = {"key": dep_keys[plain["row"]]}
    if name == "kd":
        plain = {term: weight for term, weight in plain.items() if weight != 0}  # not computed
    changed = _changed_from_defaults({name: plain}, (name,))
    if memo_key is not None:
        memo[memo_key] = (value, changed)  # the section kept alive: its id stays its own
    return changed


def _changed_from_defaults(tree: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """Only what differs from the schema's defaults, so adding a new key (with a default that
    keeps the old behaviour) to kd/config.py leaves every existing key, and every finished row,
    as it was. `sections`: the top-level names whose default keys `tree` covers."""
    flat, flat_defaults = C.flatten(tree), _flat_defaults()
    changed = {k: v for k, v in flat.items() if k not in flat_defaults or flat_defaults[k] != v}
    for section in sections:
        changed |= {k: "<absent>" for k in _section_defaults(section) if k not in flat}
    return changed


@functools.cache
def _flat_defaults() -> dict[str, Any]:
    """The schema's defaults, flat, placement left out (the same for every row: made once)."""
    defaults = C.to_dict(C.RowConfig())
    for section in C.PLACEMENT_SECTIONS:
        defaults.pop(section, None)
    flat = C.flatten(defaults)
    for dotted in C.PLACEMENT_FIELDS_ADDED_LATER:
        flat.pop(dotted, None)
    return flat


@functools.cache
def _section_defaults(section: str) -> tuple[str, ...]:
    """The flat default keys of one top-level section (`data.root`, ...; `teacher` alone)."""
    return tuple(k for k in _flat_defaults() if k.split(".")[0] == section)


def content_keys(
    configs: Sequence[C.RowConfig],
    order: Sequence[str],
    full_size: Mapping[str, str] | None = None,
    code_version: str | None = None,
) -> dict[str, str]:
    """Row id -> content key, dependencies first (a row's key includes its dependencies')."""
    by_id = {c.id: c for c in configs}
    keys: dict[str, str] = {}
    memo: dict = {}
    for row_id in order:
        keys[row_id] = content_key(
            by_id[row_id],
            keys,
            full_size[row_id] if full_size is not None else None,
            code_version,
            memo,
        )
    return keys
