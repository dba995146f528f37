"""SLURM job state for many jobs at once: one `sacct` call and one `squeue` call, never one per row."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

TERMINAL = {
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


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # sacct's State, first word (e.g. "CANCELLED by 0" -> "CANCELLED")
    elapsed_s: int = 0
    nodes: str = ""
    reason: str = ""  # squeue's pending reason
    start: str = ""
    end: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """State of each job id (plain `123` or array task `123_4`). Unknown ids are left out."""
    ids = sorted({j for j in job_ids if j and not j.startswith("local-")})
    if not ids or shutil.which("sacct") is None:
        return {}
    out = subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-j",
            ",".join(ids),
            "-o",
            "JobID,State,ElapsedRaw,NodeList,Start,End",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    states: dict[str, JobState] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        job_id, state, elapsed, nodes, start, end = parts[:6]
        states[job_id] = JobState(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",
            elapsed_s=int(elapsed) if elapsed.isdigit() else 0,
            nodes="" if nodes.startswith("None") else nodes,
            start=start,
            end=end,
        )
    _expand_pending_arrays(states, ids)
    for job_id, reason in _pending_reasons(ids).items():
        if job_id in states:
            states[job_id] = JobState(**{**states[job_id].__dict__, "reason": reason})
    return states


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


def _pending_reasons(ids: list[str]) -> dict[str, str]:
    if shutil.which("squeue") is None:
        return {}
    out = subprocess.run(
        ["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    wanted = set(ids)
    reasons = {}
    for line in out.splitlines():
        job_id, _, reason = line.partition("|")
        if job_id in wanted:
            reasons[job_id] = reason
    return reasons


def cancel(job_ids: Iterable[str]) -> None:
    ids = sorted({j for j in job_ids if j and not j.startswith("local-")})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)
