"""The local executor's start-up: `local_benchmark` runs one row through the local executor
(`slurm.local`), its processes forked from the fork server and, for comparison, started as fresh
interpreters, and reads, from each row's MLflow run, how long its process took from its start
to its first training step."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import log_nothing, machine
from kd.grid import Grid, Row
from kd.rowfiles import TRAIN_LOG
from kd.smoke import prepare_smoke_data
from kd.tracking import Tracker, absolute_uri
from slurm import local

MODES = (("fork_server", "1"), ("fresh", "0"))  # (mode, the fork server switch's value)


@contextlib.contextmanager
def _forkserver_switch() -> Iterator[None]:
    """Give the fork server switch (`slurm.local.FORKSERVER_ENV`) back its value on leaving."""
    saved = os.environ.get(local.FORKSERVER_ENV)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(local.FORKSERVER_ENV, None)
        else:
            os.environ[local.FORKSERVER_ENV] = saved


def _copies(row: Row, mode: str, repeats: int, folder: Path) -> list[Row]:
    """`repeats` copies of the row under new ids, one epoch of at most 2 batches each."""
    tcfg = dataclasses.replace(
        row.config.train, epochs=1, limit_train_batches=2, limit_eval_batches=1
    )
    copies = []
    for i in range(repeats):
        cfg = dataclasses.replace(
            row.config,
            id=f"{row.id}-{mode}-{i}",
            train=tcfg,
            output_dir=str(folder / "outputs"),
        )
        copies.append(dataclasses.replace(row, config=cfg))
    return copies


def _run_copies(
    tracker: Tracker, experiment: str, copies: list[Row], log: Callable[[str], None]
) -> tuple[list[float], float]:
    """Run the copies one at a time through the local executor: (each one's seconds from
    process start to first training step, the wall seconds of them all)."""
    run_ids = tracker.create_row_runs(experiment, copies, executor="local")
    executor = local.LocalExecutor(tracker, max_parallel=1, out=log, live=False)
    start = time.perf_counter()
    done = executor.run(copies, run_ids)
    wall = time.perf_counter() - start
    if not done.ok:
        log_path = copies[0].output_dir / TRAIN_LOG
        tail = log_path.read_text()[-3000:] if log_path.is_file() else "(no log)"
        raise RuntimeError(f"a row failed; the end of a log:\n{tail}")
    startups = [
        tracker.client.get_run(run_ids[c.id]).data.metrics.get("time/startup_s", math.nan)
        for c in copies
    ]
    return startups, wall


def _fork_server_warmup(folder: Path) -> float:
    """Seconds for the fork server's one-off imports: `python -m slurm.job --help` from a fork
    (the imports, then nothing); NaN when it fails."""
    server = local.ForkServer(local.row_env(1))
    start = time.perf_counter()
    try:
        code = server.start(["--help"], folder / "help.log", local.row_env(1)).wait(60)
    finally:
        server.close()
    return time.perf_counter() - start if code == 0 else math.nan


def local_benchmark(
    grid: Grid,
    row: Row,
    *,
    repeats: int = 2,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = log_nothing,
) -> dict[str, Any]:
    """Run `repeats` copies of `row` (one epoch of at most 2 batches each, one at a time)
    through the local executor, with row processes forked from its fork server and, for
    comparison, started as fresh interpreters; read each run's `time/startup_s` (process start
    to first training step). Also times the fork server's one-off imports (`warmup_s`)."""
    if row.depends_on:
        raise ValueError(
            f"row '{row.id}' waits on {', '.join(row.depends_on)}: pick a row without "
            "dependencies for the local benchmark"
        )
    if grid.smoke:  # the generated data stays where the grid puts it
        prepare_smoke_data([row])
    folder = Path(tempfile.mkdtemp(prefix="kdgrid-bench-local-"))
    uri = absolute_uri(tracking_uri or f"sqlite:///{folder}/mlflow.db")
    tracker = Tracker(uri)
    experiment = tracker.ensure_experiment(f"{grid.experiment}-bench")
    result: dict[str, Any] = {
        "row": row.id,
        "label": row.label,
        "student": row.config.student.model,
        "teacher": row.config.teacher.model if row.config.teacher else None,
        "repeats": repeats,
    }
    try:
        with _forkserver_switch():
            for mode, switch in MODES:
                os.environ[local.FORKSERVER_ENV] = switch
                startups, wall = _run_copies(
                    tracker, experiment, _copies(row, mode, repeats, folder), log
                )
                log(f"{mode}: first step {', '.join(f'{t:.2f}' for t in startups)} s after start")
                key = "startup_s" if mode == "fork_server" else "startup_fresh_s"
                result[key] = statistics.median(startups)
                result[f"{key}_repeats"] = startups
                result[f"{mode}_rows_wall_s"] = wall
            if hasattr(os, "fork"):
                result["warmup_s"] = _fork_server_warmup(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result | machine()


def format_local(r: dict[str, Any]) -> str:
    lines = [
        f"row {r['row']} ({r['label']}): {r['student']} <- {r['teacher'] or 'no teacher'}, "
        f"local executor, {r['repeats']} rows per mode, load {r['load_avg_1m']}",
        f"  process start -> first step, forked from the fork server  {r['startup_s']:6.2f} s",
        f"  process start -> first step, fresh interpreter             {r['startup_fresh_s']:6.2f} s",
    ]
    if "warmup_s" in r:
        lines.append(
            f"  fork server imports, once per launch                       {r['warmup_s']:6.2f} s"
        )
    return "\n".join(lines)
