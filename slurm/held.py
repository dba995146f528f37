"""Rows held back because the cluster accepts no more jobs now (slurm/limits.py), and the feeder
that submits them as room frees up.

A held row has its MLflow run like any launched row (SCHEDULED, executor slurm), no job id,
and the tag `kdgrid.held = cluster limit`; the launch journal (`submissions.jsonl`) has its line
with `"held": true` and no job id. `launch/status.py` shows it as `held` (`cluster limit`).
Held rows are submitted, within the limits, by `slurm.launcher.feed_held`: at the start of any
later launch of the grid, and by the feeder, a detached `launch/grid.py GRID ... --feed-held`
the launch starts, which calls it every `--feed-interval` seconds under the grid's launch lock
(so it never submits beside a launch) and exits when no held row is left, or when sbatch
refuses them for a reason other than a limit or an unreachable controller (exit 1; the rows stay
held, for the next launch). Its pid and log are in `<output_dir>/slurm/feeder.{pid,log}`; one
feeder per grid (a second one exits at once).
Stopping it (`kill PID`) or its death loses nothing: the rows stay held, and the next launch
of the same grid submits them and starts a new feeder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kd.grid import Grid
from kd.rowfiles import SLURM_DIR
from kd.tracking import TAG, RunRecord
from slurm.jobenv import CODE_ROOT_VARIABLE

HELD_TAG = f"{TAG}.held"
CLUSTER_LIMIT = "cluster limit"
SUBMITTED = "submitted"  # the tag's value once the feeder or a launch queued the row
FEED_INTERVAL_S = 30.0


class FeedFailed(RuntimeError):
    """Submitting held rows failed in a way that trying again will not mend (not a limit, not
    the controller down): the feeder stops instead of retrying forever."""


def is_held(record: RunRecord) -> bool:
    """A SLURM run waiting for room on the cluster: created, never queued, on purpose."""
    return (
        record.status == "SCHEDULED"
        and record.tags.get(HELD_TAG) == CLUSTER_LIMIT
        and not record.job_id
    )


def feeder_files(grid: Grid) -> tuple[Path, Path, Path]:
    """(pid file, log file, lock file) of the grid's feeder."""
    root = Path(grid.rows[0].config.output_dir).resolve() / SLURM_DIR
    return root / "feeder.pid", root / "feeder.log", root / "feeder.lock"


def start_feeder(
    grid: Grid,
    tracking_uri: str,
    interval_s: float = FEED_INTERVAL_S,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start the grid's feeder, detached from this terminal (a closed SSH session does not stop
    it); returns its pid. A feeder already running for the grid makes this one exit at once.
    `env`: the launch's job environment (slurm/jobenv.py): the feeder runs the launch's code
    snapshot, and the jobs it submits import it too, whatever the checkout holds by then."""
    pid_file, log_file, _ = feeder_files(grid)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    code_root = (env or {}).get(CODE_ROOT_VARIABLE) or Path(__file__).resolve().parent.parent
    script = Path(code_root) / "launch" / "grid.py"
    argv = [sys.executable, str(script), grid.file, *grid.overrides]
    argv += ["--smoke"] if grid.smoke else []
    argv += ["--tracking-uri", tracking_uri, "--feed-held", "--feed-interval", str(interval_s)]
    with open(log_file, "a") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.getcwd(),
            env={**os.environ, **(env or {})},
        )
    return process.pid


def feed_loop(grid: Grid, feed_once: Callable[[], int], interval_s: float) -> int:
    """The feeder's life: `feed_once()` (returns the rows still held) every `interval_s` until
    none is left (0), or until it raises: sbatch refused the rows for good (1; they stay held,
    for the next launch). One feeder per grid: a second one returns 0 at once."""
    pid_file, _, lock_file = feeder_files(grid)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"feeder: another feeder of grid '{grid.name}' is running; exiting", flush=True)
            return 0
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            while True:
                try:
                    left = feed_once()
                except FeedFailed as exc:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                    print(f"{stamp} feeder: stopped: {exc}", flush=True)
                    return 1
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                print(f"{stamp} feeder: {left} row(s) still held", flush=True)
                if left == 0:
                    return 0
                time.sleep(interval_s)
        finally:
            with contextlib.suppress(OSError):
                pid_file.unlink()
