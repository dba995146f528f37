"""Checks that need more than one key of a row, or more than one row: ids and labels, references,
init/teacher files, KD terms and their teacher, model names, checkpoint files, dataset copies,
and rows that would train the same model. Every problem names file, row and key."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kd import config as C
from kd.loss_terms import NEEDS_TEACHER, check_terms

# a replicate (`seeds:`) adds `@s<i>` to its row's id (kd/grid/replicates.py)
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*(@s[0-9]+)?$")
REPLICATE_SUFFIX = re.compile(r"@s[0-9]+$")


def check_rows(
    configs: Sequence[C.RowConfig],
    file: str,
    smoke: bool,
    read_data: bool,
    check_model_names: bool,
    unresolved: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> list[str]:
    """Checks that need more than one key: ids, references, models, KD terms, datasets."""
    problems: list[str] = []
    checked: dict[tuple[str, str, int], list[str]] = {}  # checkpoint checks shared by rows
    ids = [c.id for c in configs]
    known = set(ids) | set(unresolved)
    seen_ids: set[str] = set()
    seen_labels: dict[str, str] = {}
    base_ids: set[str] | None = None  # ids before replication, built once if a row needs them
    for cfg in configs:
        where = f"{file}: row '{cfg.id or '?'}'" + (f" ({cfg.label})" if cfg.label else "")
        problems.extend(check_id_and_label(cfg, where, seen_ids, seen_labels))
        problems.extend(check_references(cfg, where, ids, known))
        if cfg.paper.baseline is not None:
            base_ids = base_ids or {REPLICATE_SUFFIX.sub("", row_id) for row_id in known}
            problems.extend(check_baseline(cfg.paper.baseline, cfg.id, where, base_ids))
        problems.extend(check_sources(cfg, where, smoke))
        problems.extend(check_kd_terms(cfg, where))
        if check_model_names:
            problems.extend(check_models(cfg, where))
        if check_model_names and read_data and not smoke:  # reads the files, as the data check does
            problems.extend(check_checkpoints(cfg, where, checked))
    if read_data and not smoke:
        # A row whose data section is itself wrong (a misspelt dataset name falls back to the
        # default) would report a copy it never meant to use: its own problem says enough.
        skip = set(skip)
        problems.extend(check_data([c for c in configs if c.id not in skip], file))
    return problems


def check_id_and_label(
    cfg: C.RowConfig, where: str, seen_ids: set[str], seen_labels: dict[str, str]
) -> list[str]:
    """A well-formed id no earlier row has, and a label no other row has (the rows seen so far
    are added to `seen_ids` and `seen_labels`)."""
    problems = []
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
    return problems


def check_references(
    cfg: C.RowConfig, where: str, ids: Sequence[str], known: set[str]
) -> list[str]:
    """`teacher.row` and `init.row` name another row of the grid (`known`: rows, and rows whose
    interpolation failed, reported on their own)."""
    problems = []
    for section, ref in (("teacher", cfg.teacher), ("init", cfg.init)):
        if ref is None:
            continue
        if ref.row is not None and ref.row not in known:
            problems.append(
                f"{where}: {section}.row: no row '{ref.row}' in this grid{C.closest(ref.row, ids)}"
            )
        if ref.row is not None and ref.row == cfg.id:
            problems.append(f"{where}: {section}.row: a row cannot depend on itself")
    return problems


def check_baseline(baseline: str, row_id: str, where: str, rows: set[str]) -> list[str]:
    """A row's `paper.baseline` names another row of the grid (`rows`: ids before
    replication)."""
    if baseline not in rows:
        return [
            f"{where}: paper.baseline: no row '{baseline}' in this grid"
            f"{C.closest(baseline, sorted(rows))}"
        ]
    if baseline == REPLICATE_SUFFIX.sub("", row_id):
        return [f"{where}: paper.baseline: a row cannot be its own baseline"]
    return []


def check_sources(cfg: C.RowConfig, where: str, smoke: bool) -> list[str]:
    """An init or teacher source has what it needs: a row, a file that exists, a model."""
    problems = []
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
    return problems


def check_kd_terms(cfg: C.RowConfig, where: str) -> list[str]:
    """Known KD terms with valid weights, and a teacher for the terms that need one."""
    problems = [f"{where}: kd: {problem}" for problem in check_terms(cfg.kd)]
    needs_teacher = [t for t in cfg.kd if NEEDS_TEACHER.get(t) and cfg.kd[t] > 0]
    if needs_teacher and cfg.teacher is None:
        problems.append(
            f"{where}: teacher: KD term(s) {', '.join(needs_teacher)} need a teacher; "
            "set `teacher: {row: ID}` or `teacher: {model: NAME}`"
        )
    return problems


def check_data(configs: Sequence[C.RowConfig], file: str) -> list[str]:
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


def check_models(cfg: C.RowConfig, where: str) -> list[str]:
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


def check_checkpoints(
    cfg: C.RowConfig, where: str, checked: dict[tuple[str, str, int], list[str]]
) -> list[str]:
    """`init.file` and `teacher.file` are read (memory-mapped, weights only) and fitted to their
    architectures on the meta device: a corrupt file or one from another architecture is bad
    input now, not a failed job later. Missing files and bad model names are reported above."""
    from kd.models import check_model_name

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
            from kd.models import check_checkpoint  # imports torch and timm: only with a file

            checked[what] = check_checkpoint(model, path, img_size=cfg.data.img_size)
        for problem in checked[what]:
            head, *details = [line.strip() for line in problem.splitlines() if line.strip()]
            problems.append(f"{where}: {key}: {' '.join([head, '; '.join(details)]).strip()}")
    return problems


def check_distinct(configs: Sequence[C.RowConfig], keys: Mapping[str, str], file: str) -> list[str]:
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
