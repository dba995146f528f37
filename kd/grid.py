"""The grid language: one YAML file (+ CLI overrides) -> validated, frozen, named rows.

    name: table2b                 # grid name (tags, output folder)
    experiment: kd-table2b        # MLflow experiment
    defaults: {...}               # the base row (see kd.config.RowConfig)
    recipes: {deit: {...}}        # named partial rows, picked by a row's `recipe`
    axes: {values: {...}, ...}    # a product of axes -> rows (optional)
    rows: [{id: ..., label: ...}] # explicit rows (optional)

A row is `defaults` <- its recipe <- the row itself <- CLI overrides, then interpolated by
OmegaConf and checked against `kd.config`. Every problem of every row is collected and raised
at once as a `GridError`, before anything runs. Rows that reference other rows (`teacher.row`,
`init.row`) form a DAG; the content `key` of a row hashes what changes its result, with
references replaced by the referenced row's key, so a changed teacher changes its students'
keys too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd import config as C

GRID_KEYS = {
    "name",
    "experiment",
    "tracking_uri",
    "description",
    "defaults",
    "recipes",
    "axes",
    "rows",
}
AXES_KEYS = {"values", "id", "label", "row", "include", "exclude"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Grid-level keys an override can name; everything else applies to each row.
GRID_LEVEL_OVERRIDES = {
    "name",
    "experiment",
    "tracking_uri",
    "description",
    "recipes",
    "defaults",
    "axes",
}


class GridError(Exception):
    """All problems of a grid, each naming file, row and key."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the grid; nothing was run:"
        super().__init__("\n".join([head, *("  - " + p for p in self.problems)]))


