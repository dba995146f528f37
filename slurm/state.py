"""SLURM job state for many jobs at once: one `sacct` call and one `squeue` call, never one per row."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kd.tracking import RunRecord

# kdgrid's own state: SLURM no longer holds a job of ours under this id (`job_states`)
GONE = "GONE"
TERMINAL = {
    GONE,
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
}


def _waiting(words: list[str], start: str, nodes: str) -> bool:
    """Pending, or cancelled before it ever started (no node; sacct may still give a Start:
    the moment of the cancel)."""
    if not words:
        return False
    return words[0] in ("PENDING", "REQUEUED") or (
        words[0] == "CANCELLED" and (start in ("", "None", "Unknown") or nodes.startswith("None"))
    )


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # sacct's State, first word (e.g. "CANCELLED by 0" -> "CANCELLED")
    elapsed_s: int = 0
    nodes: str = ""
    reason: str = ""  # squeue's pending reason, else sacct's Reason (e.g. "Dependency")
    start: str = ""
    end: str = ""
    cancelled_by: str = ""  # uid in sacct's "CANCELLED by UID"; "" when SLURM cancelled it itself
    name: str = ""  # the job's name (kdgrid's jobs: `job_name(grid)`)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def held_after_failure(run_status: str, job: JobState | None) -> bool:
    """A FAILED or KILLED run (MLflow status) whose job SLURM still holds: requeued (a lost
    node, a preemption) and so to run again into the same run, or still winding down
    (COMPLETING, the other ranks of a multi-node job). Launches, status and cancel leave such
    a row to its job."""
    return run_status in ("FAILED", "KILLED") and job is not None and not job.terminal


@dataclass(frozen=True)
class Submission:
    """What a run recorded about its job when `sbatch` returned (`submission_tags`); None where
    it recorded nothing (an older kdgrid, a job id recovered from the journal)."""

    name: str | None = None  # the job name it was submitted under
    cluster: str | None = None  # the cluster it was queued on
    user: str | None = None  # who submitted it


def job_name(grid_name: str) -> str:
    """The SLURM job name of a grid's rows (the launcher reserves `--job-name`)."""
    return f"kd-{grid_name}"


_cluster: list[str] = []  # cluster_name(), once known


