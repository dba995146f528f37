"""A whole grid at once: the latest run of every row with its metrics (what status and the
table read, in one query), and the grid-level run the table and plot are logged to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kd.tracking import server_bulk, sqlite_read
from kd.tracking.metadata import project_commit
from kd.tracking.records import TAG, RunRecord, run_record
from kd.tracking.tracker import Tracker
from kd.tracking.uri import is_server_uri, sqlite_path, store_exists


@dataclass(frozen=True)
class RunSummary:
    """A row's latest run with its latest metric values and params (from one search)."""

    record: RunRecord
    metrics: Mapping[str, float]
    params: Mapping[str, str]  # empty unless asked for (`latest_grid_runs(..., params=True)`)
    start_time: int
    end_time: int | None


def latest_grid_runs(
    tracking_uri: str, experiment: str, grid_name: str, params: bool = False
) -> dict[str, RunSummary]:
    """Content key -> the latest run of that key in the grid, with metrics: one query for the
    whole grid (status and tables call this; no per-row requests)."""
    if not store_exists(tracking_uri):
        return {}
    db = sqlite_path(tracking_uri)
    runs = None  # a SQLite file or a kdgrid server is read without MLflow (no 2-7 s import);
    if db is not None and not params:  # params need MLflow
        runs = sqlite_read.search_tagged(
            db, experiment, f"{TAG}.grid", grid_name, latest_by=f"{TAG}.key"
        )
    elif is_server_uri(tracking_uri) and not params:
        runs = server_bulk.search_tagged_light(
            tracking_uri, experiment, f"{TAG}.grid", grid_name, latest_by=f"{TAG}.key"
        )
    if runs is None:
        tracker = Tracker(tracking_uri)
        experiment_id = tracker.experiment_id(experiment)
        if experiment_id is None:
            return {}
        runs = tracker.search_tagged(experiment_id, f"{TAG}.grid", grid_name, params)
    latest: dict[str, RunSummary] = {}
    for run in runs:
        record = run_record(run)
        if record.key and record.key not in latest:
            latest[record.key] = RunSummary(
                record=record,
                metrics=dict(run.data.metrics),
                params=dict(run.data.params),
                start_time=run.info.start_time or 0,
                end_time=run.info.end_time,
            )
    return latest


def log_grid_artifacts(
    tracking_uri: str, experiment: str, grid_name: str, files: Iterable[str | Path]
) -> str:
    """Log the grid's table and plot to its grid-level run (one per grid, updated in place)."""
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.ensure_experiment(experiment)
    found = tracker.client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG}.table_of` = '{grid_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {f"{TAG}.table_of": grid_name, f"{TAG}.commit": project_commit()}
        run_id = tracker.client.create_run(
            experiment_id, run_name=f"table {grid_name}", tags=tags
        ).info.run_id
    for path in files:
        tracker.client.log_artifact(run_id, str(path), "table")
    tracker.client.set_terminated(run_id, status="FINISHED")
    return run_id
