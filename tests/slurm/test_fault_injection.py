"""Fault injection against the local SLURM cluster (``slurm/cluster.sh up``).

Each case runs a small grid through `launch/grid.py --executor slurm`, injects one real fault
(a signal to a real process, a node taken down in slurmctld, the controller killed), recovers
the way a user would (SLURM's own requeue, or launching the grid again), then audits what MLflow
and the row folders hold (tests/slurmtools.py `audit_rows`): every row finished once, every
epoch's metrics there once, every checkpoint loadable, nothing half-written left. The session
ends with a summary (tests/conftest.py): cases tried, survived, data lost (must be zero).

  1. a row's training task SIGKILLed mid-epoch: the job fails; `--rerun-failed` resumes it;
  2. one node of a 2-node job killed (its part of the job SIGKILLed and the node set DOWN, as
     slurmctld does once a node stops answering): the job requeues (NODE_FAIL) or fails, and
     resumes into the same run from the last epoch saved;
  3. the launcher SIGKILLed right after an sbatch call, before it recorded the job: the next
     launch cancels that stray job and submits the unqueued rows, each row trains once;
  3b. the launcher SIGKILLed after journaling a job, before tagging its run: the next launch
     tags the run from the journal as a submitted run is tagged, and status finds the job GONE
     once SLURM no longer holds it;
  4. the launcher sent SIGTERM (a closed terminal) half-way through submitting: it cancels what
     it queued and exits 130; the next launch runs every row once;
  5. slurmctld SIGKILLed while a teacher runs and its student waits, then restarted: both
     finish, the student after the teacher; `launch/status.py` answers while it is down, and
     a launch refuses (exit 2) without creating anything.

Only jobs whose working directory is under this session's temporary folder are looked at or
cancelled. Outside CI the module is skipped when SLURM is not installed; with CI=true it never
skips.
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
from slurmtools import (
    REPO,
    assert_each_epoch_once,
    audit_rows,
    cancel_leftover_jobs,
    cli_env,
    launch,
    mlflow_client,
    queued_jobs,
    release_held,
    require_slurm,
    row_runs,
    run,
    sacct,
    status_json,
    submissions,
    wait_for_rows,
    wait_sacct_done,
    write_grid,
)

require_slurm()

pytestmark = pytest.mark.slurm

EPOCHS = 30  # epochs of 64 images: long enough to be killed at epoch 3, short enough for CI
LONG_EPOCHS = 80
PAUSE_S = 8  # KDGRID_INJECT_SUBMIT_PAUSE_S: the launcher waits this long after each sbatch


@pytest.fixture(scope="module", autouse=True)
def _cancel_our_jobs_at_the_end(tmp_path_factory: pytest.TempPathFactory):
    yield
    cancel_leftover_jobs(tmp_path_factory.getbasetemp())


# --------------------------------------------------------------------------------------------
# Helpers


def saved_epoch(row_dir: Path) -> int:
    try:
        return json.loads((row_dir / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_saved_epoch(row_dir: Path, epoch: int, job: str, timeout: float = 300) -> int:
    """Poll the row's state.json until it has saved `epoch` (the job must stay queued)."""
    deadline = time.monotonic() + timeout
    while (saved := saved_epoch(row_dir)) < epoch:
        assert time.monotonic() < deadline, f"epoch {saved} after {timeout:.0f}s"
        assert job in {j.split("_")[0] for j in queued_jobs(row_dir.parents[2])}, (
            f"job {job} left the queue at epoch {saved}"
        )
        time.sleep(0.2)
    return saved


def task_processes(job: str, node_index: int) -> list[int]:
    """The training process(es) of `job` on its `node_index`-th node (SLURM_NODEID), by their
    environment: every task of every node of this dev cluster is a process on this machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (
            env.get("SLURM_JOB_ID") == job
            and env.get("SLURM_NODEID") == str(node_index)
            and "SLURM_STEPID" in env
            and "submitit.core._submit" in cmdline
        ):
            pids.append(int(proc.name))
    return pids


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_first_attempt_ended(job: str, timeout: float = 120) -> str:
    """The state sacct recorded for the job's first run (NODE_FAIL, FAILED, ...)."""
    deadline = time.monotonic() + timeout
    while True:
        records = sacct([job], duplicates=True)
        ended = [r for r in records if r["State"].split()[0] not in ("RUNNING", "PENDING")]
        if ended and ended[0]["End"] not in ("Unknown", ""):
            return ended[0]["State"].split()[0]
        assert time.monotonic() < deadline, f"job {job} still running: {records}"
        time.sleep(1)


