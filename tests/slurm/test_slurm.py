"""End to end on the local SLURM cluster (``slurm/cluster.sh up``): launch/grid.py and
launch/status.py against real slurmctld, slurmd n1/n2, sacct and MLflow.

What is proved, and how:
  - the sbatch text of a row is the recorded one (tests/data/sbatch_2b-7.txt);
  - `check_rows` against the live `sinfo`, and through the CLI: exit 2, nothing queued, no MLflow;
  - the table2b smoke grid, submitted once for the module: the command returns before the rows
    run, rows sharing resources and dependencies share a job array, every row finishes, no
    student starts before its teacher ended (sacct Start/End), a relaunch submits nothing, a row
    made to fail (NaN) is rerun alone, a failed teacher's student is cancelled by SLURM;
  - a grid relaunched while pending/running submits nothing; `--cancel` cancels and kills;
  - `scontrol requeue` and a 1-minute time limit both resume into the same MLflow run, every
    epoch logged exactly once;
  - a 2-node row trains with world size 2 over gloo and logs once per epoch.

A requeued job waits in SLURM for the credential lifetime (`AuthInfo cred_expire`, 120 s by
default, "BeginTime") before it may start again; the wait loops here release our own held jobs
with `scontrol update StartTime=now` so a requeue costs seconds, not two minutes.

Only jobs whose working directory is under this session's temporary folder are ever looked at or
cancelled: other people's jobs on the same cluster are left alone.

Outside CI the module is skipped when SLURM is not installed; with CI=true it never skips.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from slurmtools import (
    NODES,
    REPO,
    assert_each_epoch_once,
    by_label,
    cancel_leftover_jobs,
    cli_env,
    generate_data,
    hostnames,
    job_logs,
    jobs_submitted_from,
    launch,
    log_tail,
    mlflow_client,
    only_run,
    parse_time,
    queued_jobs,
    require_slurm,
    row_runs,
    run,
    sacct,
    script,
    seconds_per_epoch,
    status_json,
    steps,
    submissions,
    wait_for_jobs_from,
    wait_for_rows,
    wait_sacct_done,
    write_grid,
)

from slurm.state import Submission, cluster_name, current_user, job_states

require_slurm()

pytestmark = pytest.mark.slurm

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDED_SBATCH = DATA / "sbatch_2b-7.txt"
SMOKE = "kd-table2b-smoke"
# The smoke grid's dependency edges (student label -> teacher / init labels).
EDGES = {
    "2b-5": ["2b-1"],
    "2b-6": ["2b-1"],
    "2b-7": ["2b-1", "2b-4"],
    "2b-9": ["2b-8"],
    "2b-10": ["2b-8", "2b-4"],
}


@pytest.fixture(scope="module", autouse=True)
def _cancel_our_jobs_at_the_end(tmp_path_factory: pytest.TempPathFactory):
    yield
    cancel_leftover_jobs(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder copy in the real layout: 4 classes, 16 training and 8 test images."""
    return generate_data(tmp_path_factory.mktemp("tiny-data") / "data", 4)


# --------------------------------------------------------------------------------------------
# 1. The sbatch script of a row, against the recorded one
# --------------------------------------------------------------------------------------------


def sbatch_text_2b7() -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    from kd.grid import load_grid
    from slurm.submit import executor_parameters

    grid = load_grid(
        REPO / "grids" / "table2b.yaml",
        [
            "resources.partition=gpu",
            "resources.account=kd-lab",
            "resources.qos=high",
            "resources.constraint=a100",
            "resources.exclude='n3,n4'",
            "+resources.sbatch_extra.mail-type=END",
            "+resources.sbatch_extra.comment=table2b",
        ],
        check_data=False,
    )
    (row,) = grid.select(["2b-7"])
    params = executor_parameters(row, 256)
    params["dependency"] = "afterok:101_0:102"  # as submit_rows writes it: teacher and init jobs
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit /FOLDER", folder="/FOLDER", **params
    )


def test_sbatch_script_of_row_2b7_is_the_recorded_one() -> None:
    text = sbatch_text_2b7()
    if os.environ.get("KDGRID_RECORD_SBATCH") == "1":  # deliberate re-recording only
        RECORDED_SBATCH.write_text(text)
    assert RECORDED_SBATCH.is_file(), f"{RECORDED_SBATCH} missing"
    recorded = RECORDED_SBATCH.read_text()
    assert text == recorded, (
        "the sbatch script of row 2b-7 changed; if that is intended, inspect the diff and "
        f"re-record with KDGRID_RECORD_SBATCH=1 python -m pytest {__file__} -k recorded\n"
        f"--- now:\n{text}"
    )
    # what the recording must hold, so that re-recording cannot silently lose it
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=kd-lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclude=n3,n4",
        "#SBATCH --mail-type=END",
        "#SBATCH --comment=table2b",
        "#SBATCH --dependency=afterok:101_0:102",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=65536M",
        "#SBATCH --time=720",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=kd-table2b",
    ):
        assert line in recorded.splitlines(), line


# --------------------------------------------------------------------------------------------
# 2. check_rows against the live sinfo; bad input through the CLI queues nothing
# --------------------------------------------------------------------------------------------


def _with_resources(row, **changes):
    resources = dataclasses.replace(row.config.resources, **changes)
    return dataclasses.replace(row, config=dataclasses.replace(row.config, resources=resources))


