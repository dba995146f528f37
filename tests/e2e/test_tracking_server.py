"""The cluster tracking server: `launch/server.py` starts a real `mlflow server` on 127.0.0.1
(its SQLite database in WAL mode), 50 processes logging rows at once lose no run and no metric,
and the launcher's runs made through it are what MLflow's own calls make, in fewer requests."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kd.tracking import TAG, RowRun, Tracker, row_params, row_tags, row_yaml
from slurm import server

REPO = Path(__file__).resolve().parents[2]
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
    row_run.start({f"{TAG}.id": f"row{index}", f"{TAG}.device": "cpu"})
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


def _group_commands(pgid: int) -> list[str]:
    """The command lines of the processes in process group `pgid` (from /proc)."""
    commands = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                commands.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" "))
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return [c.decode(errors="replace") for c in commands]


def test_stop_leaves_no_server_process_and_no_job_runners_start(tmp_path):
    port = free_port()
    info = server.start_local(tmp_path / "srv", "127.0.0.1", port)
    try:
        commands = _group_commands(info["pid"])
        assert any("mlflow" in c for c in commands), commands
        assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands
    finally:
        assert server.stop(tmp_path / "srv")
    assert _group_commands(info["pid"]) == []


def test_a_start_on_a_port_another_server_holds_is_refused(tracking_server, tmp_path):
    """The older server would answer the new one's health checks: the start must not report
    success for a server that could not bind."""
    _, uri = tracking_server
    port = int(uri.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
        server.start_local(tmp_path / "second", "127.0.0.1", port)
    assert server.read_server(tmp_path / "second") is None
    assert server.wait_healthy(uri, 5)  # the first server is untouched


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
        assert run.data.tags[f"{TAG}.id"] == f"row{index}"
        assert run.data.tags[f"{TAG}.device"] == "cpu"
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        assert sorted((m.step, m.value) for m in history) == [
            (e, float(index + e)) for e in range(1, EPOCHS + 1)
        ]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == EPOCHS


def test_database_is_in_wal_mode_and_migrated(tracking_server):
    folder, uri = tracking_server
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert MlflowClient(tracking_uri=uri).search_experiments()  # MLflow works on it


def _requests_during(folder: Path, action) -> list[str]:
    """The requests the server logged while `action` ran ("POST /api/2.0/mlflow/runs/create")."""
    log = folder / "server.log"
    before = len(log.read_bytes().splitlines())
    action()
    lines = log.read_bytes().decode(errors="replace").splitlines()[before:]
    found = [re.search(r'"([A-Z]+ /[^ ?"]*)', line) for line in lines]
    return sorted(re.sub(r"/artifacts/.*", "/artifacts/...", m.group(1)) for m in found if m)


def test_launcher_runs_through_a_server_equal_mlflow_calls_in_fewer_requests(
    tracking_server, tmp_path
):
    from mlflow.entities import Param

    from bench.launch import write_launch_grid
    from kd.grid import load_grid

    folder, uri = tracking_server
    grid = load_grid(write_launch_grid(tmp_path, 2, None, "server_path"))
    row = grid.rows[1]
    tracker = Tracker(uri)
    client = tracker.client
    experiment = tracker.ensure_experiment(grid.experiment)
    job_tags = {f"{TAG}.job_id": "7_1", f"{TAG}.pid": "123", f"{TAG}.note": "a b"}

    # what the launcher would send with MLflow's own calls, one set_tag per key (the params
    # and row.yaml are the job's, when it starts)
    tags = row_tags(row, "slurm", None)
    old = client.create_run(experiment, run_name=row.run_name, tags=tags).info.run_id
    client.update_run(old, status="SCHEDULED")
    for key, value in job_tags.items():
        client.set_tag(old, key, value)

    made: list[str] = []
    sent = _requests_during(
        folder, lambda: made.append(tracker.create_row_run(experiment, row, executor="slurm"))
    )
    new = made[0]
    assert sent == [  # no get_run before the status
        "POST /api/2.0/mlflow/runs/create",
        "POST /api/2.0/mlflow/runs/update",
    ]
    assert _requests_during(folder, lambda: tracker.set_tags(new, job_tags)) == [
        "POST /api/2.0/mlflow/runs/log-batch"
    ]
    one_tag = {f"{TAG}.job_id": "7_2"}
    assert _requests_during(folder, lambda: tracker.set_tags_many({new: one_tag})) == [
        "POST /api/2.0/mlflow/runs/set-tag"
    ]
    client.set_tag(old, f"{TAG}.job_id", "7_2")

    a, b = client.get_run(old), client.get_run(new)
    assert b.info.status == a.info.status == "SCHEDULED"
    assert (b.info.run_name, b.info.end_time, b.info.user_id) == (
        a.info.run_name,
        a.info.end_time,
        a.info.user_id,
    )
    assert b.data.tags == a.data.tags and b.data.tags[f"{TAG}.job_id"] == "7_2"
    assert b.data.params == a.data.params == {}
    # the job, when it starts: every param in one batch, row.yaml as an artifact
    client.log_batch(old, params=[Param(k, v) for k, v in row_params(row).items()])
    client.log_text(old, row_yaml(row), "row.yaml")
    sent = _requests_during(folder, lambda: RowRun(uri, new).log_row(row))
    assert sent.count("POST /api/2.0/mlflow/runs/log-batch") == 1
    assert sent.count("PUT /api/2.0/mlflow-artifacts/artifacts/...") == 1
    a, b = client.get_run(old), client.get_run(new)
    assert b.data.params == a.data.params and b.data.params["key"] == row.key
    for run_id in (old, new):
        assert [f.path for f in client.list_artifacts(run_id)] == ["row.yaml"]
    texts = [
        Path(client.download_artifacts(r, "row.yaml", str(tmp_path / r))).read_text()
        for r in (old, new)
    ]
    assert texts[0] == texts[1] == row_yaml(row)

    # a failed row scheduled again: the same run, its end time kept, in one get_run
    tracker.mark(new, "FAILED", "out of memory")
    failed = client.get_run(new)
    sent = _requests_during(
        folder, lambda: tracker.reopen_row_run(new, executor="slurm", parent_run_id=old)
    )
    assert sent.count("GET /api/2.0/mlflow/runs/get") == 1
    assert sent.count("POST /api/2.0/mlflow/runs/log-batch") == 1
    assert "POST /api/2.0/mlflow/runs/set-tag" not in sent
    again = client.get_run(new)
    assert again.info.status == "SCHEDULED" and again.info.end_time == failed.info.end_time
    assert again.data.tags[f"{TAG}.previous_failure"] == "out of memory"
    assert again.data.tags[f"{TAG}.resumed"] == "1"
    assert again.data.tags["mlflow.parentRunId"] == old
    for gone in (f"{TAG}.failure_reason", f"{TAG}.job_id", f"{TAG}.pid"):
        assert gone not in again.data.tags


def _compare_bulk_runs(tracker: Tracker, grid, made: dict[str, str], one: str) -> None:
    """Runs made in bulk equal the run `create_row_run` made for the first row, field by field."""
    a = tracker.client.get_run(one)
    for row in grid.rows[1:]:
        b = tracker.client.get_run(made[row.id])
        assert b.info.status == a.info.status == "SCHEDULED"
        assert (b.info.run_name, b.info.user_id, b.info.lifecycle_stage) == (
            row.run_name,
            a.info.user_id,
            "active",
        )
        assert b.info.artifact_uri.endswith(f"/{b.info.run_id}/artifacts")
        assert set(b.data.tags) == set(a.data.tags)
        assert (
            b.data.tags[f"{TAG}.key"] == row.key and b.data.tags["mlflow.runName"] == row.run_name
        )
        for key in (f"{TAG}.grid", f"{TAG}.commit", f"{TAG}.executor", "mlflow.parentRunId"):
            assert b.data.tags[key] == a.data.tags[key], key


def _launch_runs(folder: Path, uri: str, tmp_path: Path, rows: int, name: str):
    """A launch's runs made through the server at `uri`: the first row one by one
    (`create_row_run`, the reference), the others at once (`create_row_runs`). Returns the
    tracker, grid, experiment, the bulk runs, the reference run and the requests sent."""
    from bench.launch import write_launch_grid
    from kd.grid import load_grid

    grid = load_grid(write_launch_grid(tmp_path, rows, None, name))
    tracker = Tracker(uri)
    experiment = tracker.ensure_experiment(grid.experiment)
    parent = tracker.create_launch_run(experiment, grid.name, grid.file, "slurm", rows)
    one = tracker.create_row_run(experiment, grid.rows[0], executor="slurm", parent_run_id=parent)
    made: dict[str, str] = {}
    sent = _requests_during(
        folder,
        lambda: made.update(
            tracker.create_row_runs(
                experiment, grid.rows[1:], executor="slurm", parent_run_id=parent
            )
        ),
    )
    return tracker, grid, experiment, made, one, sent


def test_a_launch_posts_its_runs_and_job_tags_in_one_request_each(tracking_server, tmp_path):
    """The kdgrid server's bulk routes (kd/tracking/server_app.py): a launch's runs in one
    request, a sbatch call's job id tags in another, the same runs as MLflow's calls make."""
    folder, uri = tracking_server
    tracker, grid, experiment, made, one, sent = _launch_runs(folder, uri, tmp_path, 6, "bulk")
    assert sent == ["POST /kdgrid/api/1/runs/create-many"]
    _compare_bulk_runs(tracker, grid, made, one)
    jobs = {run_id: {f"{TAG}.job_id": f"9_{i}"} for i, run_id in enumerate(made.values())}
    sent = _requests_during(folder, lambda: tracker.set_tags_many(jobs))
    assert sent == ["POST /kdgrid/api/1/runs/set-tags-many"]
    for run_id, tags in jobs.items():
        assert tracker.client.get_run(run_id).data.tags[f"{TAG}.job_id"] == tags[f"{TAG}.job_id"]
    assert set(tracker.latest_by_key(experiment)) == {row.key for row in grid.rows}

    # read back in one request: what MLflow's own paged search returns (NaN metrics included)
    first = made[grid.rows[1].id]
    tracker.client.log_metric(first, "val/acc1", float("nan"), step=1)
    tracker.client.log_metric(made[grid.rows[2].id], "val/acc1", 0.5, step=1)
    found: list = []
    sent = _requests_during(
        folder, lambda: found.extend(tracker.search_tagged(experiment, f"{TAG}.grid", grid.name))
    )
    assert sent == ["POST /kdgrid/api/1/runs/search-tagged"]
    theirs = list(tracker.search(experiment, f"tags.`{TAG}.grid` = '{grid.name}'"))
    assert [r.info.run_id for r in found] == [r.info.run_id for r in theirs]
    for ours, mlflows in zip(found, theirs, strict=True):
        assert (ours.info.status, ours.info.start_time, ours.info.end_time) == (
            mlflows.info.status,
            mlflows.info.start_time,
            mlflows.info.end_time,
        )
        assert ours.data.tags == mlflows.data.tags and ours.data.params == {}
        assert set(ours.data.metrics) == set(mlflows.data.metrics)
    by_id = {r.info.run_id: r for r in found}
    assert math.isnan(by_id[first].data.metrics["val/acc1"])
    assert by_id[made[grid.rows[2].id]].data.metrics["val/acc1"] == 0.5

    # status's read, without MLflow's client: the same runs; none for an unknown experiment;
    # not tried with credentials in the environment (MLflow's client handles those)
    from kd.tracking import server_bulk

    light = server_bulk.search_tagged_light(uri, grid.experiment, f"{TAG}.grid", grid.name)
    assert light is not None
    assert [(r.info, r.data.tags) for r in light] == [(r.info, r.data.tags) for r in found]
    assert math.isnan(next(r for r in light if r.info.run_id == first).data.metrics["val/acc1"])
    assert server_bulk.search_tagged_light(uri, "no-such-experiment", f"{TAG}.grid", "x") == []
    newest = server_bulk.search_tagged_light(
        uri, grid.experiment, f"{TAG}.grid", grid.name, latest_by=f"{TAG}.key"
    )
    assert [r.info.run_id for r in newest] == [r.info.run_id for r in found]  # one run per key
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_TOKEN", "t")
        assert (
            server_bulk.search_tagged_light(uri, grid.experiment, f"{TAG}.grid", grid.name) is None
        )
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(REPO / "launch" / "status.py"),
            grid.file,
            "--tracking-uri",
            uri,
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert not [m for m in modules if m.split(".")[0] == "mlflow"]
    assert len(json.loads(done.stdout)) == len(grid.rows)

    # --cancel in one request: what Tracker.cancel_run leaves, a finished run left alone
    from kd.tracking import CANCEL_REASON, CANCELLED, CancelRuns

    finished, *rest = list(made.values())
    tracker.client.set_terminated(finished, status="FINISHED")
    reference = rest.pop()
    tracker.cancel_run(reference, CANCEL_REASON)
    closed: set = set()
    sent = _requests_during(
        folder,
        lambda: closed.update(
            CancelRuns(uri, grid.experiment).cancel_runs([finished, *rest], CANCEL_REASON)
        ),
    )
    assert sent == ["POST /kdgrid/api/1/runs/cancel-many"]
    assert closed == set(rest)
    assert tracker.client.get_run(finished).info.status == "FINISHED"
    want = tracker.client.get_run(reference)
    for run_id in rest:
        run = tracker.client.get_run(run_id)
        assert run.info.status == want.info.status == "KILLED" and run.info.end_time
        assert set(run.data.tags) == set(want.data.tags)
        assert run.data.tags[f"{TAG}.failure_reason"] == CANCEL_REASON
        assert run.data.tags[CANCELLED].isdigit()


def server_bulk_light(uri: str, grid) -> list | None:
    from kd.tracking import server_bulk

    return server_bulk.search_tagged_light(uri, grid.experiment, f"{TAG}.grid", grid.name)


def test_a_stock_mlflow_server_gets_the_rest_api(tmp_path, monkeypatch):
    """Without kdgrid's routes (a plain `mlflow server`) the launcher sends MLflow's requests."""
    monkeypatch.setattr(server, "kdgrid_app_installed", lambda: False)
    port = free_port()
    folder = tmp_path / "stock"
    info = server.start_local(folder, "127.0.0.1", port)
    try:
        tracker, grid, _, made, one, sent = _launch_runs(folder, info["uri"], tmp_path, 4, "stock")
        assert sent.count("POST /kdgrid/api/1/runs/create-many") == 1  # answered 404
        assert sent.count("POST /api/2.0/mlflow/runs/create") == 3
        assert server_bulk_light(info["uri"], grid) is None  # 404: MLflow's client instead
        _compare_bulk_runs(tracker, grid, made, one)
        jobs = {run_id: {f"{TAG}.job_id": "7"} for run_id in made.values()}
        tracker.set_tags_many(jobs)
        assert {tracker.client.get_run(r).data.tags[f"{TAG}.job_id"] for r in made.values()} == {
            "7"
        }
    finally:
        assert server.stop(folder)