@dataclass(frozen=True)
class Row:
    """A validated row, ready to train: its config plus where it sits in the grid."""

    config: C.RowConfig
    key: str  # content hash of what changes the result
    depends_on: tuple[str, ...]  # ids of rows whose checkpoints this row needs
    grid: str  # grid name
    grid_file: str
    experiment: str
    smoke: bool = False
    # (dependency id, folder of its best.pt) where that is not the dependency's own folder: the
    # launcher found its content key finished under another row id (a sweep variant equal to
    # its grid row, e.g. `train.seed=0,1` where 0 is the grid's seed). See `dependency_checkpoint`.
    dependency_dirs: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def run_name(self) -> str:
        return f"{self.label} {self.id}"

    @property
    def output_dir(self) -> Path:
        """This row's own folder: checkpoints, training state, logs."""
        return Path(self.config.output_dir) / self.id

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": C.to_dict(self.config),
            "key": self.key,
            "depends_on": list(self.depends_on),
            "grid": self.grid,
            "grid_file": self.grid_file,
            "experiment": self.experiment,
            "smoke": self.smoke,
            "dependency_dirs": dict(self.dependency_dirs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        problems: list[C.Problem] = []
        config = C.validate_section(C.RowConfig, data["config"], "", problems)
        if problems:
            raise ValueError("; ".join(f"{p.key}: {p.message}" for p in problems))
        return cls(
            config=config,
            key=data["key"],
            depends_on=tuple(data["depends_on"]),
            grid=data["grid"],
            grid_file=data["grid_file"],
            experiment=data["experiment"],
            smoke=data.get("smoke", False),
            dependency_dirs=tuple((data.get("dependency_dirs") or {}).items()),
        )

    def summary(self) -> dict[str, Any]:
        """The row as `--dry-run --json` prints it."""
        cfg = self.config
        teacher = None
        if cfg.teacher is not None:
            teacher = {"model": cfg.teacher.model, "row": cfg.teacher.row, "file": cfg.teacher.file}
        init: dict[str, Any] = {"source": cfg.init.source}
        for name in ("tag", "row", "file"):
            if getattr(cfg.init, name) is not None:
                init[name] = getattr(cfg.init, name)
        res = cfg.resources
        return {
            "id": self.id,
            "label": self.label,
            "student": cfg.student.model,
            "teacher": teacher,
            "kd": dict(cfg.kd),
            "init": init,
            "recipe": cfg.recipe,
            "dataset": cfg.data.dataset,
            "img_size": cfg.data.img_size,
            "epochs": cfg.train.epochs,
            "depends_on": list(self.depends_on),
            "key": self.key,
            "resources": {
                "nodes": res.nodes,
                "gpus_per_node": res.gpus_per_node,
                "cpus_per_task": res.cpus_per_task,
                "mem_gb": res.mem_gb,
                "time_min": res.time_min,
                "partition": res.partition,
            },
        }


@dataclass(frozen=True)
class Grid:
    name: str
    experiment: str
    file: str
    rows: tuple[Row, ...]
    tracking_uri: str | None = None
    smoke: bool = False
    # A sweep override's rows: row id -> (id, label) of the grid row it is a variant of.
    sweep_of: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # as given to load_grid: status and table need the same

    def row(self, row_id: str) -> Row:
        return next(r for r in self.rows if r.id == row_id)

    def command(self, script: str = "launch/grid.py", *args: str) -> str:
        """The command line of `script` for this grid as it was loaded: the same overrides (they
        change row ids and keys) and --smoke, then `args`; quoted for a shell. For the advice
        that error messages and notes give."""
        words = ["python", script, self.file, *self.overrides]
        if self.smoke:
            words.append("--smoke")
        return shlex.join([*words, *args])

    def select(self, names: Iterable[str]) -> list[Row]:
        """Rows by id, label or 1-based position (`--rows 7`), in grid order; unknown names are
        a GridError that lists the valid ones. An id wins over an equal label, a label over an
        equal position. After a sweep override (`train.lr=1e-4,5e-4`), the id or label of the
        grid's row (`2b-7`) names all its variants, and a variant's own id or label
        (`2b-7 [train.lr=0.0001]`) names that one."""
        wanted = [n.strip() for n in names if n.strip()]
        by_name: dict[str, list[Row]] = {str(i): [r] for i, r in enumerate(self.rows, 1)}
        for row in self.rows:
            for name in self.sweep_of.get(row.id, ()):
                by_name.setdefault(name, []).append(row)
        by_name |= {r.label: [r] for r in self.rows} | {r.id: [r] for r in self.rows}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise GridError(
                [
                    f"{self.file}: --rows: no row with id or label '{n}'{C.closest(n, by_name)}; "
                    f"the grid's rows are {self._names()}"
                    for n in missing
                ]
            )
        chosen = {r.id for n in wanted for r in by_name[n]}
        return [r for r in self.rows if r.id in chosen]

    def select_one(self, name: str, flag: str = "--row") -> Row:
        """The one row `name` names (`select`'s rules); a name that selects several sweep
        variants is a GridError that lists them."""
        try:
            rows = self.select([name])
        except GridError as exc:
            problems = [p.replace(": --rows: ", f": {flag}: ", 1) for p in exc.problems]
            raise GridError(problems) from None
        if len(rows) != 1:
            raise GridError(
                [
                    f"{self.file}: {flag}: '{name}' names {len(rows)} sweep variants; give one's "
                    f"id or label: {', '.join(f'{r.id} ({r.label})' for r in rows)}"
                ]
            )
        return rows[0]

    def _names(self) -> str:
        """'id (label), ...' of the grid's rows, a sweep's variants once under their row."""
        rows = dict.fromkeys(self.sweep_of.get(r.id, (r.id, r.label)) for r in self.rows)
        text = ", ".join(f"{row_id} ({label})" for row_id, label in rows)
        example = next((r for r in self.rows if r.id in self.sweep_of), None)
        if example is not None:
            text += (
                f"; each names all its sweep variants, a variant's own id or label just that "
                f"one (e.g. '{example.id}' or '{example.label}')"
            )
        return text

    def dependents(self, ids: Iterable[str]) -> set[str]:
        """`ids` and every row that (transitively) depends on one of them."""
        closed = set(ids)
        changed = True
        while changed:
            changed = False
            for row in self.rows:
                if row.id not in closed and closed.intersection(row.depends_on):
                    closed.add(row.id)
                    changed = True
        return closed


def split_row_names(text: str) -> list[str]:
    """`--rows a,b` -> ['a', 'b']; a comma inside a sweep variant's label (`2b-7 [train.lr=0.001,
    train.epochs=2]`) does not split it."""
    return [name.strip() for name in re.split(r",(?![^\[]*\])", text) if name.strip()]


# ---------------------------------------------------------------------------------------------
# Loading


class _GridLoader(yaml.SafeLoader):
    """PyYAML's safe loader with OmegaConf's YAML 1.2 number rules and duplicate-key checks.

    Plain PyYAML (YAML 1.1) reads `lr: 1e-4` as the *string* '1e-4' and keeps the last of two
    equal keys silently; OmegaConf's own loader does neither, and grids are OmegaConf files.
    Duplicate keys are collected (with their line) so that all of them are reported at once.
    """

    duplicates: list[tuple[int, str]]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag != yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
                continue
            if key_node.value in seen:
                mark = key_node.start_mark
                self.duplicates.append(
                    (
                        mark.line + 1,
                        f"{mark.line + 1}:{mark.column + 1}: duplicate key '{key_node.value}' "
                        "(a later value would silently replace the earlier one); keep one",
                    )
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_GridLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:
         [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_GridLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _GridLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a grid file safely; a syntax error names the line, and so does a duplicate key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridError(
            [f"{path}: cannot read the grid file: {exc.strerror}; check the path"]
        ) from None
    loader = _GridLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()  # safe: no Python objects from YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise GridError([f"{where}: YAML syntax error: {problem}; fix the YAML there"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise GridError([f"{path}:{message}" for _, message in sorted(loader.duplicates)])
    if not isinstance(data, dict):
        raise GridError(
            [f"{path}: a grid file must be a YAML mapping with `name`, `defaults`, `rows`"]
        )
    return data


def parse_overrides(overrides: Sequence[str], file: str) -> list[Any]:
    """Parse CLI overrides with Hydra's own grammar (`a.b=1`, `+a=1`, `++a=1`, `~a`, `a=1,2`)."""
    if not overrides:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed, problems = [], []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            first = str(exc).splitlines()[0]
            problems.append(
                f"{file}: override '{text}': {first}; write key=value, +key=value (add), "
                "++key=value (add or set), ~key (remove) or key=a,b (a sweep), quoting values "
                "with spaces or brackets"
            )
            continue
        if not override.key_or_group:  # Hydra's grammar lets `=3` through with an empty key
            problems.append(f"{file}: override '{text}': no key before '='; write key=value")
            continue
        parsed.append(override)
    if problems:
        raise GridError(problems)
    return parsed


def _sweep_points(overrides: Sequence[Any]) -> list[list[tuple[Any, Any]]]:
    """Each sweep override (`train.lr=1e-4,5e-4`) is one more axis; return the product."""
    axes = []
    for ov in overrides:
        if ov.is_sweep_override():
            axes.append([(ov, value) for value in ov.sweep_iterator()])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def _slug(value: Any) -> str:
    """A value as a short id-safe name: `1e-4` -> '0.0001', `resnet_50.a1` -> 'resnet_50.a1'."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "", text)[:40] or "x"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _del_dotted(tree: dict[str, Any], dotted: str) -> bool:
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


def _has_dotted(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _apply_override(
    tree: dict[str, Any], ov: Any, value: Any, known: set[str], where: str, problems: list[str]
) -> None:
    """Apply one parsed Hydra override to a plain dict, with Hydra's rules: `key=v` sets a key
    that exists, `+key=v` adds one that does not, `++key=v` sets one either way, `~key`
    removes one. A key of the schema (`known`) exists in every row, with its default."""
    key = ov.key_or_group
    if ov.is_delete():
        if not _del_dotted(tree, key) and key not in known:
            problems.append(
                f"{where}: override '{ov.input_line}': there is no key '{key}' to delete"
            )
        return
    exists = _has_dotted(tree, key) or key in known
    if ov.is_force_add():
        _set_dotted(tree, key, value)
        return
    if ov.is_add():
        if exists:
            how = "" if _has_dotted(tree, key) else " (kd/config.py gives every row a default)"
            problems.append(
                f"{where}: override '{ov.input_line}': key '{key}' already exists{how}, and '+' "
                f"only adds a new key; write '{key}=...' to change it (or '++{key}=...' to set "
                "it whether or not it exists)"
            )
            return
        _set_dotted(tree, key, value)
        return
    if not exists:
        hint = C.closest(key, known)
        problems.append(
            f"{where}: override '{ov.input_line}' names no existing key '{key}'{hint}; "
            f"use '+{key}=...' to add a key"
        )
        return
    _set_dotted(tree, key, value)


def _merge(*layers: Any) -> dict[str, Any]:
    """Deep-merge plain mappings; later layers win, lists and scalars are replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        if not isinstance(layer, Mapping):
            continue
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = _merge(out[key], value)
            else:
                out[key] = _copy(value)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Axes: a product of named values, filtered


def _axis_choices(name: str, spec: Any) -> list[tuple[str, Any]]:
    """An axis is a list of values (named by their text) or a mapping name -> value."""
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, list):
        return [(_slug(v), v) for v in spec]
    return [(_slug(spec), spec)]


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


def _expand_axes(axes: Any, file: str, problems: list[str]) -> list[dict[str, Any]]:
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
        row = _copy(base)
        for n, (_, value) in zip(names, combo, strict=True):
            _set_dotted(row, n, _copy(value))
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
# Expansion and validation


def load_grid(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    smoke: bool = False,
    check_data: bool = True,
    check_models: bool = True,
) -> Grid:
    """Load, expand and validate a grid file. Raises `GridError` listing every problem.

    With `smoke`, the full-size rows are validated (model names, KD terms, references) and
    then shrunk by `kd.smoke.smoke_row`; dataset roots and checkpoint files are not checked.
    `check_data` reads the inputs on disk: dataset copies (their index files) and the contents
    of `init.file`/`teacher.file` (with `check_models`); without it, only whether those files
    exist is checked (what `launch/status.py` and `launch/table.py` need).
    """
    path = Path(path)
    file = str(path)
    raw = load_yaml(path)
    problems: list[str] = []
    for key in raw:
        if key not in GRID_KEYS:
            problems.append(
                f"{file}: top-level key '{key}': unknown key{C.closest(str(key), GRID_KEYS)}"
            )
    parsed = parse_overrides(overrides, file)
    known = C.schema_keys()

    def grid_level(ov: Any) -> bool:
        return ov.key_or_group.split(".")[0] in GRID_LEVEL_OVERRIDES

    base_raw = _copy(raw)
    for ov in parsed:  # grid-level overrides (`recipes.deit.train.lr=...`) apply once
        if grid_level(ov) and not ov.is_sweep_override():
            value = None if ov.is_delete() else ov.value()
            _apply_override(base_raw, ov, value, set(), file, problems)
    raw_rows: list[dict[str, Any]] = []
    sweep_of: dict[str, tuple[str, str]] = {}  # a sweep variant's id -> its row's id and label
    unresolved: set[str] = set()  # ids of rows whose interpolation failed
    grid_raw = base_raw
    for point in _sweep_points(parsed):
        point_raw = _copy(base_raw)
        for ov, value in point:  # ... and a grid-level sweep value to its own sweep point
            if grid_level(ov):
                _apply_override(point_raw, ov, value, set(), file, problems)
        grid_raw = _check_structure(point_raw, file, problems)
        suffix = "-".join(f"{ov.key_or_group.split('.')[-1]}{_slug(v)}" for ov, v in point)
        for row in [*_expand_axes(grid_raw.get("axes"), file, problems), *grid_raw["rows"]]:
            merged = _compose_row(grid_raw, row, parsed, point, known, file, problems)
            if merged is None:  # reported; its id still exists for other rows' references
                if isinstance(row, Mapping) and row.get("id"):
                    unresolved.add(f"{row['id']}-{suffix}" if suffix else str(row["id"]))
                continue
            if suffix:
                base = (str(merged.get("id", "")), str(merged.get("label", "")))
                _suffix_ids(merged, suffix, point)
                sweep_of[str(merged["id"])] = base
            raw_rows.append(merged)

    name = str(grid_raw.get("name") or path.stem)
    experiment = str(grid_raw.get("experiment") or f"kdgrid-{name}")
    if smoke:
        experiment = f"{experiment}-smoke"
    configs: list[C.RowConfig] = []
    bad_data: set[str] = set()  # rows whose `data` section is wrong: their copy is not checked
    for merged in raw_rows:
        where = _where(file, merged)
        row_problems: list[C.Problem] = []
        cfg = C.validate_section(C.RowConfig, merged, "", row_problems)
        problems.extend(f"{where}: {p.key}: {p.message}" for p in row_problems)
        if any(p.key.split(".")[0] in ("data", "evaluate") for p in row_problems):
            bad_data.add(cfg.id)
        configs.append(cfg)
    if not configs and not problems:
        problems.append(f"{file}: the grid has no rows: add `rows:` or `axes:`")
    problems.extend(
        _check_rows(
            configs, file, smoke, check_data, check_models, unresolved=unresolved, skip=bad_data
        )
    )
    configs = [_resolve_teacher_model(cfg, configs) for cfg in configs]
    order = _topological_order(configs, file, problems)
    if not problems:
        keys = _content_keys(configs, order)
        problems.extend(_check_distinct(configs, keys, file))
    if problems:
        raise GridError(list(dict.fromkeys(problems)))  # a sweep can repeat a grid-level problem
    if smoke:
        from kd.smoke import smoke_row

        # Validated above at full size (a typo in a model name must not hide behind its tiny
        # stand-in); each smoke key derives from its full-size key, so rows that shrink to the
        # same tiny config (e.g. ConvNeXt-B and ConvNeXt-L) stay distinct rows.
        small = [smoke_row(cfg, name) for cfg in configs]
        configs = [_resolve_teacher_model(cfg, small) for cfg in small]
        keys = _content_keys(configs, order, full_size=keys)
    rows = _freeze(configs, keys, name, file, experiment, smoke)
    return Grid(
        name=name,
        experiment=experiment,
        file=file,
        rows=tuple(rows),
        tracking_uri=grid_raw.get("tracking_uri"),
        smoke=smoke,
        sweep_of=sweep_of,
        overrides=tuple(overrides),
    )


def _check_structure(raw: dict[str, Any], file: str, problems: list[str]) -> dict[str, Any]:
    """The grid's own sections have the right shapes; wrong ones are reported and emptied, so
    that the rest of the grid is still checked (and nothing below trips over them)."""
    for key in ("name", "experiment", "tracking_uri", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            problems.append(f"{file}: {key}: must be a string, got {raw[key]!r}")
            raw[key] = None
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


def _where(file: str, row: Mapping[str, Any]) -> str:
    label = f" ({row.get('label')})" if row.get("label") else ""
    return f"{file}: row '{row.get('id', '?')}'{label}"


def _compose_row(
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
                f"{_where(file, row)}: recipe: unknown recipe '{recipe_name}'{C.closest(str(recipe_name), recipes)}; "
                f"the grid defines: {', '.join(recipes) or 'none'}"
            )
        else:
            recipe = recipes[recipe_name]
    merged = _merge(grid_raw.get("defaults") or {}, recipe, row)
    swept = dict((id(ov), v) for ov, v in point)
    for ov in overrides:
        if ov.key_or_group.split(".")[0] in GRID_LEVEL_OVERRIDES:
            continue
        value = (
            swept[id(ov)] if ov.is_sweep_override() else (None if ov.is_delete() else ov.value())
        )
        _apply_override(merged, ov, value, known, _where(file, merged), problems)
    context = {k: grid_raw.get(k) for k in ("name", "experiment") if k in grid_raw}
    try:
        resolved = _interpolated({**context, **merged})
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "interpolation"
        message = str(exc).splitlines()[0]
        hint = (
            "export it, or give a default: ${oc.env:NAME,default}"
            if "Environment variable" in message
            else "fix the ${...} expression (OmegaConf interpolation)"
        )
        problems.append(f"{_where(file, merged)}: {key}: {message}; {hint}")
        return None
    for key in context:
        resolved.pop(key, None)
    return resolved


_REFERENCE = re.compile(r"[^\s${}:,'\"\[\]()=]+")  # a key path, or a word of a resolver's text
# a relative key (`${.x}`, `${oc.select:.x,0}`) or a quoted argument: resolve on the whole tree
_WHOLE_TREE = re.compile(r"[{:,\s]\.|['\"]")


def _interpolated(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with its OmegaConf interpolations (`${name}`, `${oc.env:X,default}`) resolved.

    OmegaConf resolves on a node it builds of the whole tree, and building one of a row's ~90
    keys was half the time to validate a large grid. This builds it of what takes part only:
    the strings holding `${`, and the keys their text names (a superset of what they reference;
    a relative reference, `${.x}`, or a quoted argument takes the whole tree). Same values,
    same errors, same keys.
    """
    strings = [(path, v) for path, v in _leaves(tree) if isinstance(v, str) and "${" in v]
    if not strings:
        return _copy(tree)
    part: dict[str, Any] = {}
    if any(_WHOLE_TREE.search(text) for _, text in strings):
        part = tree
    else:
        for path, text in strings:
            _put(part, path, text)
            for name in _REFERENCE.findall(text):
                found, value = _lookup(tree, name.strip(".").split("."))
                if found:
                    _put(part, tuple(name.split(".")), _copy(value))
    values = OmegaConf.to_container(OmegaConf.create(part), resolve=True)
    out = _copy(tree)
    for path, _ in strings:
        _put(out, path, _lookup(values, list(path))[1])
    return out


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
        if isinstance(tree, list):
            tree = tree[key]
            continue
        if key not in tree:
            tree[key] = [] if isinstance(next_key, int) else {}
        tree = tree[key]
    if isinstance(tree, list):
        while len(tree) <= path[-1]:
            tree.append(None)
    tree[path[-1]] = value


def _suffix_ids(row: dict[str, Any], suffix: str, point: Sequence[tuple[Any, Any]]) -> None:
    """A sweep point is a parallel copy of the grid: ids, labels and row references get its suffix."""
    row["id"] = f"{row.get('id', '')}-{suffix}"
    tag = ", ".join(f"{ov.key_or_group}={v}" for ov, v in point)
    row["label"] = f"{row.get('label', '')} [{tag}]"
    for section in ("teacher", "init"):
        ref = row.get(section)
        if isinstance(ref, dict) and isinstance(ref.get("row"), str):
            ref["row"] = f"{ref['row']}-{suffix}"


def _check_rows(
    configs: Sequence[C.RowConfig],
    file: str,
    smoke: bool,
    check_data: bool,
    check_models: bool,
    unresolved: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> list[str]:
    """Checks that need more than one key: ids, references, models, KD terms, datasets."""
    from kd import losses

    problems: list[str] = []
    checked: dict[tuple[str, str, int], list[str]] = {}  # checkpoint checks shared by rows
    unresolved = set(unresolved)
    ids = [c.id for c in configs]
    by_id = {c.id: c for c in configs}
    seen_ids: set[str] = set()
    seen_labels: dict[str, str] = {}
    for cfg in configs:
        where = f"{file}: row '{cfg.id or '?'}'" + (f" ({cfg.label})" if cfg.label else "")
        if not cfg.id:
            problems.append(f"{where}: id: every row needs a short stable `id`")
        elif not ID_PATTERN.match(cfg.id):
            problems.append(f"{where}: id: '{cfg.id}' may use letters, digits and _ . + - only")
        elif cfg.id in seen_ids:
            problems.append(f"{where}: id: duplicate id '{cfg.id}'; ids must be unique in a grid")
        seen_ids.add(cfg.id)
        if not cfg.label:
            problems.append(
                f"{where}: label: every row needs a `label` (its place in the paper's table)"
            )
        elif cfg.label in seen_labels and seen_labels[cfg.label] != cfg.id:
            problems.append(
                f"{where}: label: duplicate label '{cfg.label}' (also row '{seen_labels[cfg.label]}')"
            )
        else:
            seen_labels[cfg.label] = cfg.id
        for section, ref in (("teacher", cfg.teacher), ("init", cfg.init)):
            if ref is None:
                continue
            if ref.row is not None and ref.row not in by_id and ref.row not in unresolved:
                problems.append(
                    f"{where}: {section}.row: no row '{ref.row}' in this grid{C.closest(ref.row, ids)}"
                )
            if ref.row is not None and ref.row == cfg.id:
                problems.append(f"{where}: {section}.row: a row cannot depend on itself")
        if cfg.init.source == "row" and cfg.init.row is None:
            problems.append(f"{where}: init.row: `init: {{source: row}}` needs `row: ID`")
        if cfg.init.source == "file" and not cfg.init.file:
            problems.append(f"{where}: init.file: `init: {{source: file}}` needs `file: PATH`")
        if (
            cfg.init.source == "file"
            and cfg.init.file
            and not smoke
            and not Path(cfg.init.file).is_file()
        ):
            problems.append(
                f"{where}: init.file: no checkpoint file at '{cfg.init.file}'; fix the path "
                "(a relative path is read from the folder you launch in)"
            )
        if cfg.teacher is not None:
            if cfg.teacher.row is None and cfg.teacher.model is None:
                problems.append(
                    f"{where}: teacher: give `row: ID` or `model: NAME` (and optionally `file`)"
                )
            if cfg.teacher.file and not smoke and not Path(cfg.teacher.file).is_file():
                problems.append(
                    f"{where}: teacher.file: no checkpoint file at '{cfg.teacher.file}'; fix the "
                    "path (a relative path is read from the folder you launch in)"
                )
        for problem in losses.check_terms(cfg.kd):
            problems.append(f"{where}: kd: {problem}")
        needs_teacher = [
            t
            for t in cfg.kd
            if t in losses.TERMS and losses.TERMS[t].needs_teacher and cfg.kd[t] > 0
        ]
        if needs_teacher and cfg.teacher is None:
            problems.append(
                f"{where}: teacher: KD term(s) {', '.join(needs_teacher)} need a teacher; "
                "set `teacher: {row: ID}` or `teacher: {model: NAME}`"
            )
        if check_models:
            problems.extend(_check_models(cfg, where))
        if check_models and check_data and not smoke:  # reads the files, as the data check does
            problems.extend(_check_checkpoints(cfg, where, checked))
    if check_data and not smoke:
        # A row whose data section is itself wrong (a misspelt dataset name falls back to the
        # default) would report a copy it never meant to use: its own problem says enough.
        skip = set(skip)
        problems.extend(_check_data([c for c in configs if c.id not in skip], file))
    return problems


def _check_data(configs: Sequence[C.RowConfig], file: str) -> list[str]:
    """Missing or malformed dataset copies, reported once per copy with the rows that use it."""
    from kd.data import DatasetSpec, check_dataset

    users: dict[tuple[DatasetSpec, str], list[str]] = {}
    for cfg in configs:
        spec = DatasetSpec(cfg.data.dataset, cfg.data.root, cfg.data.dogs_root)
        users.setdefault((spec, "data"), []).append(cfg.id)
        # Clustering datasets are read after training: a wrong path must fail now, not then.
        for name, root in cfg.evaluate.cluster.items():
            users.setdefault((DatasetSpec(name, root), f"evaluate.cluster.{name}"), []).append(
                cfg.id
            )
    problems = []
    for (spec, key), row_ids in users.items():
        rows = (
            f"row '{row_ids[0]}'"
            if len(row_ids) == 1
            else f"rows {', '.join(repr(r) for r in row_ids)}"
        )
        problems.extend(f"{file}: {rows}: {key}: {p}" for p in check_dataset(spec, index=True))
    return problems


def _check_models(cfg: C.RowConfig, where: str) -> list[str]:
    from kd.models import check_model_name

    problems = []
    names = [("student.model", cfg.student.model)]
    if cfg.teacher is not None and cfg.teacher.model:
        names.append(("teacher.model", cfg.teacher.model))
    for key, name in names:
        message = check_model_name(name)
        if message:
            problems.append(f"{where}: {key}: {message}")
    return problems


def _check_checkpoints(
    cfg: C.RowConfig, where: str, checked: dict[tuple[str, str, int], list[str]]
) -> list[str]:
    """`init.file` and `teacher.file` are read (memory-mapped, weights only) and fitted to their
    architectures on the meta device: a corrupt file or one from another architecture is bad
    input now, not a failed job later. Missing files and bad model names are reported above."""
    from kd.models import check_checkpoint, check_model_name

    files = []
    if cfg.init.source == "file" and cfg.init.file:
        files.append(("init.file", cfg.student.model, cfg.init.file))
    teacher = cfg.teacher
    if teacher is not None and teacher.row is None and teacher.model and teacher.file:
        files.append(("teacher.file", teacher.model, teacher.file))
    problems = []
    for key, model, path in files:
        if not Path(path).is_file() or check_model_name(model) is not None:
            continue
        what = (model, path, cfg.data.img_size)
        if what not in checked:
            checked[what] = check_checkpoint(model, path, img_size=cfg.data.img_size)
        for problem in checked[what]:
            head, *details = [line.strip() for line in problem.splitlines() if line.strip()]
            problems.append(f"{where}: {key}: {' '.join([head, '; '.join(details)]).strip()}")
    return problems


def _resolve_teacher_model(cfg: C.RowConfig, configs: Sequence[C.RowConfig]) -> C.RowConfig:
    """`teacher: {row: X}` takes X's student architecture as the teacher model."""
    if cfg.teacher is None or cfg.teacher.row is None:
        return cfg
    source = next((c for c in configs if c.id == cfg.teacher.row), None)
    if source is None:
        return cfg
    teacher = dataclasses.replace(cfg.teacher, model=source.student.model)
    return dataclasses.replace(cfg, teacher=teacher)


def row_dependencies(cfg: C.RowConfig) -> tuple[str, ...]:
    deps = []
    if cfg.teacher is not None and cfg.teacher.row:
        deps.append(cfg.teacher.row)
    if cfg.init.row:
        deps.append(cfg.init.row)
    return tuple(dict.fromkeys(deps))


def _topological_order(configs: Sequence[C.RowConfig], file: str, problems: list[str]) -> list[str]:
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


def content_key(cfg: C.RowConfig, dep_keys: Mapping[str, str], full_size: str | None = None) -> str:
    """Hash of everything that changes the row's result (not placement, not names).

    References to other rows are replaced by those rows' keys. `full_size` is the key of the
    row a smoke row stands in for: a smoke key is then distinct per full-size row.
    """
    tree = C.to_dict(cfg)
    for section in C.PLACEMENT_SECTIONS:
        tree.pop(section, None)
    for dotted in C.PLACEMENT_FIELDS:
        section, name = dotted.split(".")
        if dotted == "data.root" and cfg.data.dataset == "imagefolder" and full_size is None:
            continue  # an ImageFolder's root *is* the dataset, not where a copy lives
        tree[section].pop(name, None)
    for section in ("teacher", "init"):
        ref = tree.get(section)
        if isinstance(ref, dict) and ref.get("row"):
            ref["row"] = {"key": dep_keys[ref["row"]]}
    tree["kd"] = {
        term: weight for term, weight in tree["kd"].items() if weight != 0
    }  # not computed
    res = cfg.resources
    world_size = res.nodes * (res.tasks_per_node or max(res.gpus_per_node, 1))
    if world_size != 1:  # batch_size is per process: the global batch, and so the result, change
        tree["world_size"] = world_size
    if full_size is not None:
        tree["smoke_of"] = full_size
    text = json.dumps(_changed_from_defaults(tree), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_from_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """Only what differs from the schema's defaults, so adding a new key (with a default that
    keeps the old behaviour) to kd/config.py leaves every existing key, and every finished row,
    as it was."""
    defaults = C.to_dict(C.RowConfig())
    for section in C.PLACEMENT_SECTIONS:
        defaults.pop(section, None)
    flat, flat_defaults = C.flatten(tree), C.flatten(defaults)
    for dotted in C.PLACEMENT_FIELDS_ADDED_LATER:
        flat_defaults.pop(dotted, None)
    changed = {k: v for k, v in flat.items() if k not in flat_defaults or flat_defaults[k] != v}
    changed |= {k: "<absent>" for k in flat_defaults if k not in flat}
    return changed


def _content_keys(
    configs: Sequence[C.RowConfig],
    order: Sequence[str],
    full_size: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Row id -> content key, dependencies first (a row's key includes its dependencies')."""
    by_id = {c.id: c for c in configs}
    keys: dict[str, str] = {}
    for row_id in order:
        keys[row_id] = content_key(
            by_id[row_id], keys, full_size[row_id] if full_size is not None else None
        )
    return keys


def _check_distinct(
    configs: Sequence[C.RowConfig], keys: Mapping[str, str], file: str
) -> list[str]:
    """Two rows with one content key would train the same model, and a launch tells rows
    apart by key (a finished run of one would skip the other): that is a mistake in the grid."""
    first: dict[str, C.RowConfig] = {}
    problems = []
    for cfg in configs:
        other = first.setdefault(keys[cfg.id], cfg)
        if other is not cfg:
            problems.append(
                f"{file}: row '{cfg.id}' ({cfg.label}): key: same content as row '{other.id}' "
                f"({other.label}); the two rows would train the same model: make them differ "
                "in something that changes the result, or remove one"
            )
    return problems


def _freeze(
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


def dependency_checkpoint(row: Row, dep_id: str) -> Path:
    """Where this row reads the dependency row's best checkpoint: the dependency's own folder
    under the same output root, unless the launcher found it in another (`Row.dependency_dirs`)."""
    folder = dict(row.dependency_dirs).get(dep_id)
    return Path(folder if folder else Path(row.config.output_dir) / dep_id) / "best.pt"


__all__ = [
    "Grid",
    "GridError",
    "Row",
    "content_key",
    "dependency_checkpoint",
    "load_grid",
    "row_dependencies",
    "split_row_names",
]
