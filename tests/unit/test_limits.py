"""Reading the cluster's limits (slurm/limits.py): the parts that need no cluster."""

from __future__ import annotations

from slurm.limits import ClusterLimits, parse_config


def test_parse_config_reads_scontrol_lines() -> None:
    text = "Configuration data as of x\nMaxArraySize            = 1001\nMaxJobCount = 10000\n"
    config = parse_config(text)
    assert config["MaxArraySize"] == "1001" and config["MaxJobCount"] == "10000"


def test_fits_counts_rows_against_the_free_slots() -> None:
    assert ClusterLimits(1001, None, "").fits(10**6)
    assert ClusterLimits(1001, 5, "MaxSubmitJobs").fits(5)
    assert not ClusterLimits(1001, 5, "MaxSubmitJobs").fits(6)


def test_mark_many_ends_runs_as_mark_does(tmp_path) -> None:
    """Undoing a large submission closes its runs in two transactions, with what `mark` sets."""
    from kd.tracking import TAG, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracker.ensure_experiment("e")
    runs = [tracker.client.create_run(experiment).info.run_id for _ in range(4)]
    tracker.mark(runs[0], "KILLED", "submission failed: x")
    tracker.mark_many(runs[1:], "KILLED", "submission failed: x")
    one = tracker.client.get_run(runs[0])
    for run_id in runs[1:]:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags[f"{TAG}.failure_reason"] == one.data.tags[f"{TAG}.failure_reason"]
