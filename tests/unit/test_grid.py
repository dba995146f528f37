"""The grid language: paper grids, `--dry-run --json`, content keys, Hydra overrides, axes,
interpolation, and every validation error of issue 2, each naming file, row and key.

Fast: nothing trains and nothing downloads; model names are checked against timm's registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kd import config as C
from kd.grid import Grid, GridError, load_grid, split_row_names
from kd.plan import plan_launch

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "grids"


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, overrides: list[str] | tuple = (), **kwargs) -> list[str]:
    with pytest.raises(GridError) as info:
        load_grid(path, overrides, **kwargs)
    assert str(info.value).startswith(f"{len(info.value.problems)} problem")
    return info.value.problems


def find(problems: list[str], *fragments: str) -> str:
    """The one problem that contains every fragment (file, row, key, message)."""
    hits = [p for p in problems if all(f in p for f in fragments)]
    assert len(hits) == 1, f"{fragments} matched {len(hits)} of:\n" + "\n".join(problems)
    return hits[0]


def by_label(grid: Grid) -> dict:
    return {row.label: row for row in grid.rows}


# A small grid on real timm names and a dataset root that does not exist (check_data=False
# where the data check is not the point): a teacher row, a student of it, a row initialised
# from the student.
MINI = """\
    name: mini
    experiment: kd-mini
    defaults:
      student: {model: resnet18}
      data: {dataset: cifar10, root: /nonexistent/cifar10}
      train: {epochs: 3, lr: 1.0e-3}
      output_dir: out/${name}
    recipes:
      fast: {train: {epochs: 5, lr: 1.0e-2}}
    rows:
      - {id: teacher, label: T, student: {model: resnet50}}
      - {id: student, label: S, recipe: fast, teacher: {row: teacher}, kd: {ce: 0.5, ikd: 0.5}}
      - {id: ft, label: F, init: {row: student}}
