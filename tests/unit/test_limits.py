"""Reading the cluster's limits (slurm/limits.py): the parts that need no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm.limits import ClusterLimits, parse_config

SMOKE_GRID = Path(__file__).resolve().parents[2] / "grids" / "table2b.yaml"


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


class ArrayBound:
    """Stands in for sbatch in `submit_rows` (its one call, `_submit_array`): refuses arrays
    over `bound` tasks with slurmctld's message, and records the arrays it takes."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.arrays: list[list[str]] = []

    def __call__(self, frozen, group, run_ids, tracking_uri, folder) -> dict[str, str]:
        if len(group) > self.bound:
            raise RuntimeError(
                "sbatch: error: Batch job submission failed: Invalid job array specification"
            )
        self.arrays.append([row.id for row in group])
        return {row.id: f"{len(self.arrays)}_{i}" for i, row in enumerate(group)}


def rows_of_one_shape(count: int):
    from kd.grid import load_grid

    grid = load_grid(
        SMOKE_GRID, [f"train.seed={','.join(map(str, range(count)))}"], smoke=True,
        check_data=False, check_models=False,
    )  # fmt: skip
    return [row for row in grid.rows if not row.depends_on][:count]


def test_arrays_are_halved_until_sbatch_takes_them(monkeypatch, tmp_path, capsys) -> None:
    """`scontrol show config` says 1001, the controller checks 3 (slurmctld 22.05 after a
    `scontrol reconfigure` that raised the bound): each row goes out once, in arrays it takes."""
    from slurm import submit

    sbatch = ArrayBound(3)
    monkeypatch.setattr(submit, "_submit_array", sbatch)
    rows = rows_of_one_shape(10)
    assert len(rows) == 10
    run_ids = {row.id: f"run-{row.id}" for row in rows}
    queued = submit.submit_rows(
        rows, run_ids, "sqlite:///x.db", folder=tmp_path, limits=ClusterLimits(1001, None, "")
    )
    assert sorted(queued) == sorted(row.id for row in rows)
    taken = [row_id for array in sbatch.arrays for row_id in array]
    assert sorted(taken) == sorted(queued)  # none twice, none lost
    assert max(len(a) for a in sbatch.arrays) <= 3
    assert "sbatch refused an array of 10 tasks" in capsys.readouterr().err


def test_a_single_task_refused_is_an_error_not_a_loop(monkeypatch, tmp_path) -> None:
    from slurm import submit

    monkeypatch.setattr(submit, "_submit_array", ArrayBound(0))
    rows = rows_of_one_shape(3)
    with pytest.raises(RuntimeError, match="Invalid job array specification"):
        submit.submit_rows(rows, {r.id: r.id for r in rows}, "sqlite:///x.db", folder=tmp_path)


def test_the_feeder_stops_when_sbatch_refuses_for_good(tmp_path) -> None:
    """A refusal that is neither a limit nor the controller down ends the feeder (exit 1) instead
    of retrying every interval forever; an unreachable controller is waited out."""
    from kd.grid import load_grid
    from slurm.held import FeedFailed, feed_loop
    from slurm.limits import controller_unavailable

    grid = load_grid(
        SMOKE_GRID, [f"output_dir={tmp_path}"], smoke=True, check_data=False, check_models=False
    )
    passes = []

    def refused() -> int:
        passes.append(1)
        raise FeedFailed("sbatch refused held rows: Invalid account")

    assert feed_loop(grid, refused, 0.0) == 1 and len(passes) == 1
    assert not (tmp_path / "slurm" / "feeder.pid").exists()
    assert controller_unavailable(
        RuntimeError("Unable to contact slurm controller (connect failure)")
    )
    assert not controller_unavailable(
        RuntimeError("Invalid account or account/partition combination")
    )
