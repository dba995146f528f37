"""What a grid is once loaded: frozen rows with their content keys, and the grid that holds
them (selection by id, label or position; dependents; the command line it was loaded with)."""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd import config as C
from kd.rowfiles import best_checkpoint


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

    def to_dict(self, shared: dict[int, tuple[Any, Any]] | None = None) -> dict[str, Any]:
        """The row as plain data (`Row.from_dict` reads it back); `shared`: see `C.to_dict`."""
        return {
            "config": C.to_dict(self.config, shared),
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
    # `seeds:`: a replicate's id -> (id, label) of its row, and its seed index (replicates.py)
    replicate_of: Mapping[str, tuple[str, str, int]] = dataclasses.field(default_factory=dict)
    seeds_flag: int | None = None  # `--seeds N` as given to load_grid (for `command`)

    def row(self, row_id: str) -> Row:
        try:
            return self._by_id[row_id]
        except KeyError:
            raise StopIteration(row_id) from None  # as the search it replaces did

    @functools.cached_property
    def _by_id(self) -> dict[str, Row]:
        """Rows by id, built once (`row` is called per row and dependency: linear, not n²)."""
        by_id: dict[str, Row] = {}
        for r in self.rows:
            by_id.setdefault(r.id, r)
        return by_id

    def command(self, script: str = "launch/grid.py", *args: str) -> str:
        """The command line of `script` for this grid as it was loaded: the same overrides (they
        change row ids and keys) and --smoke, then `args`; quoted for a shell. For the advice
        that error messages and notes give."""
        words = ["python", script, self.file, *self.overrides]
        if self.smoke:
            words.append("--smoke")
        if self.seeds_flag is not None:
            words += ["--seeds", str(self.seeds_flag)]
        return shlex.join([*words, *args])

    def groups(self, row: Row) -> tuple[str, ...]:
        """The names that select `row` together with others: the id and label of the grid row
        it is a sweep variant of, and of the row it is a replicate of."""
        names = list(self.sweep_of.get(row.id, ()))
        if row.id in self.replicate_of:
            names += self.replicate_of[row.id][:2]
        return tuple(dict.fromkeys(names))

    def replicate_groups(self) -> dict[str, list[Row]]:
        """Row id before replication -> its replicates in seed order (a row of a grid without
        `seeds:` is its own group of one), in grid order."""
        groups: dict[str, list[Row]] = {}
        for row in self.rows:
            base = self.replicate_of[row.id][0] if row.id in self.replicate_of else row.id
            groups.setdefault(base, []).append(row)
        return groups

    def select(self, names: Iterable[str]) -> list[Row]:
        """Rows by id, label or 1-based position (`--rows 7`), in grid order; unknown names are
        a GridError that lists the valid ones. An id wins over an equal label, a label over an
        equal position. After a sweep override (`train.lr=1e-4,5e-4`), the id or label of the
        grid's row (`2b-7`) names all its variants, and a variant's own id or label
        (`2b-7 [train.lr=0.0001]`) names that one. With `seeds:`, a row's id or label names
        all its replicates, a replicate's own (`2b-7@s1`) that one."""
        wanted = [n.strip() for n in names if n.strip()]
        by_name: dict[str, list[Row]] = {str(i): [r] for i, r in enumerate(self.rows, 1)}
        for row in self.rows:
            for name in self.groups(row):
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
            what = "replicates" if rows[0].id in self.replicate_of else "sweep variants"
            raise GridError(
                [
                    f"{self.file}: {flag}: '{name}' names {len(rows)} {what}; give one's id "
                    "or label: "
                    f"{', '.join(f'{r.id} ({r.label})' for r in rows)}"
                ]
            )
        return rows[0]

    def _names(self) -> str:
        """'id (label), ...' of the grid's rows, a sweep's variants and a row's replicates
        once under their row."""

        def top(row: Row) -> tuple[str, str]:
            if row.id in self.sweep_of:
                return self.sweep_of[row.id]
            if row.id in self.replicate_of:
                return self.replicate_of[row.id][:2]
            return row.id, row.label

        rows = dict.fromkeys(top(r) for r in self.rows)
        text = ", ".join(f"{row_id} ({label})" for row_id, label in rows)
        example = next((r for r in self.rows if self.groups(r)), None)
        if example is not None:
            text += (
                f"; each names all its sweep variants and replicates, a variant's or "
                f"replicate's own id or label just that one (e.g. '{example.id}' or "
                f"'{example.label}')"
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


def row_dependencies(cfg: C.RowConfig) -> tuple[str, ...]:
    deps = []
    if cfg.teacher is not None and cfg.teacher.row:
        deps.append(cfg.teacher.row)
    if cfg.init.row:
        deps.append(cfg.init.row)
    return tuple(dict.fromkeys(deps))


def dependency_checkpoint(row: Row, dep_id: str) -> Path:
    """Where this row reads the dependency row's best checkpoint: the dependency's own folder
    under the same output root, unless the launcher found it in another (`Row.dependency_dirs`)."""
    folder = dict(row.dependency_dirs).get(dep_id)
    return best_checkpoint(Path(folder if folder else Path(row.config.output_dir) / dep_id))
