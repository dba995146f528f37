"""One launch of a grid: plan against MLflow, create the row runs, hand the rows to an executor.

Order matters for "nothing run twice, nothing half-done": the plan is made (and can fail)
before the experiment or any run is created; runs are created for every row of the launch
before the first row starts; the launch record is written beside the rows' outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kd.grid import Grid, GridError
from kd.plan import Decision, plan_launch
from kd.tracking import RunRecord, Tracker, resolve_tracking_uri, store_exists


@dataclass(frozen=True)
class LaunchOptions:
    rows: list[str] | None = None
    rerun_failed: bool = False
    force: bool = False
    max_parallel: int = 2
    tracking_uri: str | None = None
    live: bool | None = None  # redraw progress in place (default: when stdout is a terminal)


def is_alive(record: RunRecord) -> bool:
    from slurm.local import local_run_alive

    if record.tags.get("kdgrid.executor") in ("local", "inline"):
        return local_run_alive(record.tags)
    return True


def describe(decisions: list[Decision]) -> None:
    for d in decisions:
        if d.action == "run":
            print(f"  run      {d.row.id:<28} {d.row.label:<12} {d.reason}")
        elif d.action in ("skip_finished", "skip_active"):
            print(f"  skipped  {d.row.id:<28} {d.row.label:<12} {d.reason}")


def launch(grid: Grid, options: LaunchOptions) -> int:
    """Run a grid on the local executor. Returns the exit status (0 ok, 1 a row failed, 2 bad input)."""
    from slurm.local import LocalExecutor

    uri = resolve_tracking_uri(options.tracking_uri, grid.tracking_uri)
    latest: dict[str, RunRecord] = {}
    if store_exists(uri):
        tracker = Tracker(uri)
        experiment_id = tracker.experiment_id(grid.experiment)
        latest = tracker.latest_by_key(experiment_id) if experiment_id else {}
    try:
        decisions = plan_launch(
            grid,
            latest,
            rows=options.rows,
            rerun_failed=options.rerun_failed,
            force=options.force,
            is_alive=is_alive,
        )
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    for d in decisions:  # a run left SCHEDULED/RUNNING by a dead launcher is closed first
        if (
            d.action == "run"
            and d.previous is not None
            and d.previous.status in ("SCHEDULED", "RUNNING")
        ):
            tracker.mark(
                d.previous.run_id, "KILLED", "its process is gone (launcher or row killed)"
            )
    to_run = [d.row for d in decisions if d.action == "run"]
    print(
        f"grid '{grid.name}' ({grid.file}): {len(to_run)} to run, "
        f"{sum(d.action.startswith('skip') for d in decisions)} skipped; tracking {uri}, "
        f"experiment '{grid.experiment}'"
    )
    describe(decisions)
    if not to_run:
        return 0
    if grid.smoke:
        from kd.smoke import prepare_smoke_data

        prepare_smoke_data(to_run)
    tracker = Tracker(uri)
    experiment_id = tracker.ensure_experiment(grid.experiment)
    run_ids = {
        row.id: tracker.create_row_run(experiment_id, row, executor="local") for row in to_run
    }
    record_launch(grid, to_run, run_ids, "local")
    executor = LocalExecutor(tracker, max_parallel=options.max_parallel, live=options.live)
    result = executor.run(to_run, run_ids)
    print(
        f"done: {len(result.finished)} finished, {len(result.failed)} failed, {len(result.skipped)} not started"
        + (
            f"; rerun with: python launch/grid.py {grid.file} --rerun-failed"
            if not result.ok
            else ""
        )
    )
    return 0 if result.ok else 1


def record_launch(
    grid: Grid, rows, run_ids: dict[str, str], executor: str, job_ids: dict[str, str] | None = None
) -> Path:
    """Append this launch (row id, key, run id, job id) to the grid's submission record."""
    root = Path(rows[0].config.output_dir) if rows else Path("outputs")
    root.mkdir(parents=True, exist_ok=True)
    path = root / "submissions.jsonl"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as handle:
        for row in rows:
            entry = {
                "time": stamp,
                "grid": grid.name,
                "id": row.id,
                "label": row.label,
                "key": row.key,
                "run_id": run_ids[row.id],
                "executor": executor,
                "job_id": (job_ids or {}).get(row.id),
                "launcher_pid": os.getpid(),
            }
            handle.write(json.dumps(entry) + "\n")
    return path
