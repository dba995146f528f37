"""Helpers for the tests that run against the local SLURM cluster (tests/test_slurm.py,
tests/test_fault_injection.py): the CLI in a working folder, SLURM (only jobs whose working
directory is under the given folder are looked at or cancelled), and the MLflow store there."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
NODES = {"n1", "n2"}
ACTIVE_STATES = ("pending", "running", "preempted")
TINY_MODEL = "test_resnet"  # timm's ~0.2M-parameter ResNet: an epoch of 16 images in < 1 s
IN_CI = os.environ.get("CI") == "true"


def require_slurm() -> None:
    """Skip the calling test module when SLURM is not installed, except in CI (CI=true), where
    a missing cluster must fail its tests instead. Call it at module level, or in a test."""
    if shutil.which("sbatch") is None and not IN_CI:
        pytest.skip("SLURM cluster not up: run slurm/cluster.sh up", allow_module_level=True)


# --------------------------------------------------------------------------------------------
# Helpers: the CLI, SLURM (only our jobs), MLflow
# --------------------------------------------------------------------------------------------


def run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment (sbatch exports it to the jobs), MLflow in workdir/mlflow.db, no fault
    injection unless asked for."""
    from kd import inject

    unset = (
        "MLFLOW_TRACKING_URI",
        "KDGRID_INJECT_NAN_AT_STEP",
        inject.SUBMIT_PAUSE,
        inject.RECORD_PAUSE,
        inject.LOCAL_START_PAUSE,
        inject.RUN_START_PAUSE,
    )
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {})}


