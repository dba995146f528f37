"""Rows -> SLURM jobs through submitit: parameters, checks against `sinfo`, arrays, dependencies.

A grid is submitted in dependency waves: rows whose dependencies are all outside the launch (or
finished) first, then rows that wait on those, and so on. Within a wave, rows with the same
resources and the same dependencies share one job array (submitit `batch()`), split at the
cluster's `MaxArraySize`, so a 10,000-row grid costs a handful of `sbatch` calls. Rows beyond
what the cluster accepts now (slurm/limits.py) are held (slurm/held.py). Edges become `afterok` dependencies with
`--kill-on-invalid-dep=yes`, so a failed teacher cancels its students instead of leaving them
pending forever. Every value that reaches an sbatch line is checked first; none goes through a
shell.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import closest
from kd.grid import Row
from kd.inject import SUBMIT_PAUSE, pause
from slurm.limits import ClusterLimits, array_too_large, refused_by_limit
from slurm.state import job_name

SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\[\]-]+$")
SAFE_FLAG = re.compile(r"^[a-z][a-z0-9-_]*$")
# Flags the launcher sets itself; a grid's `sbatch_extra` may not override them.
RESERVED_FLAGS = {
    "dependency",
    "array",
    "output",
    "error",
    "job-name",
    "wrap",
    "kill-on-invalid-dep",
}
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: time to finish writing a checkpoint


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    gres: str  # e.g. "(null)" or "gpu:8"

    @property
    def has_gpus(self) -> bool:
        return "gpu" in self.gres


class SlurmUnavailable(RuntimeError):
    """The SLURM controller does not answer: nothing can be checked or submitted."""


def read_partitions() -> dict[str, Partition]:
    """Partitions as `sinfo` reports them (one call)."""
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnavailable(f"cannot run sinfo: {exc}") from None
    if done.returncode != 0:
        detail = (
            done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        )
        raise SlurmUnavailable(
            f"sinfo failed ({detail}); is the SLURM controller up? (slurm/cluster.sh status), "
            "or run with --executor local"
        )
    out = done.stdout
    partitions: dict[str, Partition] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        name, gres = line.split("|", 1)
        default = name.endswith("*")
        name = name.rstrip("*")
        prev = partitions.get(name)
        gres = gres if prev is None or prev.gres in ("(null)", "") else f"{prev.gres},{gres}"
        partitions[name] = Partition(name, default or (prev is not None and prev.default), gres)
    return partitions


def check_rows(rows: Sequence[Row], partitions: Mapping[str, Partition] | None) -> list[str]:
    """Every problem with the rows' SLURM fields, before anything is submitted."""
    problems = []
    default = next((p for p in (partitions or {}).values() if p.default), None)
    for row in rows:
        res = row.config.resources
        where = f"{row.grid_file}: row '{row.id}' ({row.label})"
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            value = getattr(res, key)
            if value is not None and not SAFE_VALUE.match(value):
                problems.append(
                    f"{where}: resources.{key}: {value!r} contains characters SLURM does not accept "
                    "here (letters, digits and _ . , : = + @ % / [ ] - only)"
                )
        for flag, value in res.sbatch_extra.items():
            if not SAFE_FLAG.match(flag) or flag.replace("_", "-") in RESERVED_FLAGS:
                problems.append(
                    f"{where}: resources.sbatch_extra.{flag}: not an sbatch flag this launcher lets a grid set"
                )
            if not SAFE_VALUE.match(str(value)):
                problems.append(f"{where}: resources.sbatch_extra.{flag}: unsafe value {value!r}")
        if partitions is None:
            continue
        partition = partitions.get(res.partition) if res.partition else default
        if res.partition and partition is None:
            problems.append(
                f"{where}: resources.partition: no partition '{res.partition}' on this cluster"
                f"{closest(res.partition, partitions)}; sinfo lists: {', '.join(sorted(partitions))}"
            )
        elif partition is not None and res.gpus_per_node > 0 and not partition.has_gpus:
            problems.append(
                f"{where}: resources.gpus_per_node: {res.gpus_per_node} GPUs requested but partition "
                f"'{partition.name}' has no GPUs (gres {partition.gres}); set resources.gpus_per_node=0 "
                "or choose a GPU partition"
            )
    return problems


