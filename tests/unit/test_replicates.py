"""Replicates (`seeds: N`, `--seeds N`): ids, seeds, keys, edges between replicates, selection,
the launch plan (`--rows`, `--rerun-failed`) on replicates, and the statistics of the table."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from kd.grid import GridError, load_grid
from kd.plan import plan_launch
from kd.tracking import RunRecord

MINI = """\
    name: mini
    experiment: kd-mini
    {seeds}
    defaults:
      student: {{model: resnet18}}
      data: {{dataset: cifar10, root: /nonexistent/cifar10}}
      train: {{epochs: 3, lr: 1.0e-3, seed: 5}}
      output_dir: out/${{name}}
    rows:
      - {{id: teacher, label: T, paper: {{acc1: 90.0}}}}
      - {{id: student, label: S, teacher: {{row: teacher}}, kd: {{ce: 0.5, ikd: 0.5}}}}
      - {{id: ft, label: F, init: {{row: student}}}}
"""


def mini(tmp_path: Path, header: str = "seeds: 3", overrides=(), **kwargs):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(MINI.format(seeds=header)))
    kwargs.setdefault("check_data", False)
    return load_grid(path, overrides, **kwargs)


def test_each_row_becomes_n_replicates_with_their_own_seed_and_key(tmp_path):
    grid = mini(tmp_path)
    assert [r.id for r in grid.rows] == [
        f"{row}@s{i}" for row in ("teacher", "student", "ft") for i in range(3)
    ]
    assert [r.label for r in grid.rows[:3]] == ["T@s0", "T@s1", "T@s2"]
    assert [r.config.train.seed for r in grid.rows[:3]] == [5, 6, 7]
    assert len({r.key for r in grid.rows}) == 9
    # the paper's number stays with every replicate (the table compares their interval to it)
    assert {r.config.paper.acc1 for r in grid.rows[:3]} == {90.0}


def test_a_replicate_reads_the_replicate_of_its_dependency_with_the_same_seed_index(tmp_path):
    grid = mini(tmp_path)
    for i in range(3):
        student, ft = grid.row(f"student@s{i}"), grid.row(f"ft@s{i}")
        assert student.config.teacher.row == f"teacher@s{i}"
        assert student.depends_on == (f"teacher@s{i}",)
        assert ft.config.init.row == f"student@s{i}" and ft.depends_on == (f"student@s{i}",)
        assert student.config.teacher.model == "resnet18"


def test_replicate_zero_keeps_the_key_of_the_single_seed_row(tmp_path):
    """So a row trained before `seeds:` was added counts as its first replicate."""
    single = {r.id: r.key for r in mini(tmp_path, header="").rows}
    replicated = mini(tmp_path)
    assert {r.id.removesuffix("@s0"): r.key for r in replicated.rows if r.id.endswith("@s0")} == (
        single
    )
    assert {r.id: r.key for r in mini(tmp_path, header="seeds: 1").rows} == single


def test_seeds_flag_wins_over_the_grid_and_is_repeated_in_advice(tmp_path):
    grid = mini(tmp_path, smoke=True, seeds=2)
    assert len(grid.rows) == 6 and grid.seeds_flag == 2
    assert grid.command("launch/status.py").endswith("--smoke --seeds 2")
    assert len(mini(tmp_path, header="", overrides=["+seeds=4"]).rows) == 12  # an override too
    assert [r.id for r in mini(tmp_path, seeds=1).rows] == ["teacher", "student", "ft"]


@pytest.mark.parametrize("value", ["0", "-1", "true", "2.5", "'3'", "101"])
def test_a_bad_seeds_value_is_an_error(tmp_path, value):
    with pytest.raises(GridError) as info:
        mini(tmp_path, header=f"seeds: {value}")
    assert any(
        p.startswith(f"{tmp_path / 'grid.yaml'}: seeds: must be a whole number of replicates")
        for p in info.value.problems
    )


def test_an_id_with_the_replicate_mark_is_refused(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(MINI.format(seeds="")).replace("id: ft,", "id: ft@s1,", 1))
    with pytest.raises(GridError) as info:
        load_grid(path, check_data=False)
    assert any("row 'ft@s1' (F): id: 'ft@s1' contains '@'" in p for p in info.value.problems)


def test_a_row_names_all_its_replicates_a_replicate_just_itself(tmp_path):
    grid = mini(tmp_path)
    assert [r.id for r in grid.select(["S"])] == ["student@s0", "student@s1", "student@s2"]
    assert [r.id for r in grid.select(["teacher", "F@s1"])] == [
        "teacher@s0", "teacher@s1", "teacher@s2", "ft@s1"
    ]  # fmt: skip
    assert grid.select_one("student@s2").id == "student@s2"
    with pytest.raises(GridError, match="'S' names 3 replicates; give one's id or label"):
        grid.select_one("S")
    with pytest.raises(GridError) as info:
        grid.select(["nope"])
    assert "the grid's rows are teacher (T), student (S), ft (F);" in info.value.problems[0]


def test_replicates_of_a_sweep(tmp_path):
    grid = mini(tmp_path, overrides=["train.lr=1e-3,1e-2"], seeds=2)
    assert len(grid.rows) == 12
    assert [r.id for r in grid.select(["student-lr0.01"])] == [
        "student-lr0.01@s0",
        "student-lr0.01@s1",
    ]
    assert len(grid.select(["S"])) == 4  # both variants, both seeds
    assert grid.row("student-lr0.01@s1").config.teacher.row == "teacher-lr0.01@s1"
    groups = grid.replicate_groups()
    assert list(groups)[:2] == ["teacher-lr0.001", "student-lr0.001"]
    assert [r.id for r in groups["ft-lr0.01"]] == ["ft-lr0.01@s0", "ft-lr0.01@s1"]


def record(row, status: str, n: int = 0) -> RunRecord:
    return RunRecord(f"run-{row.id}", row.key, row.id, status, 1_000 + n, {})


def test_rerun_failed_and_rows_act_on_replicates(tmp_path):
    grid = mini(tmp_path)
    latest = {r.key: record(r, "FINISHED", n) for n, r in enumerate(grid.rows)}
    latest[grid.row("teacher@s1").key] = record(grid.row("teacher@s1"), "FAILED")
    del latest[grid.row("ft@s1").key]  # never ran: its dependency failed
    decisions = plan_launch(grid, latest, rerun_failed=True)
    assert {d.row.id for d in decisions if d.action == "run"} == {"teacher@s1", "ft@s1"}
    # student@s1 finished before its teacher failed again: left as it is
    # --rows S runs the replicates of S that have not finished
    del latest[grid.row("student@s2").key]
    decisions = plan_launch(grid, latest, rows=["S"])
    assert {d.row.id for d in decisions if d.action == "run"} == {"student@s2"}


# ---------------------------------------------------------------------------------------------
# statistics


def test_summary_mean_std_and_t_interval():
    from kd.stats import summarize

    s = summarize([86.0, 87.0, 88.0])
    assert s.n == 3 and s.mean == pytest.approx(87.0) and s.std == pytest.approx(1.0)
    half = 4.302652729749464 * 1.0 / math.sqrt(3)  # t(0.975, 2)
    assert (s.low, s.high) == (pytest.approx(87.0 - half), pytest.approx(87.0 + half))
    assert s.contains(85.0) and not s.contains(91.0) and s.contains(None) is None
    one = summarize([86.5])
    assert one.n == 1 and one.mean == 86.5 and one.std is None and one.low is None
    assert one.contains(86.5) is None  # no interval from one value
    empty = summarize([])
    assert empty.n == 0 and empty.mean is None


def summaries(grid, acc1: dict[str, float], states: dict[str, str] | None = None):
    """{key: RunSummary} as `latest_grid_runs` returns it: `acc1` of each replicate id."""
    from kd.tracking import RunSummary

    out = {}
    for n, row in enumerate(grid.rows):
        status = (states or {}).get(row.id, "FINISHED" if row.id in acc1 else None)
        if status is None:
            continue
        metrics = {"val/acc1": acc1.get(row.id, 50.0), "val/acc5": 99.0, "val/loss": 0.5}
        out[row.key] = RunSummary(record(row, status, n), metrics, {}, 0, None)
    return out


def test_the_table_aggregates_replicates_and_tests_the_paper_number(tmp_path):
    from kd import aggregate, results

    grid = mini(tmp_path)
    acc1 = {"teacher@s0": 89.0, "teacher@s1": 90.0, "teacher@s2": 91.0}
    acc1 |= {"student@s0": 80.0, "student@s1": 80.5}
    runs = summaries(grid, acc1, {"student@s2": "RUNNING"})
    rows = aggregate.aggregate(grid, results.build_table(grid, runs))
    assert [(r.id, r.label) for r in rows] == [("teacher", "T"), ("student", "S"), ("ft", "F")]
    teacher, student, ft = rows
    assert teacher.acc1.n == 3 and teacher.acc1.mean == pytest.approx(90.0)
    assert teacher.paper_in_interval is True and teacher.state == "3/3 finished"
    assert student.acc1.n == 2 and student.acc1_values == (80.0, 80.5)
    assert student.state == "2/3 finished, 1 running" and student.paper_in_interval is None
    assert ft.acc1.n == 0 and ft.state == "0/3 finished, 3 not run"
    text = aggregate.to_markdown(rows)
    assert (
        "| T | resnet18 | No | - | pretrained | 384 | 90.00 ± 1.00 | 3 | [87.52, 92.48] | 90.00 | yes | - | - | 89.00, 90.00, 91.00 |"
        in text
    )
    assert "| S | resnet18 | teacher (ikd) |" in text  # the teacher row, not its replicate
    shifted = summaries(grid, {k: v + 5 for k, v in acc1.items()})
    (teacher, *_) = aggregate.aggregate(grid, results.build_table(grid, shifted))
    assert teacher.paper_in_interval is False
    assert "| no |" in aggregate.to_markdown([teacher])
    png = aggregate.plot(rows, tmp_path / "t.png", "mini")
    assert png.stat().st_size > 1000


PAIRED = """\
    name: paired
    experiment: kd-paired
    seeds: 3
    defaults:
      student: {model: resnet18}
      data: {dataset: cifar10, root: /nonexistent/cifar10}
      output_dir: out/${name}
    rows:
      - {id: ce, label: CE, paper: {acc1: 86.7}}
      - {id: kd, label: KD, kd: {ce: 0.5, ikd: 0.5}, teacher: {model: resnet50},
         paper: {acc1: 87.2, baseline: ce}}
