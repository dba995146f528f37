"""End to end: the table2b smoke grid on the local executor, a real MLflow SQLite store.

One launch trains all 10 rows (real timm models, generated CUB+Dogs layouts); a second launch
skips every row; a row made to fail (NaN injected) is the only row `--rerun-failed` reruns.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launching import launch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def row_runs(client: MlflowClient, experiment: str) -> list:
    """The row runs (not the launch runs that group them)."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string="tags.`kdgrid.key` != ''", max_results=1000
    )


def launch_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string="tags.`kdgrid.launch_of` != ''", max_results=1000
    )


@pytest.fixture(scope="module")
def smoke_grid(table2b_smoke):
    return table2b_smoke


def test_every_row_finishes_with_metrics_params_and_artifacts(smoke_grid):
    workdir, result = smoke_grid
    assert "done: 10 finished, 0 failed" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    runs = row_runs(client, "kd-table2b-smoke")
    assert len(runs) == 10
    labels = sorted(r.data.tags["kdgrid.label"] for r in runs)
    assert labels == sorted(f"2b-{i}" for i in range(1, 11))
    param_keys = {frozenset(r.data.params) for r in runs}
    assert len(param_keys) == 1, "every row must log the same param keys"
    for run in runs:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{tags['kdgrid.label']} {tags['kdgrid.id']}"
        for tag in ("kdgrid.grid", "kdgrid.key", "kdgrid.commit", "kdgrid.job_id"):
            assert tags.get(tag), tag
        params = run.data.params
        assert params["train.epochs"] == "2"
        assert params["data.dataset"] == "cub_dogs"
        assert params["key"] == tags["kdgrid.key"]
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        assert [m.step for m in history] == [1, 2]
        for metric in (
            "train/loss",
            "train/ce",
            "train/lr",
            "train/img_per_s",
            "val/acc5",
            "val/loss",
        ):
            assert metric in run.data.metrics, metric
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "row.yaml" in artifacts
        checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert checkpoints == {"checkpoints/best.pt", "checkpoints/last.pt"}
    (parent,) = launch_runs(client, "kd-table2b-smoke")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    hard = next(r for r in runs if r.data.tags["kdgrid.label"] == "2b-6")
    assert hard.data.params["kd.deit_hard"] == "0.5"
    assert "train/deit_hard" in hard.data.metrics
    soft = next(r for r in runs if r.data.tags["kdgrid.label"] == "2b-5")
    assert "train/deit_soft" in soft.data.metrics


def test_students_start_after_their_teachers_finish(smoke_grid):
    workdir, _ = smoke_grid
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    by_id = {r.data.tags["kdgrid.id"]: r for r in row_runs(client, "kd-table2b-smoke")}
    edges = {
        "deit_b_dist_soft": ["convnext_b"],
        "deit_b_dist_hard": ["convnext_b"],
        "deit_b_dist_hard_ft": ["convnext_b", "deit_b_dist"],
        "deit_b_dist_hard_bit": ["bit"],
        "deit_b_dist_hard_bit_ft": ["bit", "deit_b_dist"],
    }
    for student, teachers in edges.items():
        for teacher in teachers:
            started = int(by_id[student].data.tags["kdgrid.started_at_ms"])
            assert started >= by_id[teacher].info.end_time, (
                student,
                teacher,
            )


def test_second_launch_skips_every_row(smoke_grid):
    workdir, _ = smoke_grid
    result = launch(workdir, "grids/table2b.yaml", "--smoke")
    assert result.returncode == 0, result.stderr
    assert "0 to run, 10 skipped" in result.stdout
    assert result.stdout.count("skipped  ") == 10
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    assert len(row_runs(client, "kd-table2b-smoke")) == 10