def executor_parameters(row: Row, array_parallelism: int) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one row (the same for rows that share an array)."""
    res = row.config.resources
    tasks = res.tasks_per_node or max(res.gpus_per_node, 1)
    params: dict[str, Any] = {
        "job_name": job_name(row.grid),
        "nodes": res.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{int(round(res.mem_gb * 1024))}M",
        "time": res.time_min,
        "signal_delay_s": min(SIGNAL_DELAY_S, max(res.time_min * 60 // 4, 10)),
        "array_parallelism": array_parallelism,
        "stderr_to_stdout": True,
        "additional_parameters": {
            "kill_on_invalid_dep": "yes",
            **dict(sorted(res.sbatch_extra.items())),
        },
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        value = getattr(res, key)
        if value is not None:
            params[key] = value
    return params


def dependency_waves(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows by depth in the launch's DAG: a row comes after every launched row it needs."""
    in_launch = {r.id: r for r in rows}
    depth: dict[str, int] = {}

    def visit(row: Row) -> int:
        if row.id not in depth:
            deps = [in_launch[d] for d in row.depends_on if d in in_launch]
            depth[row.id] = 1 + max((visit(d) for d in deps), default=-1)
        return depth[row.id]

    for row in rows:
        visit(row)
    waves: list[list[Row]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for row in rows:
        waves[depth[row.id]].append(row)
    return waves


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def submit_rows(
    rows: Sequence[Row],
    run_ids: Mapping[str, str],
    tracking_uri: str,
    *,
    folder: Path,
    existing_jobs: Mapping[str, str] | None = None,
    submitted: dict[str, str] | None = None,
    array_parallelism: int = 256,
    on_queued: Callable[[dict[str, str]], None] | None = None,
    limits: ClusterLimits | None = None,
    held: set[str] | None = None,
) -> dict[str, str]:
    """Submit rows (all at once, not waiting for any) and return row id -> SLURM job id.

    `existing_jobs` maps dependency rows that are already queued or running (from an earlier
    launch) to their job ids, so new rows can wait on them too. `on_queued` is called with the
    row id -> job id of each sbatch call as soon as it returns, so that a launcher killed
    half-way has recorded every job it queued but the last. With `limits`, arrays are split at
    the cluster's `MaxArraySize` and no more rows are queued than it accepts now: the ids of the
    rows left out (and of the rows that wait on them) are added to `held`.
    """
    job_ids: dict[str, str] = dict(existing_jobs or {})
    # Filled as jobs are queued: the caller's dict, so that after a failure half-way it still
    # knows what to cancel.
    submitted = {} if submitted is None else submitted
    held = set() if held is None else held
    free = None if limits is None else limits.free
    refused = False
    largest = limits.max_array_size if limits is not None else None
    for wave in dependency_waves(rows):
        groups: dict[Any, list[Row]] = {}
        for row in wave:
            if any(d in held for d in row.depends_on):
                held.add(row.id)  # its dependency has no job yet: it waits with it
                continue
            deps = sorted(job_ids[d] for d in row.depends_on if d in job_ids)
            params = executor_parameters(row, array_parallelism)
            if deps:
                params["dependency"] = "afterok:" + ":".join(deps)
            groups.setdefault(_freeze(params), []).append(row)
        for frozen, group in groups.items():
            if refused:
                free = 0
            if free is not None:
                held.update(row.id for row in group[free:])
                group = group[:free]
                free -= len(group)
            pending = _chunks(group, largest)
            while pending:
                chunk = pending.pop(0)
                if refused:  # sbatch said no more jobs: the rest waits too
                    held.update(row.id for row in chunk)
                    continue
                try:
                    queued = _submit_array(frozen, chunk, run_ids, tracking_uri, folder)
                except Exception as exc:
                    if len(chunk) > 1 and array_too_large(exc):
                        largest = _smaller_arrays(len(chunk), limits)
                        pending = _chunks([row for c in (chunk, *pending) for row in c], largest)
                        continue
                    if limits is None or not refused_by_limit(exc):
                        raise
                    held.update(row.id for row in chunk)  # a limit not read, or reached
                    refused = True
                    continue
                job_ids |= queued
                submitted |= queued
                pause(SUBMIT_PAUSE)  # fault injection (tests): the launcher killed here
                if on_queued is not None:
                    on_queued(queued)
    return submitted


def _smaller_arrays(refused_size: int, limits: ClusterLimits | None) -> int:
    """sbatch refused an array of `refused_size` tasks as too large: the controller checks a
    smaller MaxArraySize than `scontrol show config` reports (slurmctld 22.05 keeps the bound it
    read first through a `scontrol reconfigure`), or the value could not be read. Halve the
    arrays until sbatch takes them; one task is always a valid array."""
    size = (refused_size + 1) // 2
    told = limits.max_array_size if limits is not None else "unknown"
    print(
        f"launch/grid.py: sbatch refused an array of {refused_size} tasks (MaxArraySize reads "
        f"{told}); submitting arrays of at most {size}",
        file=sys.stderr,
    )
    return size


def _chunks(rows: list[Row], size: int | None) -> list[list[Row]]:
    if not rows:
        return []
    size = size or len(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _submit_array(
    frozen: Any, group: list[Row], run_ids: Mapping[str, str], tracking_uri: str, folder: Path
) -> dict[str, str]:
    """One sbatch call: the rows of `group` (one set of parameters) as one job array."""
    import submitit

    from slurm.job import ArrayRowJob, RowJob

    params = dict(frozen)
    params["additional_parameters"] = dict(params["additional_parameters"])
    # one folder per sbatch call (an array's tasks share it), not one per task
    executor = submitit.SlurmExecutor(folder=folder / "%A", max_num_timeout=20)
    executor.update_parameters(**params)
    shared: dict = {}  # the rows' common sections made into dicts once (pickled once, too)
    rows = [row.to_dict(shared) for row in group]
    if len(group) == 1:
        job = executor.submit(RowJob(), rows[0], run_ids[group[0].id], tracking_uri)
        return {group[0].id: str(job.job_id)}
    task = ArrayRowJob(rows, [run_ids[row.id] for row in group], tracking_uri)
    job_ids = submit_shared_pickle_array(executor, task, len(group))
    return {row.id: job for row, job in zip(group, job_ids, strict=True)}


def submit_shared_pickle_array(executor: Any, task: Any, count: int) -> list[str]:
    """`count` tasks as one job array that share one pickle of `task`: what submitit's
    `batch()` does, without its pickle, folder and rename per task (~0.5 ms each: seconds for
    10,000 rows). The job script is submitit's own for an array (its `map_count`, through its
    `_submit_command`: logs, signals, requeue as before); only the command each task runs is
    `slurm.array_task`, which links the task's pickle to the shared one on the node and then
    runs submitit's `process_job`. The shared pickle is written before sbatch, so a task never
    starts before it exists."""
    import shlex
    import uuid

    from submitit.core.utils import DelayedSubmission, JobPaths

    root = JobPaths.get_first_id_independent_folder(executor.folder)
    root.mkdir(parents=True, exist_ok=True)
    delayed = DelayedSubmission(task)
    delayed.set_timeout(executor.parameters.get("time", 5), executor.max_num_timeout)
    shared = root / f"array_{uuid.uuid4().hex}.pkl"
    delayed.dump(shared)
    command = " ".join(
        [
            executor.python,
            "-u -m slurm.array_task",
            *map(shlex.quote, (str(executor.folder), str(shared))),
        ]
    )
    executor.parameters["map_count"] = count  # submitit's array: --array=0-(count-1)%parallelism
    try:
        first = executor._submit_command(command)
    except BaseException:
        shared.unlink(missing_ok=True)
        raise
    finally:
        del executor.parameters["map_count"]
    return [f"{first.job_id}_{index}" for index in range(count)]


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None