def test_check_rows_against_live_sinfo() -> None:
    from kd.grid import load_grid
    from slurm.submit import check_rows, read_partitions

    partitions = read_partitions()
    assert {"gpu", "debug"} <= set(partitions)
    assert partitions["gpu"].default and not partitions["debug"].default
    assert not partitions["gpu"].has_gpus and not partitions["debug"].has_gpus

    grid = load_grid(REPO / "grids" / "table2b.yaml", check_data=False)
    row = grid.rows[0]  # 1 GPU per node, as the real grid asks
    cpu_row = _with_resources(row, gpus_per_node=0)
    assert check_rows([_with_resources(cpu_row, partition="gpu")], partitions) == []
    assert check_rows([_with_resources(cpu_row, partition="debug")], partitions) == []
    assert check_rows([cpu_row], partitions) == []  # the default partition

    (problem,) = check_rows([_with_resources(cpu_row, partition="gpuu")], partitions)
    assert "no partition 'gpuu'" in problem and "did you mean 'gpu'?" in problem, problem

    for partition in ("gpu", "debug", None):
        (problem,) = check_rows([_with_resources(row, partition=partition)], partitions)
        assert "resources.gpus_per_node" in problem and "has no GPUs" in problem, problem

    for bad in ("gpu;rm -rf /", "gpu\nrm -rf /", "$(x)", "a b", "`id`"):
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            problems = check_rows([_with_resources(cpu_row, **{key: bad})], partitions)
            assert any(f"resources.{key}" in p for p in problems), (key, bad, problems)
        problems = check_rows([_with_resources(cpu_row, sbatch_extra={"comment": bad})], partitions)
        assert any("sbatch_extra.comment" in p for p in problems), (bad, problems)
    for flag in ("dependency", "array", "output", "wrap", "kill-on-invalid-dep", "x;y"):
        problems = check_rows([_with_resources(cpu_row, sbatch_extra={flag: "1"})], partitions)
        assert any(f"sbatch_extra.{flag}" in p for p in problems), (flag, problems)