def half_written_state(row_dir: Path) -> list[str]:
    """What a resume would trip on: a checkpoint that does not load, or a state.json that is
    not the epoch of state.pt or the one before. state.pt is an epoch's commit point, written
    first (kd.train.state.save_epoch): a kill after it and before state.json leaves state.json
    one epoch behind, which the resume repairs (`repair_epoch_files`)."""
    problems = []
    committed = committed_epoch(row_dir, problems)
    for name in ("best.pt", "last.pt"):
        _load(row_dir / name, problems)
    if committed is not None and saved_epoch(row_dir) not in (committed, committed - 1):
        problems.append(f"state.json says epoch {saved_epoch(row_dir)}, state.pt {committed}")
    return problems


def _load(path: Path, problems: list[str]) -> dict | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{path.name}: {exc}")
        return None


def committed_epoch(row_dir: Path, problems: list[str] | None = None) -> int | None:
    """The last epoch state.pt holds: where a resume starts from."""
    state = _load(row_dir / "state.pt", [] if problems is None else problems)
    return None if state is None else len(state["history"])


def job_logs_text(workdir: Path) -> str:
    """Every log of every job (and task) run from `workdir`."""
    return "\n".join(p.read_text() for p in sorted(workdir.glob("**/slurm/*/*_log.out")))


def two_row_grid(
    folder: Path, name: str, data: Path, teacher_epochs: int, *, held: bool = False
) -> Path:
    """A teacher T-1 and a student S-1 distilled from it: two dependency waves, so two sbatch
    calls, the student's with `afterok` on the teacher's job. `held`: the jobs wait with
    `--begin=now+600` until `release_held` (called by `wait_for_rows`) lets them start."""
    return write_grid(
        folder,
        name,
        [
            {"id": "teacher", "label": "T-1", "train": {"epochs": teacher_epochs}},
            {
                "id": "student",
                "label": "S-1",
                "teacher": {"row": "teacher"},
                "kd": {"ce": 0.5, "ikd": 0.5},
            },
        ],
        data,
        epochs=2,
        resources={"sbatch_extra": {"begin": "now+600"}} if held else None,
    )


def start_launch(workdir: Path, grid: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "grid.py"), grid, "--executor", "slurm"],
        cwd=workdir,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_queued(workdir: Path, count: int, launcher: subprocess.Popen, timeout: float = 120):
    """Our queued jobs, once there are `count` of them (the launcher must still be running)."""
    deadline = time.monotonic() + timeout
    while len(jobs := queued_jobs(workdir)) < count:
        assert launcher.poll() is None, launcher.communicate()[0]
        assert time.monotonic() < deadline, f"{len(jobs)} jobs queued after {timeout:.0f}s"
        time.sleep(0.1)
    return jobs


# --------------------------------------------------------------------------------------------
# 1. A task SIGKILLed


