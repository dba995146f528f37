"""`run(row)`: one row from start to end on this process group: Accelerate, the row's MLflow run
(opened, or resumed after a requeue), build, the epoch loop, and the run's final status."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    broadcast_object_list,
    set_seed,
)

from kd import config as C
from kd import tracking
from kd.grid import Row
from kd.inject import RUN_START_PAUSE, pause
from kd.models import count_params
from kd.rowfiles import saved_state_info
from kd.train.build import Built, build, loss_reads_class_head, mixed_precision
from kd.train.loop import StopRequested, train


def run(
    row: Row,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    stop_requested: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train one row to the end (or resume it) and return its final metrics.

    `run_id` is the row's MLflow run (created by the launcher); None means create one here.
    `stop_requested` is polled between epochs, once the epoch's files are written; when it
    returns True `StopRequested` is raised so the caller can requeue.
    """
    log = log or _print
    accelerator = make_accelerator(row.config)
    run_id, mlrun = open_row_run(row, accelerator, run_id, tracking_uri)
    row.output_dir.mkdir(parents=True, exist_ok=True)
    done = _finished_already(row, run_id, mlrun) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        done = broadcast_object_list([done], from_process=0)[0]
    if done is not None:
        log(f"[{row.id}] already finished in run {run_id}; nothing to do")
        accelerator.end_training()
        return done
    try:
        start_row_run(row, accelerator, mlrun, log)
        set_seed(row.config.train.seed)
        built = build(row, accelerator)
        if mlrun:
            mlrun.log_metrics(model_sizes(built), step=0)
        result = train(row, accelerator, built, mlrun, run_id, stop_requested, log)
    except (StopRequested, SystemExit, RunCancelled):
        # Stopping to be requeued (submitit exits with SystemExit after `scontrol requeue`):
        # the run stays open, and the requeued job resumes into it from the saved state. A
        # cancelled run stays as `--cancel` left it.
        raise
    except BaseException as exc:
        record_failure(row, mlrun, exc)
        raise
    if mlrun:
        mlrun.finish("FINISHED")
    accelerator.end_training()
    return result


class RunCancelled(Exception):
    """`launch/grid.py --cancel` closed the row's run before its job opened it: not trained."""


def start_row_run(
    row: Row, accelerator: Accelerator, mlrun: tracking.RowRun | None, log: Callable[[str], None]
) -> None:
    """Mark the run RUNNING, unless `--cancel` closed it: then raise RunCancelled on every
    process. `--cancel` tags the run, closes it, then stops its job; the job checks the tag
    before it marks the run RUNNING and again after. A cancel that came before the second
    check is seen there (a RUNNING just written is closed again); one that came after it finds
    the run RUNNING, with its job there to stop. A cancelled run never stays RUNNING, and no
    job trains into it."""
    cancelled = False
    if mlrun:
        cancelled = mlrun.cancelled()
        if not cancelled:
            pause(  # fault injection (tests): a --cancel while the job starts
                RUN_START_PAUSE,
                until=lambda: mlrun.status() != "SCHEDULED",
                log=lambda text: log(f"[{row.id}] {text}"),
            )
            mlrun.start(
                {
                    "kdgrid.started_at_ms": str(int(time.time() * 1000)),  # start_time: launch
                    "kdgrid.world_size": str(accelerator.num_processes),
                    "kdgrid.device": str(accelerator.device),
                    **tracking.code_tags(),  # the code this job imports: its launch's snapshot
                },
                system_metrics=True,
            )
            mlrun.log_row(row)
            mlrun.log_code_diff()
            cancelled = mlrun.cancelled()
        if cancelled:
            mlrun.finish("KILLED")  # as the cancel left it (a RUNNING just written undone)
    if accelerator.num_processes > 1:
        cancelled = broadcast_object_list([cancelled], from_process=0)[0]
    if cancelled:
        accelerator.end_training()
        raise RunCancelled(
            f"[{row.id}] not trained: its run was cancelled (launch/grid.py --cancel)"
        )


def make_accelerator(cfg: C.RowConfig) -> Accelerator:
    """Accelerate for the row: CPU without CUDA, the row's precision and accumulation."""
    cuda = torch.cuda.is_available()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision(cfg.train.precision, cuda),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        # Pinned batches are copied to the GPU while the previous step still runs.
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=not loss_reads_class_head(cfg))
        ],
    )


def open_row_run(
    row: Row, accelerator: Accelerator, run_id: str | None, tracking_uri: str | None
) -> tuple[str | None, tracking.RowRun | None]:
    """The row's MLflow run id on every process, and the run itself on the main process (a run
    is created here when the launcher made none, as `launch/train.py` does)."""
    main = accelerator.is_main_process
    uri = tracking.tracking_uri_for(tracking_uri)
    if run_id is None and main:
        tracker = tracking.Tracker(uri)
        run_id = tracker.create_row_run(
            tracker.ensure_experiment(row.experiment), row, executor="inline"
        )
    if accelerator.num_processes > 1:
        # Only the main process created the run; every process needs its id, since whether a
        # saved state is resumed depends on it, and all must make the same decision.
        run_id = broadcast_object_list([run_id], from_process=0)[0]
    return run_id, (tracking.RowRun(uri, run_id) if main and run_id else None)


def model_sizes(built: Built) -> dict[str, int]:
    sizes = {"model/params": count_params(built.student)}
    if built.teacher is not None:
        sizes["model/teacher_params"] = count_params(built.teacher)
    return sizes


def record_failure(row: Row, mlrun: tracking.RowRun | None, exc: BaseException) -> None:
    """Close the run as FAILED (KILLED for an interrupt) with the reason; never raise."""
    if mlrun is None:
        return
    if isinstance(exc, tracking.TrackingUnavailable):
        # The store is the problem: recording the failure there would only wait as long again.
        print(f"[{row.id}] the failure could not be recorded in MLflow: {exc}", file=sys.stderr)
        return
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    try:
        mlrun.finish(status, reason=failure_reason(exc))
    except Exception as log_exc:  # the tracking server may be the problem itself
        print(f"[{row.id}] could not record the failure in MLflow: {log_exc}", file=sys.stderr)


def _finished_already(row: Row, run_id: str | None, mlrun: Any) -> dict[str, float] | None:
    """The final metrics when this row's run is FINISHED and its saved state is the last
    epoch's, else None. A job killed after finishing can be started again by SLURM (a
    requeue's SIGTERM is ignored by submitit until SLURM's kill wait is over, time enough to
    finish a short row): it must not reopen the run nor train again."""
    if mlrun is None:
        return None
    info = saved_state_info(row, run_id)
    if info is None or info.get("epoch") != row.config.train.epochs:
        return None
    try:
        metrics = mlrun.finished_metrics()
    except Exception:  # noqa: BLE001 - the store away: carry on, the normal path reports it
        return None
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if not k.startswith(("system/", "model/"))}


def _print(message: str) -> None:
    print(message, flush=True)


def failure_reason(exc: BaseException) -> str:
    """`Type: message` for MLflow's failure_reason tag. An error raised in a DataLoader worker
    (e.g. a corrupt image) reaches the loop with the worker's traceback in its message: keep
    only the error itself, which names the file."""
    text, kind = str(exc), type(exc).__name__
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        name, _, message = (lines[-1] if lines else text).partition(": ")
        if name.split(".")[-1] == kind:  # the worker's `kd.data.DatasetError: ...` line
            return f"{kind}: {message}"
    return f"{kind}: {text}"