def cluster_name() -> str | None:
    """This machine's SLURM cluster (`ClusterName`), or None when the controller does not answer."""
    if _cluster:
        return _cluster[0]
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    found = re.search(r"^ClusterName\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not found:
        return None
    _cluster.append(found[1])
    return found[1]


def current_user() -> str:
    """The user SLURM knows this process by: its uid's name (not $USER), or the uid where the
    uid has no name (a container run with `--user 1234`)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def submission_tags(grid_name: str, sbatch_extra: Mapping[str, str]) -> dict[str, str]:
    """The run tags that say where a row's job went (read back by `slurm_jobs`). No cluster when
    `sbatch_extra` sends the job to other clusters: this one's squeue does not list it."""
    from kd.tracking import TAG

    tags = {f"{TAG}.slurm_job_name": job_name(grid_name), f"{TAG}.slurm_user": current_user()}
    cluster = cluster_name()
    if cluster is not None and "clusters" not in sbatch_extra:
        tags[f"{TAG}.slurm_cluster"] = cluster
    return tags


def slurm_jobs(records: Iterable[RunRecord]) -> dict[str, JobState]:
    """The jobs of these runs' SLURM submissions, by job id (`job_states`, told what each run
    recorded about its job)."""
    from kd.tracking import TAG

    submitted = {
        r.job_id: Submission(
            name=r.tags.get(f"{TAG}.slurm_job_name"),
            cluster=r.tags.get(f"{TAG}.slurm_cluster"),
            user=r.tags.get(f"{TAG}.slurm_user"),
        )
        for r in records
        if r.tags.get(f"{TAG}.executor") == "slurm" and r.job_id
    }
    return job_states(submitted.keys(), submitted)


def job_states(
    job_ids: Iterable[str], submitted: Mapping[str, Submission] | None = None
) -> dict[str, JobState]:
    """State of each job id (plain `123` or array task `123_4`). Unknown ids are left out.

    With `submitted` (what the runs recorded about their jobs) an id is GONE, i.e. no job of
    ours runs or waits under it, when SLURM lists it under another job's name (job ids started
    over: a reset controller), or when this user's job on this cluster is not in `squeue` and
    accounting does not say how it ended (a lost controller state, a cluster without
    accounting): the controller lists every job it holds. When `squeue` does not answer (no
    controller), absence proves nothing and an unknown id stays unknown."""
    from concurrent.futures import ThreadPoolExecutor

    ids = sorted({j for j in job_ids if j and not j.startswith("local-")})
    if not ids or shutil.which("sacct") is None:
        return {}
    with ThreadPoolExecutor(max_workers=1) as pool:  # squeue beside sacct: ~0.15 s less
        queued_later = pool.submit(_queued, ids)
        try:
            out = _sacct(ids)
        except subprocess.TimeoutExpired:  # slurmdbd slow or away: squeue says who is alive
            out = ""
        queued = queued_later.result()
    states: dict[str, JobState] = {}
    for line in out.splitlines():
        parts = line.split("|", 7)
        if len(parts) < 8:
            continue
        job_id, state, elapsed, nodes, start, end, reason, name = parts
        words = state.split()
        states[job_id] = JobState(
            job_id=job_id,
            state=words[0] if words else "UNKNOWN",
            elapsed_s=int(elapsed) if elapsed.isdigit() else 0,
            nodes="" if nodes.startswith("None") else nodes,
            # sacct keeps the last pending reason after the job started: only a pending job's,
            # or a job's cancelled before it started, says why it is (was) waiting
            reason=reason if _waiting(words, start, nodes) and reason != "None" else "",
            start=start,
            end=end,
            cancelled_by=words[2] if len(words) > 2 and words[1] == "by" else "",
            name=name,
        )
    _expand_pending_arrays(states, ids)
    # squeue is the controller's own view of live jobs; sacct (slurmdbd) lags it by seconds and
    # does not know a job submitted a moment ago at all. A job squeue lists as ended is left to
    # sacct, which says how (by whom it was cancelled, why).
    for job_id, (state, reason, nodes, name) in (queued or {}).items():
        if state in TERMINAL:
            continue
        known = states.get(job_id, JobState(job_id=job_id, state=state))
        states[job_id] = dataclasses.replace(
            known,
            state=state,
            reason=reason if state == "PENDING" else known.reason,
            nodes=nodes or known.nodes,
            name=name,
        )
    asked = set(ids)
    for job_id, submission in (submitted or {}).items():
        if job_id in asked:
            _mark_gone(states, job_id, submission, queued)
    return states


def _sacct(ids: list[str]) -> str:
    """sacct's lines, one per job allocation, for these job ids."""
    return subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-j",
            ",".join(ids),
            "-o",
            "JobID,State,ElapsedRaw,NodeList,Start,End,Reason,JobName",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout


def _mark_gone(
    states: dict[str, JobState],
    job_id: str,
    submission: Submission,
    queued: dict[str, tuple[str, str, str, str]] | None,
) -> None:
    """Replace what SLURM says of `job_id` with GONE where it says nothing of our job."""
    job = states.get(job_id)
    if job is not None and submission.name and job.name and job.name != submission.name:
        why = (
            f"job id {job_id} belongs to another job now ('{job.name}', not "
            f"'{submission.name}'): SLURM's job ids started over"
        )
    elif (
        queued is not None
        and job_id not in queued
        and submission.cluster is not None
        and submission.cluster == cluster_name()
        and submission.user == current_user()  # PrivateData=jobs may hide others' jobs
        and (job is None or not job.terminal)
    ):
        last = f" (accounting last said {job.state})" if job is not None else ""
        why = f"SLURM no longer has job {job_id}{last}: it ended without a trace"
    else:
        return
    states[job_id] = JobState(job_id=job_id, state=GONE, reason=why)


def _expand_pending_arrays(states: dict[str, JobState], ids: list[str]) -> None:
    """sacct lists a pending array as one line `123_[0-9]`; give each asked-for task its state."""
    for job_id in ids:
        if job_id in states or "_" not in job_id:
            continue
        array_id, task = job_id.split("_", 1)
        for key, state in list(states.items()):
            if key.startswith(f"{array_id}_[") and _task_in_range(
                task, key[len(array_id) + 2 : -1]
            ):
                states[job_id] = JobState(**{**state.__dict__, "job_id": job_id})


def _task_in_range(task: str, spec: str) -> bool:
    spec = spec.split("%")[0]
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            if low.isdigit() and high.isdigit() and int(low) <= int(task) <= int(high):
                return True
        elif part == task:
            return True
    return False


def _queued(ids: list[str]) -> dict[str, tuple[str, str, str, str]] | None:
    """(state, pending reason, nodes, name) of the asked-for jobs squeue lists; None when squeue
    does not answer (no controller)."""
    if shutil.which("squeue") is None:
        return None
    # Every job the controller holds, in any state (-t all: a requeued job between its states
    # too; finished ones for MinJobAge), in hidden partitions too (-a), and none of the
    # SQUEUE_* / SLURM_CLUSTERS filters a user's shell may set: absence from it means GONE.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SQUEUE_") and k != "SLURM_CLUSTERS"
    }
    try:
        result = subprocess.run(
            ["squeue", "-h", "-a", "-r", "-t", "all", "-o", "%i|%T|%r|%N|%j"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    wanted = set(ids)
    queued = {}
    for line in result.stdout.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5 and parts[0] in wanted:
            job_id, state, reason, nodes, name = parts
            queued[job_id] = (state, "" if reason == "None" else reason, nodes, name)
    return queued


def queued_jobs_logging_under(folder: Path) -> set[str]:
    """Ids (array job ids for arrays) of the live jobs whose log file lies under `folder`: one
    `scontrol show job` call. This finds jobs that a killed launcher queued but never recorded,
    since every job kdgrid submits logs under its grid's `slurm/` folder."""
    if shutil.which("scontrol") is None:
        return set()
    out = subprocess.run(
        ["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    prefix = str(folder.resolve()).rstrip("/") + "/"
    found = set()
    for line in out.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        stdout = re.search(r"\bStdOut=(.*?)(?= [A-Za-z:]+=|$)", line)  # a path may hold spaces
        if fields.get("JobState") in TERMINAL or not (stdout and stdout[1].startswith(prefix)):
            continue
        found.add(fields.get("ArrayJobId") or fields.get("JobId", ""))
    return found - {""}


def cancel(job_ids: Iterable[str]) -> None:
    ids = job_specs({j for j in job_ids if j and not j.startswith("local-")})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)


def job_specs(job_ids: Iterable[str]) -> list[str]:
    """The same jobs in SLURM's array notation, `123_[0-4,7]`, one word per array: scancel
    took 5.7 s for 10,000 task ids one by one. Exactly the tasks given, never a whole array
    by its id (other tasks of it may belong to rows not being cancelled)."""
    arrays: dict[str, list[int]] = {}
    single = []
    for job in set(job_ids):
        array, _, task = job.partition("_")
        if task.isdigit() and array.isdigit():
            arrays.setdefault(array, []).append(int(task))
        else:
            single.append(job)
    specs = sorted(single)
    for array, tasks in sorted(arrays.items()):
        tasks.sort()
        ranges, start = [], tasks[0]
        for previous, task in zip(tasks, [*tasks[1:], None], strict=True):
            if task != previous + 1:
                ranges.append(str(start) if start == previous else f"{start}-{previous}")
                start = task
        specs.append(f"{array}_[{','.join(ranges)}]")
    return specs