def test_task_sigkilled_mid_epoch(tmp_path: Path, epoch_data: Path, fault) -> None:
    """A row's training task SIGKILLed mid-epoch: the job fails, --rerun-failed resumes it."""
    fault.where = "slurm"
    write_grid(tmp_path, "taskkill", [{"id": "victim", "label": "K-1"}], epoch_data, epochs=EPOCHS)
    result = launch(tmp_path, "taskkill.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = (e["job_id"] for e in submissions(tmp_path, "taskkill"))
    row_dir = tmp_path / "outputs" / "taskkill" / "victim"
    wait_saved_epoch(row_dir, 3, job)
    (pid,) = task_processes(job, 0)
    os.kill(pid, signal.SIGKILL)
    assert wait_first_attempt_ended(job) == "FAILED"
    assert half_written_state(row_dir) == []
    killed_at = committed_epoch(row_dir)
    (run_,) = row_runs(tmp_path, "kd-test-taskkill")

    rerun = launch(tmp_path, "taskkill.yaml", "--rerun-failed")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumes its saved state" in rerun.stdout, rerun.stdout
    wait_for_rows(tmp_path, "taskkill.yaml")
    audit = audit_rows(tmp_path, "kd-test-taskkill", {"K-1": EPOCHS}, row_dir.parent)
    fault.lost = len(audit.lost)
    fault.detail = f"killed at epoch {killed_at}/{EPOCHS}; rerun resumed it; {audit}"
    assert [r.info.run_id for r in row_runs(tmp_path, "kd-test-taskkill")] == [run_.info.run_id]
    assert not audit.lost and not audit.twice, audit
    log = job_logs_text(tmp_path)
    assert f"resuming after epoch {killed_at}/{EPOCHS}" in log, log[-2000:]


# --------------------------------------------------------------------------------------------
# 2. One node of a 2-node job killed


@pytest.fixture
def node_n2_back():
    """n2 is put back in service whatever happens in the test."""
    yield
    run("scontrol", "update", "NodeName=n2", "State=RESUME")


def test_one_node_of_a_two_node_job_killed(
    tmp_path: Path, epoch_data: Path, fault, node_n2_back
) -> None:
    """One node of a 2-node job killed: the job requeues or fails, no half-written state
    remains, and it resumes into the same run."""
    fault.where = "slurm"
    write_grid(
        tmp_path,
        "nodekill",
        [{"id": "wide", "label": "N-1"}],
        epoch_data,
        epochs=EPOCHS,
        resources={"nodes": 2},
    )
    result = launch(tmp_path, "nodekill.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = (e["job_id"] for e in submissions(tmp_path, "nodekill"))
    row_dir = tmp_path / "outputs" / "nodekill" / "wide"
    wait_saved_epoch(row_dir, 3, job)
    others = run("squeue", "-h", "-w", "n2", "-o", "%i").stdout.split()
    assert others == [job], f"other jobs on n2 would be killed too: {others}"

    # The node dies: every process of the job on it at once, then slurmctld marks it DOWN
    # (here at once; a real controller does it after SlurmdTimeout without an answer).
    (task,) = task_processes(job, 1)
    stepd = parent_pid(task)
    for pid in (task, stepd):
        os.kill(pid, signal.SIGKILL)
    down = run("scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=kdgrid-fault-test")
    assert down.returncode == 0, down.stderr
    first = wait_first_attempt_ended(job)
    assert first in ("NODE_FAIL", "FAILED"), first
    problems = half_written_state(row_dir)
    killed_at = committed_epoch(row_dir)
    (run_,) = row_runs(tmp_path, "kd-test-nodekill")
    run("scontrol", "update", "NodeName=n2", "State=RESUME")

    requeued = job in {j.split("_")[0] for j in queued_jobs(tmp_path)}
    if not requeued:  # the job failed instead: the user reruns it
        rerun = launch(tmp_path, "nodekill.yaml", "--rerun-failed")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    release_held(tmp_path)
    rows = wait_for_rows(tmp_path, "nodekill.yaml")
    assert rows["N-1"]["state"] == "finished"
    audit = audit_rows(tmp_path, "kd-test-nodekill", {"N-1": EPOCHS}, row_dir.parent)
    fault.lost = len(audit.lost) + len(problems)
    fault.detail = (
        f"killed at epoch {killed_at}/{EPOCHS}: sacct {first}, "
        + ("requeued by SLURM" if requeued else "rerun with --rerun-failed")
        + f"; {audit}"
    )
    assert problems == [], problems
    assert [r.info.run_id for r in row_runs(tmp_path, "kd-test-nodekill")] == [run_.info.run_id]
    assert not audit.lost and not audit.twice, audit
    assert_each_epoch_once(tmp_path, run_.info.run_id, EPOCHS)
    log = job_logs_text(tmp_path)
    assert f"resuming after epoch {killed_at}/{EPOCHS}" in log, log[-2000:]
    final = mlflow_client(tmp_path).get_run(run_.info.run_id)
    assert final.data.tags["kdgrid.world_size"] == "2"


# --------------------------------------------------------------------------------------------
# 3-4. The launcher killed or interrupted while submitting


def test_launcher_sigkilled_between_sbatch_and_its_record(
    tmp_path: Path, epoch_data: Path, fault
) -> None:
    """The launcher SIGKILLed after an sbatch call, before recording the job: the next launch
    cancels the stray job, submits the rows never queued, and each row trains once."""
    fault.where = "slurm"
    # held: the stray student job is still waiting (on its teacher) when the relaunch comes
    two_row_grid(tmp_path, "launchkill", epoch_data, teacher_epochs=3, held=True)
    launcher = start_launch(tmp_path, "launchkill.yaml", KDGRID_INJECT_SUBMIT_PAUSE_S=str(PAUSE_S))
    jobs = wait_queued(tmp_path, 2, launcher)  # the student's sbatch returned: in its pause
    launcher.send_signal(signal.SIGKILL)
    launcher.communicate(timeout=60)
    recorded = {e["label"]: e["job_id"] for e in submissions(tmp_path, "launchkill")}
    assert set(recorded) == {"T-1"}, recorded  # the teacher's job was recorded, not the student's
    (stray,) = set(jobs) - {recorded["T-1"]}
    status = {r["label"]: r for r in status_json(tmp_path, "launchkill.yaml")}
    assert status["S-1"]["state"] == "failed", status
    assert "interrupted before the row was queued" in status["S-1"]["reason"], status

    relaunch = launch(tmp_path, "launchkill.yaml")
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert f"cancelled 1 stray job(s): {stray}" in relaunch.stdout, relaunch.stdout
    assert "1 to run, 1 skipped" in relaunch.stdout, relaunch.stdout
    rows = wait_for_rows(tmp_path, "launchkill.yaml", timeout=900)
    assert {r["state"] for r in rows.values()} == {"finished"}, rows
    (record,) = sacct([stray])
    assert record["State"].startswith("CANCELLED") and record["NodeList"] == "None assigned"
    audit = audit_rows(
        tmp_path,
        "kd-test-launchkill",
        {"T-1": 3, "S-1": 2},
        tmp_path / "outputs/launchkill",
    )
    fault.lost = len(audit.lost)
    fault.detail = f"stray student job {stray} cancelled before it started; {audit}"
    assert not audit.lost and not audit.twice, audit


def test_launcher_sigkilled_between_its_journal_and_the_run_tags(
    tmp_path: Path, epoch_data: Path, fault
) -> None:
    """The launcher SIGKILLed after journaling a job, before tagging its run: the next launch
    takes the job from the journal with the tags a submitted run gets (job name, cluster,
    user), so once SLURM no longer holds the job, status says so (GONE) instead of pending."""
    from slurm.state import cluster_name, current_user

    fault.where = "slurm"
    write_grid(
        tmp_path,
        "journalkill",
        [{"id": "only", "label": "J-1"}],
        epoch_data,
        epochs=2,
        resources={"sbatch_extra": {"begin": "now+600"}},  # pending until cancelled
    )
    launcher = start_launch(tmp_path, "journalkill.yaml", KDGRID_INJECT_RECORD_PAUSE_S=str(PAUSE_S))
    journal = tmp_path / "outputs" / "journalkill" / "submissions.jsonl"
    deadline = time.monotonic() + 120
    while not journal.exists() or '"job_id": "' not in journal.read_text():
        assert launcher.poll() is None, launcher.communicate()[0]
        assert time.monotonic() < deadline, "no job journaled"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)  # in its pause: journaled, the run not yet tagged
    launcher.communicate(timeout=60)
    (entry,) = submissions(tmp_path, "journalkill")
    (run_,) = row_runs(tmp_path, "kd-test-journalkill")
    assert "kdgrid.job_id" not in run_.data.tags, run_.data.tags

    relaunch = launch(tmp_path, "journalkill.yaml")
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert "1 of its rows were queued" in relaunch.stdout, relaunch.stdout
    assert "0 to run, 1 skipped" in relaunch.stdout, relaunch.stdout
    tags = mlflow_client(tmp_path).get_run(run_.info.run_id).data.tags
    recovered = {k: tags.get(k) for k in tags if k.startswith("kdgrid.slurm_")}
    assert tags["kdgrid.job_id"] == entry["job_id"]
    assert recovered == {  # what a run submitted without a fault is tagged with
        "kdgrid.slurm_job_name": "kd-journalkill",
        "kdgrid.slurm_cluster": cluster_name(),
        "kdgrid.slurm_user": current_user(),
    }, tags
    (row,) = status_json(tmp_path, "journalkill.yaml")
    assert (row["state"], row["reason"]) == ("pending", "BeginTime"), row

    # SLURM loses the job (a controller that lost its state): the run's job id is one the
    # cluster no longer has, the way tests/slurm/test_slurm.py's GONE test makes it
    run("scancel", entry["job_id"])
    never = "987654322"
    mlflow_client(tmp_path).set_tag(run_.info.run_id, "kdgrid.job_id", never)
    (row,) = status_json(tmp_path, "journalkill.yaml")
    assert row["state"] == "failed", row
    assert f"SLURM no longer has job {never}" in row["reason"], row
    fault.lost = 0
    fault.detail = f"job {entry['job_id']} recovered from the journal with its tags; GONE seen"


def test_launcher_sent_sigterm_half_way_through_submitting(
    tmp_path: Path, epoch_data: Path, fault
) -> None:
    """The launcher sent SIGTERM half-way through submitting: it cancels what it queued and
    exits 130; the next launch runs every row once."""
    fault.where = "slurm"
    two_row_grid(tmp_path, "launchterm", epoch_data, teacher_epochs=2)
    launcher = start_launch(tmp_path, "launchterm.yaml", KDGRID_INJECT_SUBMIT_PAUSE_S=str(PAUSE_S))
    jobs = wait_queued(tmp_path, 1, launcher)  # the teacher's sbatch returned: in its pause
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 130, output
    assert "submission interrupted, nothing left queued" in output, output
    deadline = time.monotonic() + 60  # scancel returns before the job has left the queue
    while queued_jobs(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not queued_jobs(tmp_path), queued_jobs(tmp_path)
    (record,) = wait_sacct_done(jobs).values()
    assert record["State"].startswith("CANCELLED"), record
    runs = row_runs(tmp_path, "kd-test-launchterm")
    assert {r.info.status for r in runs} == {"KILLED"}, [r.info.status for r in runs]

    relaunch = launch(tmp_path, "launchterm.yaml")
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert "2 to run" in relaunch.stdout, relaunch.stdout
    rows = wait_for_rows(tmp_path, "launchterm.yaml")
    assert {r["state"] for r in rows.values()} == {"finished"}, rows
    audit = audit_rows(
        tmp_path, "kd-test-launchterm", {"T-1": 2, "S-1": 2}, tmp_path / "outputs/launchterm"
    )
    fault.lost = len(audit.lost)
    fault.detail = f"job(s) {', '.join(sorted(jobs))} cancelled by the launcher; {audit}"
    assert not audit.lost and not audit.twice, audit


# --------------------------------------------------------------------------------------------
# 5. The controller killed and restarted


def slurmctld_pid() -> int:
    return int(Path("/run/slurm/slurmctld.pid").read_text().strip())


def test_slurmctld_killed_and_restarted_while_rows_run(
    tmp_path: Path, epoch_data: Path, fault
) -> None:
    """slurmctld SIGKILLed while a teacher runs and its student waits, then restarted: both
    finish, the student after the teacher; while it is down, status answers and a launch
    refuses without creating anything."""
    fault.where = "slurm"
    # the teacher trains on through the status read (squeue waits ~9 s for a dead controller)
    two_row_grid(tmp_path, "ctldkill", epoch_data, teacher_epochs=LONG_EPOCHS)
    result = launch(tmp_path, "ctldkill.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {e["label"]: e["job_id"] for e in submissions(tmp_path, "ctldkill")}
    row_dir = tmp_path / "outputs" / "ctldkill" / "teacher"
    wait_saved_epoch(row_dir, 3, jobs["T-1"])
    os.kill(slurmctld_pid(), signal.SIGKILL)
    try:
        started = time.monotonic()
        status = {r["label"]: r for r in status_json(tmp_path, "ctldkill.yaml")}
        status_s = time.monotonic() - started
        assert status["T-1"]["state"] == "running", status
        # a launch meanwhile refuses at once and leaves nothing behind
        other = tmp_path / "other"
        write_grid(other, "other", [{"id": "o", "label": "O-1"}], epoch_data, epochs=1)
        refused = launch(other, "other.yaml")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "nothing was submitted" in refused.stderr, refused.stderr
        assert not (other / "mlflow.db").exists()
        made = [p.name for p in other.rglob("*") if p.is_file() and p.name != "other.yaml"]
        assert made == [], made
    finally:
        up = subprocess.run(
            ["bash", str(REPO / "slurm" / "cluster.sh"), "up"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert up.returncode == 0, up.stdout + up.stderr
    rows = wait_for_rows(tmp_path, "ctldkill.yaml", timeout=900)
    assert {r["state"] for r in rows.values()} == {"finished"}, rows
    records = {r["JobID"]: r for r in sacct(jobs.values())}
    assert records[jobs["S-1"]]["Start"] >= records[jobs["T-1"]]["End"], records
    audit = audit_rows(
        tmp_path, "kd-test-ctldkill", {"T-1": LONG_EPOCHS, "S-1": 2}, tmp_path / "outputs/ctldkill"
    )
    fault.lost = len(audit.lost)
    fault.detail = f"status answered in {status_s:.1f}s with the controller down; {audit}"
    assert not audit.lost and not audit.twice, audit
