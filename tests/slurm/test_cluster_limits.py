"""Grids larger than the cluster accepts: arrays split at MaxArraySize, rows beyond MaxSubmitJobs
held (status `held: cluster limit`) and submitted later by the feeder pass, with their
dependencies, each row once.

The cluster is shared: MaxSubmitJobs is an association limit on root, removed in a finally;
MaxArraySize is lowered (`KDGRID_MAX_ARRAY_SIZE=3 slurm/cluster.sh up`) only around the launch
itself and restored in a finally.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from slurmtools import (
    REPO,
    cancel_leftover_jobs,
    launch,
    queued_jobs,
    require_slurm,
    run,
    script,
)

require_slurm()


def array_accepted(tasks: int) -> bool:
    """Whether slurmctld takes an array of `tasks` tasks now (sbatch --test-only queues nothing)."""
    return run("sbatch", "--test-only", f"--array=0-{tasks - 1}", "--wrap=true").returncode == 0


def cluster_up(**knobs: str) -> None:
    """`slurm/cluster.sh up` with its limit knobs: a changed limit restarts slurmctld (a
    `scontrol reconfigure` does not change the bound slurmctld 22.05 checks arrays against)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGRID_MAX_")}
    up = subprocess.run(
        ["bash", str(REPO / "slurm" / "cluster.sh"), "up"],
        capture_output=True, text=True, timeout=300, check=False, env={**env, **knobs},
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr


@contextlib.contextmanager
def max_array_size(size: int) -> Iterator[None]:
    try:
        cluster_up(KDGRID_MAX_ARRAY_SIZE=str(size))
        assert not array_accepted(size + 1), "MaxArraySize was not lowered"
        yield
    finally:
        cluster_up()
    assert array_accepted(size + 1), "MaxArraySize was not restored"


@contextlib.contextmanager
def max_submit_jobs(free: int) -> Iterator[int]:
    """root's association allows `free` more jobs than it has queued now; removed after."""
    mine = len(run("squeue", "-h", "-r", "-u", "root", "-o", "%i").stdout.split())
    limit = mine + free
    try:
        done = run("sacctmgr", "-i", "modify", "user", "root", "set", f"MaxSubmitJobs={limit}")
        assert done.returncode == 0, done.stderr
        yield limit
    finally:
        run("sacctmgr", "-i", "modify", "user", "root", "set", "MaxSubmitJobs=-1")


def write_grid(folder: Path, students: int) -> Path:
    """A teacher and `students` rows that wait on it; every job held back (--begin)."""
    grid = {
        "name": "limits",
        "experiment": "kd-limits",
        "defaults": {
            "student": {"model": "resnet18"},
            "init": "scratch",
            "kd": {"ce": 1.0},
            "data": {"dataset": "imagefolder", "root": str(folder / "data"), "img_size": 32},
            "train": {"epochs": 1, "batch_size": 2},
            "resources": {
                "gpus_per_node": 0,
                "cpus_per_task": 1,
                "mem_gb": 0.25,
                "time_min": 5,
                "sbatch_extra": {"begin": "now+1hour"},
            },
            "output_dir": str(folder / "outputs"),
        },
        "rows": [{"id": "teacher", "label": "t"}],
        "axes": {
            "values": {"train.seed": list(range(students))},
            "id": "s{seed}",
            "label": "s{seed}",
            "row": {"teacher": {"row": "teacher"}, "kd": {"ce": 0.5, "ikd": 0.5}},
        },
    }
    from kd.data import generate_dataset

    generate_dataset("imagefolder", folder / "data", num_classes=2, train_per_class=2)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def dependency_of(job_id: str) -> str:
    out = run("scontrol", "show", "job", job_id).stdout
    match = re.search(r"Dependency=(\S+)", out)
    return match.group(1) if match else ""


def test_arrays_split_and_rows_held_then_fed(tmp_path: Path) -> None:
    path = write_grid(tmp_path, students=8)
    try:
        with max_submit_jobs(5):
            with max_array_size(3):
                done = launch(tmp_path, str(path), "--no-feeder")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "4 row(s) held" in done.stdout, done.stdout
            status = json.loads(script(tmp_path, "status.py", str(path), "--json").stdout)
            states = {r["id"]: r["state"] for r in status}
            assert states["teacher"] == "pending"
            held = sorted(r for r, s in states.items() if s == "held")
            assert len(held) == 4 and all(
                r["reason"] == "cluster limit" for r in status if r["state"] == "held"
            )
            table = script(tmp_path, "status.py", str(path)).stdout
            assert "held: cluster limit" in table
            teacher_job = next(r["job_id"] for r in status if r["id"] == "teacher")
            arrays = {
                r["job_id"].split("_")[0] for r in status if r["job_id"] and r["id"] != "teacher"
            }
            assert len(arrays) == 2  # 4 students in arrays of at most 3 tasks
            first_run_ids = {r["id"]: r["run_id"] for r in status}
        # the limit is gone: one feeder pass submits the held rows, after the teacher
        fed = script(tmp_path, "grid.py", str(path), "--feed-held", "--feed-interval", "1")
        assert fed.returncode == 0, fed.stdout + fed.stderr
        status = json.loads(script(tmp_path, "status.py", str(path), "--json").stdout)
        assert {r["state"] for r in status} == {"pending"}, status
        assert {r["id"]: r["run_id"] for r in status} == first_run_ids  # the same runs
        for row in status:
            if row["id"] != "teacher":
                assert dependency_of(row["job_id"]).startswith(f"afterok:{teacher_job}"), row
        jobs = queued_jobs(tmp_path)
        assert len(jobs) == 9  # each row queued once
        (journal,) = (tmp_path / "outputs").rglob("submissions.jsonl")
        lines = [json.loads(x) for x in journal.read_text().splitlines()]
        assert sum(1 for e in lines if e.get("held")) == 4
        assert len({e["job_id"] for e in lines if e["job_id"]}) == 9
        # a second pass (and a second launch) submits nothing again
        again = launch(tmp_path, str(path), "--no-feeder")
        assert again.returncode == 0 and len(queued_jobs(tmp_path)) == 9, again.stdout
    finally:
        cancel_leftover_jobs(tmp_path)


def test_the_feeder_a_launch_starts_submits_held_rows_and_exits(tmp_path: Path) -> None:
    path = write_grid(tmp_path, students=3)
    try:
        with max_submit_jobs(2):
            done = launch(tmp_path, str(path), "--feed-interval", "1")
            assert done.returncode == 0 and "by the feeder, pid" in done.stdout, done.stdout
            status = json.loads(script(tmp_path, "status.py", str(path), "--json").stdout)
            assert sorted(r["state"] for r in status).count("held") == 2
        (log,) = (tmp_path / "outputs").rglob("feeder.log")
        for _ in range(60):  # the limit is gone: the feeder's next pass submits them
            status = json.loads(script(tmp_path, "status.py", str(path), "--json").stdout)
            if {r["state"] for r in status} == {
                "pending"
            } and "0 row(s) still held" in log.read_text():
                break
            time.sleep(1)
        assert {r["state"] for r in status} == {"pending"}, (status, log.read_text())
        assert "0 row(s) still held" in log.read_text()
        assert not list((tmp_path / "outputs").rglob("feeder.pid"))  # it exited
        assert len(queued_jobs(tmp_path)) == 4
    finally:
        cancel_leftover_jobs(tmp_path)