"""


def mini(tmp_path: Path, overrides: list[str] | tuple = (), text: str = MINI, **kwargs) -> Grid:
    kwargs.setdefault("check_data", False)
    return load_grid(write(tmp_path, text), overrides, **kwargs)


def keys(grid: Grid) -> dict[str, str]:
    return {row.id: row.key for row in grid.rows}


# ---------------------------------------------------------------------------------------------
# The paper's grids


@pytest.mark.parametrize(("table", "count"), [("2a", 4), ("2b", 10), ("2c", 3)])
@pytest.mark.parametrize("smoke", [False, True])
def test_paper_grid_rows_and_labels(table, count, smoke):
    grid = load_grid(GRIDS / f"table{table}.yaml", smoke=smoke, check_data=False)
    assert [row.label for row in grid.rows] == [f"{table}-{i}" for i in range(1, count + 1)]
    assert len({row.id for row in grid.rows}) == count
    assert len({row.key for row in grid.rows}) == count  # distinct rows, also once shrunk
    for row in grid.rows:
        paper = row.config.paper
        assert None not in (paper.acc1, paper.acc5, paper.loss), row.label
        assert 0 < paper.acc5 <= 100 and paper.acc1 <= paper.acc5 and paper.loss > 0


def test_table2b_teachers_inits_edges_and_kd_terms():
    grid = load_grid(GRIDS / "table2b.yaml", check_data=False)
    rows = by_label(grid)
    ids = {label: row.id for label, row in rows.items()}
    teacher = {
        label: (row.config.teacher.row if row.config.teacher else None)
        for label, row in rows.items()
    }
    assert teacher == {
        "2b-1": None,
        "2b-2": None,
        "2b-3": None,
        "2b-4": None,
        "2b-5": ids["2b-1"],
        "2b-6": ids["2b-1"],
        "2b-7": ids["2b-1"],
        "2b-8": None,
        "2b-9": ids["2b-8"],
        "2b-10": ids["2b-8"],
    }
    assert ids["2b-1"] == "convnext_b" and ids["2b-8"] == "bit" and ids["2b-4"] == "deit_b_dist"
    # A row teacher is that row's model (a fine-tuned ConvNeXt-B, a fine-tuned BiT).
    for label in ("2b-5", "2b-6", "2b-7"):
        assert rows[label].config.teacher.model == rows["2b-1"].config.student.model
        assert rows[label].config.teacher.model.startswith("convnext_base")
    for label in ("2b-9", "2b-10"):
        assert rows[label].config.teacher.model == rows["2b-8"].config.student.model
        assert "bit" in rows[label].config.teacher.model
    for label in ("2b-7", "2b-10"):
        assert rows[label].config.init.source == "row"
        assert rows[label].config.init.row == "deit_b_dist"
    for label in ("2b-5", "2b-6", "2b-9"):
        assert rows[label].config.init.source == "pretrained"
        assert "distilled" in rows[label].config.student.model
    depends = {label: set(row.depends_on) for label, row in rows.items() if row.depends_on}
    assert depends == {
        "2b-5": {"convnext_b"},
        "2b-6": {"convnext_b"},
        "2b-7": {"convnext_b", "deit_b_dist"},
        "2b-9": {"bit"},
        "2b-10": {"bit", "deit_b_dist"},
    }
    assert rows["2b-5"].config.kd == {"ce": 0.5, "deit_soft": 0.5}
    assert rows["2b-6"].config.kd == {"ce": 0.5, "deit_hard": 0.5}
    for label in ("2b-7", "2b-9", "2b-10"):
        assert rows[label].config.kd == {"ce": 0.5, "deit_hard": 0.5}
    for label in ("2b-1", "2b-2", "2b-3", "2b-4", "2b-8"):
        assert rows[label].config.kd == {"ce": 1.0}
    assert {row.config.data.img_size for row in grid.rows} == {384}
    assert {row.config.train.epochs for row in grid.rows} == {60}
    assert {row.config.train.batch_size for row in grid.rows} == {16}


def test_smoke_keeps_the_row_graph_and_shrinks_everything():
    full = load_grid(GRIDS / "table2b.yaml", check_data=False)
    small = load_grid(GRIDS / "table2b.yaml", smoke=True)  # no dataset check under --smoke
    assert [(r.id, r.depends_on) for r in small.rows] == [(r.id, r.depends_on) for r in full.rows]
    assert small.experiment == full.experiment + "-smoke"
    for row in small.rows:
        assert row.config.data.img_size <= 64 and row.config.train.epochs <= 2
        assert row.config.init.source in ("scratch", "row")
    assert set(keys(small).values()).isdisjoint(keys(full).values())


# ---------------------------------------------------------------------------------------------
# Content keys


def test_keys_are_stable_and_ignore_placement_names_and_paper(tmp_path):
    base = keys(mini(tmp_path))
    assert keys(mini(tmp_path)) == base
    for overrides in (
        ["resources.partition=gpu"],
        ["resources.account=lab", "resources.time_min=5", "resources.qos=high"],
        ["output_dir=/elsewhere"],
        ["paper.acc1=99.5"],
        ["data.root=/another/copy", "data.num_workers=2"],
        ["data.eval_cache_gb=0"],
    ):
        assert keys(mini(tmp_path, overrides)) == base, overrides
    relabelled = MINI.replace("label: T,", "label: T-new,").replace(
        "output_dir: out", "output_dir: o"
    )
    assert keys(mini(tmp_path, text=relabelled)) == base


# The keys of the paper grids' rows (full size and --smoke) as published, in
# tests/data/grid_keys.json: a new version of kdgrid must recognise the rows an older one
# finished (a schema key added with its default, a new placement field), or it would train
# them all again. Update only for a change that really changes results.
GRID_KEYS = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "grid_keys.json").read_text()
)


@pytest.mark.parametrize("name", sorted(GRID_KEYS))
def test_finished_rows_keep_their_keys_across_versions(name):
    grid_name, smoke = name.removesuffix("-smoke"), name.endswith("-smoke")
    grid = load_grid(GRIDS / f"{grid_name}.yaml", smoke=smoke, check_data=False)
    assert {row.id: row.key for row in grid.rows} == GRID_KEYS[name]
    # Left out of the defaults only if left out of the row: else every key would change.
    assert C.PLACEMENT_FIELDS_ADDED_LATER <= C.PLACEMENT_FIELDS
    assert all(name.count(".") == 1 for name in C.PLACEMENT_FIELDS)  # section.field


@pytest.mark.parametrize(
    "overrides",
    [["train.lr=0.5"], ["student.model=resnet34"], ["data.img_size=224"], ["train.seed=1"]],
)
def test_keys_change_with_what_changes_the_result(tmp_path, overrides):
    base = keys(mini(tmp_path))
    changed = keys(mini(tmp_path, overrides))
    assert all(changed[i] != base[i] for i in base), overrides


def test_key_changes_with_kd_weights(tmp_path):
    base = keys(mini(tmp_path))
    other = keys(mini(tmp_path, text=MINI.replace("{ce: 0.5, ikd: 0.5}", "{ce: 0.3, ikd: 0.7}")))
    assert other["student"] != base["student"] and other["teacher"] == base["teacher"]
    # The order of the terms does not matter.
    swapped = keys(mini(tmp_path, text=MINI.replace("{ce: 0.5, ikd: 0.5}", "{ikd: 0.5, ce: 0.5}")))
    assert swapped == base


def test_spelling_out_a_default_or_a_zero_weight_keeps_the_key(tmp_path):
    """Keys hash what differs from kd/config.py's defaults: a new schema key with a default
    that keeps the old behaviour cannot change the keys of finished rows."""
    base = keys(mini(tmp_path))
    explicit = keys(mini(tmp_path, ["train.weight_decay=0.05", "train.ema=false"]))
    assert explicit == base
    zero = keys(
        mini(
            tmp_path, text=MINI.replace("{ce: 0.5, ikd: 0.5}", "{ce: 0.5, ikd: 0.5, rkd_angle: 0}")
        )
    )
    assert zero == base


def test_world_size_changes_the_key(tmp_path):
    """batch_size is per process: more GPUs is a bigger global batch, another result."""
    base = keys(mini(tmp_path))
    assert keys(mini(tmp_path, ["resources.gpus_per_node=4"]))["teacher"] != base["teacher"]
    assert keys(mini(tmp_path, ["resources.nodes=2"]))["teacher"] != base["teacher"]
    assert keys(mini(tmp_path, ["resources.gpus_per_node=0"]))["teacher"] == base["teacher"]


def test_a_teacher_change_changes_its_students_keys(tmp_path):
    base = keys(mini(tmp_path))
    text = MINI.replace("student: {model: resnet50}", "student: {model: resnet50, drop_path: 0.2}")
    changed = keys(mini(tmp_path, text=text))
    assert changed["teacher"] != base["teacher"]
    assert changed["student"] != base["student"]  # its teacher changed
    assert changed["ft"] != base["ft"]  # its init's teacher changed
    # Renaming the teacher row (and its references) changes nothing that matters.
    renamed = MINI.replace("id: teacher", "id: tchr").replace("row: teacher", "row: tchr")
    assert set(keys(mini(tmp_path, text=renamed)).values()) == set(base.values())


def test_imagefolder_root_is_part_of_the_key(tmp_path):
    text = MINI.replace(
        "dataset: cifar10, root: /nonexistent/cifar10", "dataset: imagefolder, root: /a"
    )
    base = keys(mini(tmp_path, text=text))
    assert keys(mini(tmp_path, ["data.root=/b"], text=text))["teacher"] != base["teacher"]


def test_identical_rows_are_an_error(tmp_path):
    text = MINI + "      - {id: ft2, label: F2, init: {row: student}}\n"
    problem = find(problems_of(write(tmp_path, text), check_data=False), "row 'ft2' (F2)")
    assert "same content as row 'ft' (F)" in problem


# ---------------------------------------------------------------------------------------------
# Overrides, in Hydra's grammar


def test_override_applies_to_every_row_even_over_a_recipe(tmp_path):
    assert mini(tmp_path).row("student").config.train.epochs == 5  # from the recipe
    grid = mini(tmp_path, ["train.epochs=2"])
    assert {row.config.train.epochs for row in grid.rows} == {2}
    assert grid.row("student").config.train.lr == 1e-2  # the rest of the recipe stays


def test_override_of_a_schema_key_missing_from_the_yaml(tmp_path):
    grid = mini(tmp_path, ["train.clip_grad=1.0"])
    assert {row.config.train.clip_grad for row in grid.rows} == {1.0}


def test_plus_adds_a_key(tmp_path):
    grid = mini(tmp_path, ["+resources.sbatch_extra.gres=gpu:1"])
    assert {row.config.resources.sbatch_extra["gres"] for row in grid.rows} == {"gpu:1"}
    # Without `+`, a key that is neither in the grid nor in the schema is refused.
    problem = find(
        problems_of(write(tmp_path, MINI), ["resources.sbatch_extra.gres=gpu:1"]), "row 'ft'"
    )
    assert "use '+resources.sbatch_extra.gres=...'" in problem


def test_plus_refuses_a_key_that_exists(tmp_path):
    # Hydra's rule: `+key` appends a new key; changing one that exists needs `key=` or `++key=`.
    problems = problems_of(write(tmp_path, MINI), ["+train.epochs=2"], check_data=False)
    assert len(problems) == 3  # one per row
    problem = find(problems, "row 'student' (S)")
    assert str(tmp_path / "grid.yaml") in problem
    assert "override '+train.epochs=2': key 'train.epochs' already exists" in problem
    assert "write 'train.epochs=...' to change it (or '++train.epochs=...'" in problem
    # A schema key exists in every row even where the YAML does not write it.
    problem = find(problems_of(write(tmp_path, MINI), ["+train.clip_grad=1"]), "row 'ft'")
    assert (
        "key 'train.clip_grad' already exists (kd/config.py gives every row a default)" in problem
    )
    # Only the rows that hold a free-form key refuse to add it again.
    problems = problems_of(write(tmp_path, MINI), ["+kd.ikd=0.1"], check_data=False)
    problem = find(problems, "override '+kd.ikd=0.1'")
    assert "row 'student' (S): override '+kd.ikd=0.1': key 'kd.ikd' already exists," in problem
    # Grid-level keys too.
    problem = find(problems_of(write(tmp_path, MINI), ["+name=other"], check_data=False), "name")
    assert problem.startswith(f"{tmp_path / 'grid.yaml'}: override '+name=other': key 'name'")


def test_plus_plus_sets_a_key_whether_or_not_it_exists(tmp_path):
    grid = mini(tmp_path, ["++train.epochs=2", "++resources.sbatch_extra.gres=gpu:1"])
    assert {row.config.train.epochs for row in grid.rows} == {2}
    assert {row.config.resources.sbatch_extra["gres"] for row in grid.rows} == {"gpu:1"}
    grid = mini(tmp_path, ["++kd.ce=0.25", "++train.clip_grad=1.0", "++name=other"])
    assert grid.row("student").config.kd == {"ce": 0.25, "ikd": 0.5}
    assert {row.config.train.clip_grad for row in grid.rows} == {1.0}
    assert grid.name == "other"


def test_plus_of_an_unknown_key_fails_validation(tmp_path):
    problems = problems_of(write(tmp_path, MINI), ["+train.bogus=1"], check_data=False)
    assert len(problems) == 3  # one per row
    assert "row 'ft' (F): train.bogus: unknown key" in find(problems, "row 'ft'")


def test_tilde_removes_a_key(tmp_path):
    grid = mini(tmp_path, ["~teacher", "kd={ce: 1.0}"])
    student = grid.row("student")
    assert student.config.teacher is None and student.depends_on == ()
    assert student.config.kd == {"ce": 1.0}
    assert grid.row("ft").depends_on == ("student",)
    # Removing the teacher but keeping a KD term that needs one is caught.
    problem = find(problems_of(write(tmp_path, MINI), ["~teacher"], check_data=False), "student")
    assert "teacher: KD term(s) ikd need a teacher" in problem
    problem = find(problems_of(write(tmp_path, MINI), ["~train.bogus"]), "row 'ft'")
    assert "no key 'train.bogus' to delete" in problem


def test_sweep_adds_an_axis_with_edges_inside_each_point():
    grid = load_grid(GRIDS / "table2b.yaml", ["train.lr=1e-4,5e-4"], check_data=False)
    assert len(grid.rows) == 20
    assert len({row.id for row in grid.rows}) == 20 and len({row.label for row in grid.rows}) == 20
    assert len({row.key for row in grid.rows}) == 20
    for suffix, lr in (("-lr0.0001", 1e-4), ("-lr0.0005", 5e-4)):
        point = [row for row in grid.rows if row.id.endswith(suffix)]
        assert len(point) == 10
        assert {row.config.train.lr for row in point} == {lr}
        assert sorted(row.label.split()[0] for row in point) == sorted(
            f"2b-{i}" for i in range(1, 11)
        )
        for row in point:
            assert all(dep.endswith(suffix) for dep in row.depends_on), row.id
        assert grid.row("deit_b_dist_hard_ft" + suffix).depends_on == (
            "convnext_b" + suffix,
            "deit_b_dist" + suffix,
        )
        assert grid.row("deit_b_dist_hard_bit" + suffix).config.init.source == "pretrained"


def test_sweep_of_a_recipe_key_changes_the_rows_of_that_recipe(tmp_path):
    text = MINI.replace("- {id: teacher, label: T,", "- {id: teacher, label: T, recipe: fast,")
    text = text.replace("- {id: ft, label: F,", "- {id: ft, label: F, recipe: fast,")
    grid = mini(tmp_path, ["recipes.fast.train.lr=0.02,0.03"], text=text)
    assert len(grid.rows) == 6
    assert {r.id: r.config.train.lr for r in grid.rows} == {
        "teacher-lr0.02": 0.02,
        "student-lr0.02": 0.02,
        "ft-lr0.02": 0.02,
        "teacher-lr0.03": 0.03,
        "student-lr0.03": 0.03,
        "ft-lr0.03": 0.03,
    }


def test_grid_level_override(tmp_path):
    grid = mini(tmp_path, ["name=other", "recipes.fast.train.epochs=7"])
    assert grid.name == "other"
    assert grid.row("student").config.train.epochs == 7
    assert grid.row("teacher").config.output_dir == "out/other"  # ${name} sees the override


def test_override_naming_no_key_is_an_error_with_a_hint(tmp_path):
    problems = problems_of(write(tmp_path, MINI), ["train.epohcs=2"], check_data=False)
    problem = find(problems, "row 'teacher' (T)")
    assert str(tmp_path / "grid.yaml") in problem
    assert "'train.epohcs'" in problem and "did you mean 'train.epochs'?" in problem


@pytest.mark.parametrize("override", ["train.epochs=[1,2", "=3", "train.lr=1e-4,,", "train..lr=1"])
def test_malformed_override_is_an_error(tmp_path, override):
    problems = problems_of(write(tmp_path, MINI), [override])
    assert find(problems, str(tmp_path / "grid.yaml"), f"override '{override}'")


# ---------------------------------------------------------------------------------------------
# Axes and interpolation

AXES = """\
    name: axes
    defaults:
      student: {model: resnet18}
      data: {dataset: cifar10, root: /nonexistent}
    axes:
      values:
        student.model: [resnet18, resnet34, convnext_atto]
        train.lr: {small: 1.0e-4, big: 1.0e-3}
      id: "{model}_{lr}"
      label: "A-{model}-{lr}"
      exclude: [{model: convnext_atto, lr: big}]
      row: {train: {epochs: 3}}
    rows:
      - {id: extra, label: X, student: {model: resnet50}}
