"""The row job: what runs on a node (or in a local process) for one row.

`python -m slurm.job ROW_JSON --run-id ID --tracking-uri URI` trains the row described by the
JSON file the local executor wrote; a SLURM job (`RowJob`, run by submitit) gets the same row
as a dict in its pickle. Both end in `kd.train.run`, so a row trains the same way wherever it
runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from kd.grid import Row
from kd.rowfiles import ROW_JSON


def write_row_file(row: Row) -> Path:
    """The row as its job will read it, in the row's own output folder."""
    row.output_dir.mkdir(parents=True, exist_ok=True)
    path = row.output_dir / ROW_JSON
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row.to_dict(), indent=1, default=str))
    os.replace(tmp, path)
    return path


def read_row_file(path: str | Path) -> Row:
    return Row.from_dict(json.loads(Path(path).read_text()))


def job_row(row: str | dict[str, Any]) -> Row:
    """The row a SLURM job trains: carried in its submitit pickle as `Row.to_dict()` (one
    file per task, not a pickle and a row.json), or, in jobs queued by earlier versions, the
    path of its row.json."""
    return Row.from_dict(row) if isinstance(row, dict) else read_row_file(row)


def _threads_from_allocation() -> None:
    """As many CPU threads as the task was given (--cpus-per-task), unless OMP_NUM_THREADS says.

    torch otherwise starts one per core of the node, whatever the allocation: tasks sharing a
    node oversubscribe it, and OpenMP threads spinning against each other slowed a 1-CPU row
    5-10x on a busy 2-core node. (The local executor shares threads out the same way.)"""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0 and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        os.environ["OMP_NUM_THREADS"] = cpus  # for processes the row starts (loader workers)
        torch.set_num_threads(int(cpus))


class RowJob:
    """The callable submitit runs on the node(s): one row, resumable, requeued on preemption.

    On SLURM's USR2 (preemption, or the time limit coming) submitit calls `checkpoint()`, which
    resubmits this same call: the row's state is saved at every epoch end, so the requeued job
    resumes at the next epoch into the same MLflow run. With several tasks (nodes x GPUs) each
    task exports torch.distributed's environment and Accelerate trains across all of them.
    """

    def __call__(
        self, row_data: str | dict[str, Any], run_id: str, tracking_uri: str
    ) -> dict[str, float]:
        import submitit

        from kd.tracking import TAG, RowRun
        from kd.train import RunCancelled, run

        env = submitit.JobEnvironment()
        _threads_from_allocation()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        row = job_row(row_data)
        if env.global_rank == 0:
            RowRun(tracking_uri, run_id).set_tag(f"{TAG}.job_id", str(env.job_id))
        try:
            result = run(row, run_id=run_id, tracking_uri=tracking_uri)
        except RunCancelled as exc:  # the job ends quietly; its run stays KILLED
            print(exc, flush=True)
            return {}
        # The row is finished. A USR2 from now on (the time limit coming while the process
        # winds down) must not kill it: at exit Python puts back the default action of the
        # signals it handles, and USR2's default terminates the process, so SLURM recorded
        # FAILED for a row that finished. An ignored signal stays ignored through the exit.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return result

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(RowJob(), *args, **kwargs)


class ArrayRowJob:
    """A job array's rows in one pickle: task i trains `rows[i]` into `run_ids[i]`.

    submitit writes one pickle per array task; for a 10,000-row grid that was 10,000 files,
    seconds of a launch. The launcher writes this object once per array and links each task's
    pickle to it (slurm/submit.py). A requeue (USR2) gives the task a pickle of its own, a
    plain `RowJob` of its row: submitit replaces the link with that file, the others keep
    theirs."""

    def __init__(self, rows: list[dict[str, Any]], run_ids: list[str], tracking_uri: str):
        self.rows, self.run_ids, self.tracking_uri = rows, run_ids, tracking_uri

    def _task(self) -> tuple[dict[str, Any], str]:
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
        return self.rows[index], self.run_ids[index]

    def __call__(self) -> dict[str, float]:
        row, run_id = self._task()
        return RowJob()(row, run_id, self.tracking_uri)

    def checkpoint(self, *args, **kwargs):
        import submitit

        row, run_id = self._task()
        return submitit.helpers.DelayedSubmission(RowJob(), row, run_id, self.tracking_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.job", description=__doc__)
    parser.add_argument("row_file")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--tracking-uri", required=True)
    args = parser.parse_args(argv)
    from kd.train import RunCancelled, run

    row = read_row_file(args.row_file)
    try:
        run(row, run_id=args.run_id, tracking_uri=args.tracking_uri)
    except RunCancelled as exc:  # its run stays KILLED, as the cancel left it
        print(exc, flush=True)
        return 0
    except Exception as exc:
        print(f"[{row.id}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
