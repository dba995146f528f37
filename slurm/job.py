"""The row job: what runs on a node (or in a local process) for one row.

`python -m slurm.job ROW_JSON --run-id ID --tracking-uri URI` trains the row described by the
JSON file the launcher wrote. The same entry point serves the local executor and SLURM jobs,
so a row travels the same way wherever it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

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

    def __call__(self, row_file: str, run_id: str, tracking_uri: str) -> dict[str, float]:
        import submitit

        from kd.tracking import TAG, RowRun
        from kd.train import RunCancelled, run

        env = submitit.JobEnvironment()
        _threads_from_allocation()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        row = read_row_file(row_file)
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
