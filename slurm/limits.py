"""What the cluster accepts now, read before submitting: the largest job array (`MaxArraySize`)
and how many more jobs may be queued (`MaxJobCount`, the association's `MaxSubmitJobs` and
`GrpSubmitJobs`, the QOS's `MaxSubmitJobsPerUser`/`GrpSubmitJobs`), less the jobs already queued.

SLURM counts every task of a job array as one job against these limits, so the launcher counts
rows, not sbatch calls. A limit that cannot be read (no accounting database, an old sacctmgr) is
left out: then sbatch is the judge, as before.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from slurm.state import current_user

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default, used when `scontrol show config` cannot be read


@dataclass(frozen=True)
class ClusterLimits:
    max_array_size: int  # tasks in one job array (indices 0 .. max_array_size - 1)
    free: int | None  # more jobs this user may queue now; None: no limit known
    why: str  # the limit that bounds `free`, for messages

    def fits(self, rows: int) -> bool:
        return self.free is None or rows <= self.free


#: what sbatch says when a limit (of those above, or one not read) refuses a job: the rows left
#: are then held, not the launch failed
LIMIT_ERRORS = (
    "Resource temporarily unavailable",
    "MaxSubmitJob",
    "MaxSubmitJobsPerUser",
    "AssocMaxSubmitJobLimit",
    "QOSMaxSubmitJobPerUserLimit",
    "Job violates accounting/QOS policy",
)


#: what sbatch says when the controller cannot be reached or is busy: worth trying again later
UNAVAILABLE_ERRORS = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Slurm temporarily unable to accept job",
    "Connection refused",
    "Zero Bytes were transmitted or received",
)

#: what sbatch says of an array larger than the controller's MaxArraySize
ARRAY_TOO_LARGE = "Invalid job array specification"


def array_too_large(exc: BaseException) -> bool:
    return ARRAY_TOO_LARGE in str(exc)


def controller_unavailable(exc: BaseException) -> bool:
    """An sbatch failure that says nothing of the job: the controller is down or busy."""
    text = str(exc)
    return any(marker in text for marker in UNAVAILABLE_ERRORS)


def refused_by_limit(exc: BaseException) -> bool:
    """An sbatch failure that means "no more jobs now" (a limit), not a bad job."""
    text = str(exc)
    return any(marker in text for marker in LIMIT_ERRORS)


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_config(text: str) -> dict[str, str]:
    """`scontrol show config` lines `Key = value` -> {Key: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def count_jobs(user: str | None) -> int | None:
    """The user's queued and running jobs, or every job record slurmctld holds (ended ones
    too, until `MinJobAge` passes: they count against `MaxJobCount`); array tasks one by one."""
    args = ["squeue", "-h", "-r", "-o", "%i"] + (["-u", user] if user else ["-t", "all"])
    out = _run(args)
    return None if out is None else sum(1 for line in out.splitlines() if line.strip())


def association_limits(user: str) -> tuple[list[tuple[str, int]], set[str]]:
    """(limit name, value) of the user's associations, and the QOS they default to."""
    out = _run(
        [
            "sacctmgr", "-nP", "show", "assoc", "where", f"users={user}",
            "format=Account,MaxSubmit,GrpSubmit,DefaultQOS",
        ]
    )  # fmt: skip
    limits: list[tuple[str, int]] = []
    default_qos: set[str] = set()
    for line in (out or "").splitlines():
        fields = line.split("|")
        if len(fields) < 4:
            continue
        account, max_submit, grp_submit, qos = fields[:4]
        for name, value in (("MaxSubmitJobs", max_submit), ("GrpSubmitJobs", grp_submit)):
            if _number(value) is not None:
                limits.append((f"association {user}/{account} {name}", int(value)))
        default_qos.add(qos.strip() or "normal")
    return limits, default_qos


QOS_COMMAND = ["sacctmgr", "-nP", "show", "qos", "format=Name,MaxSubmitPU,GrpSubmit"]


def qos_limits(names: Iterable[str], out: str | None = None) -> list[tuple[str, int]]:
    """(limit name, value) of the named QOSes' per-user and group submit limits (`out`:
    QOS_COMMAND's output, when it was run already)."""
    names = set(names)
    out = _run(QOS_COMMAND) if out is None else out
    limits = []
    for line in (out or "").splitlines():
        fields = line.split("|")
        if len(fields) < 3 or fields[0] not in names:
            continue
        for name, value in (("MaxSubmitJobsPerUser", fields[1]), ("GrpSubmitJobs", fields[2])):
            if _number(value) is not None:
                limits.append((f"QOS {fields[0]} {name}", int(value)))
    return limits


def read_limits(qos: Iterable[str | None] = ()) -> ClusterLimits:
    """The limits that apply to this user's next submission (rows' `resources.qos` values).

    The five commands (scontrol, two sacctmgr, two squeue) run at once: one after the other
    they took ~0.5 s of a 10,000-row launch."""
    from concurrent.futures import ThreadPoolExecutor

    user = current_user()
    with ThreadPoolExecutor(max_workers=5) as pool:
        config_out = pool.submit(_run, ["scontrol", "show", "config"])
        association = pool.submit(association_limits, user)
        qos_out = pool.submit(_run, QOS_COMMAND)
        mine_count = pool.submit(count_jobs, user)
        all_count = pool.submit(count_jobs, None)
    config = parse_config(config_out.result() or "")
    max_array = _number(config.get("MaxArraySize", "")) or DEFAULT_MAX_ARRAY_SIZE
    per_user, default_qos = association.result()
    qos_names = {q for q in qos if q} or default_qos
    per_user += qos_limits(qos_names, qos_out.result() or "")
    bounds: list[tuple[str, int]] = []
    if per_user:
        mine = mine_count.result()
        if mine is not None:
            bounds += [(name, value - mine) for name, value in per_user]
    max_jobs = _number(config.get("MaxJobCount", ""))
    if max_jobs is not None:
        everyone = all_count.result()
        if everyone is not None:
            # slurmctld refuses a job that would bring its records to MaxJobCount itself
            bounds.append(("MaxJobCount", max_jobs - everyone - 1))
    if not bounds:
        return ClusterLimits(max_array, None, "")
    why, free = min(bounds, key=lambda b: b[1])
    return ClusterLimits(max_array, max(free, 0), why)