"""


def test_axes_product_exclude_templates_and_explicit_rows(tmp_path):
    grid = mini(tmp_path, text=AXES)
    got = {row.id: (row.label, row.config.student.model, row.config.train.lr) for row in grid.rows}
    assert got == {
        "resnet18_small": ("A-resnet18-small", "resnet18", 1e-4),
        "resnet18_big": ("A-resnet18-big", "resnet18", 1e-3),
        "resnet34_small": ("A-resnet34-small", "resnet34", 1e-4),
        "resnet34_big": ("A-resnet34-big", "resnet34", 1e-3),
        "convnext_atto_small": ("A-convnext_atto-small", "convnext_atto", 1e-4),
        "extra": ("X", "resnet50", 5e-5),  # the schema's default
    }
    assert {row.config.train.epochs for row in grid.rows if row.id != "extra"} == {3}


def test_axes_include_by_name_or_by_value(tmp_path):
    by_name = AXES.replace("exclude: [{model: convnext_atto, lr: big}]", "include: [{lr: big}]")
    assert sorted(r.id for r in mini(tmp_path, text=by_name).rows) == [
        "convnext_atto_big",
        "extra",
        "resnet18_big",
        "resnet34_big",
    ]
    by_value = AXES.replace(
        "exclude: [{model: convnext_atto, lr: big}]",
        "include: [{train.lr: 1.0e-4, model: resnet34}, {model: convnext_atto}]",
    )
    assert sorted(r.id for r in mini(tmp_path, text=by_value).rows) == [
        "convnext_atto_big",
        "convnext_atto_small",
        "extra",
        "resnet34_small",
    ]


def test_axes_default_templates(tmp_path):
    text = """\
        name: ax
        defaults: {student: {model: resnet18}, data: {dataset: cifar10, root: /x}}
        axes:
          values: {train.lr: [1e-4, 1e-3], train.seed: [0, 1]}
    """
    grid = mini(tmp_path, text=text)
    assert sorted(r.id for r in grid.rows) == ["0.0001_0", "0.0001_1", "0.001_0", "0.001_1"]
    assert {r.config.train.lr for r in grid.rows} == {1e-4, 1e-3}  # YAML 1.2 floats


def test_axes_template_with_unknown_axis(tmp_path):
    text = AXES.replace('id: "{model}_{lr}"', 'id: "{model}_{rate}"')
    problem = find(problems_of(write(tmp_path, text), check_data=False), "axes.id/label")
    assert "'rate'" in problem


def test_interpolation(tmp_path, monkeypatch):
    text = """\
        name: interp
        defaults:
          student: {model: resnet18}
          data: {dataset: cifar10, root: "${oc.env:KDGRID_TEST_ROOT,/default/root}"}
          train: {epochs: 7, warmup_epochs: "${train.epochs}"}
          output_dir: out/${name}/e${train.epochs}
        rows:
          - {id: a, label: A}
    """
    monkeypatch.delenv("KDGRID_TEST_ROOT", raising=False)
    row = mini(tmp_path, text=text).row("a")
    assert row.config.data.root == "/default/root"
    assert row.config.output_dir == "out/interp/e7"
    assert row.config.train.warmup_epochs == 7.0
    monkeypatch.setenv("KDGRID_TEST_ROOT", "/my/cifar")
    row = mini(tmp_path, ["train.epochs=2"], text=text).row("a")
    assert row.config.data.root == "/my/cifar"
    assert row.config.output_dir == "out/interp/e2"  # interpolation sees the overrides


def test_interpolation_error_names_row_and_key(tmp_path):
    text = MINI.replace("output_dir: out/${name}", "output_dir: out/${nope}")
    problems = problems_of(write(tmp_path, text), check_data=False)
    assert find(problems, "row 'ft' (F): output_dir:", "nope")
    # The row that failed to interpolate still exists for the rows that reference it.
    assert not [p for p in problems if "no row" in p]


# ---------------------------------------------------------------------------------------------
# Validation: every error of issue 2, each naming file, row and key


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\nrows:\n  - {id: a, label: A\n  - {id: b}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4:") and "YAML syntax error" in problem


def test_duplicate_yaml_keys_are_errors_with_lines(tmp_path):
    path = write(tmp_path, MINI.replace("experiment: kd-mini", "train: 1\n    name: again"))
    problems = problems_of(path)
    assert find(problems, f"{path}:3:", "duplicate key 'name'")


def test_yaml_floats_in_exponent_form(tmp_path):
    grid = mini(tmp_path, text=MINI.replace("lr: 1.0e-3", "lr: 1e-3"))
    assert grid.row("teacher").config.train.lr == 1e-3


EVERYTHING_WRONG = """\
    name: wrong
    defaults:
      student: {model: resnet18}
      data: {dataset: cifar10, root: /nonexistent/cifar10}
    recipes:
      fast: {train: {epochs: 1}}
    rows:
      - {id: typo, label: L1, trian: {epochs: 2}}
      - {id: lrr, label: L2, train: {lrr: 0.1}}
      - {id: ranges, label: L3, train: {epochs: -1, lr: fast, eval_every: 0}, data: {img_size: 3}}
      - {id: model, label: L4, student: {model: convnext_tiniest}}
      - {id: term, label: L5, kd: {ce: 0.5, deit_sfot: 0.5}, teacher: {model: resnet50}}
      - {id: noteacher, label: L6, kd: {ce: 0.5, deit_hard: 0.5}, teacher: null}
      - {id: dup, label: L7}
      - {id: dup, label: L8, train: {seed: 8}}
      - {id: duplabel, label: L1, train: {seed: 9}}
      - {id: lost, label: L10, teacher: {row: tmodell}, kd: {ce: 0.5, ikd: 0.5}}
      - {id: lostinit, label: L11, init: {row: nowhere}}
      - {id: cyc_a, label: L12, init: {row: cyc_b}}
      - {id: cyc_b, label: L13, init: {row: cyc_a}}
      - {id: norecipe, label: L14, recipe: fsat}
      - {id: "bad id!", label: L15, train: {seed: 15}}
      - {id: tmodel, label: L16, teacher: {model: resnet_50}, kd: {ce: 0.5, ikd: 0.5}}
