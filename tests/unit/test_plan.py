"""`kd.plan.plan_launch`: which rows a launch runs, given what MLflow already holds.

Unit tests on table2b with fabricated run records (no MLflow store): the real row graph
(2b-5..7 need convnext_b, 2b-9/10 need bit, 2b-7/10 start from deit_b_dist).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.grid import Grid, GridError, load_grid
from kd.plan import plan_launch, stale_after_launch
from kd.tracking import RunRecord

GRID = Path(__file__).resolve().parents[2] / "grids" / "table2b.yaml"
ALL = [
    "convnext_b",
    "deit_b_deit",
    "deit_b_convnext",
    "deit_b_dist",
    "deit_b_dist_soft",
    "deit_b_dist_hard",
    "deit_b_dist_hard_ft",
    "bit",
    "deit_b_dist_hard_bit",
    "deit_b_dist_hard_bit_ft",
]


@pytest.fixture(scope="module")
def grid() -> Grid:
    return load_grid(GRID, check_data=False, check_models=False)


def records(grid: Grid, **status: str) -> dict[str, RunRecord]:
    """{key: record} as `Tracker.latest_by_key` returns it; `status` maps row id -> status."""
    out = {}
    for n, (row_id, state) in enumerate(status.items()):
        row = grid.row(row_id)
        out[row.key] = RunRecord(
            run_id=f"run-{row_id}",
            key=row.key,
            row_id=row_id,
            status=state,
            start_time=1_000 + n,
            tags={"kdgrid.job_id": f"job-{row_id}"},
        )
    return out


def actions(decisions) -> dict[str, str]:
    return {d.row.id: d.action for d in decisions}


def running(decisions) -> set[str]:
    return {d.row.id for d in decisions if d.action == "run"}


def everything(grid: Grid, state: str = "FINISHED", **overrides: str) -> dict[str, RunRecord]:
    return records(grid, **({row_id: state for row_id in ALL} | overrides))


def test_fresh_grid_runs_every_row_in_grid_order(grid):
    decisions = plan_launch(grid, {})
    assert [d.row.id for d in decisions] == ALL
    assert running(decisions) == set(ALL)
    assert {d.reason for d in decisions} == {"new"}


def test_finished_rows_are_skipped_unless_forced(grid):
    latest = records(grid, convnext_b="FINISHED", bit="FINISHED")
    decisions = plan_launch(grid, latest)
    assert actions(decisions)["convnext_b"] == "skip_finished"
    assert actions(decisions)["bit"] == "skip_finished"
    assert running(decisions) == set(ALL) - {"convnext_b", "bit"}
    skipped = next(d for d in decisions if d.row.id == "convnext_b")
    assert skipped.previous is latest[grid.row("convnext_b").key]
    assert "run-convnext_b" in skipped.reason and "--force" in skipped.reason

    forced = plan_launch(grid, latest, force=True)
    assert running(forced) == set(ALL)
    assert next(d for d in forced if d.row.id == "bit").reason == "forced rerun"


def test_everything_finished_runs_nothing(grid):
    decisions = plan_launch(grid, everything(grid))
    assert set(actions(decisions).values()) == {"skip_finished"}


def test_a_finished_run_of_another_key_does_not_count(grid):
    stale = RunRecord("old", "0123456789abcdef", "convnext_b", "FINISHED", 1, {})
    assert actions(plan_launch(grid, {stale.key: stale}))["convnext_b"] == "run"


@pytest.mark.parametrize("state", ["RUNNING", "SCHEDULED"])
def test_active_alive_rows_are_not_started_again_even_with_force(grid, state):
    latest = everything(grid, deit_b_deit=state)
    checked = []

    def alive(record: RunRecord) -> bool:
        checked.append(record.row_id)
        return True

    for force in (False, True):
        decisions = plan_launch(grid, latest, force=force, is_alive=alive)
        decision = next(d for d in decisions if d.row.id == "deit_b_deit")
        assert decision.action == "skip_active"
        assert "job-deit_b_deit" in decision.reason
        assert "deit_b_deit" not in running(decisions)
    assert set(checked) == {"deit_b_deit"}  # liveness is asked only of active runs


def test_active_dead_rows_are_treated_as_failed(grid):
    latest = everything(grid, deit_b_deit="RUNNING")
    decisions = plan_launch(grid, latest, is_alive=lambda record: False)
    assert running(decisions) == {"deit_b_deit"}
    assert "running" in next(d for d in decisions if d.row.id == "deit_b_deit").reason
    # ... and --rerun-failed picks them up.
    again = plan_launch(grid, latest, rerun_failed=True, is_alive=lambda record: False)
    assert running(again) == {"deit_b_deit"}


def test_rerun_failed_runs_failed_and_killed_rows_and_their_dependents_only(grid):
    latest = everything(grid, convnext_b="FAILED", deit_b_dist="KILLED")
    del latest[grid.row("deit_b_dist_hard").key]  # never ran (its teacher had failed)
    del latest[grid.row("deit_b_dist_hard_bit_ft").key]
    decisions = plan_launch(grid, latest, rerun_failed=True)
    assert running(decisions) == {
        "convnext_b",  # failed
        "deit_b_dist",  # killed
        "deit_b_dist_hard",  # a dependent of convnext_b that never ran
        "deit_b_dist_hard_bit_ft",  # a dependent of deit_b_dist that never ran
    }
    acts = actions(decisions)
    # Dependents that finished stay finished; rows unrelated to a failure are not selected.
    assert acts["deit_b_dist_soft"] == "skip_finished"
    assert acts["deit_b_dist_hard_ft"] == "skip_finished"
    assert acts["bit"] == "not_selected" and acts["deit_b_dist_hard_bit"] == "not_selected"


def test_rerun_failed_does_not_pick_rows_that_never_ran(grid):
    latest = everything(grid, deit_b_deit="FAILED")
    del latest[grid.row("deit_b_convnext").key]
    decisions = plan_launch(grid, latest, rerun_failed=True)
    assert running(decisions) == {"deit_b_deit"}
    assert actions(decisions)["deit_b_convnext"] == "not_selected"
    assert running(plan_launch(grid, everything(grid), rerun_failed=True)) == set()


def test_rerun_failed_with_rows_restricts_the_failed_rows(grid):
    latest = everything(grid, deit_b_dist_hard_ft="FAILED", deit_b_dist_hard_bit="FAILED")
    decisions = plan_launch(grid, latest, rows=["2b-7"], rerun_failed=True)
    assert running(decisions) == {"deit_b_dist_hard_ft"}


def test_rows_with_an_unfinished_unselected_dependency_is_an_error(grid):
    for latest in ({}, records(grid, convnext_b="FAILED")):
        with pytest.raises(GridError) as info:
            plan_launch(grid, latest, rows=["2b-5"])
        (problem,) = info.value.problems
        assert "row 'deit_b_dist_soft' (2b-5)" in problem
        assert "depends on row 'convnext_b'" in problem
        assert "--rows convnext_b,deit_b_dist_soft" in problem
        assert str(GRID) in problem


def test_rows_with_every_missing_dependency_named(grid):
    with pytest.raises(GridError) as info:
        plan_launch(grid, records(grid, deit_b_dist="FINISHED"), rows=["2b-7", "2b-10"])
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 2
    assert "row 'deit_b_dist_hard_ft' (2b-7): depends on row 'convnext_b'" in problems
    assert "row 'deit_b_dist_hard_bit_ft' (2b-10): depends on row 'bit'" in problems


def test_rows_with_a_running_dependency_is_an_error(grid):
    with pytest.raises(GridError, match="depends on row 'convnext_b', which is running"):
        plan_launch(grid, records(grid, convnext_b="RUNNING"), rows=["deit_b_dist_soft"])


def test_rows_with_finished_or_selected_dependencies(grid):
    latest = records(grid, convnext_b="FINISHED", deit_b_dist="FINISHED")
    decisions = plan_launch(grid, latest, rows=["2b-7"])
    assert running(decisions) == {"deit_b_dist_hard_ft"}
    assert actions(decisions)["deit_b_dist_soft"] == "not_selected"
    decisions = plan_launch(grid, {}, rows=["2b-1", "deit_b_dist_soft", "2b-6"])
    assert running(decisions) == {"convnext_b", "deit_b_dist_soft", "deit_b_dist_hard"}


def test_rows_accept_ids_and_labels_alike(grid):
    latest = records(grid, bit="FINISHED", deit_b_dist="FINISHED")
    by_label = plan_launch(grid, latest, rows=["2b-9", "2b-10"])
    by_id = plan_launch(grid, latest, rows=["deit_b_dist_hard_bit", "deit_b_dist_hard_bit_ft"])
    assert (
        running(by_label) == running(by_id) == {"deit_b_dist_hard_bit", "deit_b_dist_hard_bit_ft"}
    )
    with pytest.raises(GridError, match="no row with id or label '2b-11'"):
        plan_launch(grid, latest, rows=["2b-11"])


def test_failed_row_whose_job_slurm_requeued_is_not_submitted_again(grid):
    """A node lost mid-run: the run is FAILED but SLURM requeued its job, which will resume
    it. Neither a plain launch nor --rerun-failed may queue it a second time."""
    latest = everything(grid, deit_b_deit="FAILED")

    def requeued(record: RunRecord) -> bool:
        return record.row_id == "deit_b_deit"

    for rerun_failed in (False, True):
        decisions = plan_launch(grid, latest, rerun_failed=rerun_failed, requeued=requeued)
        assert "deit_b_deit" not in running(decisions)
        if not rerun_failed:
            decision = next(d for d in decisions if d.row.id == "deit_b_deit")
            assert decision.action == "skip_active"
            assert "requeued its job job-deit_b_deit" in decision.reason
    # once the job is gone for good, the row is an ordinary failed row again
    assert running(plan_launch(grid, latest, rerun_failed=True)) == {"deit_b_deit"}


@pytest.mark.parametrize("state", ["SCHEDULED", "RUNNING"])
def test_a_finished_row_is_not_rerun_under_a_row_that_reads_its_checkpoint(grid, state):
    """A forced rerun replaces best.pt; a student queued or running from an earlier launch
    would load the new, half-trained teacher. Refused, naming both rows and what to do."""
    latest = everything(grid, deit_b_dist_hard=state)
    with pytest.raises(GridError) as err:
        plan_launch(grid, latest, rows=["convnext_b"], force=True, is_alive=lambda r: True)
    (problem,) = err.value.problems
    assert "row 'convnext_b'" in problem and "row 'deit_b_dist_hard'" in problem
    assert "job-deit_b_dist_hard" in problem and "--cancel --rows deit_b_dist_hard" in problem
    # its process gone, the reader no longer holds the teacher up
    dead = plan_launch(grid, latest, rows=["convnext_b"], force=True, is_alive=lambda r: False)
    assert running(dead) == {"convnext_b"}
    # rows that do not read the forced row's checkpoint do not matter
    assert running(
        plan_launch(grid, latest, rows=["bit"], force=True, is_alive=lambda r: True)
    ) == {"bit"}


def test_a_reader_whose_failed_job_slurm_requeued_blocks_a_forced_rerun(grid):
    latest = everything(grid, deit_b_dist_hard_bit="FAILED")
    with pytest.raises(GridError, match="row 'deit_b_dist_hard_bit'"):
        plan_launch(
            grid,
            latest,
            rows=["bit"],
            force=True,
            requeued=lambda r: r.row_id == "deit_b_dist_hard_bit",
        )


def test_a_failed_teacher_is_rerun_while_its_student_still_waits(grid):
    """Only a *finished* row's checkpoint can have been read: rerunning a failed teacher (whose
    waiting student SLURM cancels) is not held up."""
    latest = everything(grid, convnext_b="FAILED", deit_b_dist_hard="SCHEDULED")
    decisions = plan_launch(grid, latest, rows=["convnext_b"], is_alive=lambda r: True)
    assert running(decisions) == {"convnext_b"}


def test_forcing_a_row_names_its_finished_readers_left_stale(grid):
    latest = everything(grid)
    decisions = plan_launch(grid, latest, rows=["deit_b_dist"], force=True)
    (line,) = stale_after_launch(grid, decisions, latest)
    assert "deit_b_dist_hard_ft, deit_b_dist_hard_bit_ft finished from its earlier" in line
    # the readers alone: the row itself is being rerun by this very launch
    assert line.endswith(
        f"python launch/grid.py {grid.file} --rows deit_b_dist_hard_ft,deit_b_dist_hard_bit_ft --force"
    )
    # rerun together, nothing is left stale; the suggested launch is a valid one
    together = plan_launch(
        grid,
        latest,
        rows=["deit_b_dist", "deit_b_dist_hard_ft", "deit_b_dist_hard_bit_ft"],
        force=True,
    )
    assert stale_after_launch(grid, together, latest) == []
    # a plain launch forces nothing
    assert stale_after_launch(grid, plan_launch(grid, latest), latest) == []


def test_advice_repeats_the_grids_overrides_and_smoke():
    """A hint that drops --smoke or a sweep override names rows of another experiment."""
    swept = load_grid(GRID, ["train.seed=0,1"], smoke=True, check_data=False, check_models=False)
    reader, teacher = swept.row("deit_b_dist_hard-seed1"), swept.row("convnext_b-seed1")
    latest = {
        teacher.key: RunRecord("t", teacher.key, teacher.id, "FINISHED", 0, {}),
        reader.key: RunRecord("s", reader.key, reader.id, "RUNNING", 1, {}),
    }
    with pytest.raises(GridError) as err:
        plan_launch(swept, latest, rows=[teacher.id], force=True)
    assert err.value.problems[0].endswith(
        f"python launch/grid.py {swept.file} train.seed=0,1 --smoke --cancel --rows {reader.id}"
    )


def test_a_sweep_variant_reads_the_checkpoint_of_the_grid_row_it_equals(tmp_path, monkeypatch):
    """`train.seed=0,1` where 0 is the grid's seed: convnext_b-seed0 has convnext_b's content
    key, so its finished run (written as row convnext_b) counts, and deit_b_dist_hard-seed0
    must read convnext_b's folder, not the empty convnext_b-seed0."""
    from kd.grid import dependency_checkpoint
    from kd.plan import locate_checkpoints

    monkeypatch.chdir(tmp_path)
    swept = load_grid(GRID, ["train.seed=0,1"], check_data=False, check_models=False)
    teacher, student = swept.row("convnext_b-seed0"), swept.row("deit_b_dist_hard-seed0")
    latest = {teacher.key: RunRecord("t", teacher.key, "convnext_b", "FINISHED", 0, {})}
    decisions = plan_launch(swept, latest, rows=[student.id])
    with pytest.raises(GridError) as err:  # the finished run's checkpoint is not there
        locate_checkpoints(swept, decisions, latest)
    (problem,) = err.value.problems
    assert "row 'deit_b_dist_hard-seed0'" in problem and "as row 'convnext_b'" in problem
    assert "convnext_b/best.pt" in problem
    assert problem.endswith("--rows convnext_b-seed0,deit_b_dist_hard-seed0 --force")

    written = Path(teacher.config.output_dir) / "convnext_b" / "best.pt"
    written.parent.mkdir(parents=True)
    written.write_bytes(b"weights")
    located = {d.row.id: d.row for d in locate_checkpoints(swept, decisions, latest)}
    assert dependency_checkpoint(located[student.id], teacher.id) == written
    # what the job gets: the row through its JSON file
    from kd.grid import Row

    again = Row.from_dict(located[student.id].to_dict())
    assert dependency_checkpoint(again, teacher.id) == written
    # a dependency in its own folder is left as it was
    own = {teacher.key: RunRecord("t", teacher.key, teacher.id, "FINISHED", 0, {})}
    (Path(teacher.config.output_dir) / teacher.id).mkdir()
    (Path(teacher.config.output_dir) / teacher.id / "best.pt").write_bytes(b"w")
    (row,) = (d.row for d in locate_checkpoints(swept, decisions, own) if d.row.id == student.id)
    assert row.dependency_dirs == ()

    # the folder the run recorded wins (another output root, say)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "best.pt").parent.mkdir(parents=True)
    (elsewhere / "best.pt").write_bytes(b"w")
    tagged = {
        teacher.key: RunRecord(
            "t", teacher.key, "convnext_b", "FINISHED", 0, {"kdgrid.output_dir": str(elsewhere)}
        )
    }
    (row,) = (d.row for d in locate_checkpoints(swept, decisions, tagged) if d.row.id == student.id)
    assert dependency_checkpoint(row, teacher.id) == elsewhere / "best.pt"


def test_a_teacher_with_its_own_output_dir_is_read_from_there(tmp_path):
    from slurmtools import TINY_MODEL, write_grid

    from kd.grid import dependency_checkpoint
    from kd.plan import locate_checkpoints

    path = write_grid(
        tmp_path,
        "roots",
        [
            {"id": "teacher", "label": "R-1", "output_dir": "teachers"},
            {"id": "student", "label": "R-2", "teacher": {"row": "teacher", "model": TINY_MODEL}},
        ],
        tmp_path / "data",
        epochs=1,
    )
    roots = load_grid(path, check_data=False, check_models=False)
    decisions = locate_checkpoints(roots, plan_launch(roots, {}), {})
    student = next(d.row for d in decisions if d.row.id == "student")
    assert dependency_checkpoint(student, "teacher") == Path("teachers/teacher/best.pt")
