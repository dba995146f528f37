"""The environment a launch's row jobs run in, settled before anything is submitted: the code
they import (this launch's snapshot, `kd.codesnap`) and whether the Hugging Face hub is offline
(every pretrained weight they need is cached, `kd.preflight`).

Both executors give every row process this environment: SLURM exports the launcher's
environment at `sbatch` time and a requeued job keeps it, the local executor passes it to its
fork server and row processes. `PYTHONSAFEPATH=1` keeps the job's working folder (often the
checkout itself) off `sys.path`, so `python -m ...` imports `kd` and `slurm` from the snapshot
on `PYTHONPATH`, and so does submitit when it unpickles the row job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kd.codesnap import CodeInfo, snapshot
from kd.grid import Grid, GridError, Row
from kd.preflight import WeightsCheck, check_weights, pretrained_needs
from kd.tracking import store_exists, tracking_uri_for


def rows_to_check(
    grid: Grid, rows: Sequence[str] | None, force: bool, tracking_uri: str | None
) -> list[Row]:
    """The selected rows that may run: rows whose latest run finished are left out (unless
    `force`), so a finished row's teacher weights, gone from the cache since, do not block a
    launch that will not train it. The store is read only when a row needs pretrained weights."""
    selected = grid.select(rows) if rows else list(grid.rows)
    if force or not pretrained_needs(selected):
        return selected
    uri = tracking_uri_for(tracking_uri, grid.tracking_uri)
    if not store_exists(uri):
        return selected
    from kd.tracking import Tracker

    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id(grid.experiment)
    latest = tracker.latest_by_key(experiment_id) if experiment_id else {}
    return [r for r in selected if getattr(latest.get(r.key), "status", None) != "FINISHED"]


def check_launch_weights(
    grid: Grid,
    rows: Sequence[str] | None,
    *,
    force: bool,
    prefetch: bool,
    tracking_uri: str | None,
) -> WeightsCheck | str:
    """The pretrained weights check of a launch; a string is the exit-2 message for stderr."""
    check = check_weights(rows_to_check(grid, rows, force, tracking_uri), prefetch=prefetch)
    if check.problems:
        return str(GridError(check.problems))
    for note in check.notes:
        print(f"note: {note}")
    if check.names and check.all_cached:
        print(
            f"pretrained weights in the Hugging Face cache: {', '.join(check.names)}; "
            "jobs run with HF_HUB_OFFLINE=1"
        )
    return check


CODE_ROOT_VARIABLE = "KDGRID_CODE_ROOT"  # the snapshot's folder, for the feeder (slurm/held.py)


def job_environment(output_dir: Path, hub_offline: bool) -> tuple[dict[str, str], CodeInfo]:
    """The variables to give every row process of a launch, and the code snapshot they name."""
    code = snapshot(output_dir)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(code.root), os.environ.get("PYTHONPATH")])),
        "PYTHONSAFEPATH": "1",
        CODE_ROOT_VARIABLE: str(code.root),
    }
    if hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    dirty = {True: ", uncommitted changes included", False: "", None: ""}[code.dirty]
    print(f"code: {code.root} (hash {code.hash}, commit {code.commit[:12]}{dirty})")
    return env, code


@contextlib.contextmanager
def exported(env: Mapping[str, str]) -> Iterator[None]:
    """`env` in this process's environment for the block (sbatch copies it into each job), and
    the previous values back afterwards."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