def launch(
    workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python launch/grid.py ARGS --executor slurm` in `workdir`."""
    return script(workdir, "grid.py", *args, "--executor", "slurm", env=env, timeout=timeout)


def script(
    workdir: Path, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python launch/NAME ARGS` in `workdir`."""
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / name), *args],
        cwd=workdir,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status_json(workdir: Path, *args: str) -> list[dict[str, Any]]:
    """`python launch/status.py ARGS --json` in `workdir`."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "status.py"), *args, "--json"],
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def by_label(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows}


def queued_jobs(root: Path) -> dict[str, tuple[str, str]]:
    """Our jobs still known to slurmctld (pending, running, completing): job id (array tasks
    one by one) -> (state, reason)."""
    out = run("squeue", "-h", "-r", "-o", "%i|%T|%r|%Z").stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, reason, workdir = line.split("|", 3)
        if Path(workdir).is_relative_to(root):
            jobs[job_id] = (state, reason)
    return jobs


def cancel_leftover_jobs(root: Path) -> None:
    """Whatever a failed test left queued under `root` is cancelled, by job id, ours only."""
    leftover = queued_jobs(root)
    if leftover:
        run("scancel", *sorted(leftover))


def jobs_submitted_from(workdir: Path) -> set[str]:
    """Every job (array tasks one by one) ever submitted from `workdir`: squeue + sacct."""
    ids = {j for j in queued_jobs(workdir)}
    out = run("sacct", "-X", "-n", "-P", "-S", "now-1days", "-o", "JobID,WorkDir").stdout
    for line in out.splitlines():
        job_id, _, folder = line.partition("|")
        if folder and Path(folder) == workdir and "[" not in job_id:
            ids.add(job_id)
    return ids


def wait_for_jobs_from(workdir: Path, timeout: float = 60) -> set[str]:
    """The jobs submitted from `workdir`, once there are some: a job cancelled at once has left
    squeue before slurmdbd (sacct) recorded it, a few seconds later."""
    deadline = time.monotonic() + timeout
    while not (jobs := jobs_submitted_from(workdir)) and time.monotonic() < deadline:
        time.sleep(1)
    return jobs


def sacct(job_ids: Iterable[str], *, duplicates: bool = False) -> list[dict[str, str]]:
    """sacct records of the jobs' allocations (with `duplicates`, one per requeued run too)."""
    fields = ["JobID", "State", "Start", "End", "NodeList", "Reason"]
    out = run(
        "sacct",
        "-X",
        "-n",
        "-P",
        *(["-D"] if duplicates else []),
        "-j",
        ",".join(sorted(job_ids)),
        "-o",
        ",".join(fields),
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]


def release_held(root: Path) -> None:
    """Let our requeued jobs start now instead of after SLURM's 120 s requeue hold."""
    for job_id, (state, reason) in queued_jobs(root).items():
        if state == "PENDING" and reason == "BeginTime":
            run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def wait_sacct_done(job_ids: Iterable[str], timeout: float = 120) -> dict[str, dict[str, str]]:
    """sacct records once every job has a final state and an End time, and slurmctld lists
    none of them any more: a cancelled job has its final state in sacct at once but stays
    COMPLETING until SLURM's KillWait has killed its processes, and status (and a launch)
    rightly treat a KILLED run whose job is still completing as not over yet."""
    ids = set(job_ids)
    deadline = time.monotonic() + timeout
    while True:
        records = {r["JobID"]: r for r in sacct(ids)}
        ended = all(
            j in records
            and records[j]["State"].split()[0]
            in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
            and records[j]["End"] not in ("Unknown", "")
            for j in ids
        )
        listed = set(run("squeue", "-h", "-r", "-o", "%i").stdout.split())
        left = {j for j in ids if j in listed or any(x.startswith(j + "_") for x in listed)}
        done = ended and not left
        if done or time.monotonic() > deadline:
            assert done, f"the end of {sorted(ids)}: sacct {records}, still listed {sorted(left)}"
            return records
        time.sleep(2)


def job_logs(workdir: Path, job_id: str) -> list[Path]:
    """The submitit logs of a job (one per task): <output_dir>/slurm/<array job>/<job>_<task>_log.out
    (an array's tasks share their array's folder; a lone job's folder is its own id)."""
    return sorted(workdir.glob(f"**/slurm/{job_id.split('_')[0]}/{job_id}_*_log.out"))


def log_tail(workdir: Path, job_id: str | None, lines: int = 30) -> str:
    if not job_id:
        return "(no job)"
    texts = []
    for path in job_logs(workdir, job_id):
        texts.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
    return "\n".join(texts) or f"(no log for job {job_id} under {workdir})"


def wait_for_rows(
    workdir: Path,
    *args: str,
    labels: Iterable[str] | None = None,
    expect: str | None = "finished",
    timeout: float = 600,
    status_every: float = 30,
) -> dict[str, dict[str, Any]]:
    """Poll `launch/status.py --json` until the rows (default: all) are no longer pending or
    running; with `expect`, fail at once (with the job log) when a row ends in another state.

    status.py costs seconds of CPU on a 2-core box that is training: it runs every
    `status_every` seconds, and at once when the rows' jobs have left squeue (polled each
    second, with our requeued jobs released from SLURM's hold)."""
    deadline = time.monotonic() + timeout
    last, active_jobs = -1e9, None
    while True:
        release_held(workdir)
        now = time.monotonic()
        gone = active_jobs is not None and not (active_jobs & set(queued_jobs(workdir)))
        if now - last >= status_every or (gone and now - last >= 3):
            last = now
            rows = by_label(status_json(workdir, *args))
            wanted = {k: v for k, v in rows.items() if labels is None or k in set(labels)}
            if expect is not None:
                for label, row in wanted.items():
                    if row["state"] not in (*ACTIVE_STATES, expect):
                        pytest.fail(
                            f"row {label} is {row['state']} ({row['reason']}), expected "
                            f"{expect}:\n" + log_tail(workdir, row["job_id"])
                        )
            if all(r["state"] not in ACTIVE_STATES for r in wanted.values()):
                return rows
            active_jobs = {r["job_id"] for r in wanted.values() if r["state"] in ACTIVE_STATES}
        if now > deadline:
            pytest.fail(
                f"rows not done after {timeout:.0f}s: "
                + ", ".join(f"{k}={v['state']}" for k, v in wanted.items())
            )
        time.sleep(1)


def mlflow_client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")


def row_runs(workdir: Path, experiment: str) -> list[Any]:
    """The row runs of an experiment (not the launch runs that group them)."""
    client = mlflow_client(workdir)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("kdgrid.key")]


def steps(workdir: Path, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in mlflow_client(workdir).get_metric_history(run_id, metric))


def submissions(workdir: Path, output_dir: str) -> list[dict[str, Any]]:
    path = workdir / "outputs" / output_dir / "submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def hostnames(nodelist: str) -> set[str]:
    return set(run("scontrol", "show", "hostnames", nodelist).stdout.split())


def generate_data(folder: Path, train_per_class: int) -> Path:
    from kd.data import generate_dataset

    spec = generate_dataset(
        "imagefolder",
        folder,
        num_classes=4,
        train_per_class=train_per_class,
        test_per_class=2,
        image_size=32,
    )
    return Path(spec.root)


