"""Which run's checkpoint a row was trained from, and whether that is still the current one.

A row that distils from (or starts from) another row reads that row's `best.pt`. A `--force`
rerun of the other row replaces that file, so a finished row's results can silently come
from a checkpoint that no longer exists in the row folder. Each checkpoint therefore carries
the MLflow run that wrote it; a row records, per dependency, the run whose checkpoint it read
(tag `kdgrid.dependency_run.<row id>`, and in its saved state); status and the table call a
finished row *stale* when a dependency has been rerun since, or is stale itself.
"""

from __future__ import annotations

import sys
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
    Its tensors are mapped, not read: 25-80 ms for ConvNeXt-B's 352 MB best.pt (a full load:
    0.38 s)."""
    from kd.models import torch_load

    try:
        obj = torch_load(path, trusted=True, mmap=True)  # a file this project wrote
    except Exception as exc:  # noqa: BLE001 - building the model reports an unreadable file
        print(f"kd.provenance: cannot read the run id of {path}: {exc}", file=sys.stderr)
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


def stale_rows(grid: Grid, latest: Mapping[str, RunRecord]) -> dict[str, str]:
    """Row id -> why its latest run, FINISHED, no longer matches the checkpoints it was trained
    from; rows not stale are left out. `latest` maps content key -> the key's latest run.

    A dependency counts as rerun when its latest run is not the one the row recorded, or, for
    a row trained before runs were recorded (or from an older checkpoint), when that latest run
    was created after the row started training. A row reading a stale row is stale too."""
    reasons: dict[str, str] = {}
    done: set[str] = set()

    def visit(row: Row) -> None:
        if row.id in done:
            return
        done.add(row.id)
        record = latest.get(row.key)
        if record is None or record.status != "FINISHED":
            return
        used = recorded_runs(record.tags)
        for dep_id in row.depends_on:
            dep = grid.row(dep_id)
            visit(dep)
            reason = _dependency_changed(grid, row, record, dep, used.get(dep_id), latest)
            if reason is None and dep_id in reasons:
                reason = (
                    f"stale: it was trained from row '{dep_id}', which is stale itself; rerun "
                    f"that first, then this row: {grid.command('launch/grid.py', '--rows', row.id, '--force')}"
                )
            if reason is not None:
                reasons[row.id] = reason
                return

    for row in grid.rows:
        visit(row)
    return reasons


def _dependency_changed(
    grid: Grid,
    row: Row,
    record: RunRecord,
    dep: Row,
    used: str | None,
    latest: Mapping[str, RunRecord],
) -> str | None:
    current = latest.get(dep.key)
    if current is None:
        return None
    if used is not None and used != UNKNOWN_RUN:
        if current.run_id == used:
            return None
        trained = f"this row was trained from its run {used}"
    elif current.start_time > int(record.tags.get("kdgrid.started_at_ms", record.start_time)):
        trained = "this row started training (which run it read was not recorded)"
    else:
        return None
    rerun = grid.command("launch/grid.py", "--rows", row.id, "--force")
    if current.status == "FINISHED":
        return f"stale: row '{dep.id}' has finished again (run {current.run_id}) since {trained}; rerun: {rerun}"
    if current.status in ("SCHEDULED", "RUNNING"):
        return (
            f"stale: row '{dep.id}' is being rerun (run {current.run_id}, {current.status.lower()}) "
            f"since {trained}; once it has finished: {rerun}"
        )
    return (
        f"stale: row '{dep.id}' was rerun (run {current.run_id}, {current.status.lower()}) since "
        f"{trained}, and its best.pt may hold that run's partial weights; finish it "
        f"({grid.command('launch/grid.py', '--rows', dep.id, '--rerun-failed')}), then: {rerun}"
    )


__all__ = [
    "DEPENDENCY_TAG",
    "UNKNOWN_RUN",
    "checkpoint_run_id",
    "dependency_runs",
    "dependency_tag",
    "recorded_runs",
    "stale_rows",
]