def test_failed_row_is_rerun_alone(smoke_grid):
    workdir, _ = smoke_grid
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    failed = launch(
        workdir,
        "grids/table2b.yaml",
        "--smoke",
        "--rows",
        "2b-4",
        "--force",
        env={"KDGRID_INJECT_NAN_AT_STEP": "1"},
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert (
        "rerun with: python launch/grid.py grids/table2b.yaml --smoke --rerun-failed"
        in failed.stdout
    )
    # 2b-7 and 2b-10 start from deit_b_dist's checkpoint: the forced rerun says they stay as
    # they are, and how to rerun them with it
    assert (
        "note: row 'deit_b_dist' is rerun; deit_b_dist_hard_ft, deit_b_dist_hard_bit_ft finished"
        in failed.stdout
    )
    assert "--rows deit_b_dist_hard_ft,deit_b_dist_hard_bit_ft --force" in failed.stdout
    runs = row_runs(client, "kd-table2b-smoke")
    assert len(runs) == 11
    latest = max(
        (r for r in runs if r.data.tags["kdgrid.id"] == "deit_b_dist"),
        key=lambda r: r.info.start_time,
    )
    assert latest.info.status == "FAILED"
    assert "non-finite loss" in latest.data.tags["kdgrid.failure_reason"]

    rerun = launch(workdir, "grids/table2b.yaml", "--smoke", "--rerun-failed")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 to run" in rerun.stdout
    runs = row_runs(client, "kd-table2b-smoke")
    assert len(runs) == 12
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.tags["kdgrid.id"] == "deit_b_dist"
    assert newest.info.status == "FINISHED"


def run_script(workdir: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_rows_trained_from_a_rerun_row_are_stale_until_rerun(smoke_grid):
    """Each row records which run's checkpoint it read; after bit (2b-8) is forced, its
    readers 2b-9 and 2b-10 are stale in status and the table until they are rerun."""
    workdir, _ = smoke_grid
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")

    def latest_finished(row_id: str):
        runs = [
            r
            for r in row_runs(client, "kd-table2b-smoke")
            if r.data.tags["kdgrid.id"] == row_id and r.info.status == "FINISHED"
        ]
        return max(runs, key=lambda r: r.info.start_time)

    def status() -> dict:
        result = run_script(workdir, "status.py", "grids/table2b.yaml", "--smoke", "--json")
        return {s["id"]: s for s in json.loads(result.stdout)}

    student, teacher = latest_finished("deit_b_dist_hard_bit"), latest_finished("bit")
    assert student.data.tags["kdgrid.dependency_run.bit"] == teacher.info.run_id
    assert status()["deit_b_dist_hard_bit"]["reason"] is None

    forced = launch(workdir, "grids/table2b.yaml", "--smoke", "--rows", "2b-8", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert (
        "note: row 'bit' is rerun; deit_b_dist_hard_bit, deit_b_dist_hard_bit_ft" in forced.stdout
    )
    new_teacher = latest_finished("bit").info.run_id
    assert new_teacher != teacher.info.run_id
    rows = status()
    for stale in ("deit_b_dist_hard_bit", "deit_b_dist_hard_bit_ft"):
        assert rows[stale]["state"] == "finished"
        assert rows[stale]["reason"].startswith(
            f"stale: row 'bit' has finished again (run {new_teacher})"
        ), rows[stale]
    assert rows["deit_b_dist_hard"]["reason"] is None  # its teacher was not rerun
    table = run_script(workdir, "table.py", "grids/table2b.yaml", "--smoke", "--no-log")
    line = next(x for x in table.stdout.splitlines() if x.startswith("| 2b-9 |"))
    assert line.rstrip(" |").endswith("finished (stale)")
    assert "warning: row 'deit_b_dist_hard_bit' (2b-9): stale:" in table.stderr

    rerun = launch(workdir, "grids/table2b.yaml", "--smoke", "--rows", "2b-9", "--force")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert latest_finished("deit_b_dist_hard_bit").data.tags["kdgrid.dependency_run.bit"] == (
        new_teacher
    )
    rows = status()
    assert rows["deit_b_dist_hard_bit"]["reason"] is None
    assert rows["deit_b_dist_hard_bit_ft"]["reason"].startswith("stale:")


def test_rows_with_unfinished_dependency_is_an_error(tmp_path):
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    result = launch(tmp_path, "grids/table2b.yaml", "--smoke", "--rows", "2b-7")
    assert result.returncode == 2
    assert "depends on row 'convnext_b'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists()


def test_train_script_runs_one_row_after_the_launchers_checks(tmp_path):
    """launch/train.py (one row in this process, for debugging): a row whose dependency never
    ran is bad input (exit 2, no MLflow store created); a row without one trains."""
    shutil.copytree(REPO / "grids", tmp_path / "grids")

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "launch" / "train.py"), "grids/table2b.yaml", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    blocked = train("--row", "2b-7", "--smoke")
    assert blocked.returncode == 2, blocked.stdout + blocked.stderr
    assert "depends on row 'convnext_b'" in blocked.stderr and "Traceback" not in blocked.stderr
    assert not (tmp_path / "mlflow.db").exists()

    done = train("--row", "2b-4", "--smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[deit_b_dist] finished: " in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = row_runs(client, "kd-table2b-smoke")
    assert run.info.status == "FINISHED" and run.data.tags["kdgrid.executor"] == "inline"


def test_a_sweep_variant_equal_to_its_grid_row_reads_that_rows_teacher(tmp_path):
    """`train.seed=0,1` with 0 the grid's seed: convnext_b-seed0 is convnext_b (same content
    key), finished by an earlier launch in the folder convnext_b; the seed-0 student launched
    from the sweep reads that checkpoint (its own convnext_b-seed0 folder does not exist)."""
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    teacher = launch(tmp_path, "grids/table2b.yaml", "--smoke", "--rows", "convnext_b")
    assert teacher.returncode == 0, teacher.stdout + teacher.stderr
    swept = launch(
        tmp_path,
        "grids/table2b.yaml",
        "train.seed=0,1",
        "--smoke",
        "--rows",
        "deit_b_dist_hard-seed0",
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "done: 1 finished, 0 failed" in swept.stdout
    assert not (tmp_path / "outputs" / "table2b-smoke" / "convnext_b-seed0").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.data.tags["kdgrid.id"]: r for r in row_runs(client, "kd-table2b-smoke")}
    assert runs["deit_b_dist_hard-seed0"].info.status == "FINISHED"
    used = runs["deit_b_dist_hard-seed0"].data.tags["kdgrid.dependency_run.convnext_b-seed0"]
    assert used == runs["convnext_b"].info.run_id


def test_cancel_and_sigterm_stop_a_local_launch_row_by_row(tmp_path):
    """Two rows at a time, three rows: `--cancel` of the row still waiting marks its run KILLED
    and the launcher never starts it (it used to, and the row trained to the end); `--cancel`
    of a running row stops its process; SIGTERM to the launcher stops the last one, closes its
    run and exits 130 with the command to rerun."""
    import os
    import signal
    import threading
    import time

    from slurmtools import generate_data, write_grid

    grid = write_grid(
        tmp_path,
        "waiting",
        [
            {"id": "first", "label": "W-1"},
            {"id": "second", "label": "W-2", "train": {"seed": 1}},
            {"id": "third", "label": "W-3", "train": {"seed": 2}},
        ],
        generate_data(tmp_path / "data", train_per_class=2),
        epochs=5000,  # minutes: still running when stopped
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "grid.py"), str(grid), "--executor", "local"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []  # the launcher's output, read as it comes

    def read() -> None:
        for line in launcher.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def runs() -> dict:
        # opened only once the launcher has made the store (MlflowClient makes a new store's
        # tables itself, and two processes doing so at once fail)
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        return {r.data.tags["kdgrid.id"]: r for r in row_runs(client, "kd-test-waiting")}

    try:
        deadline = time.monotonic() + 300
        # the launcher says when it started a row (the store is made by then: not read before)
        while time.monotonic() < deadline and sum("] started (pid" in x for x in lines) < 2:
            time.sleep(0.5)
            assert launcher.poll() is None, "".join(lines)
        started = sorted(x[1 : x.index("]")] for x in lines if "] started (pid" in x)
        assert len(started) == 2, "".join(lines)
        (waiting,) = {"first", "second", "third"} - set(started)
        cancelled, interrupted = started  # the two running rows: one cancelled, one by SIGTERM
        pids = {row: int(runs()[row].data.tags["kdgrid.pid"]) for row in started}
        for row in (waiting, cancelled):
            cancel = launch(tmp_path, str(grid), "--cancel", "--rows", row)
            assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        time.sleep(3)  # the launcher notices the cancelled row's end; the waiting row's turn
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert launcher.returncode == 130, out
    assert f"[{waiting}] not started: its run was cancelled" in out, out
    assert "launch/grid.py: interrupted (SIGTERM): the running rows were stopped" in out, out
    assert "--rerun-failed" in out and "Traceback" not in out, out
    final = runs()
    assert final[waiting].info.status == "KILLED" and "kdgrid.pid" not in final[waiting].data.tags
    for row in (waiting, cancelled):
        reason = final[row].data.tags["kdgrid.failure_reason"]
        assert reason == "cancelled with launch/grid.py --cancel", (row, reason)
    assert final[interrupted].info.status == "KILLED"
    assert final[interrupted].data.tags["kdgrid.failure_reason"] == "launcher interrupted (SIGTERM)"
    for pid in pids.values():  # both row processes are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cancel_while_the_local_executor_starts_a_row(tmp_path):
    """`--cancel` just as the local executor starts a row (it found the run SCHEDULED and is
    about to start its process): the run stays KILLED, the row does not train and no process
    is left. (The row used to start anyway, reopen the KILLED run to RUNNING and train to the
    end.) KDGRID_INJECT_LOCAL_START_PAUSE_S holds the executor in that window until the run is
    closed, so the cancel lands there every time."""
    import os
    import threading
    import time

    from slurmtools import generate_data, write_grid

    from kd.processes import still_running

    grid = write_grid(
        tmp_path,
        "startrace",
        [{"id": "only", "label": "SR-1"}],
        generate_data(tmp_path / "data", train_per_class=2),
        epochs=3,
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["KDGRID_INJECT_LOCAL_START_PAUSE_S"] = "300"
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "grid.py"), str(grid), "--executor", "local"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("[only] fault injection" in x for x in lines):
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        cancel = launch(tmp_path, str(grid), "--cancel", "--rows", "only")
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert "cancelled 1 row(s): only" in cancel.stdout, cancel.stdout
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert "Traceback" not in out, out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = row_runs(client, "kd-test-startrace")
    assert run.info.status == "KILLED", (run.info.status, out)
    assert run.data.tags["kdgrid.failure_reason"] == "cancelled with launch/grid.py --cancel"
    assert client.get_metric_history(run.info.run_id, "epoch") == [], "the cancelled row trained"
    pid, started = run.data.tags.get("kdgrid.pid"), run.data.tags.get("kdgrid.pid_started")
    assert pid is None or not still_running(int(pid), started), "its process is still there"
