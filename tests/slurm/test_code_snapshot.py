"""On the local SLURM cluster: queued jobs, and their requeues, run the code that was submitted.

A grid (a teacher, and a student that waits for it with `afterok`) is submitted from a
throwaway copy of the checkout; the moment the launch returns, the copy is edited so that any
process importing the trainer from it fails. The teacher is then requeued (`scontrol
requeue`) once it trains, so it starts a second time after the edit, and the student starts
only after the edit. Both must finish, their runs naming the launch's snapshot as the code they
imported, and `launch/status.py` of the edited copy must say the rows were trained by other
code than the checkout holds now.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from codecopy import break_training, copy_checkout
from slurmtools import (
    cancel_leftover_jobs,
    cli_env,
    generate_data,
    mlflow_client,
    parse_time,
    require_slurm,
    row_runs,
    run,
    sacct,
    submissions,
    wait_for_rows,
    wait_sacct_done,
    write_grid,
)

require_slurm()

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _cancel_our_jobs_at_the_end(tmp_path: Path):
    yield
    cancel_leftover_jobs(tmp_path)


def _teacher_epoch(workdir: Path, run_id: str) -> float:
    return mlflow_client(workdir).get_run(run_id).data.metrics.get("epoch", 0.0)


def test_queued_and_requeued_jobs_run_the_submitted_code(tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path / "checkout")
    workdir = tmp_path / "work"
    data = generate_data(tmp_path / "data", 4)
    rows = [
        {"id": "teacher", "label": "T"},
        {
            "id": "student",
            "label": "S",
            "teacher": {"row": "teacher"},
            "kd": {"ce": 0.5, "ikd": 0.5},
            "train": {"epochs": 1},
        },
    ]
    write_grid(workdir, "snapslurm", rows, data, epochs=40)
    proc = subprocess.run(
        [sys.executable, str(checkout / "launch" / "grid.py"), "snapslurm.yaml"]
        + ["--executor", "slurm", "--partition", "gpu"],
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    break_training(checkout)
    edited_at = datetime.now().replace(microsecond=0)
    jobs = {e["id"]: e["job_id"] for e in submissions(workdir, "snapslurm")}
    runs = {r.data.tags["kdgrid.id"]: r.info.run_id for r in row_runs(workdir, "kd-test-snapslurm")}

    # requeue the teacher once it trains: its second start comes after the edit too
    deadline = time.monotonic() + 300
    while _teacher_epoch(workdir, runs["teacher"]) < 1:
        assert time.monotonic() < deadline, "the teacher logged no epoch in 300 s"
        time.sleep(1)
    requeue = run("scontrol", "requeue", jobs["teacher"])
    assert requeue.returncode == 0, requeue.stderr

    finished = wait_for_rows(workdir, "snapslurm.yaml", timeout=800)
    assert {r["state"] for r in finished.values()} == {"finished"}, finished
    records = wait_sacct_done(jobs.values())
    assert len(sacct([jobs["teacher"]], duplicates=True)) >= 2, "the teacher was not requeued"
    assert parse_time(records[jobs["student"]]["Start"]) >= edited_at

    (snapshot,) = (workdir / "outputs" / "snapslurm" / "code").iterdir()
    manifest = json.loads((snapshot / "CODE.json").read_text())
    for run_ in row_runs(workdir, "kd-test-snapslurm"):
        tags = run_.data.tags
        assert run_.info.status == "FINISHED"
        assert tags["kdgrid.code_dir"] == str(snapshot), tags
        assert tags["kdgrid.code_hash"] == manifest["hash"]
    status = subprocess.run(
        [sys.executable, str(checkout / "launch" / "status.py"), "snapslurm.yaml"],
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert "2 finished row(s) were trained by other code than this checkout" in status.stdout
