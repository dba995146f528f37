"""The names a row's run is found by, and the launcher's view of a run (`RunRecord`).

Rows are found again by their content key tag (`kdgrid.key`); the launcher, the planner and
status read an MLflow run as a `RunRecord`. No mlflow here: the planner imports these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TAG = "kdgrid"  # tag namespace
# Set by `launch/grid.py --cancel` before it closes a run and stops its job: a job that starts
# (or opens its run) after that sees it and does not train (kd.train.runner)
CANCELLED = f"{TAG}.cancelled"
CANCEL_REASON = "cancelled with launch/grid.py --cancel"
REASON_MAX_CHARS = 5000  # a failure reason kept in a tag is cut here


def cancel_tags(reason: str, now_ms: int) -> dict[str, str]:
    """The tags `--cancel` puts on a run it closes, whichever way it closes it (MLflow's calls,
    sqlite3, a kdgrid server): when (a job that opens the run from then on does not train) and
    why."""
    return {CANCELLED: str(now_ms), f"{TAG}.failure_reason": reason[:REASON_MAX_CHARS]}


# A row run's tags about its process or job (`kdgrid.<name>`), and the --cancel that stopped
# it: dropped when the run is reopened
JOB_TAGS = (
    "pid",
    "pid_started",
    "job_id",
    "slurm_job_name",
    "slurm_cluster",
    "slurm_user",
    "cancelled",
)
ACTIVE = ("SCHEDULED", "RUNNING")
FAILED = ("FAILED", "KILLED")


@dataclass(frozen=True)
class RunRecord:
    """What a launch needs to know about an existing run."""

    run_id: str
    key: str
    row_id: str
    status: str  # MLflow status: SCHEDULED, RUNNING, FINISHED, FAILED, KILLED
    start_time: int
    tags: Mapping[str, str]

    @property
    def job_id(self) -> str | None:
        return self.tags.get(f"{TAG}.job_id")


def run_record(run: Any) -> RunRecord:
    """An MLflow run as the launcher sees it."""
    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        key=tags.get(f"{TAG}.key", ""),
        row_id=tags.get(f"{TAG}.id", ""),
        status=run.info.status,
        start_time=run.info.start_time or 0,
        tags=dict(tags),
    )


@dataclass(frozen=True)
class LeanInfo:
    run_id: str
    status: str
    start_time: int | None
    end_time: int | None


@dataclass(frozen=True)
class LeanData:
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class LeanRun:
    """The parts of an `mlflow.entities.Run` this project reads (from plain SELECTs)."""

    info: LeanInfo
    data: LeanData


def latest_by_key(runs: Iterable[Any]) -> dict[str, RunRecord]:
    """Content key -> the first run of that key in `runs` (MLflow runs, newest first)."""
    latest: dict[str, RunRecord] = {}
    for run in runs:
        record = run_record(run)
        latest.setdefault(record.key, record)
    return latest
