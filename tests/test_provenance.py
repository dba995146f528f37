"""Which run's checkpoint a row was trained from (kd/provenance.py), and what the launcher,
status and the trainer do with it: a resume never mixes two runs of a teacher, and a finished
row whose teacher has been rerun since is called stale. Real checkpoint files, real state.json;
run records are made up (no MLflow store: the end-to-end check is in test_launch_local)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd import provenance
from kd import train as T
from kd.checkpoint import atomic_save
from kd.grid import Grid, load_grid
from kd.plan import plan_launch
from kd.tracking import RunRecord
from slurm.launcher import resumable_runs

GRID = Path(__file__).resolve().parent.parent / "grids" / "table2b.yaml"


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
    checkpoint = T._model_checkpoint(row, model, {}, 0, {"acc1": 1.0}, 10, "run-a")
    atomic_save(checkpoint, path)  # the dict the loop writes, row config included
    assert provenance.checkpoint_run_id(path) == "run-a"
    student = grid.row("deit_b_dist_hard")
    assert provenance.dependency_runs(student) == {"convnext_b": "run-a"}

    atomic_save({"model": model}, path)  # a checkpoint from before run ids were written
    assert provenance.checkpoint_run_id(path) == provenance.UNKNOWN_RUN
    path.write_bytes(b"not a checkpoint")
    assert provenance.checkpoint_run_id(path) == provenance.UNKNOWN_RUN


def test_a_finished_row_is_stale_once_its_teacher_finished_again(grid):
    student = grid.row("deit_b_dist_hard_ft")  # teacher convnext_b, init deit_b_dist
    tags = {
        provenance.dependency_tag("convnext_b"): "run-1",
        provenance.dependency_tag("deit_b_dist"): "run-init",
    }
    teacher_key, init_key = grid.row("convnext_b").key, grid.row("deit_b_dist").key
    latest = {
        teacher_key: record(grid, "convnext_b", "FINISHED", "run-1"),
        init_key: record(grid, "deit_b_dist", "FINISHED", "run-init"),
    }
    assert provenance.stale_reason(grid, student, tags, latest) is None

    latest[teacher_key] = record(grid, "convnext_b", "RUNNING", "run-2")
    reason = provenance.stale_reason(grid, student, tags, latest)
    assert reason.startswith("stale: row 'convnext_b' was rerun (running) (run run-2)")
    assert "run-1" in reason and "--rows deit_b_dist_hard_ft --force" in reason

    latest[teacher_key] = record(grid, "convnext_b", "FINISHED", "run-2")
    assert "has finished again (run run-2)" in provenance.stale_reason(grid, student, tags, latest)

    # a row trained before runs were recorded, or from an old checkpoint, is never called stale
    assert provenance.stale_reason(grid, student, {}, latest) is None
    unknown = {provenance.dependency_tag("convnext_b"): provenance.UNKNOWN_RUN}
    assert provenance.stale_reason(grid, student, unknown, latest) is None


def write_state(row, run_id: str, dependency_runs: dict | None) -> None:
    info = {"run_id": run_id, "key": row.key, "epoch": 1, "epochs": 2}
    if dependency_runs is not None:
        info["dependency_runs"] = dependency_runs
    row.output_dir.mkdir(parents=True, exist_ok=True)
    (row.output_dir / T.STATE_INFO_FILE).write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("saved", "teacher_run", "force_teacher", "resumes"),
    [
        ({"convnext_b": "run-1"}, "run-1", False, True),  # same teacher run: resume
        ({"convnext_b": "run-1"}, "run-2", False, False),  # teacher finished again since
        ({"convnext_b": "run-1"}, "run-1", True, False),  # teacher rerun in this launch
        (None, "run-2", False, True),  # state from before runs were recorded
        ({"convnext_b": provenance.UNKNOWN_RUN}, "run-2", False, True),  # an old teacher file
        ({"convnext_b": provenance.UNKNOWN_RUN}, "run-1", True, False),
    ],
)
def test_a_crashed_row_resumes_only_with_the_teacher_run_it_trained_from(
    grid, saved, teacher_run, force_teacher, resumes
):
    student = grid.row("deit_b_dist_hard")
    write_state(student, "run-student", saved)
    latest = {
        grid.row("convnext_b").key: record(grid, "convnext_b", "FINISHED", teacher_run),
        student.key: record(grid, "deit_b_dist_hard", "FAILED", "run-student"),
    }
    rows = ["convnext_b", "deit_b_dist_hard"] if force_teacher else ["deit_b_dist_hard"]
    decisions = plan_launch(grid, latest, rows=rows, force=force_teacher)
    expected = {"deit_b_dist_hard": "run-student"} if resumes else {}
    assert resumable_runs(grid, decisions, latest) == expected


def test_the_trainer_refuses_to_resume_across_a_teacher_rerun(grid):
    row = grid.row("deit_b_dist_hard")
    state = {"epoch": 3, "dependency_runs": {"convnext_b": "run-1"}}
    T._check_same_dependencies(row, state, {"convnext_b": "run-1"})
    T._check_same_dependencies(row, {"epoch": 3}, {"convnext_b": "run-2"})  # an older state
    unknown = {"epoch": 3, "dependency_runs": {"convnext_b": provenance.UNKNOWN_RUN}}
    T._check_same_dependencies(row, unknown, {"convnext_b": "run-2"})  # as the launcher decides
    with pytest.raises(T.DependencyChanged) as err:
        T._check_same_dependencies(row, state, {"convnext_b": "run-2"})
    message = str(err.value)
    assert "row 'deit_b_dist_hard'" in message and "epoch 4" in message
    assert (
        "run-1" in message and "run-2" in message and "--rows deit_b_dist_hard --force" in message
    )
