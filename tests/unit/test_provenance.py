"""Which run's checkpoint a row was trained from (kd/provenance.py), and what the launcher,
status and the trainer do with it: a resume never mixes two runs of a teacher, and a finished
row whose teacher has been rerun since is called stale. Real checkpoint files, real state.json;
run records are made up (no MLflow store: the end-to-end check is in test_launch_local)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from slurmtools import TINY_MODEL, write_grid

from kd import provenance, rowfiles
from kd import train as T
from kd.checkpoint import atomic_save
from kd.grid import Grid, load_grid
from kd.plan import plan_launch
from kd.tracking import RunRecord
from slurm.launcher import resumable_runs

GRID = Path(__file__).resolve().parents[2] / "grids" / "table2b.yaml"


@pytest.fixture
def grid(tmp_path, monkeypatch) -> Grid:
    monkeypatch.chdir(tmp_path)  # rows write under ./outputs
    return load_grid(GRID, check_data=False, check_models=False)


def record(grid: Grid, row_id: str, status: str, run_id: str | None = None, **tags) -> RunRecord:
    row = grid.row(row_id)
    return RunRecord(run_id or f"run-{row_id}", row.key, row_id, status, 0, tags)


def test_a_checkpoint_names_the_run_that_wrote_it(grid):
    row = grid.row("convnext_b")
    path = row.output_dir / "best.pt"
    path.parent.mkdir(parents=True)
    model = {"weight": torch.ones(3)}
    checkpoint = T.model_checkpoint(row, model, {}, 0, {"acc1": 1.0}, 10, "run-a")
    atomic_save(checkpoint, path)  # the dict the loop writes, row config included
    assert provenance.checkpoint_run_id(path) == "run-a"
    student = grid.row("deit_b_dist_hard")
    assert provenance.dependency_runs(student) == {"convnext_b": "run-a"}

    atomic_save({"model": model}, path)  # a checkpoint from before run ids were written
    assert provenance.checkpoint_run_id(path) == provenance.UNKNOWN_RUN
    path.write_bytes(b"not a checkpoint")
    assert provenance.checkpoint_run_id(path) == provenance.UNKNOWN_RUN


def tagged(grid: Grid, row_id: str, run_id: str, started: int = 10, **used: str) -> RunRecord:
    """A FINISHED run of `row_id` that read the given dependency runs (`used`: dep -> run)."""
    tags = {provenance.dependency_tag(dep): run for dep, run in used.items()}
    tags["kdgrid.started_at_ms"] = str(started)
    row = grid.row(row_id)
    return RunRecord(run_id, row.key, row_id, "FINISHED", started - 5, tags)


def latest_of(*records: RunRecord) -> dict[str, RunRecord]:
    return {r.key: r for r in records}


def test_a_finished_row_is_stale_once_its_teacher_is_rerun(grid):
    teacher = record(grid, "convnext_b", "FINISHED", "run-1")
    init = record(grid, "deit_b_dist", "FINISHED", "run-init")
    student = tagged(
        grid, "deit_b_dist_hard_ft", "run-s", convnext_b="run-1", deit_b_dist="run-init"
    )
    assert provenance.stale_rows(grid, latest_of(teacher, init, student)) == {}

    running = record(grid, "convnext_b", "RUNNING", "run-2")
    reason = provenance.stale_rows(grid, latest_of(running, init, student))["deit_b_dist_hard_ft"]
    assert reason.startswith("stale: row 'convnext_b' is being rerun (run run-2, running)")
    assert "trained from its run run-1" in reason and "once it has finished" in reason
    assert reason.endswith(f"python launch/grid.py {grid.file} --rows deit_b_dist_hard_ft --force")

    finished = record(grid, "convnext_b", "FINISHED", "run-2")
    reason = provenance.stale_rows(grid, latest_of(finished, init, student))["deit_b_dist_hard_ft"]
    assert "row 'convnext_b' has finished again (run run-2)" in reason

    # a failed rerun may have left partial weights in best.pt: finish it first, then the row
    failed = record(grid, "convnext_b", "FAILED", "run-2")
    reason = provenance.stale_rows(grid, latest_of(failed, init, student))["deit_b_dist_hard_ft"]
    assert "(run run-2, failed)" in reason and "may hold that run's partial weights" in reason
    assert "--rows convnext_b --rerun-failed" in reason


def test_a_row_that_reads_a_stale_row_is_stale(tmp_path):
    """teacher -> student -> grandstudent (init from the student): after a rerun of the
    teacher, the student is stale, and so is the row trained from the student."""
    path = write_grid(
        tmp_path,
        "chain",
        [
            {"id": "teacher", "label": "C-1"},
            {"id": "student", "label": "C-2", "teacher": {"row": "teacher", "model": TINY_MODEL}},
            {"id": "grand", "label": "C-3", "init": {"row": "student"}},
        ],
        tmp_path / "data",
        epochs=1,
    )
    chain = load_grid(path, check_data=False, check_models=False)
    student = tagged(chain, "student", "run-s", teacher="run-t1")
    grand = tagged(chain, "grand", "run-g", student="run-s")
    first = record(chain, "teacher", "FINISHED", "run-t1")
    assert provenance.stale_rows(chain, latest_of(first, student, grand)) == {}
    again = record(chain, "teacher", "FINISHED", "run-t2")
    reasons = provenance.stale_rows(chain, latest_of(again, student, grand))
    assert reasons["student"].startswith("stale: row 'teacher' has finished again")
    assert reasons["grand"].startswith("stale: it was trained from row 'student', which is stale")


def test_rows_trained_before_runs_were_recorded_are_judged_by_time(grid):
    student = tagged(grid, "deit_b_dist_hard", "run-s", started=1_000)  # no dependency tag
    before = RunRecord("run-1", grid.row("convnext_b").key, "convnext_b", "FINISHED", 900, {})
    assert provenance.stale_rows(grid, latest_of(before, student)) == {}
    after = RunRecord("run-2", grid.row("convnext_b").key, "convnext_b", "FINISHED", 2_000, {})
    reason = provenance.stale_rows(grid, latest_of(after, student))["deit_b_dist_hard"]
    assert "has finished again (run run-2) since this row started training" in reason
    unknown = tagged(grid, "deit_b_dist_hard", "run-s", started=1_000, convnext_b="unknown")
    assert "deit_b_dist_hard" in provenance.stale_rows(grid, latest_of(after, unknown))


def write_state(row, run_id: str, dependency_runs: dict | None) -> None:
    info = {"run_id": run_id, "key": row.key, "epoch": 1, "epochs": 2}
    if dependency_runs is not None:
        info["dependency_runs"] = dependency_runs
    row.output_dir.mkdir(parents=True, exist_ok=True)
    (row.output_dir / rowfiles.STATE_INFO).write_text(json.dumps(info))


def write_best(row, run_id: str | None) -> None:
    """The row's best.pt as the loop writes it (no run id: as written before they were)."""
    row.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = T.model_checkpoint(row, {"w": torch.ones(2)}, {}, 0, {"acc1": 1.0}, 10, run_id)
    if run_id is None:
        del checkpoint["run_id"]
    atomic_save(checkpoint, row.output_dir / "best.pt")


