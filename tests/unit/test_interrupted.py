"""Unit tests of the pieces that settle a launch killed while submitting and a job SLURM
requeued after its run failed (the end-to-end cases are in tests/test_fault_injection.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from kd.tracking import RunRecord
from slurm.interrupted import NEVER_QUEUED, launcher_gone, never_queued, read_journal
from slurm.state import (
    GONE,
    JobState,
    cluster_name,
    current_user,
    held_after_failure,
    submission_tags,
)
from slurm.status import row_state


def record(status: str = "SCHEDULED", **tags: str) -> RunRecord:
    return RunRecord("run-1", "key-1", "row-1", status, 0, {"kdgrid.executor": "slurm", **tags})


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_journal_maps_runs_to_jobs_and_skips_a_line_cut_short(tmp_path: Path) -> None:
    where = {"kdgrid.slurm_job_name": "kd-t2b", "kdgrid.slurm_cluster": "c1"}
    lines = [
        json.dumps({"run_id": "a", "job_id": "101_0", "grid": "t2b", "job_tags": where}),
        json.dumps({"run_id": "b", "job_id": None}),  # a local launch: no job
        json.dumps({"run_id": "d", "job_id": "102", "grid": "t2b"}),  # an older kdgrid's line
        "7",  # not an entry at all
        '{"run_id": "c", "job_',  # the launcher died writing it
    ]
    (tmp_path / "submissions.jsonl").write_text("\n".join(lines))
    assert read_journal([tmp_path, tmp_path / "missing"]) == {
        "a": {**where, "kdgrid.job_id": "101_0"},
        "d": {"kdgrid.slurm_job_name": "kd-t2b", "kdgrid.job_id": "102"},
    }


def test_the_journal_records_what_the_run_is_tagged_with(tmp_path: Path) -> None:
    """A SLURM launch journals each job with the tags its run gets (`submission_tags`): a run
    recovered from the journal is tagged as if its launcher had not been killed."""
    from kd.grid import load_grid
    from slurm.journal import record_launch

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        "name: jr\nexperiment: jr\n"
        f"defaults: {{output_dir: {tmp_path}/out, data: {{dataset: imagefolder, root: /nowhere}}}}\n"
        "rows: [{id: r1, label: J-1, student: {model: test_resnet}}]\n"
    )
    grid = load_grid(grid_file, check_data=False)
    where = {"r1": submission_tags(grid.name, {})}
    record_launch(grid, grid.rows, {"r1": "run-9"}, "slurm", {"r1": "55"}, job_tags=where)
    assert read_journal([tmp_path / "out"]) == {"run-9": {**where["r1"], "kdgrid.job_id": "55"}}


def test_never_queued_is_a_scheduled_slurm_run_without_a_job() -> None:
    assert never_queued(record())
    assert not never_queued(record(**{"kdgrid.job_id": "7"}))
    assert not never_queued(record("RUNNING"))
    assert not never_queued(record(**{"kdgrid.executor": "local"}))


def test_status_of_a_row_whose_launcher_died_before_queueing_it() -> None:
    here = {"kdgrid.launch_host": socket.gethostname()}
    gone = record(**here, **{"kdgrid.launcher_pid": str(dead_pid())})
    assert launcher_gone(gone)
    assert row_state(gone, None, None) == ("failed", NEVER_QUEUED)
    launching = record(**here, **{"kdgrid.launcher_pid": str(os.getpid())})
    assert row_state(launching, None, None) == ("pending", None)
    elsewhere = record(**{"kdgrid.launch_host": "login-2", "kdgrid.launcher_pid": "1"})
    assert row_state(elsewhere, None, None) == ("pending", None)  # cannot tell: pending


def test_status_of_a_failed_run_whose_job_slurm_requeued() -> None:
    failed = record("FAILED", **{"kdgrid.job_id": "9", "kdgrid.failure_reason": "gloo reset"})
    requeued = JobState("9", "PENDING", reason="BeginTime")
    assert row_state(failed, requeued, None) == (
        "pending",
        "its job is still in SLURM (pending, BeginTime) after: gloo reset",
    )
    assert row_state(failed, JobState("9", "RUNNING"), None)[0] == "running"
    # winding down (the other ranks, SLURM's kill wait): still there, so not to be rerun yet
    assert row_state(failed, JobState("9", "COMPLETING"), None)[0] == "running"
    # over: the failure stands
    assert row_state(failed, JobState("9", "NODE_FAIL"), None) == ("failed", "gloo reset")


def test_status_of_a_job_slurm_cancelled_because_a_dependency_failed() -> None:
    """--kill-on-invalid-dep: SLURM cancels the job itself ("CANCELLED", no "by <uid>") before
    it starts; sacct keeps the pending reason "Dependency" only when the scheduler set it
    before the cancel, so a job never started counts too."""
    waiting = record()
    assert row_state(waiting, JobState("9", "CANCELLED", reason="Dependency"), None)[0] == (
        "skipped"
    )
    assert row_state(waiting, JobState("9", "CANCELLED"), None)[0] == "skipped"
    by_user = JobState("9", "CANCELLED", cancelled_by="0")
    assert row_state(waiting, by_user, None)[0] == "cancelled"
    started = JobState("9", "CANCELLED", nodes="n1")
    assert row_state(waiting, started, None)[0] == "cancelled"


def test_sacct_reason_is_kept_for_a_job_cancelled_before_it_started() -> None:
    from slurm.state import _waiting

    assert _waiting(["CANCELLED"], "2026-11-21T23:39:25", "None assigned")  # Start = the cancel
    assert _waiting(["CANCELLED"], "Unknown", "")
    assert not _waiting(["CANCELLED", "by", "0"], "2026-11-21T23:39:25", "n1")
    assert _waiting(["PENDING"], "Unknown", "None assigned")


def test_submission_interrupts_leave_an_ignored_signal_ignored() -> None:
    """`nohup python launch/grid.py ... &` then logging out: SIGHUP is ignored and must stay
    so, or the submission would be cancelled; SIGTERM (default) raises like Ctrl-C."""
    import signal

    import pytest

    from slurm.launcher import _interrupts_raise

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _interrupts_raise():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
            with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_status_of_a_run_whose_job_is_gone() -> None:
    """GONE (slurm.state.job_states): no job of ours under the id any more. An open run is
    failed, with SLURM's side of it; a failed run keeps its own reason, and is not held."""
    gone = JobState("9", GONE, reason="SLURM no longer has job 9: it ended without a trace")
    assert row_state(record("RUNNING", **{"kdgrid.job_id": "9"}), gone, None) == (
        "failed",
        "SLURM no longer has job 9: it ended without a trace",
    )
    failed = record("FAILED", **{"kdgrid.job_id": "9", "kdgrid.failure_reason": "OOM"})
    assert not held_after_failure("FAILED", gone)
    assert row_state(failed, gone, None) == ("failed", "OOM")


def test_a_job_sent_to_other_clusters_records_no_cluster() -> None:
    """Its absence from this cluster's squeue proves nothing: no `slurm_cluster` tag."""
    here = submission_tags("t2b", {"qos": "high"})
    assert here["kdgrid.slurm_job_name"] == "kd-t2b"
    assert here["kdgrid.slurm_user"] == current_user()
    assert here.get("kdgrid.slurm_cluster") == cluster_name()
    assert "kdgrid.slurm_cluster" not in submission_tags("t2b", {"clusters": "other"})