"""


@pytest.fixture(scope="module")
def everything_wrong(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("wrong"), EVERYTHING_WRONG)
    with pytest.raises(GridError) as info:
        load_grid(path)  # one load: every problem in one GridError
    return str(path), info.value.problems


@pytest.mark.parametrize(
    ("row", "key", "fragments"),
    [
        ("typo' (L1)", "trian:", ["unknown key", "did you mean 'train'?"]),
        ("lrr' (L2)", "train.lrr:", ["unknown key", "did you mean 'train.lr'?"]),
        ("ranges' (L3)", "train.epochs:", ["must be >= 1, got -1"]),
        ("ranges' (L3)", "train.lr:", ["must be float, got 'fast'"]),
        ("ranges' (L3)", "train.eval_every:", [">= 1 (1 = every epoch), got 0"]),
        ("ranges' (L3)", "data.img_size:", ["between 16 and 2048, got 3"]),
        (
            "model' (L4)",
            "student.model:",
            ["unknown timm model 'convnext_tiniest'", "did you mean"],
        ),
        ("term' (L5)", "kd:", ["unknown KD term 'deit_sfot'", "did you mean 'deit_soft'?"]),
        ("noteacher' (L6)", "teacher:", ["deit_hard need a teacher"]),
        ("dup' (L8)", "id:", ["duplicate id 'dup'"]),
        ("duplabel' (L1)", "label:", ["duplicate label 'L1'", "row 'typo'"]),
        ("lost' (L10)", "teacher.row:", ["no row 'tmodell'", "did you mean 'tmodel'?"]),
        ("lostinit' (L11)", "init.row:", ["no row 'nowhere' in this grid"]),
        ("cyc_a'", "init.row", ["dependency cycle cyc_a -> cyc_b -> cyc_a"]),
        ("norecipe' (L14)", "recipe:", ["unknown recipe 'fsat'", "did you mean 'fast'?"]),
        ("bad id!' (L15)", "id:", ["letters, digits and _ . + - only"]),
        ("tmodel' (L16)", "teacher.model:", ["unknown timm model 'resnet_50'", "'resnet50'"]),
        ("typo'", "data:", ["/nonexistent/cifar10"]),
    ],
)
def test_every_error_names_file_row_and_key(everything_wrong, row, key, fragments):
    file, problems = everything_wrong
    problem = find(problems, f"{file}: ", f"row{'s' if key == 'data:' else ''} '{row}", key)
    for fragment in fragments:
        assert fragment in problem, problem


def test_all_errors_reported_at_once(everything_wrong):
    _, problems = everything_wrong
    # The 18 problems above (the cycle once, the missing dataset once for all rows), no more:
    # no error is reported twice and no error hides another.
    assert len(problems) == 18, "\n".join(problems)


def test_missing_dataset_root_only_outside_smoke(tmp_path):
    path = write(tmp_path, MINI)
    problems = problems_of(path)
    problem = find(problems, str(path), "rows 'teacher', 'student', 'ft'", "data:")
    assert "/nonexistent/cifar10" in problem
    grid = load_grid(path, smoke=True)  # --smoke generates its data: no dataset error
    assert len(grid.rows) == 3


def test_smoke_still_checks_model_names(tmp_path):
    # The typo maps to a real tiny model of the same family; it must be caught anyway.
    path = write(tmp_path, MINI.replace("model: resnet50", "model: resnet_50"))
    problem = find(problems_of(path, smoke=True), "row 'teacher' (T): student.model:")
    assert "unknown timm model 'resnet_50'" in problem


def test_kd_term_needing_a_teacher_with_teacher_null(tmp_path):
    text = MINI.replace("teacher: {row: teacher}", "teacher: null")
    problem = find(problems_of(write(tmp_path, text), check_data=False), "row 'student' (S)")
    assert "teacher: KD term(s) ikd need a teacher" in problem


def test_self_dependency(tmp_path):
    text = MINI.replace("init: {row: student}", "init: {row: ft}")
    problem = find(problems_of(write(tmp_path, text), check_data=False), "row 'ft' (F)")
    assert "init.row: a row cannot depend on itself" in problem


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: g\ndefaults: 5\nrows: [{id: a, label: A}]\n", "defaults: must be a mapping"),
        ("name: g\nrecipes: [x]\nrows: [{id: a, label: A, recipe: x}]\n", "recipes: must be"),
        ("name: g\nrecipes: {x: 3}\nrows: [{id: a, label: A, recipe: x}]\n", "recipes.x: must be"),
        ("name: g\nrows: [{id: a, label: A, recipe: [x]}]\n", "recipe: must be str"),
        ("name: g\nrows: {a: 1}\n", "rows: must be a list"),
        ("name: g\nrows: [3]\n", "each row must be a mapping"),
        ("name: [g]\nrows: [{id: a, label: A}]\n", "name: must be a string"),
        ("name: g\naxes: {values: {train.lr: [0.1]}, include: 5}\n", "axes.include: must be"),
        ("name: g\naxes: {values: {train.lr: [0.1]}, row: 5}\n", "axes.row: must be"),
        ("name: g\naxes: {valeus: {train.lr: [0.1]}}\n", "axes: must be a mapping with `values`"),
        ("name: g\ntrian: 1\nrows: [{id: a, label: A}]\n", "top-level key 'trian'"),
        ("name: g\n", "the grid has no rows"),
        ("- 1\n", "must be a YAML mapping"),
    ],
)
def test_malformed_grid_structure_is_a_grid_error(tmp_path, text, fragment):
    path = write(tmp_path, text)
    assert find(problems_of(path, check_data=False), str(path), fragment)


# ---------------------------------------------------------------------------------------------
# Selecting rows


def test_select_by_id_label_or_position():
    grid = load_grid(GRIDS / "table2b.yaml", check_data=False)
    assert [r.id for r in grid.select(["2b-7"])] == ["deit_b_dist_hard_ft"]
    assert [r.id for r in grid.select(["bit", "2b-1"])] == ["convnext_b", "bit"]  # grid order
    assert [r.id for r in grid.select(["7"])] == ["deit_b_dist_hard_ft"]  # `--rows 7`
    with pytest.raises(GridError) as info:
        grid.select(["2b-77", "convnext_bb"])
    assert len(info.value.problems) == 2
    assert "did you mean 'convnext_b'?" in info.value.problems[1]
    assert "the grid's rows are convnext_b (2b-1), deit_b_deit (2b-2)," in info.value.problems[1]


def test_select_a_row_of_a_sweep_selects_each_variant():
    grid = load_grid(GRIDS / "table2b.yaml", ["train.lr=1e-3,1e-4"], check_data=False)
    variants = ["deit_b_dist_hard_ft-lr0.001", "deit_b_dist_hard_ft-lr0.0001"]
    assert [r.label for r in grid.select(["2b-7"])] == [
        "2b-7 [train.lr=0.001]",
        "2b-7 [train.lr=0.0001]",
    ]
    assert [r.id for r in grid.select(["deit_b_dist_hard_ft"])] == variants
    # A variant's own label or id selects just that one.
    assert [r.id for r in grid.select(["2b-7 [train.lr=0.0001]"])] == variants[1:]
    assert [r.id for r in grid.select(["deit_b_dist_hard_ft-lr0.001", "bit"])] == [
        variants[0],
        "bit-lr0.001",
        "bit-lr0.0001",
    ]
    assert [r.id for r in grid.select(["7"])] == variants[:1]  # a position is still one row
    with pytest.raises(GridError) as info:
        grid.select(["2b-77"])
    (problem,) = info.value.problems
    assert "--rows: no row with id or label '2b-77' (did you mean '2b-7'?)" in problem
    # Each row is listed once, with how to name one variant.
    assert "deit_b_dist_hard_ft (2b-7), bit (2b-8)," in problem
    assert "'convnext_b-lr0.001' or '2b-1 [train.lr=0.001]'" in problem
    # The plan selects the same rows.
    decisions = plan_launch(grid, {}, rows=["2b-1", "2b-4", "2b-6"])
    assert {d.row.id for d in decisions if d.action == "run"} == {
        f"{row}-lr{lr}" for row in ("convnext_b", "deit_b_dist", "deit_b_dist_hard")
        for lr in ("0.001", "0.0001")
    }  # fmt: skip


def test_select_one_refuses_a_name_of_several_variants():
    grid = load_grid(GRIDS / "table2b.yaml", ["train.lr=1e-3,1e-4"], check_data=False)
    assert grid.select_one("2b-7 [train.lr=0.001]").id == "deit_b_dist_hard_ft-lr0.001"
    with pytest.raises(GridError) as info:
        grid.select_one("2b-7")
    assert info.value.problems == [
        f"{grid.file}: --row: '2b-7' names 2 sweep variants; give one's id or label: "
        "deit_b_dist_hard_ft-lr0.001 (2b-7 [train.lr=0.001]), "
        "deit_b_dist_hard_ft-lr0.0001 (2b-7 [train.lr=0.0001])"
    ]
    with pytest.raises(GridError, match="--row: no row with id or label 'nope'"):
        grid.select_one("nope")


def test_split_row_names_keeps_a_variant_label_whole():
    assert split_row_names("2b-1, bit,,") == ["2b-1", "bit"]
    two_axes = "2b-7 [train.lr=0.001, train.epochs=2]"
    assert split_row_names(f"{two_axes},2b-1") == [two_axes, "2b-1"]
    grid = load_grid(
        GRIDS / "table2b.yaml", ["train.lr=1e-3,1e-4", "train.epochs=2,3"], check_data=False
    )
    assert [r.id for r in grid.select(split_row_names(f"{two_axes},2b-1"))] == [
        "convnext_b-lr0.001-epochs2",
        "deit_b_dist_hard_ft-lr0.001-epochs2",
        "convnext_b-lr0.001-epochs3",
        "convnext_b-lr0.0001-epochs2",
        "convnext_b-lr0.0001-epochs3",
    ]


# ---------------------------------------------------------------------------------------------
# The command line

BROKEN = """\
    name: broken
    defaults:
      student: {model: resnet18}
      data: {dataset: cifar10, root: /nonexistent/cifar10}
    rows:
      - {id: a, label: A, trian: {epochs: 2}}
      - {id: b, label: B, student: {model: resnet_18}}
      - {id: c, label: C, kd: {ce: 0.5, ikd: 0.5}}
