"""The cluster tracking server: `launch/server.py` starts a real `mlflow server` on 127.0.0.1,
and 50 processes logging rows at once lose no run and no metric."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.tracking import TAG, RowRun
from slurm import server

REPO = Path(__file__).resolve().parent.parent
WRITERS = 50
EPOCHS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "server.py"),
            "start",
            "--dir",
            str(folder),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    uri = f"http://127.0.0.1:{port}"
    assert uri in result.stdout
    yield folder, uri
    server.stop(folder)


def log_row(uri: str, experiment_id: str, index: int) -> None:
    """What a row job does with its run: start, per-epoch metrics, finish."""
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(
        experiment_id, run_name=f"row {index}", tags={f"{TAG}.key": f"key{index}"}
    )
    row_run = RowRun(uri, run.info.run_id)
    row_run.start({f"{TAG}.id": f"row{index}"})
    for epoch in range(1, EPOCHS + 1):
        row_run.log_metrics(
            {"train/loss": 1.0 / epoch, "val/acc1": float(index + epoch)}, step=epoch
        )
    row_run.finish("FINISHED")


def test_server_binds_loopback_and_reports_status(tracking_server):
    folder, uri = tracking_server
    info = server.read_server(folder)
    assert info["uri"] == uri
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True, check=False).stdout
    port = uri.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in listening
    assert f"0.0.0.0:{port}" not in listening
    status = subprocess.run(
        [sys.executable, str(REPO / "launch" / "server.py"), "status", "--dir", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0 and uri in status.stdout


def test_fifty_concurrent_writers_lose_nothing(tracking_server):
    _, uri = tracking_server
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("concurrency")
    context = multiprocessing.get_context("fork")  # mlflow is imported once; children log at once
    processes = [
        context.Process(target=log_row, args=(uri, experiment_id, i)) for i in range(WRITERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * WRITERS
    runs = client.search_runs([experiment_id], max_results=1000)
    assert len(runs) == WRITERS
    for run in runs:
        assert run.info.status == "FINISHED"
        index = int(run.data.tags[f"{TAG}.key"].removeprefix("key"))
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        assert sorted((m.step, m.value) for m in history) == [
            (e, float(index + e)) for e in range(1, EPOCHS + 1)
        ]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == EPOCHS
