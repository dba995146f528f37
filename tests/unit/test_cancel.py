"""`launch/grid.py --cancel` against a job that opens its run at the same moment
(`kd.train.start_row_run`), on a real MLflow SQLite store: the end-to-end races are in
tests/e2e/test_launch_local.py and tests/slurm/test_slurm.py."""

from __future__ import annotations

import pytest

from kd.tracking import CANCEL_REASON, CANCELLED, RowRun, Tracker
from kd.train import RunCancelled, start_row_run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """One MLflow SQLite store (made once: seconds), a row and a CPU Accelerator."""
    from accelerate import Accelerator

    from kd.grid import load_grid

    folder = tmp_path_factory.mktemp("cancel")
    grid_file = folder / "g.yaml"
    grid_file.write_text(
        "name: cr\nexperiment: cr\n"
        f"defaults: {{output_dir: {folder}/out, data: {{dataset: imagefolder, root: /nowhere}}}}\n"
        "rows: [{id: r1, label: C-1, student: {model: test_resnet}}]\n"
    )
    (row,) = load_grid(grid_file, check_data=False).rows
    return Tracker(f"sqlite:///{folder}/mlflow.db"), row, Accelerator(cpu=True)


@pytest.fixture
def scheduled(store):
    """A new SCHEDULED row run, as a launch leaves it."""
    tracker, row, accelerator = store
    run_id = tracker.create_row_run(tracker.ensure_experiment("cr"), row, executor="local")
    return tracker, row, run_id, accelerator


def test_a_job_does_not_open_a_run_cancelled_before_it_started(scheduled) -> None:
    tracker, row, run_id, accelerator = scheduled
    tracker.cancel_run(run_id, CANCEL_REASON)
    with pytest.raises(RunCancelled, match=r"\[r1\] not trained: its run was cancelled"):
        start_row_run(row, accelerator, RowRun(tracker.uri, run_id), print)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["kdgrid.failure_reason"] == CANCEL_REASON
    assert "kdgrid.started_at_ms" not in run.data.tags  # never marked RUNNING


def test_a_cancel_between_the_jobs_check_and_its_running_wins(scheduled, monkeypatch) -> None:
    """The cancel lands after the job's first check, before it marks the run RUNNING: the
    job's second check sees it, and the run ends KILLED, not RUNNING."""
    import kd.train.runner

    tracker, row, run_id, accelerator = scheduled
    monkeypatch.setattr(
        kd.train.runner, "pause", lambda *a, **k: tracker.cancel_run(run_id, CANCEL_REASON)
    )
    with pytest.raises(RunCancelled):
        start_row_run(row, accelerator, RowRun(tracker.uri, run_id), print)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["kdgrid.failure_reason"] == CANCEL_REASON


def test_a_cancelled_run_scheduled_again_is_opened(scheduled) -> None:
    """`--rerun-failed` reopens a cancelled run (to resume it): the cancel no longer holds."""
    tracker, row, run_id, accelerator = scheduled
    tracker.cancel_run(run_id, CANCEL_REASON)
    tracker.reopen_row_run(run_id, executor="local")
    assert CANCELLED not in tracker.client.get_run(run_id).data.tags
    mlrun = RowRun(tracker.uri, run_id)
    start_row_run(row, accelerator, mlrun, print)
    try:
        assert tracker.run_status(run_id) == "RUNNING"
    finally:
        mlrun.finish("FINISHED")


def test_scancel_gets_each_array_as_ranges_of_exactly_the_tasks_given() -> None:
    from slurm.state import job_specs

    assert job_specs(["5_0", "5_1", "5_2", "5_4", "7", "9_3", "5_2"]) == ["7", "5_[0-2,4]", "9_[3]"]
    assert job_specs([f"12_{i}" for i in range(10000)]) == ["12_[0-9999]"]
    assert job_specs([f"12_{i}" for i in range(0, 10, 2)]) == ["12_[0,2,4,6,8]"]
    assert job_specs([]) == []
