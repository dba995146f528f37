"""What a task of a kdgrid job array runs on its node, in place of submitit's own
`python -m submitit.core._submit FOLDER`:

    python -u -m slurm.array_task FOLDER SHARED_PICKLE

The launcher writes one pickle per array (`slurm.job.ArrayRowJob`, every task's row) instead of
one per task (slurm/submit.py). submitit on the node looks for the task's own pickle,
`<array>_<task>_submitted.pkl`; this links it to the shared one, then hands over to submitit
(`process_job`): signals, requeue, results and logs are submitit's. A requeue that checkpoints
(USR2) replaces the task's link with a pickle of its own; a requeue that does not finds its
link again. Every process of a multi-task row links the same name: the first one wins.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def link_task_pickle(task_pickle: Path, shared: Path) -> None:
    """The task's pickle as a hard link to the array's (a symbolic one where the folder's
    filesystem has no hard links); nothing when the task has one (a requeued task)."""
    if task_pickle.exists():
        return
    task_pickle.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(shared, task_pickle)
    except FileExistsError:  # another process of the same task was first
        pass
    except OSError:
        with contextlib.suppress(FileExistsError):
            task_pickle.symlink_to(shared.resolve())


def main(argv: list[str] | None = None) -> None:
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.submission import process_job

    folder, shared = argv if argv is not None else sys.argv[1:]
    os.environ["SUBMITIT_FOLDER"] = folder  # as process_job sets it, for JobEnvironment's paths
    link_task_pickle(JobEnvironment().paths.submitted_pickle, Path(shared))
    process_job(folder)


if __name__ == "__main__":
    main()
