"""Which run's checkpoint a row was trained from, and whether that is still the current one.

A row that distils from (or starts from) another row reads that row's `best.pt`. A `--force`
rerun of the other row replaces that file, so a finished row's results can silently come
from a checkpoint that no longer exists in the row folder. Each checkpoint therefore carries
the MLflow run that wrote it; a row records, per dependency, the run whose checkpoint it read
(tag `kdgrid.dependency_run.<row id>`, and in its saved state); status and the table call a
finished row *stale* when a dependency has finished again in another run since.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from kd.grid import Grid, Row, dependency_checkpoint
from kd.tracking import RunRecord

DEPENDENCY_TAG = "kdgrid.dependency_run."  # + dependency row id -> run id of the checkpoint read
UNKNOWN_RUN = "unknown"  # a checkpoint written before checkpoints named their run


def dependency_tag(dep_id: str) -> str:
    return DEPENDENCY_TAG + dep_id


def checkpoint_run_id(path: Path) -> str:
    """The MLflow run that wrote a checkpoint of this project (`UNKNOWN_RUN` for older files).
    Its tensors are mapped, not read: this costs milliseconds even for a 350 MB file."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here: building the model reports it properly
        return UNKNOWN_RUN
    run_id = obj.get("run_id") if isinstance(obj, dict) else None
    return str(run_id) if run_id else UNKNOWN_RUN


def dependency_runs(row: Row) -> dict[str, str]:
    """Dependency row id -> the run that wrote the checkpoint this row reads from it now."""
    return {dep: checkpoint_run_id(dependency_checkpoint(row, dep)) for dep in row.depends_on}


def recorded_runs(tags: Mapping[str, str]) -> dict[str, str]:
    """Dependency row id -> run id, from a run's tags."""
    return {
        k.removeprefix(DEPENDENCY_TAG): v for k, v in tags.items() if k.startswith(DEPENDENCY_TAG)
    }


def stale_reason(
    grid: Grid, row: Row, tags: Mapping[str, str], latest: Mapping[str, RunRecord]
) -> str | None:
    """Why a finished row's results no longer come from its dependencies' current checkpoints,
    or None. `tags` are the row's run tags; `latest` maps content key -> latest run."""
    for dep_id, used in recorded_runs(tags).items():
        if dep_id not in row.depends_on or used == UNKNOWN_RUN:
            continue
        current = latest.get(grid.row(dep_id).key)
        if current is None or current.run_id == used:
            continue
        since = (
            "has finished again"
            if current.status == "FINISHED"
            else f"was rerun ({current.status.lower()})"
        )
        return (
            f"stale: row '{dep_id}' {since} (run {current.run_id}) since this row was trained "
            f"from its run {used}; rerun with --rows {row.id} --force"
        )
    return None


__all__ = [
    "DEPENDENCY_TAG",
    "UNKNOWN_RUN",
    "checkpoint_run_id",
    "dependency_runs",
    "dependency_tag",
    "recorded_runs",
    "stale_reason",
]
