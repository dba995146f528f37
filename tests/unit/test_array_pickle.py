"""A job array's tasks share one pickle (slurm/submit.py, slurm/job.py `ArrayRowJob`,
slurm/array_task.py on the node): each task links its pickle to it and reads its own row, and a
requeue (submitit's own checkpoint code, run here as on a node) gives that task a pickle of its
own without touching the others'. sbatch and the node are tested on the cluster
(tests/slurm/test_slurm.py)."""

from __future__ import annotations

from pathlib import Path

from submitit.core.job_environment import _checkpoint
from submitit.core.utils import DelayedSubmission, JobPaths

from kd.grid import load_grid
from slurm.array_task import link_task_pickle
from slurm.job import ArrayRowJob, RowJob

GRIDS = Path(__file__).resolve().parents[2] / "grids"
URI = "sqlite:////tracking/mlflow.db"


def test_tasks_read_their_row_and_a_requeue_gets_its_own_pickle(tmp_path, monkeypatch):
    rows = load_grid(GRIDS / "table2b.yaml", check_data=False, smoke=True).rows[:3]
    shared: dict = {}
    task = ArrayRowJob([r.to_dict(shared) for r in rows], ["run0", "run1", "run2"], URI)
    shared_pickle = tmp_path / "slurm" / "array_x.pkl"  # written before sbatch
    shared_pickle.parent.mkdir()
    delayed = DelayedSubmission(task)
    delayed.set_timeout(5, 3)
    delayed.dump(shared_pickle)
    folder = tmp_path / "slurm" / "%A"  # as the launcher gives submitit
    for index in range(3):  # each task on its node (twice: a second process of the task)
        for _ in range(2):
            link_task_pickle(JobPaths(folder, job_id=f"42_{index}").submitted_pickle, shared_pickle)

    def loaded(index: int) -> DelayedSubmission:
        return DelayedSubmission.load(JobPaths(folder, job_id=f"42_{index}").submitted_pickle)

    for index, row in enumerate(rows):  # what each task finds where submitit looks
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        job = loaded(index)
        assert type(job.function) is ArrayRowJob
        assert job.function._task() == (row.to_dict(), f"run{index}")

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # task 1 gets USR2: submitit checkpoints it
    path = JobPaths(folder, job_id="42_1").submitted_pickle
    assert _checkpoint(loaded(1), path, countdown=2) == ""  # "" = requeue
    assert not path.samefile(shared_pickle)
    requeued = DelayedSubmission.load(path)
    assert type(requeued.function) is RowJob
    assert requeued.args == (rows[1].to_dict(), "run1", URI)
    assert requeued._timeout_countdown == 2
    link_task_pickle(path, shared_pickle)  # the requeued task keeps its own
    assert type(DelayedSubmission.load(path).function) is RowJob
    for other in (0, 2):  # the other tasks still read the shared pickle, unchanged
        assert JobPaths(folder, job_id=f"42_{other}").submitted_pickle.samefile(shared_pickle)
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(other))
        assert loaded(other).function._task() == (rows[other].to_dict(), f"run{other}")
