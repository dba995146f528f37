"""Where every row of a grid stands: MLflow (what the row recorded) and SLURM (what the job did).

One MLflow search, one `sacct` call and one `squeue` call for the whole grid. MLflow is the
truth about results, SLURM about jobs: a job SLURM calls COMPLETED whose run never finished is
failed; a run still marked RUNNING whose job timed out is a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from kd.codesnap import code_note, read_code
from kd.grid import Grid, Row
from kd.provenance import stale_rows
from kd.tracking import (
    CANCEL_REASON,
    TAG,
    CancelRuns,
    RunRecord,
    latest_grid_runs,
    store_exists,
)
from slurm.held import CLUSTER_LIMIT, is_held
from slurm.interrupted import NEVER_QUEUED, launcher_gone, never_queued
from slurm.state import GONE, JobState, cancel, held_after_failure, slurm_jobs

STATES = (
    "not_submitted",
    "held",
    "pending",
    "running",
    "finished",
    "failed",
    "timeout",
    "preempted",
    "cancelled",
    "skipped",
)
SLURM_TO_STATE = {
    "PENDING": "pending",
    "REQUEUED": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "CONFIGURING": "running",
    "SUSPENDED": "preempted",
    "PREEMPTED": "preempted",
    "TIMEOUT": "timeout",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "timeout",
    "COMPLETED": "failed",  # only reached when the run did not finish (see row_state)
    GONE: "failed",  # no job of ours under its id any more (slurm.state.job_states)
}


@dataclass(frozen=True)
class RowStatus:
    id: str
    label: str
    state: str
    job_id: str | None
    nodes: str | None
    elapsed_s: int | None
    epoch: int | None
    epochs: int
    acc1: float | None
    run_id: str | None
    reason: str | None
    code_hash: str | None = None  # the code the latest run was trained by (kd.codesnap)
    other_code: str | None = None  # finished, by other code than this checkout: how so

    def to_dict(self) -> dict:
        return asdict(self)


def row_state(
    record: RunRecord | None, job: JobState | None, local_alive: bool | None
) -> tuple[str, str | None]:
    """(state, reason) of one row from its latest run and its job."""
    if record is None:
        return "not_submitted", None
    reason = record.tags.get(f"{TAG}.failure_reason")
    if record.status == "FINISHED":
        return "finished", None
    if job is not None and held_after_failure(record.status, job):  # a launch leaves it alone
        state = SLURM_TO_STATE.get(job.state, "pending")
        why = f"{job.state.lower()}{', ' + job.reason if job.reason else ''}"
        return state, f"its job is still in SLURM ({why}) after: {reason or record.status.lower()}"
    if record.status == "FAILED":
        if job is not None and job.state in ("TIMEOUT", "DEADLINE"):
            return "timeout", reason
        return "failed", reason
    if record.status == "KILLED":
        if reason and ("dependency" in reason or "not started" in reason):
            return "skipped", reason
        return "cancelled", reason
    # SCHEDULED or RUNNING in MLflow: ask the executor
    if local_alive is not None:
        if not local_alive:
            return "failed", "the local process is gone"
        return ("running" if record.status == "RUNNING" else "pending"), None
    if job is None:
        if is_held(record):  # waits for room on the cluster (slurm/held.py)
            return "held", CLUSTER_LIMIT
        if never_queued(record) and launcher_gone(record):
            return "failed", NEVER_QUEUED
        return ("running" if record.status == "RUNNING" else "pending"), None
    state = SLURM_TO_STATE.get(job.state, "pending")
    if job.state == "COMPLETED":
        return "failed", "SLURM says COMPLETED but the run never finished; see the job log"
    if (
        job.state == "CANCELLED"
        and not job.cancelled_by
        and ("Dependency" in job.reason or not job.nodes)
    ):
        # cancelled by SLURM itself (--kill-on-invalid-dep), not by a user, before it started: a
        # dependency failed (sacct keeps the pending reason "Dependency" only when the scheduler
        # got to set it before the cancel)
        return "skipped", "a dependency failed; SLURM cancelled the job"
    return state, job.reason or None


def grid_status(grid: Grid, tracking_uri: str) -> list[RowStatus]:
    summaries = latest_grid_runs(tracking_uri, grid.experiment, grid.name)
    latest = {key: summary.record for key, summary in summaries.items()}
    metrics = {
        summary.record.run_id: {
            "metrics": summary.metrics,
            "end": summary.end_time,
            "start": summary.start_time,
        }
        for summary in summaries.values()
    }
    jobs = slurm_jobs(latest.values())
    stale = stale_rows(grid, latest)
    checkout = read_code()  # rows trained by other code than this checkout are noted
    out = []
    for row in grid.rows:
        record = latest.get(row.key)
        job = jobs.get(record.job_id) if record is not None and record.job_id else None
        local_alive = None
        if record is not None and record.tags.get(f"{TAG}.executor") in ("local", "inline"):
            from slurm.local import local_run_alive

            local_alive = (
                local_run_alive(record.tags) if record.status in ("SCHEDULED", "RUNNING") else True
            )
        state, reason = row_state(record, job, local_alive)
        other_code = None
        if state == "finished":
            other_code = code_note(record.tags, checkout, TAG)
            reason = stale.get(row.id)
        info = metrics.get(record.run_id, {}) if record else {}
        values = info.get("metrics", {})
        known = job is not None and job.state != GONE
        elapsed = job.elapsed_s if known else _elapsed(record, info)
        out.append(
            RowStatus(
                id=row.id,
                label=row.label,
                state=state,
                job_id=record.job_id if record else None,
                nodes=(job.nodes or None) if known else None,
                elapsed_s=elapsed,
                epoch=int(values["epoch"]) if "epoch" in values else None,
                epochs=row.config.train.epochs,
                acc1=values.get("val/acc1"),
                run_id=record.run_id if record else None,
                reason=reason,
                code_hash=record.tags.get(f"{TAG}.code_hash") if record else None,
                other_code=other_code,
            )
        )
    return out


def _elapsed(record: RunRecord | None, info: dict) -> int | None:
    if record is None:
        return None
    started = record.tags.get(f"{TAG}.started_at_ms")
    if started is None:
        return None
    end = info.get("end") or int(time.time() * 1000)
    return max(0, int((end - int(started)) / 1000))


def format_table(rows: Iterable[RowStatus]) -> str:
    headers = ["id", "label", "state", "job", "nodes", "elapsed", "epoch", "acc1", "note"]
    lines = []
    for s in rows:
        lines.append(
            [
                s.id,
                s.label,
                f"{s.state}: {s.reason}" if s.state == "held" else s.state,
                s.job_id or "-",
                s.nodes or "-",
                _hms(s.elapsed_s),
                f"{s.epoch}/{s.epochs}" if s.epoch is not None else f"-/{s.epochs}",
                f"{s.acc1:.2f}" if s.acc1 is not None else "-",
                "" if s.state == "held" else (s.reason or s.other_code or "")[:60],
            ]
        )
    widths = [max(len(str(r[i])) for r in [headers, *lines]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *lines]
    )


def _hms(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cancel_rows(grid: Grid, rows: list[Row], tracking_uri: str) -> list[str]:
    """Cancel the rows that are pending or running: mark their runs KILLED, then cancel their
    jobs (or stop their local processes). Returns the ids of the rows cancelled.

    Marking comes first, with the cancel tag (`CancelRuns.cancel_runs`): a row's job that starts
    meanwhile sees it and does not train (`kd.train.start_row_run`), and one that started
    before is found by the tags as they are once the runs are marked (a local process the
    executor started meanwhile has its pid there by then)."""
    if not store_exists(tracking_uri):
        return []
    runs = CancelRuns(tracking_uri, grid.experiment)
    latest = runs.latest_by_key()
    # a FAILED/KILLED run whose job SLURM still holds (requeued, or held) is cancelled too; a
    # job id that is GONE (another job's now, or ended) is not cancelled
    jobs = slurm_jobs(r for r in latest.values() if r.status != "FINISHED")
    cancelled: list[tuple[Row, RunRecord]] = []
    for row in rows:
        record = latest.get(row.key)
        if record is not None and (
            record.status in ("SCHEDULED", "RUNNING")
            or held_after_failure(record.status, jobs.get(record.job_id or ""))
        ):
            cancelled.append((row, record))
    # (a run may have finished meanwhile: it is left so)
    closed = runs.cancel_runs([r.run_id for _, r in cancelled], CANCEL_REASON)
    marked = [r for _, r in cancelled if r.run_id in closed]
    now = {r.run_id: r for r in runs.latest_by_key().values()} if marked else {}
    job_ids, pids = set(), set()
    for record in marked:
        for seen in (record, now.get(record.run_id, record)):
            job = jobs.get(seen.job_id or "")
            if seen.tags.get(f"{TAG}.executor") == "slurm" and seen.job_id:
                if job is None or job.state != GONE:
                    job_ids.add(seen.job_id)
            elif seen.tags.get(f"{TAG}.pid") and _local_process_here(seen):
                pids.add(int(seen.tags[f"{TAG}.pid"]))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    cancel(job_ids)
    return [row.id for row, _ in cancelled]


def _local_process_here(record: RunRecord) -> bool:
    """The row's own process runs on this machine: its pid is not another process's now, nor
    a process of another machine."""
    import socket

    from kd.processes import still_running

    pid = record.tags.get(f"{TAG}.pid", "")
    return (
        record.tags.get(f"{TAG}.launch_host") == socket.gethostname()
        and pid.isdigit()
        and still_running(int(pid), record.tags.get(f"{TAG}.pid_started"))
    )


__all__ = ["STATES", "RowStatus", "cancel_rows", "format_table", "grid_status", "row_state"]
