"""What `launch/grid.py --cancel` reads and writes in the tracking store (`CancelRuns`).

On a SQLite store's file it uses Python's own sqlite3, without importing MLflow (the import is
most of the command's time): the runs read as `sqlite_read` reads them for status, and a run
closed as `Tracker.cancel_run` closes it (the cancel tag and the reason, KILLED, an end time), all
in one transaction, which leaves a run that finished meanwhile as it is. Whenever the file does not
read or write as expected, and on a tracking server, the same goes through MLflow.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kd.tracking import server_bulk, sqlite_read
from kd.tracking.records import TAG, RunRecord, cancel_tags, latest_by_key
from kd.tracking.uri import is_server_uri, sqlite_path

if TYPE_CHECKING:
    from kd.tracking.tracker import Tracker

BUSY_TIMEOUT_S = 30.0  # a job writing its metrics holds the file's lock for milliseconds


class SqliteRuns:
    """The runs of one experiment in a SQLite file, without MLflow; None: could not."""

    def __init__(self, db: Path, experiment: str) -> None:
        self.db = db
        self.experiment = experiment

    def latest_by_key(self) -> dict[str, RunRecord] | None:
        """Content key -> the newest row run of the experiment (as `Tracker.latest_by_key`)."""
        runs = sqlite_read.search_tagged(self.db, self.experiment, f"{TAG}.key", None)
        if runs is None:
            return None
        return latest_by_key(runs)

    def cancel_runs(self, run_ids: list[str], reason: str) -> set[str] | None:
        """Close the runs KILLED with the cancel tag, in one transaction (one commit for a
        10,000-row grid, not one each: 22 s), except those that finished meanwhile; the ids
        of the runs closed."""
        now = int(time.time() * 1000)
        tags = cancel_tags(reason, now)
        try:
            with contextlib.closing(sqlite3.connect(self.db, timeout=BUSY_TIMEOUT_S)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                ended = {
                    run_id
                    for run_id in run_ids
                    if conn.execute(
                        "UPDATE runs SET status = 'KILLED', end_time = ? "
                        "WHERE run_uuid = ? AND status != 'FINISHED'",
                        (now, run_id),
                    ).rowcount
                }
                conn.executemany(
                    "INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(key, value, run_id) for run_id in ended for key, value in tags.items()],
                )
                conn.commit()
        except sqlite3.Error:
            return None
        return ended


class CancelRuns:
    """The runs of one experiment as `--cancel` needs them: SQLite without MLflow where it
    can, MLflow otherwise."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.uri = tracking_uri
        self.experiment = experiment
        db = sqlite_path(tracking_uri)
        self.light = SqliteRuns(db, experiment) if db is not None else None
        self._tracker: Tracker | None = None

    def _mlflow(self) -> Tracker:
        from kd.tracking.tracker import Tracker

        if self._tracker is None:
            self._tracker = Tracker(self.uri)
        return self._tracker

    def latest_by_key(self) -> dict[str, RunRecord]:
        """Content key -> the newest row run of the experiment ({} when there is none)."""
        found = self.light.latest_by_key() if self.light is not None else None
        if found is not None:
            return found
        tracker = self._mlflow()
        experiment_id = tracker.experiment_id(self.experiment)
        return {} if experiment_id is None else tracker.latest_by_key(experiment_id)

    def cancel_runs(self, run_ids: list[str], reason: str) -> set[str]:
        """Close the runs as `--cancel` does; the ids of those closed (a run that had finished
        is left so)."""
        done = self.light.cancel_runs(run_ids, reason) if self.light is not None else None
        if done is not None:
            return done
        tracker = self._mlflow()
        if is_server_uri(self.uri):  # a kdgrid server closes them in one request
            tags = cancel_tags(reason, int(time.time() * 1000))
            done = server_bulk.cancel_runs(tracker.client, run_ids, tags)
            if done is not None:
                return done
        closed = set()
        for run_id in run_ids:
            if tracker.run_status(run_id) != "FINISHED":
                tracker.cancel_run(run_id, reason)
                closed.add(run_id)
        return closed
