"""Faults on the local executor: nothing finished is lost, nothing is run twice.

A row killed with SIGKILL mid-training is rerun by `--rerun-failed` from its last saved epoch,
into the same MLflow run, with every epoch logged exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.data import generate_dataset

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
EPOCHS = 6

GRID = """\
name: faults
experiment: kd-faults
defaults:
  student: {{model: deit_tiny_patch16_224, drop_path: 0.0}}
  init: scratch
  data: {{dataset: imagefolder, root: {root}, img_size: 32, num_workers: 0}}
  train: {{epochs: {epochs}, batch_size: 4, warmup_epochs: 0, auto_augment: null}}
  resources: {{gpus_per_node: 0}}
  output_dir: {out}
rows:
  - {{id: victim, label: V}}
"""


def launch(workdir: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "grid.py"),
            "grid.yaml",
            *args,
            "--executor",
            "local",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkilled_row_resumes_into_the_same_run(tmp_path):
    spec = generate_dataset(
        "imagefolder", tmp_path / "data", num_classes=2, train_per_class=8, image_size=32
    )
    out = tmp_path / "out"
    (tmp_path / "grid.yaml").write_text(GRID.format(root=spec.root, out=out, epochs=EPOCHS))
    first = launch(tmp_path)
    state_info = out / "victim" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state_info.exists() and json.loads(state_info.read_text())["epoch"] >= 2:
            break
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kd-faults")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    os.kill(int(run.data.tags["kdgrid.pid"]), signal.SIGKILL)  # the row's process, mid-training
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 1, output
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    saved = json.loads(state_info.read_text())["epoch"]
    assert 2 <= saved < EPOCHS

    rerun = launch(tmp_path, "--rerun-failed")
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    assert "resumes its saved state" in output
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    assert [r.info.run_id for r in runs] == [run.info.run_id], "the rerun must land in the same run"
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    assert final.data.tags["kdgrid.resumed"] == "1"
    assert "exited with code" in final.data.tags["kdgrid.previous_failure"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc1"))
    assert steps == list(range(1, EPOCHS + 1)), "every epoch logged exactly once"
    log = (out / "victim" / "train.log").read_text()
    assert f"resuming after epoch {saved}/{EPOCHS}" in log