def _assert_nothing_happened(workdir: Path, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (workdir / "mlflow.db").exists(), "a refused launch created the MLflow store"
    assert not list(workdir.glob("outputs/**/slurm")), "a refused launch wrote job folders"
    assert jobs_submitted_from(workdir) == set(), "a refused launch queued jobs"


def test_bad_slurm_fields_through_the_cli_queue_nothing(tmp_path: Path, tiny_data: Path) -> None:
    """Every problem reported at once, exit status 2, no job, no MLflow store, no job folder."""
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    proc = launch(
        tmp_path,
        "grids/table2b.yaml",
        "resources.account='gpu;rm -rf /'",
        "+resources.sbatch_extra.comment='$(x)'",
        "--smoke",
        "--partition",
        "gpuu",
    )
    _assert_nothing_happened(tmp_path, proc)
    assert "no partition 'gpuu' on this cluster (did you mean 'gpu'?)" in proc.stderr
    assert "resources.account: 'gpu;rm -rf /' contains characters" in proc.stderr
    assert "resources.sbatch_extra.comment: unsafe value '$(x)'" in proc.stderr

    # unquoted, the override grammar refuses it already
    proc = launch(tmp_path, "grids/table2b.yaml", "--smoke", "--partition", "gpu;rm -rf /")
    _assert_nothing_happened(tmp_path, proc)

    # from a grid file: a newline in a row, a GPU on a partition without GPUs in another
    grid = write_grid(
        tmp_path / "g",
        "badfields",
        [
            {"id": "a", "label": "A-1", "resources": {"partition": "gpu\nrm -rf /"}},
            {
                "id": "b",
                "label": "A-2",
                "train": {"seed": 1},
                "resources": {"gpus_per_node": 1, "partition": "debug"},
            },
        ],
        tiny_data,
        epochs=1,
    )
    proc = launch(tmp_path, str(grid))
    _assert_nothing_happened(tmp_path, proc)
    assert "resources.partition: 'gpu\\nrm -rf /' contains characters" in proc.stderr
    assert "1 GPUs requested but partition 'debug' has no GPUs" in proc.stderr


def test_submission_failing_half_way_leaves_nothing_queued(tmp_path: Path, tiny_data: Path) -> None:
    """The first wave is queued, sbatch refuses the second: the first is cancelled again."""
    grid = write_grid(
        tmp_path,
        "halfway",
        [
            {"id": "teacher", "label": "H-1"},
            {
                "id": "student",
                "label": "H-2",
                "init": {"row": "teacher"},
                "resources": {"sbatch_extra": {"no-such-flag": "1"}},  # passes check_rows
            },
        ],
        tiny_data,
        epochs=500,
    )
    proc = launch(tmp_path, grid.name)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unrecognized option '--no-such-flag=1'" in proc.stderr, proc.stderr
    queued = wait_for_jobs_from(tmp_path)
    assert len(queued) == 1, queued  # the teacher's job, before the student's sbatch failed
    (record,) = wait_sacct_done(queued).values()
    assert record["State"].startswith("CANCELLED"), record
    runs = row_runs(tmp_path, "kd-test-halfway")
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    for run_ in runs:
        assert "submission failed" in run_.data.tags["kdgrid.failure_reason"]
    assert {r["state"] for r in status_json(tmp_path, grid.name)} == {"cancelled"}


# --------------------------------------------------------------------------------------------
# 3-5, 9. The table2b smoke grid, submitted once
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Submitted:
    workdir: Path
    result: subprocess.CompletedProcess[str]
    seconds: float
    queued_after: dict[str, tuple[str, str]]  # squeue the moment the command returned
    jobs: dict[str, str]  # label -> job id


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory: pytest.TempPathFactory) -> Submitted:
    """`launch/grid.py grids/table2b.yaml --smoke --partition gpu`, once for the module."""
    workdir = tmp_path_factory.mktemp("table2b")
    shutil.copytree(REPO / "grids", workdir / "grids")
    start = time.monotonic()
    result = launch(workdir, "grids/table2b.yaml", "--smoke", "--partition", "gpu")
    seconds = time.monotonic() - start
    queued_after = queued_jobs(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {e["label"]: e["job_id"] for e in submissions(workdir, "table2b-smoke")}
    return Submitted(workdir, result, seconds, queued_after, jobs)


@pytest.fixture(scope="module")
def finished_grid(smoke_grid: Submitted) -> dict[str, dict[str, Any]]:
    """The smoke grid once every row has finished (status --json, polled)."""
    return wait_for_rows(smoke_grid.workdir, "grids/table2b.yaml", "--smoke", timeout=900)


def test_submission_returns_before_the_rows_run(smoke_grid: Submitted) -> None:
    out = smoke_grid.result.stdout
    assert smoke_grid.seconds < 60, f"launch took {smoke_grid.seconds:.0f}s"
    assert "10 to run, 0 skipped" in out, out
    assert set(smoke_grid.jobs) == {f"2b-{i}" for i in range(1, 11)}
    for label, job_id in smoke_grid.jobs.items():  # row -> job id, printed
        assert re.search(rf"\s{re.escape(label)}\s+job {re.escape(job_id)}\s", out), (label, out)
    # the moment the command returned: every row still queued (none ended), students waiting
    # (status' pending rows and their reason: test_relaunch_while_queued_...)
    queued = smoke_grid.queued_after
    assert set(smoke_grid.jobs.values()) <= set(queued), (smoke_grid.jobs, queued)
    for label in EDGES:
        assert queued[smoke_grid.jobs[label]][0] == "PENDING", (label, queued)


def test_submission_record_in_output_folder_and_mlflow(smoke_grid: Submitted) -> None:
    entries = submissions(smoke_grid.workdir, "table2b-smoke")
    assert len(entries) == 10
    runs = {r.info.run_id: r for r in row_runs(smoke_grid.workdir, SMOKE)}
    for entry in entries:
        assert entry["executor"] == "slurm"
        run_ = runs[entry["run_id"]]
        assert run_.data.tags["kdgrid.job_id"] == entry["job_id"]
        assert run_.data.tags["kdgrid.key"] == entry["key"]
        assert run_.data.tags["kdgrid.label"] == entry["label"]


def test_rows_with_same_resources_and_dependencies_share_an_array(smoke_grid: Submitted) -> None:
    jobs = smoke_grid.jobs
    groups: dict[str, set[str]] = {}
    for label, job_id in jobs.items():
        groups.setdefault(job_id.split("_")[0], set()).add(label)
    expected = [{"2b-1", "2b-2", "2b-3", "2b-4", "2b-8"}, {"2b-5", "2b-6"}, {"2b-7"}, {"2b-9"}]
    expected.append({"2b-10"})
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected)), groups
    # each sbatch script waits on its dependencies' jobs (afterok) and dies with them
    slurm_dir = smoke_grid.workdir / "outputs" / "table2b-smoke" / "slurm"
    for label, teachers in EDGES.items():
        array = jobs[label].split("_")[0]
        script = (slurm_dir / array / f"{array}_submission.sh").read_text()
        deps = ":".join(sorted(jobs[t] for t in teachers))
        assert f"#SBATCH --dependency=afterok:{deps}\n" in script, (label, script)
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in script
        assert "#SBATCH --partition=gpu\n" in script
    first = jobs["2b-1"].split("_")[0]
    assert "#SBATCH --array=0-4%5\n" in (slurm_dir / first / f"{first}_submission.sh").read_text()