U = provenance.UNKNOWN_RUN


@pytest.mark.parametrize(
    ("saved", "teacher_file", "force_teacher", "resumes"),
    [
        ({"convnext_b": "run-1"}, "run-1", False, True),  # the same teacher checkpoint: resume
        ({"convnext_b": "run-1"}, "run-2", False, False),  # the teacher was rerun since
        ({"convnext_b": "run-1"}, "run-1", True, False),  # the teacher runs again in this launch
        (None, "run-2", False, True),  # a state from before runs were recorded
        ({"convnext_b": U}, None, False, True),  # the same old-format teacher file
        ({"convnext_b": U}, "run-2", False, False),  # an old file only gets an id by a rewrite
    ],
)
def test_a_crashed_row_resumes_only_from_the_teacher_checkpoint_it_trained_with(
    grid, saved, teacher_file, force_teacher, resumes
):
    teacher, student = grid.row("convnext_b"), grid.row("deit_b_dist_hard")
    write_best(teacher, teacher_file)
    write_state(student, "run-student", saved)
    latest = latest_of(
        record(grid, "convnext_b", "FINISHED", teacher_file or "run-old"),
        record(grid, "deit_b_dist_hard", "FAILED", "run-student"),
    )
    rows = ["convnext_b", "deit_b_dist_hard"] if force_teacher else ["deit_b_dist_hard"]
    decisions = plan_launch(grid, latest, rows=rows, force=force_teacher)
    assert resumable_runs(decisions) == ({"deit_b_dist_hard": "run-student"} if resumes else {})
    # the trainer, reading the same file, agrees with the launcher
    now = provenance.dependency_runs(student)
    state = {"epoch": 0, **({"dependency_runs": saved} if saved is not None else {})}
    if resumes or force_teacher:
        T.check_same_dependencies(student, state, now)
    else:
        with pytest.raises(T.DependencyChanged):
            T.check_same_dependencies(student, state, now)


def test_the_trainer_refuses_to_resume_across_a_teacher_rerun(grid):
    row = grid.row("deit_b_dist_hard")
    state = {"epoch": 3, "dependency_runs": {"convnext_b": "run-1"}}
    T.check_same_dependencies(row, state, {"convnext_b": "run-1"})
    T.check_same_dependencies(row, {"epoch": 3}, {"convnext_b": "run-2"})  # an older state
    with pytest.raises(T.DependencyChanged) as err:
        T.check_same_dependencies(row, state, {"convnext_b": "run-2"})
    message = str(err.value)
    assert "row 'deit_b_dist_hard'" in message and "epoch 4" in message
    assert (
        "run-1" in message and "run-2" in message and "--rows deit_b_dist_hard --force" in message
    )