"""


def test_a_baseline_row_gives_the_gain_paired_by_seed(tmp_path):
    """Seeds that move both rows together (seed 1 low in both) leave the rows' own intervals
    overlapping, but the per-seed differences, and so the gain's interval, are tight."""
    from kd import aggregate, results

    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(PAIRED))
    grid = load_grid(path, check_data=False)
    acc1 = {"ce@s0": 80.0, "ce@s1": 79.0, "ce@s2": 80.6, "kd@s0": 80.5, "kd@s1": 79.6}
    acc1 |= {"kd@s2": 81.0}
    ce, kd = aggregate.aggregate(grid, results.build_table(grid, summaries(grid, acc1)))
    assert kd.acc1.low < ce.acc1.high  # the rows' intervals overlap
    assert kd.baseline == "CE" and kd.gain.n == 3
    assert kd.gain.mean == pytest.approx(0.5) and kd.gain.low > 0  # the paired gain is clear
    assert kd.paper_gain == pytest.approx(0.5) and ce.baseline is None
    cell = f"+0.50 [{kd.gain.low:+.2f}, {kd.gain.high:+.2f}] over CE, 3 seeds | +0.50 |"
    assert cell in aggregate.to_markdown([ce, kd])
    png = aggregate.plot([ce, kd], tmp_path / "gain.png", "paired")  # with the gains' panel
    assert png.stat().st_size > 1000
    # only the seeds both rows finished are paired
    del acc1["ce@s2"]
    ce, kd = aggregate.aggregate(grid, results.build_table(grid, summaries(grid, acc1)))
    assert kd.gain.n == 2 and kd.gain.mean == pytest.approx(0.55)