def test_every_row_finishes_with_metrics(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    assert {r["state"] for r in finished_grid.values()} == {"finished"}, finished_grid
    runs = row_runs(smoke_grid.workdir, SMOKE)
    assert len(runs) == 10
    for run_ in runs:
        assert run_.info.status == "FINISHED"
        assert run_.data.tags["kdgrid.executor"] == "slurm"
        assert run_.data.tags["kdgrid.world_size"] == "1"
        for metric in ("train/loss", "train/ce", "val/acc1", "val/acc5", "val/loss", "epoch"):
            assert metric in run_.data.metrics, metric
        assert steps(smoke_grid.workdir, run_.info.run_id, "val/acc1") == [1, 2]
        checkpoints = {
            a.path
            for a in mlflow_client(smoke_grid.workdir).list_artifacts(
                run_.info.run_id, "checkpoints"
            )
        }
        assert checkpoints == {"checkpoints/best.pt", "checkpoints/last.pt"}


def test_no_student_starts_before_its_teacher_ended(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    records = wait_sacct_done(smoke_grid.jobs.values())
    times = {
        label: records[job_id] for label, job_id in smoke_grid.jobs.items()
    }  # label -> sacct record
    for label, record in times.items():
        assert record["State"] == "COMPLETED", (label, record)
    for student, teachers in EDGES.items():
        for teacher in teachers:
            started = parse_time(times[student]["Start"])
            ended = parse_time(times[teacher]["End"])
            assert started >= ended, f"{student} started {started} before {teacher} ended {ended}"


def test_status_json_fields_for_the_finished_grid(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    rows = status_json(smoke_grid.workdir, "grids/table2b.yaml", "--smoke")
    assert [r["label"] for r in rows] == [f"2b-{i}" for i in range(1, 11)]
    for row in rows:
        for field in ("id", "label", "state", "job_id", "nodes", "elapsed_s", "epoch", "acc1"):
            assert field in row, field
        assert row["state"] == "finished"
        assert row["job_id"] == smoke_grid.jobs[row["label"]]
        assert hostnames(row["nodes"]) <= NODES and row["nodes"], row
        assert isinstance(row["elapsed_s"], int) and row["elapsed_s"] > 0, row
        assert row["epoch"] == 2
        assert isinstance(row["acc1"], float) and 0.0 <= row["acc1"] <= 100.0, row
    text = subprocess.run(
        [sys.executable, str(REPO / "launch" / "status.py"), "grids/table2b.yaml", "--smoke"],
        cwd=smoke_grid.workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    assert ": 10 finished\n" in text.stdout, text.stdout + text.stderr
    for label, job_id in smoke_grid.jobs.items():
        assert re.search(rf"\s{re.escape(label)}\s+finished\s+{re.escape(job_id)}\s", text.stdout)


def test_relaunch_when_done_submits_nothing(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    before = jobs_submitted_from(smoke_grid.workdir)
    result = launch(smoke_grid.workdir, "grids/table2b.yaml", "--smoke", "--partition", "gpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 to run, 10 skipped" in result.stdout, result.stdout
    assert "submitted" not in result.stdout
    assert jobs_submitted_from(smoke_grid.workdir) == before
    assert len(row_runs(smoke_grid.workdir, SMOKE)) == 10


def test_failed_row_is_rerun_alone(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    workdir = smoke_grid.workdir
    before = jobs_submitted_from(workdir)
    failed = launch(
        workdir,
        "grids/table2b.yaml",
        "--smoke",
        "--rows",
        "2b-4",
        "--force",
        env={"KDGRID_INJECT_NAN_AT_STEP": "1"},  # sbatch exports it to the job
    )
    assert failed.returncode == 0, failed.stdout + failed.stderr
    assert "1 to run" in failed.stdout
    (nan_job,) = jobs_submitted_from(workdir) - before
    rows = wait_for_rows(workdir, "grids/table2b.yaml", "--smoke", labels=["2b-4"], expect="failed")
    assert rows["2b-4"]["job_id"] == nan_job
    assert "non-finite loss" in rows["2b-4"]["reason"], rows["2b-4"]
    assert wait_sacct_done([nan_job])[nan_job]["State"] == "FAILED"

    before = jobs_submitted_from(workdir)
    rerun = launch(workdir, "grids/table2b.yaml", "--smoke", "--rerun-failed")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 to run" in rerun.stdout, rerun.stdout
    assert re.search(r"run\s+deit_b_dist\s+2b-4\s", rerun.stdout), rerun.stdout
    new = jobs_submitted_from(workdir) - before
    assert len(new) == 1, new
    rows = wait_for_rows(workdir, "grids/table2b.yaml", "--smoke", labels=["2b-4"])
    assert rows["2b-4"]["job_id"] in new
    assert {r["state"] for r in rows.values()} == {"finished"}
    runs = row_runs(workdir, SMOKE)
    assert len(runs) == 12  # the 10 rows, the NaN run, the rerun
    assert sorted(r.info.status for r in runs if r.data.tags["kdgrid.label"] == "2b-4") == [
        "FAILED",
        "FINISHED",
        "FINISHED",
    ]


def test_failed_teacher_cancels_its_waiting_student(
    smoke_grid: Submitted, finished_grid: dict[str, dict[str, Any]]
) -> None:
    """--kill-on-invalid-dep: the student of a failed teacher is cancelled, not left pending."""
    workdir = smoke_grid.workdir
    before = jobs_submitted_from(workdir)
    result = launch(
        workdir,
        "grids/table2b.yaml",
        "--smoke",
        "--rows",
        "2b-8,2b-9",
        "--force",
        env={"KDGRID_INJECT_NAN_AT_STEP": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 to run" in result.stdout, result.stdout
    entries = submissions(workdir, "table2b-smoke")[-2:]
    jobs = {e["label"]: e["job_id"] for e in entries}
    assert set(jobs) == {"2b-8", "2b-9"} and set(jobs.values()) == (
        jobs_submitted_from(workdir) - before
    )
    rows = wait_for_rows(
        workdir, "grids/table2b.yaml", "--smoke", labels=["2b-8", "2b-9"], expect=None
    )
    assert rows["2b-8"]["state"] == "failed", rows["2b-8"]
    assert rows["2b-9"]["state"] == "skipped", rows["2b-9"]
    assert "dependency failed" in rows["2b-9"]["reason"]
    records = wait_sacct_done(jobs.values())
    assert records[jobs["2b-8"]]["State"] == "FAILED"
    student = records[jobs["2b-9"]]
    assert student["State"] == "CANCELLED", student  # by SLURM: no "by <uid>"
    assert student["Start"] == "None", f"the student ran: {student}"
    assert jobs["2b-9"] not in queued_jobs(workdir)


# --------------------------------------------------------------------------------------------
# 4, 9. Relaunch while pending/running submits nothing; --cancel cancels and kills
# --------------------------------------------------------------------------------------------


def test_relaunch_while_queued_submits_nothing_and_cancel_kills(
    tmp_path: Path, tiny_data: Path
) -> None:
    grid = write_grid(
        tmp_path,
        "queued",
        [
            {"id": "teacher", "label": "Q-1"},
            {"id": "student", "label": "Q-2", "init": {"row": "teacher"}},
        ],
        tiny_data,
        epochs=5000,  # minutes: still running when cancelled
    )
    first = launch(tmp_path, grid.name)
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = {e["label"]: e["job_id"] for e in submissions(tmp_path, "queued")}
    assert set(jobs.values()) == jobs_submitted_from(tmp_path)

    again = launch(tmp_path, grid.name)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 to run, 2 skipped" in again.stdout, again.stdout
    assert f"already scheduled (job {jobs['Q-2']})" in again.stdout, again.stdout
    assert set(jobs.values()) == jobs_submitted_from(tmp_path), "a relaunch queued jobs again"
    assert len(row_runs(tmp_path, "kd-test-queued")) == 2

    rows = by_label(status_json(tmp_path, grid.name))
    assert rows["Q-1"]["state"] in ("pending", "running"), rows["Q-1"]
    assert rows["Q-2"]["state"] == "pending" and rows["Q-2"]["reason"] == "Dependency", rows

    cancel = launch(tmp_path, grid.name, "--cancel")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "cancelled 2 row(s): teacher, student" in cancel.stdout, cancel.stdout
    records = wait_sacct_done(jobs.values())
    for label, job_id in jobs.items():
        assert records[job_id]["State"].startswith("CANCELLED"), (label, records[job_id])
    assert {r.info.status for r in row_runs(tmp_path, "kd-test-queued")} == {"KILLED"}
    rows = by_label(status_json(tmp_path, grid.name))
    assert {r["state"] for r in rows.values()} == {"cancelled"}, rows
    assert not queued_jobs(tmp_path)


def test_cancel_while_a_job_starts_leaves_its_run_killed_and_untrained(
    tmp_path: Path, tiny_data: Path
) -> None:
    """`--cancel` while a row's job is starting (SLURM runs it; it has not opened its run yet):
    the run stays KILLED, the job sees the cancel and does not train, and no job is left. (The
    job used to mark the run RUNNING after the cancel had marked it KILLED: scancel's SIGTERM
    is ignored by submitit until KillWait is over, and SLURM's SIGKILL then left a RUNNING run
    without a job.) KDGRID_INJECT_RUN_START_PAUSE_S holds the job just before it opens its
    run, until the run is closed: the cancel lands in that window every time."""
    grid = write_grid(
        tmp_path, "startrace", [{"id": "only", "label": "SR-1"}], tiny_data, epochs=500
    )
    first = launch(tmp_path, grid.name, env={"KDGRID_INJECT_RUN_START_PAUSE_S": "300"})
    assert first.returncode == 0, first.stdout + first.stderr
    (job,) = (e["job_id"] for e in submissions(tmp_path, "startrace"))
    deadline = time.monotonic() + 300
    while "KDGRID_INJECT_RUN_START_PAUSE_S=300: paused" not in "".join(
        p.read_text() for p in job_logs(tmp_path, job)
    ):
        assert time.monotonic() < deadline, log_tail(tmp_path, job)
        assert job in queued_jobs(tmp_path), log_tail(tmp_path, job)
        time.sleep(0.5)

    cancel = launch(tmp_path, grid.name, "--cancel")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "cancelled 1 row(s): only" in cancel.stdout, cancel.stdout
    (record,) = wait_sacct_done([job]).values()
    assert record["State"].startswith("CANCELLED"), record
    assert not queued_jobs(tmp_path)
    ours = only_run(tmp_path, "kd-test-startrace")
    assert ours.info.status == "KILLED", (ours.info.status, log_tail(tmp_path, job))
    assert ours.data.tags["kdgrid.failure_reason"] == "cancelled with launch/grid.py --cancel"
    assert steps(tmp_path, ours.info.run_id, "epoch") == [], "the cancelled row trained"
    assert "not trained: its run was cancelled" in log_tail(tmp_path, job)
    (row,) = status_json(tmp_path, grid.name)
    assert row["state"] == "cancelled", row


def test_a_finished_teacher_is_not_rerun_under_its_queued_student(
    tmp_path: Path, tiny_data: Path
) -> None:
    """A forced rerun replaces the teacher's best.pt; a student queued from an earlier launch
    would start from the new, half-trained one. The launch is refused (exit 2, nothing queued,
    no run created) until the student is done or cancelled."""
    grid = write_grid(
        tmp_path,
        "reader",
        [
            {"id": "teacher", "label": "R-1", "train": {"epochs": 2}},
            {"id": "student", "label": "R-2", "init": {"row": "teacher"}},
        ],
        tiny_data,
        epochs=5000,  # minutes: still queued or running when the teacher is forced
    )
    first = launch(tmp_path, grid.name, "--rows", "teacher")
    assert first.returncode == 0, first.stdout + first.stderr
    wait_for_rows(tmp_path, grid.name, labels=["R-1"])
    second = launch(tmp_path, grid.name, "--rows", "student")
    assert second.returncode == 0, second.stdout + second.stderr
    jobs, runs = jobs_submitted_from(tmp_path), len(row_runs(tmp_path, "kd-test-reader"))

    forced = launch(tmp_path, grid.name, "--rows", "teacher", "--force")
    assert forced.returncode == 2, forced.stdout + forced.stderr
    assert "row 'teacher' (R-1): cannot be rerun while row 'student'" in forced.stderr
    assert "--cancel --rows student" in forced.stderr and "Traceback" not in forced.stderr
    assert jobs_submitted_from(tmp_path) == jobs
    assert len(row_runs(tmp_path, "kd-test-reader")) == runs
    # launch/train.py, which trains a row in its own process, refuses the queued row too
    inline = script(tmp_path, "train.py", grid.name, "--row", "student")
    assert inline.returncode == 2, inline.stdout + inline.stderr
    assert "would train it a second time beside it" in inline.stderr, inline.stderr
    assert "--cancel --rows student" in inline.stderr and "Traceback" not in inline.stderr
    assert len(row_runs(tmp_path, "kd-test-reader")) == runs

    cancel = launch(tmp_path, grid.name, "--cancel", "--rows", "student")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_sacct_done(jobs_submitted_from(tmp_path))
    again = launch(tmp_path, grid.name, "--rows", "teacher", "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 to run" in again.stdout, again.stdout
    rows = wait_for_rows(tmp_path, grid.name, labels=["R-1"])
    assert rows["R-2"]["state"] == "cancelled", rows


def _retag_job(workdir: Path, run_id: str, job_id: str) -> None:
    """Make a run's recorded job id point elsewhere: what a controller that lost its state, or
    started its job ids over, leaves behind."""
    mlflow_client(workdir).set_tag(run_id, "kdgrid.job_id", job_id)


def test_a_job_id_slurm_no_longer_holds_is_not_alive(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's job id that SLURM lists under another job's name (ids started over) or does not
    list at all (ended without a trace: no accounting, a lost controller state) is GONE: status
    says failed and why, a launch runs the row again, and `--cancel` cancels nobody else's job."""
    grid = write_grid(
        tmp_path,
        "lost",
        [{"id": "lost", "label": "L-1"}],
        tiny_data,
        epochs=1,
        resources={"sbatch_extra": {"begin": "now+1hour"}},  # pending: never runs
    )
    first = launch(tmp_path, grid.name)
    assert first.returncode == 0, first.stdout + first.stderr
    ours = only_run(tmp_path, "kd-test-lost")
    assert ours.data.tags["kdgrid.slurm_cluster"] == "kdgrid"  # slurm/cluster.sh's ClusterName
    assert ours.data.tags["kdgrid.slurm_job_name"] == "kd-lost"
    assert ours.data.tags["kdgrid.slurm_user"] == current_user()
    (row,) = status_json(tmp_path, grid.name)  # our live job, with those tags: not GONE
    assert (row["state"], row["reason"]) == ("pending", "BeginTime"), row
    # another user's job, held, that got the id our run recorded
    other = run(
        "sbatch",
        "--parsable",
        "-J",
        "someone-else",
        "--hold",
        "-D",
        tmp_path,
        "-o",
        "/dev/null",
        "--wrap",
        "sleep 600",
    )
    assert other.returncode == 0, other.stderr
    other_id = other.stdout.strip().split(";")[0]
    run("scancel", ours.data.tags["kdgrid.job_id"])
    _retag_job(tmp_path, ours.info.run_id, other_id)

    (row,) = status_json(tmp_path, grid.name)
    assert row["state"] == "failed", row
    assert f"job id {other_id} belongs to another job now ('someone-else'" in row["reason"], row
    cancel = launch(tmp_path, grid.name, "--cancel")
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "cancelled 1 row(s): lost" in cancel.stdout, cancel.stdout
    assert queued_jobs(tmp_path)[other_id][0] == "PENDING", "--cancel cancelled another job"
    assert mlflow_client(tmp_path).get_run(ours.info.run_id).info.status == "KILLED"

    second = launch(tmp_path, grid.name, "--rerun-failed")
    assert second.returncode == 0, second.stdout + second.stderr
    latest = max(row_runs(tmp_path, "kd-test-lost"), key=lambda r: r.info.start_time)
    run("scancel", latest.data.tags["kdgrid.job_id"])
    never = "987654321"  # no job of this cluster had it
    _retag_job(tmp_path, latest.info.run_id, never)
    (row,) = status_json(tmp_path, grid.name)
    assert row["state"] == "failed" and f"SLURM no longer has job {never}" in row["reason"], row
    third = launch(tmp_path, grid.name)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "1 to run" in third.stdout and "rerun (latest run scheduled)" in third.stdout, (
        third.stdout
    )
    old = mlflow_client(tmp_path).get_run(latest.info.run_id)
    assert old.info.status == "KILLED", old.info
    assert old.data.tags["kdgrid.failure_reason"] == "its process or job is gone"

    # squeue not answering (no controller): nothing is GONE, an unknown id stays unknown
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (fake / "squeue").chmod(0o755)
    submitted = {never: Submission("kd-lost", cluster=cluster_name(), user=current_user())}
    assert job_states([never], submitted)[never].state == "GONE"
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert job_states([never], submitted) == {}
    monkeypatch.undo()
    run("scancel", other_id, *queued_jobs(tmp_path))


# --------------------------------------------------------------------------------------------
# 6-7. Requeue (scontrol requeue) and a time limit: resume into the same run, epochs once each
# --------------------------------------------------------------------------------------------

# Well under a second each on a quiet box. After `scontrol requeue` the job trains on until
# SLURM's kill wait ends (submitit ignores the SIGTERM): at 0.15 s an epoch a 40-epoch row
# requeued at epoch 9 finished in that wait, and there was nothing left to resume.
REQUEUE_EPOCHS = 100
# The time-limited row trains for about this long at the pace measured on the requeue row. The
# first USR2 of a 1-minute limit comes 15-45 s after the start (15 s ahead of the limit, plus
# up to 30 s of slurmctld's timer); each later run starts just after a signal and is signalled
# ~26 s in, so it trains 26 s less its start-up (6 s on a quiet box, 20 s on a loaded one), and
# submitit requeues 20 times at most (max_num_timeout). A row that finished before its first
# signal (the box got faster than measured) is launched again, four times longer.
TIME_LIMIT_TRAIN_S = 45


@dataclasses.dataclass(frozen=True)
class TimeLimited:
    grid: str  # the grid's name, its file (<name>.yaml), output folder and experiment suffix
    job: str
    epochs: int


@dataclasses.dataclass(frozen=True)
class Resume:
    workdir: Path
    data: Path
    requeue_job: str
    requeued_at_epoch: int  # the last epoch R-1 had logged when `scontrol requeue` ran
    seconds_per_epoch: float
    time_limited: TimeLimited


def _launch_time_limited(workdir: Path, data: Path, epochs: int, attempt: int) -> TimeLimited:
    name = f"timelimit{attempt}"
    write_grid(
        workdir,
        name,
        [{"id": "time_limited", "label": "T-1"}],
        data,
        epochs=epochs,
        resources={"time_min": 1},
    )
    result = launch(workdir, f"{name}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = (e["job_id"] for e in submissions(workdir, name))
    return TimeLimited(name, job, epochs)


@pytest.fixture(scope="module")
def resume(tmp_path_factory: pytest.TempPathFactory, epoch_data: Path) -> Resume:
    """A row to requeue by hand, then, sized on its pace, a row with a 1-minute time limit."""
    workdir = tmp_path_factory.mktemp("resume")
    write_grid(
        workdir, "requeue", [{"id": "requeued", "label": "R-1"}], epoch_data, epochs=REQUEUE_EPOCHS
    )
    result = launch(workdir, "requeue.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    (requeue_job,) = (e["job_id"] for e in submissions(workdir, "requeue"))
    run_id = only_run(workdir, "kd-test-requeue").info.run_id
    pace = seconds_per_epoch(workdir, run_id, 6)
    # the requeue under test (test_requeued_job_resumes_into_the_same_run checks the outcome)
    requeued_at = int(mlflow_client(workdir).get_run(run_id).data.metrics["epoch"])
    requeue = run("scontrol", "requeue", requeue_job)
    assert requeue.returncode == 0, requeue.stderr
    epochs = min(max(round(TIME_LIMIT_TRAIN_S / pace), 20), 2000)
    time_limited = _launch_time_limited(workdir, epoch_data, epochs, 0)
    return Resume(workdir, epoch_data, requeue_job, requeued_at, pace, time_limited)


def test_requeued_job_resumes_into_the_same_run(resume: Resume, fault) -> None:
    """`scontrol requeue` once the row logged epoch 6 or later (in the `resume` fixture): the
    job is killed and starts again, resuming after the last epoch saved, into the same run."""
    workdir, job_id, epoch = resume.workdir, resume.requeue_job, resume.requeued_at_epoch
    run_id = only_run(workdir, "kd-test-requeue").info.run_id
    assert 6 <= epoch < REQUEUE_EPOCHS - 10, f"requeued at epoch {epoch}"
    rows = wait_for_rows(workdir, "requeue.yaml")
    assert rows["R-1"]["epoch"] == REQUEUE_EPOCHS
    records = wait_sacct_done([job_id])  # the job's last run is over, not just the row
    run_ = only_run(workdir, "kd-test-requeue")
    assert run_.info.run_id == run_id and run_.info.status == "FINISHED"
    assert_each_epoch_once(workdir, run_id, REQUEUE_EPOCHS)
    log = "\n".join(p.read_text() for p in job_logs(workdir, job_id))
    assert "DUE TO JOB REQUEUE" in log, log[-3000:]
    resumed = [int(k) for k in re.findall(rf"resuming after epoch (\d+)/{REQUEUE_EPOCHS}", log)]
    assert len(resumed) == 1 and epoch <= resumed[0] < REQUEUE_EPOCHS, (epoch, resumed)
    assert records[job_id]["State"] == "COMPLETED"
    assert len(sacct([job_id], duplicates=True)) == 2, "sacct shows no second run of the job"
    fault.where, fault.lost = "slurm", 0  # every epoch logged once, in the same run
    fault.detail = f"scontrol requeue at epoch {epoch}: resumed after epoch {resumed[0]}"


def test_time_limit_checkpoints_requeues_and_finishes(resume: Resume, fault) -> None:
    """time_min=1: submitit's USR2 (15 s ahead, give or take slurmctld's 30 s timer) calls
    RowJob.checkpoint and requeues; each run resumes from the last epoch saved."""
    workdir, row = resume.workdir, resume.time_limited
    for attempt in range(1, 4):
        array = row.job.split("_")[0]  # an array's tasks share its folder and script
        script = workdir / "outputs" / row.grid / "slurm" / array / f"{array}_submission.sh"
        assert "#SBATCH --time=1\n" in script.read_text()
        assert "#SBATCH --signal=USR2@15\n" in script.read_text()
        rows = wait_for_rows(workdir, f"{row.grid}.yaml", timeout=900)
        log = "\n".join(p.read_text() for p in job_logs(workdir, row.job))
        if "Caught signal SIGUSR2" in log:
            break
        # finished before slurmctld signalled it: the box got faster than when it was measured
        assert "resuming after epoch" not in log, log[-3000:]
        row = _launch_time_limited(workdir, resume.data, row.epochs * 4, attempt)
    context = (
        f"{row.epochs} epochs at {resume.seconds_per_epoch:.2f} s measured; attempt {attempt}:\n"
        + log[-3000:]
    )
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log, context
    assert rows["T-1"]["epoch"] == row.epochs
    run_ = only_run(workdir, f"kd-test-{row.grid}")
    assert run_.info.status == "FINISHED"
    assert_each_epoch_once(workdir, run_.info.run_id, row.epochs)
    assert "Calling checkpoint method." in log
    assert "DUE TO TIME LIMIT" not in log, "SLURM killed the job before submitit requeued it"
    resumed = [int(k) for k in re.findall(rf"resuming after epoch (\d+)/{row.epochs}", log)]
    assert resumed and resumed == sorted(resumed), resumed
    records = wait_sacct_done([row.job])
    assert records[row.job]["State"] == "COMPLETED"
    runs = sacct([row.job], duplicates=True)
    assert len(runs) >= 2 and {r["State"] for r in runs[:-1]} == {"REQUEUED"}, runs
    fault.where, fault.lost = "slurm", 0  # every epoch logged once, in the same run
    fault.detail = f"1-minute limit: {len(runs) - 1} requeue(s), resumed after epochs {resumed}"


# --------------------------------------------------------------------------------------------
# 8. Two nodes
# --------------------------------------------------------------------------------------------


def test_two_node_row_trains_once_across_n1_and_n2(tmp_path: Path) -> None:
    shutil.copytree(REPO / "grids", tmp_path / "grids")
    args = ("grids/table2b.yaml", "resources.nodes=2", "--smoke")
    result = launch(tmp_path, *args, "--rows", "2b-2", "--partition", "gpu")
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = submissions(tmp_path, "table2b-smoke")
    job_id = entry["job_id"]
    rows = wait_for_rows(tmp_path, *args, labels=["2b-2"])
    assert hostnames(rows["2b-2"]["nodes"]) == NODES, rows["2b-2"]
    records = wait_sacct_done([job_id])
    assert records[job_id]["State"] == "COMPLETED"
    assert hostnames(records[job_id]["NodeList"]) == NODES

    (run_,) = row_runs(tmp_path, SMOKE)
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["kdgrid.world_size"] == "2"
    client = mlflow_client(tmp_path)
    for metric in ("val/acc1", "train/loss", "epoch"):  # once per epoch, not once per process
        assert [m.step for m in client.get_metric_history(run_.info.run_id, metric)] in (
            [1, 2],
            [2, 1],
        ), metric
    checkpoints = [a.path for a in client.list_artifacts(run_.info.run_id, "checkpoints")]
    assert sorted(checkpoints) == ["checkpoints/best.pt", "checkpoints/last.pt"]

    logs = job_logs(tmp_path, job_id)
    assert [p.name for p in logs] == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]
    rank0, rank1 = (p.read_text() for p in logs)
    assert "global_rank=0(2)" in rank0 and "global_rank=1(2)" in rank1
    assert rank0.count("[deit_b_deit] epoch ") == 2, rank0
    assert "[deit_b_deit] epoch " not in rank1, "the second process logged epochs too"
    row_dir = tmp_path / "outputs" / "table2b-smoke" / "deit_b_deit"
    assert sorted(p.name for p in row_dir.iterdir() if p.name.endswith(".pt")) == [
        "best.pt",
        "last.pt",
        "state.pt",
    ]
    assert not list(row_dir.glob(".*tmp*")), list(row_dir.iterdir())
    import torch

    state = torch.load(row_dir / "state.pt", map_location="cpu", weights_only=False)
    assert [h["epoch"] for h in state["history"]] == [0, 1]
