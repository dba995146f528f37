"""Holding rows the cluster does not accept now, and submitting them later (slurm/held.py says
how it works for a user); and undoing a submission cut short."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path

from kd.grid import Grid, Row
from kd.rowfiles import SLURM_DIR
from kd.tracking import ACTIVE, TAG, RunRecord, Tracker, store_exists
from slurm.held import CLUSTER_LIMIT, HELD_TAG, SUBMITTED, FeedFailed, is_held
from slurm.interrupted import read_journal, stray_jobs
from slurm.journal import queued_recorder, record_launch
from slurm.limits import controller_unavailable, read_limits
from slurm.state import cancel
from slurm.submit import dependency_waves, submit_rows


def hold_rows(grid: Grid, rows: list[Row], run_ids: Mapping[str, str], tracker: Tracker) -> None:
    """Mark rows held: their runs' tag, then their journal lines."""
    tracker.set_tags_many({run_ids[row.id]: {HELD_TAG: CLUSTER_LIMIT} for row in rows})
    record_launch(grid, rows, run_ids, "slurm", held=True)


def undo_submission(
    grid: Grid,
    rows: list[Row],
    run_ids: Mapping[str, str],
    tracker: Tracker,
    submitted: Mapping[str, str],
    exc: BaseException,
    active_deps: Mapping[str, str],
) -> int:
    """A submission failed or was interrupted: cancel what it queued (and a job whose sbatch
    returned just as the interrupt came, not yet recorded), close the rows' runs. Returns the
    exit status."""
    cancel(submitted.values())
    roots = [Path(row.config.output_dir) for row in rows]
    known = [*submitted.values(), *active_deps.values()]
    with contextlib.suppress(Exception):  # the next launch looks for strays again
        cancel(stray_jobs(roots, known))
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    tracker.mark_many(
        [run_ids[row.id] for row in rows],
        "KILLED",
        f"submission {what}: {exc or type(exc).__name__}",
    )
    print(
        f"launch/grid.py: submission {what}, nothing left queued "
        f"({len(submitted)} job(s) cancelled): {exc or type(exc).__name__}",
        file=sys.stderr,
    )
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def _latest_runs(grid: Grid, tracker: Tracker) -> dict[str, RunRecord]:
    """Row key -> latest run of every row of the grid (empty when nothing was launched)."""
    experiment_id = tracker.experiment_id(grid.experiment)
    return tracker.latest_by_key(experiment_id) if experiment_id else {}


def _settle_recorded(
    grid: Grid, held: dict[str, RunRecord], latest: dict[str, RunRecord], tracker: Tracker
) -> dict[str, str]:
    """Held runs whose job an earlier feed queued and journaled but did not tag (it was
    killed in between) get their job id; stray jobs (queued, never journaled) are cancelled.
    Returns row id -> job id of the runs settled."""
    roots = {Path(row.config.output_dir) for row in grid.rows}
    journal = read_journal(roots)
    found = {rid: journal[r.run_id] for rid, r in held.items() if r.run_id in journal}
    if found:
        tracker.set_tags_many(
            {
                held[rid].run_id: {f"{TAG}.job_id": job, HELD_TAG: SUBMITTED}
                for rid, job in found.items()
            }
        )
    known = {r.job_id for r in latest.values() if r.job_id} | set(found.values())
    with contextlib.suppress(Exception):
        cancel(stray_jobs(roots, known, journal))
    return found


def _dependencies(
    grid: Grid, rows: list[Row], latest: Mapping[str, RunRecord], queued: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(dependency row id -> job id to wait on, blocked row id -> why) for held `rows`: a
    dependency held too is submitted first in the same feed; one that finished needs no wait;
    one that failed, was cancelled or never ran blocks the row (and rows that wait on it)."""
    by_id = {row.id: row for row in grid.rows}
    ids = {row.id for row in rows}
    existing: dict[str, str] = dict(queued)
    blocked: dict[str, str] = {}
    for wave in dependency_waves(rows):
        for row in wave:
            for dep in row.depends_on:
                if dep in blocked:
                    blocked[row.id] = f"dependency '{dep}' was not started; not started"
                    break
                if dep in ids or dep in existing:
                    continue
                record = latest.get(by_id[dep].key)
                if record is not None and record.status == "FINISHED":
                    continue
                if record is not None and record.status in ACTIVE and record.job_id:
                    existing[dep] = record.job_id
                    continue
                state = "never ran" if record is None else record.status.lower()
                blocked[row.id] = f"dependency '{dep}' {state}; not started"
                break
    return existing, blocked


def feed_held(grid: Grid, tracking_uri: str, array_parallelism: int = 256) -> int:
    """Submit the grid's held rows that the cluster accepts now (call under the grid's launch
    lock). Returns how many rows are still held; raises FeedFailed when sbatch refuses them for
    a reason other than a limit or an unreachable controller (the rows stay held)."""
    if not store_exists(tracking_uri):
        return 0
    tracker = Tracker(tracking_uri)
    latest = _latest_runs(grid, tracker)
    held = {
        row.id: latest[row.key]
        for row in grid.rows
        if row.key in latest and is_held(latest[row.key])
    }
    if not held:
        return 0
    found = _settle_recorded(grid, held, latest, tracker)
    rows = [row for row in grid.rows if row.id in held and row.id not in found]
    existing, blocked = _dependencies(grid, rows, latest, found)
    for row_id, why in blocked.items():
        tracker.mark(held[row_id].run_id, "KILLED", why)
    rows = [row for row in rows if row.id not in blocked]
    if not rows:
        return 0
    run_ids = {row.id: held[row.id].run_id for row in rows}
    folder = Path(rows[0].config.output_dir).resolve() / SLURM_DIR
    submitted: dict[str, str] = {}
    still: set[str] = set()
    try:
        submit_rows(
            rows,
            run_ids,
            tracking_uri,
            folder=folder,
            existing_jobs=existing,
            array_parallelism=array_parallelism,
            submitted=submitted,
            on_queued=queued_recorder(grid, rows, run_ids, tracker, was_held=True),
            limits=read_limits(row.config.resources.qos for row in rows),
            held=still,
        )
    except Exception as exc:  # what this feed queued is cancelled; the rest stays held
        done = [row for row in rows if row.id in submitted]
        undo_submission(grid, done, run_ids, tracker, submitted, exc, existing)
        if not controller_unavailable(exc):
            raise FeedFailed(
                f"sbatch refused held rows of grid '{grid.name}': {exc}; they stay held. "
                "Fix what it names, then launch the grid again: the launch submits them"
            ) from exc
        return sum(row.id not in submitted for row in rows)
    if submitted:
        print(
            f"submitted {len(submitted)} held row(s) of grid '{grid.name}'; {len(still)} still held"
        )
    return len(still)