@pytest.mark.parametrize(
    ("baseline", "message"),
    [("cee", "no row 'cee' in this grid (did you mean 'ce'?)"), ("kd", "its own baseline")],
)
def test_a_baseline_that_is_no_other_row_is_an_error(tmp_path, baseline, message):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(PAIRED).replace("baseline: ce", f"baseline: {baseline}"))
    with pytest.raises(GridError) as err:
        load_grid(path, check_data=False)
    assert "row 'kd@s0' (KD@s0): paper.baseline: " in str(err.value)
    assert message in str(err.value)


def test_a_swept_baseline_is_the_same_sweep_points_row(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(PAIRED))
    grid = load_grid(path, ["train.lr=1e-3,1e-2"], check_data=False)
    assert grid.row("kd-lr0.01@s1").config.paper.baseline == "ce-lr0.01"


def test_a_row_with_its_own_seeds_1_is_one_row_that_every_replicate_reads(tmp_path):
    path = tmp_path / "grid.yaml"
    text = textwrap.dedent(MINI.format(seeds="seeds: 3"))
    path.write_text(text.replace("{id: teacher, label: T,", "{id: teacher, label: T, seeds: 1,"))
    grid = load_grid(path, check_data=False)
    assert [r.id for r in grid.rows][:4] == ["teacher", "student@s0", "student@s1", "student@s2"]
    assert {grid.row(f"student@s{i}").config.teacher.row for i in range(3)} == {"teacher"}
    assert grid.select(["T"]) == [grid.row("teacher")]
    path.write_text(text.replace("{id: teacher, label: T,", "{id: teacher, label: T, seeds: 2,"))
    with pytest.raises(GridError) as info:
        load_grid(path, check_data=False)
    assert any(
        "row 'student' (S): teacher.row: row 'teacher' has 2 replicates, fewer than this row's 3"
        in p
        for p in info.value.problems
    )


