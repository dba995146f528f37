"""A grid's runs read straight from a SQLite store's file with Python's own sqlite3, without
importing MLflow (its import takes 2-7 s, most of `launch/status.py`'s time): the same SELECTs
as `bulk.search_tagged_sql` on MLflow's tables `experiments`, `runs`, `tags`, `latest_metrics`,
which have had these columns since MLflow 1.x. Returns None whenever the file does not read as
expected: the caller then asks MLflow, as before."""

from __future__ import annotations

import contextlib
import math
import sqlite3
from pathlib import Path

from kd.tracking.records import LeanData, LeanInfo, LeanRun

RUNS = """
SELECT r.run_uuid, r.status, r.start_time, r.end_time FROM runs r
WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'
  AND r.run_uuid IN (SELECT t.run_uuid FROM tags t WHERE t.key = ? AND {match})
ORDER BY r.start_time DESC, r.run_uuid
"""


# the newest run of each content key among RUNS (newest first; ties: the smaller run id, as
# `records.latest_by_key` picks from RUNS' order)
LATEST = """
SELECT run_uuid, status, start_time, end_time FROM (
  SELECT r.run_uuid, r.status, r.start_time, r.end_time, ROW_NUMBER() OVER (
    PARTITION BY k.value ORDER BY r.start_time DESC, r.run_uuid) AS newest
  FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ?
  WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'
    AND r.run_uuid IN (SELECT t.run_uuid FROM tags t WHERE t.key = ? AND {match})
) WHERE newest = 1
ORDER BY start_time DESC, run_uuid
"""


def search_tagged(
    db: Path, experiment: str, key: str, value: str | None, latest_by: str | None = None
) -> list[LeanRun] | None:
    """The active runs of the experiment named `experiment` whose tag `key` is `value` (None:
    set and not empty), newest first, with tags and latest metrics (no params); [] when the
    experiment does not exist; None when the file cannot be read this way. With `latest_by`
    (a tag name), only the newest run of each value of that tag: status reads a grid's latest
    runs, not every run of every relaunch."""
    try:
        with contextlib.closing(_connect(db)) as conn:
            found = conn.execute(
                "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
            return [] if found is None else _runs(conn, found[0], key, value, latest_by)
    except sqlite3.Error:
        return None


def search_tagged_by_id(
    db: Path, experiment_id: str | int, key: str, value: str | None
) -> list[LeanRun] | None:
    """`search_tagged` of the experiment with this id (what `bulk.search_tagged_sql` reads
    through SQLAlchemy in ~3x the time: 1.1 s against 0.4 s for 10,000 runs)."""
    try:
        with contextlib.closing(_connect(db)) as conn:
            return _runs(conn, int(experiment_id), key, value)
    except (sqlite3.Error, ValueError):
        return None


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def _runs(
    conn: sqlite3.Connection,
    experiment_id: int,
    key: str,
    value: str | None,
    latest_by: str | None = None,
) -> list[LeanRun]:
    match = "t.value = ?" if value is not None else "t.value != ''"
    args: tuple = (experiment_id, key, *([value] if value is not None else []))
    query = RUNS.format(match=match)
    if latest_by is not None:
        query, args = LATEST.format(match=match), (latest_by, *args)
    # the runs found once, in a temporary table the tag and metric reads join
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (run_uuid TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM wanted")
    infos = conn.execute(query, args).fetchall()
    conn.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(r[0],) for r in infos])
    tags = conn.execute(
        "SELECT run_uuid, key, value FROM tags WHERE run_uuid IN (SELECT run_uuid FROM wanted)"
    ).fetchall()
    metrics = conn.execute(
        "SELECT run_uuid, key, value, is_nan FROM latest_metrics "
        "WHERE run_uuid IN (SELECT run_uuid FROM wanted)"
    ).fetchall()
    by_run = {run_id: LeanData({}, {}, {}) for run_id, *_ in infos}
    for run_id, k, v in tags:
        if run_id in by_run:
            by_run[run_id].tags[k] = v
    for run_id, k, v, is_nan in metrics:
        if run_id in by_run:
            by_run[run_id].metrics[k] = math.nan if is_nan else v
    return [LeanRun(LeanInfo(r, status, start, end), by_run[r]) for r, status, start, end in infos]
