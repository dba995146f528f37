"""Recovery from a SLURM launch that died while submitting (SIGKILL, a lost login node, a crash).

A launch creates every row's run (SCHEDULED), then queues the rows group by group; after each
sbatch call it appends the job ids to `<output_dir>/submissions.jsonl` and tags the runs. A
launcher that dies half-way leaves runs with no job id: some of their rows were queued (the
group in flight), the rest never were. Left alone, those runs would read as "scheduled" forever
and the next launch would skip their rows.

The next launch of the grid, under the grid's lock (so no other launch is submitting), calls
`recover`: a run whose job id is in the journal gets it, with the tags that say where the job
went (job name, cluster, user: as a run submitted without a fault, so that a job SLURM no
longer holds is found GONE for it too); a stray job (logging under the
grid's `slurm/` folder but recorded nowhere) is cancelled; the remaining runs are closed as
KILLED, so their rows run again. Nothing then runs twice and no row is left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from kd.grid import Grid
from kd.processes import still_running
from kd.rowfiles import SLURM_DIR, SUBMISSIONS
from kd.tracking import TAG, RunRecord, Tracker
from slurm.held import CLUSTER_LIMIT, HELD_TAG

NEVER_QUEUED = "its launch was interrupted before the row was queued; launch the grid again"


def never_queued(record: RunRecord) -> bool:
    """A SLURM run the launcher created but never tagged with a job id (held rows are not:
    they wait for room on the cluster on purpose, see slurm/held.py)."""
    return (
        record.status == "SCHEDULED"
        and record.tags.get(f"{TAG}.executor") == "slurm"
        and not record.job_id
        and record.tags.get(HELD_TAG) != CLUSTER_LIMIT
    )


def _launcher_here(record: RunRecord) -> bool | None:
    """Is the launcher that created this run alive? None when it ran on another machine."""
    import socket

    if record.tags.get(f"{TAG}.launch_host") != socket.gethostname():
        return None
    pid = record.tags.get(f"{TAG}.launcher_pid", "")
    return pid.isdigit() and still_running(int(pid), record.tags.get(f"{TAG}.launcher_started"))


def launcher_gone(record: RunRecord) -> bool:
    """The launcher that created this run ran on this machine and has exited."""
    return _launcher_here(record) is False


def read_journal(roots: Iterable[Path]) -> dict[str, dict[str, str]]:
    """run id -> the tags its launcher gave (or would have given) the run with its job: the
    job id and where the job went (`slurm.state.submission_tags`, which GONE detection reads),
    from every launch recorded in the grid's submission files. A line of an older kdgrid has
    no such tags: the job name is then the one its grid's jobs were submitted under."""
    from slurm.state import job_name

    jobs: dict[str, dict[str, str]] = {}
    for root in roots:
        try:
            lines = (root / SUBMISSIONS).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by the crash itself
                continue
            if not (isinstance(entry, dict) and entry.get("run_id") and entry.get("job_id")):
                continue
            where = entry.get("job_tags")
            if not isinstance(where, dict):
                grid = entry.get("grid")
                where = {f"{TAG}.slurm_job_name": job_name(grid)} if grid else {}
            jobs[entry["run_id"]] = {
                **{str(k): str(v) for k, v in where.items()},
                f"{TAG}.job_id": str(entry["job_id"]),
            }
    return jobs


def journal_job_ids(journal: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """run id -> job id, from `read_journal`'s tags."""
    return {run_id: tags[f"{TAG}.job_id"] for run_id, tags in journal.items()}


def stray_jobs(
    roots: Iterable[Path],
    known: Iterable[str],
    journal: Mapping[str, Mapping[str, str]] | None = None,
) -> set[str]:
    """Live jobs logging under the grid's `slurm/` folders that neither the journal (read
    from `roots` unless given) nor `known` (job ids, array tasks or whole arrays) accounts
    for: queued by a launch that never recorded them."""
    from slurm.state import queued_jobs_logging_under

    roots = list(roots)
    journal = read_journal(roots) if journal is None else journal
    recorded = {job.split("_")[0] for job in [*journal_job_ids(journal).values(), *known]}
    live = set().union(*(queued_jobs_logging_under(root / SLURM_DIR) for root in roots))
    return live - recorded


def recover(grid: Grid, latest: Mapping[str, RunRecord], tracker: Tracker) -> dict[str, RunRecord]:
    """`latest` with every interrupted submission settled (see the module docstring)."""
    from slurm.state import cancel

    # this grid's runs only (an experiment may hold other grids), and not those of a launcher
    # still running here (a launch of this grid into another output folder: another lock)
    keys = {row.key for row in grid.rows}
    unqueued = {
        key: r
        for key, r in latest.items()
        if key in keys and never_queued(r) and _launcher_here(r) is not True
    }
    if not unqueued:
        return dict(latest)
    roots = {Path(row.config.output_dir) for row in grid.rows}
    journal = read_journal(roots)
    settled = dict(latest)
    found = {key: r for key, r in unqueued.items() if r.run_id in journal}
    if found:  # the tags a run submitted without a fault has: its job id, and where it went
        tracker.set_tags_many({r.run_id: dict(journal[r.run_id]) for r in found.values()})
        for key, r in found.items():
            settled[key] = replace(r, tags={**r.tags, **journal[r.run_id]})
    known = {r.job_id for r in settled.values() if r.job_id}
    stray = stray_jobs(roots, known, journal)
    cancel(stray)
    lost = [r for key, r in unqueued.items() if key not in found]
    for r in lost:
        tracker.mark(r.run_id, "KILLED", NEVER_QUEUED)
        settled[r.key] = replace(
            r, status="KILLED", tags={**r.tags, f"{TAG}.failure_reason": NEVER_QUEUED}
        )
    print(
        f"an earlier launch of grid '{grid.name}' was interrupted while submitting: "
        f"{len(found)} of its rows were queued (job ids taken from {SUBMISSIONS}), "
        f"{len(lost)} never were"
        + (f"; cancelled {len(stray)} stray job(s): {', '.join(sorted(stray))}" if stray else "")
    )
    return settled