def test_a_row_trained_before_seeds_counts_as_replicate_zero(tmp_path, monkeypatch):
    """teacher@s0 has the key of the single-seed teacher: its finished run (written as row
    'teacher') is skipped, and student@s0 reads its checkpoint from the folder 'teacher'."""
    from kd.grid import dependency_checkpoint
    from kd.plan import locate_checkpoints

    monkeypatch.chdir(tmp_path)
    single = mini(tmp_path, header="").row("teacher")
    grid = mini(tmp_path)
    teacher = grid.row("teacher@s0")
    assert teacher.key == single.key
    latest = {teacher.key: RunRecord("t", teacher.key, "teacher", "FINISHED", 0, {})}
    decisions = plan_launch(grid, latest, rows=["T", "S"])
    acts = {d.row.id: d.action for d in decisions}
    assert acts["teacher@s0"] == "skip_finished"
    assert {r for r, a in acts.items() if a == "run"} >= {"teacher@s1", "student@s0"}
    written = Path(single.config.output_dir) / "teacher" / "best.pt"
    written.parent.mkdir(parents=True)
    written.write_bytes(b"weights")
    located = {d.row.id: d.row for d in locate_checkpoints(grid, decisions, latest)}
    assert dependency_checkpoint(located["student@s0"], "teacher@s0") == written