def write_grid(
    folder: Path,
    name: str,
    rows: list[dict[str, Any]],
    data: Path,
    *,
    epochs: int,
    resources: dict[str, Any] | None = None,
) -> Path:
    """A grid of tiny rows on the generated data: 32 px, batch 8, no augmentation, 1 CPU."""
    import yaml

    spec = {
        "name": name,
        "experiment": f"kd-test-{name}",
        "defaults": {
            "student": {"model": TINY_MODEL},
            "init": "scratch",
            "kd": {"ce": 1.0},
            "data": {"dataset": "imagefolder", "root": str(data), "img_size": 32, "num_workers": 0},
            "train": {
                "epochs": epochs,
                "batch_size": 8,
                "lr": 1.0e-3,
                "warmup_epochs": 0,
                "seed": 0,
                "auto_augment": None,
            },
            "resources": {
                "nodes": 1,
                "gpus_per_node": 0,
                "cpus_per_task": 1,
                "mem_gb": 2,
                "time_min": 30,
                **(resources or {}),
            },
            "output_dir": f"outputs/{name}",
        },
        "rows": rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def only_run(workdir: Path, experiment: str) -> Any:
    (run_,) = row_runs(workdir, experiment)
    return run_


def seconds_per_epoch(workdir: Path, run_id: str, epochs: int, timeout: float = 300) -> float:
    """Median time between consecutive epochs 2..`epochs` of a running row (MLflow's
    timestamps; the first epoch carries the start-up)."""
    client = mlflow_client(workdir)
    deadline = time.monotonic() + timeout
    while True:
        history = sorted(client.get_metric_history(run_id, "epoch"), key=lambda m: m.step)
        if len(history) >= epochs:
            stamps = [m.timestamp for m in history[1:epochs]]
            gaps = sorted(b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True))
            return gaps[len(gaps) // 2] / 1000
        assert time.monotonic() < deadline, f"{len(history)} epochs after {timeout:.0f}s"
        assert client.get_run(run_id).info.status in ("SCHEDULED", "RUNNING")
        release_held(workdir)
        time.sleep(0.5)


def assert_each_epoch_once(workdir: Path, run_id: str, epochs: int) -> None:
    client = mlflow_client(workdir)
    for metric in ("val/acc1", "train/loss", "epoch"):
        logged = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert logged == list(range(1, epochs + 1)), (metric, logged)


# --------------------------------------------------------------------------------------------
# The audit after a fault: what MLflow and the row folders hold once the grid finished


@dataclasses.dataclass
class Audit:
    lost: list[str]  # data that should be there and is not
    twice: list[str]  # work done twice: an epoch logged twice, a row trained by two runs

    def __str__(self) -> str:
        return "; ".join(self.lost + self.twice) or "nothing lost, nothing done twice"


CHECKPOINTS = ("best.pt", "last.pt", "state.pt")


def audit_rows(workdir: Path, experiment: str, epochs: dict[str, int], output: Path) -> Audit:
    """Per row label (-> its epochs): exactly one FINISHED run, each epoch's metrics logged
    once, the checkpoints in MLflow, loadable checkpoints and no temporary file in the row's
    folder under `output`; and no second run of the row that trained."""
    import torch

    client = mlflow_client(workdir)
    runs = row_runs(workdir, experiment)
    lost: list[str] = []
    twice: list[str] = []
    for label, count in epochs.items():
        mine = [r for r in runs if r.data.tags.get("kdgrid.label") == label]
        trained = [r for r in mine if client.get_metric_history(r.info.run_id, "epoch")]
        if len(trained) > 1:
            twice.append(f"{label}: trained by {len(trained)} runs")
        finished = [r for r in mine if r.info.status == "FINISHED"]
        if len(finished) != 1:
            lost.append(f"{label}: {len(finished)} finished runs, not 1")
            continue
        run_id = finished[0].info.run_id
        for metric in ("epoch", "train/loss", "val/acc1"):
            logged = [m.step for m in client.get_metric_history(run_id, metric)]
            missing = sorted(set(range(1, count + 1)) - set(logged))
            if missing:
                lost.append(f"{label}: {metric} missing at epochs {missing}")
            if len(logged) > len(set(logged)):
                twice.append(f"{label}: {metric} logged {len(logged)} times for {count} epochs")
        stored = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        for name in ("best.pt", "last.pt"):
            if f"checkpoints/{name}" not in stored:
                lost.append(f"{label}: checkpoints/{name} not in MLflow")
        row_dir = output / finished[0].data.tags["kdgrid.id"]
        for name in CHECKPOINTS:
            try:
                torch.load(row_dir / name, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any failure to load is a lost checkpoint
                lost.append(f"{label}: {row_dir / name} does not load: {exc}")
        leftovers = [p.name for p in row_dir.glob(".*tmp*")]
        if leftovers:
            lost.append(f"{label}: half-written files left in {row_dir}: {leftovers}")
    return Audit(lost, twice)