"""


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "grid.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 180) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def slow_cli_runs(tmp_path_factory):
    """The two launches that import torch and timm (seconds each) start with this module and
    run beside its other tests; the tests at the end of the file collect their results."""
    dry = tmp_path_factory.mktemp("dry")
    bad = tmp_path_factory.mktemp("bad")
    sweep = tmp_path_factory.mktemp("sweep")
    grid = write(bad, BROKEN)
    runs = {
        "dry": (dry, start_cli(str(GRIDS / "table2b.yaml"), "--dry-run", "--json", "--smoke", cwd=dry)),
        "sweep": (sweep, start_cli(
            str(GRIDS / "table2b.yaml"), "train.lr=1e-3,1e-4", "--dry-run", "--json", "--smoke",
            "--rows", "2b-7 [train.lr=0.001, train.epochs=2],2b-1",
            "train.epochs=2,3",  # overrides may follow the options too
            cwd=sweep,
        )),
        "bad": (
            bad,
            start_cli(
                str(grid), "--executor", "local", "--tracking-uri", f"sqlite:///{bad}/mlflow.db",
                cwd=bad,
            ),
        ),
    }  # fmt: skip
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_cli_dry_run_json(slow_cli_runs):
    workdir, process = slow_cli_runs["dry"]
    status, stdout, stderr = finish(process)
    assert status == 0, stderr
    rows = json.loads(stdout)  # stdout is exactly one JSON document
    assert isinstance(rows, list) and len(rows) == 10
    fields = {"id", "label", "student", "teacher", "kd", "init", "recipe", "depends_on", "key"}
    for row in rows:
        assert fields <= set(row)
    by = {row["label"]: row for row in rows}
    assert [row["label"] for row in rows] == [f"2b-{i}" for i in range(1, 11)]
    assert by["2b-1"]["teacher"] is None and by["2b-1"]["depends_on"] == []
    assert by["2b-1"]["recipe"] == "convnext" and by["2b-5"]["recipe"] == "deit"
    assert by["2b-1"]["init"] == {"source": "scratch"}  # --smoke: no pretrained downloads
    assert by["2b-5"]["teacher"]["row"] == "convnext_b"
    assert by["2b-5"]["teacher"]["model"] == by["2b-1"]["student"] == "convnext_atto"
    assert by["2b-5"]["kd"] == {"ce": 0.5, "deit_soft": 0.5}
    assert by["2b-6"]["kd"] == {"ce": 0.5, "deit_hard": 0.5}
    assert by["2b-7"]["init"] == {"source": "row", "row": "deit_b_dist"}
    assert sorted(by["2b-7"]["depends_on"]) == ["convnext_b", "deit_b_dist"]
    assert by["2b-10"]["teacher"]["row"] == "bit"
    assert by["2b-9"]["depends_on"] == ["bit"] and "row" not in by["2b-9"]["init"]
    # Keys are the same in another process (no dependence on hash seeds or dict order).
    assert {r["id"]: r["key"] for r in rows} == keys(load_grid(GRIDS / "table2b.yaml", smoke=True))
    assert list(workdir.iterdir()) == []  # a dry run writes nothing


def test_cli_rows_of_a_sweep(slow_cli_runs):
    """`--rows`: a row's label selects each of its sweep variants, a variant's label (commas
    and all) just that one."""
    _, process = slow_cli_runs["sweep"]
    status, stdout, stderr = finish(process)
    assert status == 0, stderr
    assert [row["id"] for row in json.loads(stdout)] == [
        "convnext_b-lr0.001-epochs2",
        "deit_b_dist_hard_ft-lr0.001-epochs2",
        "convnext_b-lr0.001-epochs3",
        "convnext_b-lr0.0001-epochs2",
        "convnext_b-lr0.0001-epochs3",
    ]


def test_cli_bad_grid_exits_2_lists_every_problem_and_creates_nothing(slow_cli_runs):
    workdir, process = slow_cli_runs["bad"]
    status, stdout, stderr = finish(process)
    assert status == 2, stdout + stderr
    assert "Traceback" not in stderr
    assert "4 problems" in stderr
    assert "row 'a' (A): trian: unknown key (did you mean 'train'?)" in stderr
    assert "row 'b' (B): student.model: unknown timm model 'resnet_18'" in stderr
    assert "row 'c' (C): teacher: KD term(s) ikd need a teacher" in stderr
    assert "rows 'a', 'b', 'c': data: CIFAR-10: root /nonexistent/cifar10" in stderr
    assert str(workdir / "grid.yaml") in stderr
    assert stdout == ""
    assert sorted(p.name for p in workdir.iterdir()) == ["grid.yaml"]  # no db, no outputs/


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        ("name: x\nrows: [\n", (), "YAML syntax error"),
        (MINI, ("train.epochs=[1,2",), "override 'train.epochs=[1,2'"),
    ],
    ids=["yaml", "override"],
)
def test_cli_bad_input_without_traceback(tmp_path, text, args, expected):
    """Errors found before any model library loads: quick to run as real processes."""
    grid = write(tmp_path, text)
    process = start_cli(
        str(grid), *args, "--executor", "local", "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path,
    )  # fmt: skip
    status, stdout, stderr = finish(process, timeout=60)
    assert status == 2, stdout + stderr
    assert expected in stderr and str(grid) in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_missing_clustering_dataset_is_reported_before_training(tmp_path):
    from kd.data import generate_dataset

    spec = generate_dataset("cifar10", tmp_path / "cifar", num_classes=2)
    text = MINI.replace("root: /nonexistent/cifar10", f"root: {spec.root}").replace(
        "output_dir: out/${name}",
        "output_dir: out/${name}\n      evaluate: {cluster: {cifar10: /nonexistent/cifar10}}",
    )
    problems = problems_of(write(tmp_path, text), check_data=True)
    assert problems, "a missing clustering dataset must be an error"
    assert all("evaluate.cluster.cifar10" in p and "/nonexistent/cifar10" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Interpolation resolved on the parts of a row that take part (kd.grid.trees.interpolated)


def _whole_tree(tree):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)


@pytest.mark.parametrize("smoke", [False, True])
def test_paper_grids_resolve_as_omegaconf_does_on_the_whole_row(monkeypatch, smoke, tmp_path):
    import kd.grid.trees as grid_trees

    grids = sorted((Path(__file__).resolve().parents[2] / "grids").glob("*.yaml"))
    # grids/fashion_kd.yaml fine-tunes a converted checkpoint named relative to the launch folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tf_efficientnet_lite0.safetensors").touch()
    fast = [load_grid(g, smoke=smoke, check_data=False, check_models=False) for g in grids]
    monkeypatch.setattr(grid_trees, "interpolated", _whole_tree)
    slow = [load_grid(g, smoke=smoke, check_data=False, check_models=False) for g in grids]
    for a, b in zip(fast, slow, strict=True):
        assert [r.to_dict() for r in a.rows] == [r.to_dict() for r in b.rows]
        assert [r.key for r in a.rows] == [r.key for r in b.rows]


def test_interpolated_matches_omegaconf_on_references_lists_resolvers_and_errors(monkeypatch):
    from omegaconf.errors import OmegaConfBaseException

    from kd.grid.trees import interpolated

    monkeypatch.setenv("KDGRID_TEST_ROOT", "/data/cub")
    trees = [
        {"name": "g", "output_dir": "outputs/${name}", "train": {"lr": 0.1}},
        {"train": {"lr": 0.1, "note": "lr=${train.lr}"}, "tags": ["${train.lr}", 3, None]},
        {"data": {"root": "${oc.env:KDGRID_TEST_ROOT}", "dogs": "${oc.env:KDGRID_NOPE,/x}"}},
        {"a": {"b": {"c": 1}}, "copy": "${a}", "deep": "${a.b.c}", "esc": "\\${not}"},
        {"x": {"y": 2, "z": "${.y}"}, "w": "${x.z}"},  # relative: the whole tree
        {"chain": "${mid}", "mid": "${end}", "end": "e", "untouched": [1, {"k": "v"}]},
        {"data-set": {"my-root": "r"}, "ref": "${data-set.my-root}"},
        {"train": {"lr": "${oc.select:.base,0.1}", "base": 0.5}},  # relative, in a resolver
        {"x": 1, "y": "${ .x}"},
        {"t": {"x y": 1}, "v": "${oc.select:'t.x y',0}"},  # quoted argument
        {"été": 2, "7x": 3, "a": "${été}-${7x}"},
    ]
    for tree in trees:
        assert interpolated(tree) == _whole_tree(tree), tree
    for bad in (
        {"a": "${missing.key}"},
        {"a": "${oc.env:KDGRID_NOPE}"},
        {"a": "${b}", "b": "${a}"},
    ):
        with pytest.raises(OmegaConfBaseException) as fast:
            interpolated(bad)
        with pytest.raises(OmegaConfBaseException) as whole:
            _whole_tree(bad)
        assert type(fast.value) is type(whole.value)
        assert str(fast.value).splitlines()[0] == str(whole.value).splitlines()[0]


def test_status_hint_after_a_launch_repeats_its_overrides():
    """The overrides change row keys (resources.nodes=2 does: world size): the hint printed
    after a SLURM launch must show the rows as launched, quoted for a shell."""
    from slurm.launcher import status_command

    overrides = ["train.lr=1e-4", "resources.nodes=2", "resources.exclude='n3,n4'"]
    grid = load_grid(
        GRIDS / "table2b.yaml", overrides, smoke=True, check_data=False, check_models=False
    )
    assert status_command(grid) == (
        f"python launch/status.py {grid.file} train.lr=1e-4 resources.nodes=2 "
        "'resources.exclude='\"'\"'n3,n4'\"'\"'' --smoke"
    )
    assert status_command(grid, "http://127.0.0.1:5000").endswith(
        "--smoke --tracking-uri http://127.0.0.1:5000"
    )


def test_sections_equal_in_value_but_not_in_type_are_checked_apart(tmp_path):
    """Equal sections are checked once per grid (kd.config.validate_section's memo): 2 and
    2.0, 0 and false, 1.0e-3 and 0.001 as text must still be told apart, row by row."""
    path = write(
        tmp_path,
        """\
        name: types
        defaults:
          student: {model: resnet18}
          data: {dataset: cifar10, root: /nonexistent/cifar10}
        rows:
          - {id: a, label: A, train: {epochs: 2, seed: 0}}
          - {id: b, label: B, train: {epochs: 2.0, seed: 0}}
          - {id: c, label: C, train: {epochs: 2, seed: 0}}
          - {id: d, label: D, train: {epochs: 2, seed: false}}
          - {id: e, label: E, train: {epochs: 2, seed: "0"}}
          - {id: f, label: F, train: {epochs: 2, seed: 0}, student: {drop_path: -0.0}}
        """,
    )
    problems = problems_of(path, check_data=False)
    find(problems, "row 'b'", "train.epochs", "2.0")
    find(problems, "row 'd'", "train.seed", "False")
    find(problems, "row 'e'", "train.seed", "'0'")
    assert not [p for p in problems if "row 'a'" in p or "row 'c'" in p or "row 'f'" in p]
    assert len(problems) == 3


def test_sweep_rows_are_those_of_each_point_loaded_alone(tmp_path):
    """Rows of a sweep share their equal sections (checked once, frozen): their configs and
    keys are still those of the same rows loaded one sweep point at a time."""
    grid = mini(tmp_path, ["train.seed=1,2,3"])
    for seed in (1, 2, 3):
        (tmp_path / str(seed)).mkdir()
        alone = mini(tmp_path / str(seed), [f"train.seed={seed}"])
        for row in alone.rows:
            (variant,) = [r for r in grid.rows if r.id == f"{row.id}-seed{seed}"]
            assert variant.key == row.key
            mine, theirs = C.to_dict(variant.config), C.to_dict(row.config)
            for name in ("id", "label"):
                mine.pop(name), theirs.pop(name)
            for section in ("teacher", "init"):
                if isinstance(mine[section], dict) and mine[section].get("row"):
                    assert mine[section]["row"] == f"{theirs[section]['row']}-seed{seed}"
                    mine[section]["row"] = theirs[section]["row"]
            assert mine == theirs


def test_an_interpolation_in_a_list_of_lists_is_a_problem_not_a_traceback(tmp_path: Path):
    """Found by tests/unit/test_row_yaml.py's fuzzing: `${...}` inside a list inside a list
    raised IndexError from the interpolation's tree builder (a traceback, exit 1)."""
    row = "{id: ft, label: F, init: {row: student}}"
    bad = "{id: ft, label: F, init: {row: student}, student: [[a, '${oc.env:KDGRID_TEST_UNSET}']]}"
    problems = problems_of(write(tmp_path, MINI.replace(row, bad)), check_data=False)
    find(problems, "row 'ft'", "student[0][1]", "KDGRID_TEST_UNSET")
