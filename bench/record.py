"""A 10,000-row grid's in-process work, without a cluster: validating it, recording its runs
in MLflow, and reading its status back.

`record_benchmark(n)` writes the n-row grid of `bench launch` (bench/launch.py) and a fresh
SQLite store, then times (wall and CPU seconds of this process; the machine is shared)

- `validate_s`: `kd.grid.load_grid`, as `launch/grid.py` loads a grid to launch it;
- `record_s`: `Tracker.create_row_runs`, the launch's runs with their tags (a job logs its params
  and row.yaml when it starts)
  (after the experiment and the launch run, timed apart as `experiment_s`), and `job_tags_s`:
  `Tracker.set_tags_many` of a job id per run, as the launcher tags them after sbatch;
- `status_load_s`: the grid as `launch/status.py` loads it (no data or model checks),
  `status_read_s`: `latest_grid_runs` (every row's latest run, from the store), and
  `status_rows_s`: all of `slurm.status.grid_status` but its sacct and squeue calls, which
  need the cluster (`bench launch` measures them).

Nothing is submitted: sbatch, sacct and squeue are not called.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import slurm.status as status_module
from bench.common import log_nothing, machine
from bench.launch import write_launch_grid
from kd.grid import load_grid
from kd.tracking import TAG, Tracker, latest_grid_runs


@contextlib.contextmanager
def _timed(result: dict[str, Any], name: str) -> Iterator[None]:
    """`result[name]` (wall seconds) and `result[name + '_cpu']` (this process's CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    result[name] = round(time.perf_counter() - wall, 3)
    result[f"{name}_cpu"] = round(time.process_time() - cpu, 3)


@contextlib.contextmanager
def _no_slurm_queries() -> Iterator[None]:
    """`grid_status` without sacct and squeue: every job reads as not known to SLURM."""
    original = status_module.slurm_jobs
    status_module.slurm_jobs = lambda records: {}
    try:
        yield
    finally:
        status_module.slurm_jobs = original


def record_benchmark(
    rows: int = 10000,
    *,
    workdir: str | Path | None = None,
    keep: bool = False,
    log: Callable[[str], None] = log_nothing,
) -> dict[str, Any]:
    """Seconds to validate an n-row grid, record its runs and read its status; no cluster."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    folder = Path(workdir or tempfile.mkdtemp(prefix="kdgrid-bench-record-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    result: dict[str, Any] = {"rows": rows, "tracking_uri": uri}
    try:
        path = write_launch_grid(folder, rows, None, f"bench_record_{rows}")
        tracker = Tracker(uri)
        with _timed(result, "store_init_s"):
            tracker.client.search_experiments(max_results=1)  # schema, once per store

        log(f"validating a {rows}-row grid ({path})")
        with _timed(result, "validate_s"):
            grid = load_grid(path)
        log("recording the runs (Tracker.create_row_runs)")
        with _timed(result, "experiment_s"):
            experiment = tracker.ensure_experiment(grid.experiment)
            parent = tracker.create_launch_run(experiment, grid.name, grid.file, "slurm", rows)
        with _timed(result, "record_s"):
            runs = tracker.create_row_runs(
                experiment, grid.rows, executor="slurm", parent_run_id=parent
            )
        with _timed(result, "job_tags_s"):
            tracker.set_tags_many(
                {run_id: {f"{TAG}.job_id": f"1000_{i}"} for i, run_id in enumerate(runs.values())}
            )
        log("reading the status of every row (no sacct, no squeue)")
        with _timed(result, "status_load_s"):
            status_grid = load_grid(path, check_data=False, check_models=False)
        with _timed(result, "status_read_s"):
            found = latest_grid_runs(uri, status_grid.experiment, status_grid.name)
        with _timed(result, "status_rows_s"), _no_slurm_queries():
            statuses = status_module.grid_status(status_grid, uri)
        result["runs_found"] = len(found)
        result["states"] = {s.state: sum(x.state == s.state for x in statuses) for s in statuses}
    finally:
        if not keep and workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result |= machine()
    return result


def format_record(r: dict[str, Any]) -> str:
    def line(name: str, key: str, what: str) -> str:
        return f"  {name:<13} {r[key]:8.2f} s  (CPU {r[key + '_cpu']:6.2f} s)   {what}"

    status_s = r["status_load_s"] + r["status_rows_s"]
    return "\n".join(
        [
            f"{r['rows']} rows, tracking {r['tracking_uri']}, load {r['load_avg_1m']}",
            line("validate", "validate_s", "load_grid, as launch/grid.py loads it"),
            line("record", "record_s", "Tracker.create_row_runs: runs and tags"),
            line("  experiment", "experiment_s", "the experiment and the launch run"),
            line("  job ids", "job_tags_s", "Tracker.set_tags_many: a job id per run"),
            f"  validate + record + job ids {r['validate_s'] + r['record_s'] + r['job_tags_s']:8.2f} s",
            line("status load", "status_load_s", "load_grid, as launch/status.py loads it"),
            line("status read", "status_read_s", "latest_grid_runs: every row's latest run"),
            line("status rows", "status_rows_s", "grid_status without sacct/squeue (read incl.)"),
            f"  status (load + rows) {status_s:8.2f} s   runs found {r['runs_found']}, "
            f"states {r['states']}",
        ]
    )
