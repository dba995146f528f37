"""Launching a grid on SLURM: validating, submitting and reading the status of an N-row grid.

`launch_benchmark(n)` writes an n-row grid (one teacher row and n - 1 students that wait on it,
tiny rows that never run: every job is held back with `--begin=now+1hour`), then times

- `validate_s`: `kd.grid.load_grid` (expand, validate, content keys, dataset check);
- `submit_s`: `slurm.launcher.launch`, the real path of `launch/grid.py --executor slurm`,
  split into `mlflow_s` (every `kd.tracking.Tracker` call: the experiment, one run per row with
  its tags, the job id tags), `sbatch_s` (`slurm.submit.submit_rows`:
  one pickle per job array and the sbatch calls), `sinfo_s` and the rest (`other_s`);
- `status_s`: `slurm.status.grid_status`, what `launch/status.py` prints (one MLflow search,
  one sacct call, one squeue call);

and then cancels every job it submitted, by job id, and checks that none is left.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

import slurm.launcher as launcher_module
import slurm.status as status_module
import slurm.submit as submit
from bench.common import log_nothing, machine
from kd.data import generate_dataset
from kd.grid import Grid, load_grid
from kd.rowfiles import SUBMISSIONS
from kd.tracking import Tracker
from slurm.launcher import LaunchOptions, launch
from slurm.state import cancel

HOLD = "now+1hour"  # sbatch --begin: the jobs stay pending (reason BeginTime) until cancelled


@contextlib.contextmanager
def _timed(buckets: dict[str, float], targets: list[tuple[Any, str, str]]) -> Iterator[None]:
    """Add the time spent in each `owner.name` to `buckets[bucket]` while inside.

    A call made from inside another timed call of the same bucket (from any thread: the
    tracker's thread pools) is not counted twice. A call of another bucket made from inside
    one (the job-id tags set while `submit_rows` runs) counts for its own bucket only.
    """
    depth: dict[str, int] = {}
    lock = threading.Lock()
    frames = threading.local()  # this thread's open timed calls: [bucket, time in nested ones]

    def wrap(fn: Callable, bucket: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with lock:
                inside_same = depth.get(bucket, 0) > 0
                depth[bucket] = depth.get(bucket, 0) + 1
            if inside_same:
                try:
                    return fn(*args, **kwargs)
                finally:
                    with lock:
                        depth[bucket] -= 1
            stack = frames.__dict__.setdefault("stack", [])
            frame = [bucket, 0.0]
            stack.append(frame)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                stack.pop()
                if stack:
                    stack[-1][1] += elapsed  # the enclosing call leaves this out of its own
                with lock:
                    depth[bucket] -= 1
                    buckets[bucket] = buckets.get(bucket, 0.0) + elapsed - frame[1]

        return timed

    saved = []
    for owner, name, bucket in targets:
        original = owner.__dict__[name]
        saved.append((owner, name, original))
        setattr(owner, name, wrap(original, bucket))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _tracker_methods() -> list[str]:
    # plain methods only: every one of them talks to the store (static helpers do not)
    return [n for n, v in vars(Tracker).items() if inspect.isfunction(v) and not n.startswith("__")]


def write_launch_grid(folder: Path, rows: int, partition: str | None, name: str) -> Path:
    """An n-row grid of tiny rows on a tiny generated dataset; every job is held back."""
    spec = generate_dataset(
        "imagefolder", folder / "data", num_classes=2, train_per_class=2, test_per_class=1
    )
    resources: dict[str, Any] = {
        "nodes": 1,
        "gpus_per_node": 0,
        "cpus_per_task": 1,
        "mem_gb": 0.25,
        "time_min": 5,
        "sbatch_extra": {"begin": HOLD},
    }
    if partition:
        resources["partition"] = partition
    grid = {
        "name": name,
        "experiment": f"kd-{name}",
        "description": "launch/bench.py launch: rows that are cancelled before they run",
        "defaults": {
            "student": {"model": "resnet18", "drop_path": 0.0},
            "init": "scratch",
            "kd": {"ce": 1.0},
            "data": {
                "dataset": "imagefolder",
                "root": spec.root,
                "img_size": 32,
                "num_workers": 0,
            },
            "train": {"epochs": 1, "batch_size": 2},
            "resources": resources,
            "output_dir": str(folder / "outputs"),
        },
        "rows": [{"id": "teacher", "label": "t"}],
    }
    if rows > 1:
        grid["axes"] = {
            "values": {"train.seed": list(range(rows - 1))},
            "id": "s{seed}",
            "label": "s{seed}",
            "row": {"teacher": {"row": "teacher"}, "kd": {"ce": 0.5, "ikd": 0.5}},
        }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _jobs_named(name: str) -> list[str]:
    """Job ids (arrays as their array job id) of this user's jobs with this job name."""
    out = subprocess.run(
        ["squeue", "-h", "--me", "--name", name, "-o", "%F"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def _submitted_jobs(grid: Grid) -> list[str]:
    """Job ids the launch recorded for this grid (array tasks reduced to their array)."""
    path = Path(grid.rows[0].config.output_dir) / SUBMISSIONS
    ids: set[str] = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            job = json.loads(line).get("job_id")
            if job:
                ids.add(str(job).split("_")[0])
    return sorted(ids)


def _submit(grid: Grid, uri: str) -> dict[str, Any]:
    """`launch --executor slurm` of the grid, its time split into MLflow, sbatch and sinfo."""
    buckets: dict[str, float] = {}
    targets = [(Tracker, n, "mlflow") for n in _tracker_methods()]
    targets += [
        (launcher_module, "submit_rows", "sbatch"),
        (launcher_module, "read_partitions", "sinfo"),
        (launcher_module, "read_limits", "limits"),
    ]
    out = io.StringIO()
    start = time.perf_counter()
    with _timed(buckets, targets), contextlib.redirect_stdout(out):
        code = launch(
            grid, LaunchOptions(executor="slurm", tracking_uri=uri, live=False, feeder=False)
        )
    result: dict[str, Any] = {"submit_s": time.perf_counter() - start}
    if code != 0:
        raise RuntimeError(f"the launch failed (exit {code}):\n{out.getvalue()[-2000:]}")
    result["mlflow_s"] = buckets.get("mlflow", 0.0)
    result["sbatch_s"] = buckets.get("sbatch", 0.0)
    result["sinfo_s"] = buckets.get("sinfo", 0.0)
    result["limits_s"] = buckets.get("limits", 0.0)
    # the limits are read in a thread while MLflow records the runs: not part of the sum
    result["other_s"] = result["submit_s"] - sum(
        result[k] for k in ("mlflow_s", "sbatch_s", "sinfo_s")
    )
    result["sbatch_calls"] = len(_submitted_jobs(grid))
    return result


def _read_status(grid: Grid, uri: str) -> dict[str, Any]:
    """`grid_status` of every row, its time split into MLflow and SLURM, and the states."""
    parts: dict[str, float] = {}
    targets = [
        (status_module, "latest_grid_runs", "mlflow"),
        (status_module, "slurm_jobs", "slurm"),
    ]
    start = time.perf_counter()
    with _timed(parts, targets):
        statuses = status_module.grid_status(grid, uri)
    result: dict[str, Any] = {"status_s": time.perf_counter() - start}
    result["status_mlflow_s"] = parts.get("mlflow", 0.0)
    result["status_slurm_s"] = parts.get("slurm", 0.0)
    states: dict[str, int] = {}
    for status in statuses:
        states[status.state] = states.get(status.state, 0) + 1
    result["states"] = states
    return result


def _cancel_all(grid: Grid | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Cancel every job the launch submitted (and any left with the grid's job name); wait
    until none is queued, for at most ten seconds."""
    if grid is None:
        return {"cancelled_jobs": [], "cancelled_ok": True}
    jobs = sorted(set(_submitted_jobs(grid)) | set(_jobs_named(f"kd-{grid.name}")))
    log(f"cancelling {len(jobs)} job(s): {' '.join(jobs)}")
    cancel(jobs)
    left = jobs
    for _ in range(20):
        left = [j for j in _jobs_named(f"kd-{grid.name}") if j in jobs]
        if not left:
            break
        time.sleep(0.5)
    return {"cancelled_jobs": jobs, "cancelled_ok": not left}


def launch_benchmark(
    rows: int = 1000,
    *,
    partition: str | None = None,
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
    keep: bool = False,
    log: Callable[[str], None] = log_nothing,
) -> dict[str, Any]:
    """Seconds to validate, submit and read the status of an n-row grid; cancels its jobs."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if not submit.slurm_available():
        raise ValueError("launch benchmark: sbatch is not on PATH (bash slurm/cluster.sh up)")
    stamp = time.strftime("%Y%m%d%H%M%S")
    name = f"bench_launch_{stamp}_{os.getpid()}"
    folder = Path(workdir or tempfile.mkdtemp(prefix="kdgrid-bench-launch-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{folder}/mlflow.db"
    result: dict[str, Any] = {"rows": rows, "partition": partition, "tracking_uri": uri}
    grid = None
    try:
        path = write_launch_grid(folder, rows, partition, name)
        start = time.perf_counter()
        Tracker(uri).client.search_experiments(max_results=1)  # schema, once per store
        result["store_init_s"] = time.perf_counter() - start

        log(f"validating a {rows}-row grid ({path})")
        start = time.perf_counter()
        grid = load_grid(path)
        result["validate_s"] = time.perf_counter() - start

        log("submitting (launch/grid.py --executor slurm)")
        result |= _submit(grid, uri)
        log("reading the status of every row")
        result |= _read_status(grid, uri)
    finally:
        result |= _cancel_all(grid, log)
        if not keep and workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result |= machine()
    return result


def format_launch(r: dict[str, Any]) -> str:
    lines = [
        f"{r['rows']} rows, {r.get('sbatch_calls', '?')} sbatch call(s), tracking {r['tracking_uri']}, "
        f"load {r['load_avg_1m']}",
        f"  validate      {r['validate_s']:8.2f} s   (expand + validate + keys: load_grid)",
        f"  submit        {r['submit_s']:8.2f} s   (launch --executor slurm)",
        f"    MLflow      {r['mlflow_s']:8.2f} s   (experiment, {r['rows']} runs, job id tags)",
        f"    sbatch      {r['sbatch_s']:8.2f} s   (one pickle per array + sbatch)",
        f"    sinfo       {r['sinfo_s']:8.2f} s",
        f"    limits      {r.get('limits_s', 0.0):8.2f} s   (scontrol, sacctmgr, squeue; read beside MLflow's)",
        f"    other       {r['other_s']:8.2f} s   (plan, smoke data, launch record, waiting for limits)",
        f"  status        {r['status_s']:8.2f} s   (grid_status: {r.get('states')})",
        f"    MLflow      {r['status_mlflow_s']:8.2f} s   (one search of the grid's runs)",
        f"    SLURM       {r['status_slurm_s']:8.2f} s   (one sacct + one squeue)",
        f"  cancelled     {len(r['cancelled_jobs'])} job(s): "
        + ("none left" if r["cancelled_ok"] else "SOME ARE STILL QUEUED"),
    ]
    return "\n".join(lines)
