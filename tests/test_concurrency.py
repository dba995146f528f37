"""Two launches of the same grid at the same moment run each row once (the launch lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
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
