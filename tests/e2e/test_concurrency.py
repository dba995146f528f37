"""Two launches of the same grid at the same moment run each row once (the launch lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_simultaneous_launches_run_each_row_once(tmp_path):
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, str(REPO / "launch" / "grid.py"), "grids/table2a.yaml", "--smoke",
           "--rows", "2a-1", "--executor", "local"]  # fmt: skip
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    second = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    ran = [o for o in outputs if "1 to run" in o]
    skipped = [o for o in outputs if "0 to run" in o]
    assert len(ran) == 1 and len(skipped) == 1, outputs
    assert "already" in skipped[0] or "finished in run" in skipped[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kd-table2a-smoke")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


OPEN_STORE = """
import sys, time
from kd.tracking import Tracker
start = float(sys.argv[2])
while time.time() < start:  # every process opens the new database at the same moment
    time.sleep(0.001)
Tracker(sys.argv[1]).client.search_experiments(max_results=1)
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """A first launch creates the SQLite store's tables while `launch/status.py --watch` opens
    the file that just appeared: MLflow's table creation is not safe to run twice at once
    ("table ... already exists"), so kdgrid runs it under a lock. Four processes, one new file."""
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = str(time.time() + 8)  # after every interpreter has imported MLflow
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, uri, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], "\n".join(outputs)
    assert MlflowClient(tracking_uri=uri).search_experiments()  # the Default experiment
