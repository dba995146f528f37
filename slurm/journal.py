"""The grid's launch journal (`<output_dir>/submissions.jsonl`): one line per row a launch ran,
queued or held, written (and fsynced) as soon as it is known; slurm/interrupted.py recovers a
killed launch from it. And the bookkeeping after each sbatch call: journal first, then tags."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kd.grid import Grid, Row
from kd.inject import RECORD_PAUSE, pause
from kd.rowfiles import SUBMISSIONS
from kd.tracking import TAG, Tracker


def record_launch(
    grid: Grid,
    rows,
    run_ids: Mapping[str, str],
    executor: str,
    job_ids: Mapping[str, str] | None = None,
    held: bool = False,
    job_tags: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Append this launch (row id, key, run id, job id, and the tags that say where each job
    went: `slurm.state.submission_tags`) to the grid's submission record."""
    root = Path(rows[0].config.output_dir) if rows else Path("outputs")
    root.mkdir(parents=True, exist_ok=True)
    path = root / SUBMISSIONS
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a") as handle:
        for row in rows:
            entry = {
                "time": stamp,
                "grid": grid.name,
                "id": row.id,
                "label": row.label,
                "key": row.key,
                "run_id": run_ids[row.id],
                "executor": executor,
                "job_id": (job_ids or {}).get(row.id),
                **({"job_tags": dict(job_tags[row.id])} if job_tags and row.id in job_tags else {}),
                "launcher_pid": os.getpid(),
            }
            if held:
                entry["held"] = True
            handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # the journal a killed launch is recovered from
    return path


def queued_recorder(
    grid: Grid, rows: list[Row], run_ids: Mapping[str, str], tracker: Tracker, was_held: bool
) -> Callable[[dict[str, str]], None]:
    """What `submit_rows` calls after each sbatch call: the journal, then the runs' job id tags
    (and where the job went: slurm.state.job_states reads them); `was_held`: the rows were
    held, and their held tag now says they were submitted."""
    from slurm.held import HELD_TAG, SUBMITTED
    from slurm.state import submission_tags

    by_id = {row.id: row for row in rows}

    def record_queued(queued: dict[str, str]) -> None:
        # where each job went, in the journal first: a launch killed before tagging the runs
        # is recovered from it (slurm/interrupted.py), GONE detection included
        where = {
            r: submission_tags(by_id[r].grid, by_id[r].config.resources.sbatch_extra)
            for r in queued
        }
        record_launch(grid, [by_id[r] for r in queued], run_ids, "slurm", queued, job_tags=where)
        pause(RECORD_PAUSE)  # fault injection (tests): the launcher killed here
        tracker.set_tags_many(
            {
                run_ids[r]: {f"{TAG}.job_id": job, **where[r]}
                | ({HELD_TAG: SUBMITTED} if was_held else {})
                for r, job in queued.items()
            }
        )

    return record_queued
