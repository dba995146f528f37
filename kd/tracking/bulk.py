"""Many runs at once, straight through MLflow's own SQL tables, on a database store (SQLite,
PostgreSQL, MySQL): creating a launch's row runs in one transaction, retagging them in another,
and reading a grid's runs with plain SELECTs.

MLflow's client does one request (and one ORM object per tag and param) per call: 50 s to
launch a 1000-row grid, 2.6 s to read it back. `BulkUnsupported` means nothing was written or
read this way (an MLflow whose tables differ, say) and the caller goes through MLflow's client.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kd.tracking import sqlite_read
from kd.tracking.metadata import row_tags
from kd.tracking.records import LeanData, LeanInfo, LeanRun
from kd.tracking.uri import sqlite_path

if TYPE_CHECKING:
    from kd.grid import Row


class BulkUnsupported(RuntimeError):
    """This MLflow's tables do not take the bulk insert; nothing was written."""


def _database_store(store: Any) -> None:
    """Raise BulkUnsupported unless `store` is MLflow's SQL store (a kdgrid server may run on
    any backend MLflow has)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    if not isinstance(store, SqlAlchemyStore):
        raise BulkUnsupported(f"{type(store).__name__} is not a database store")


def search_tagged_sql(
    store: Any, experiment_id: str, key: str, value: str | None, params: bool = False
) -> list:
    """`Tracker.search_tagged` in three or four SELECTs: the runs, their tags, latest metrics,
    and their params only when asked (a row has ~90: most of the rows read for a 10,000-row
    grid, and status, the table and the planner read none)."""
    _database_store(store)
    db = sqlite_path(getattr(store, "db_uri", "") or "")
    if db is not None and not params:  # Python's sqlite3: a third of SQLAlchemy's time
        found = sqlite_read.search_tagged_by_id(db, experiment_id, key, value)
        if found is not None:
            return found
    try:
        from mlflow.entities import LifecycleStage
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy import select
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    match = select(SqlTag.run_uuid).where(
        SqlTag.key == key, SqlTag.value == value if value is not None else SqlTag.value != ""
    )
    runs = (
        select(SqlRun.run_uuid)
        .where(
            SqlRun.experiment_id == int(experiment_id),
            SqlRun.lifecycle_stage == LifecycleStage.ACTIVE,
            SqlRun.run_uuid.in_(match),
        )
        .scalar_subquery()
    )
    try:
        with store.ManagedSessionMaker() as session:
            infos = session.execute(
                select(SqlRun.run_uuid, SqlRun.status, SqlRun.start_time, SqlRun.end_time)
                .where(SqlRun.run_uuid.in_(runs))
                .order_by(SqlRun.start_time.desc(), SqlRun.run_uuid)
            ).all()
            tags = session.execute(
                select(SqlTag.run_uuid, SqlTag.key, SqlTag.value).where(SqlTag.run_uuid.in_(runs))
            ).all()
            params = (
                session.execute(
                    select(SqlParam.run_uuid, SqlParam.key, SqlParam.value).where(
                        SqlParam.run_uuid.in_(runs)
                    )
                ).all()
                if params
                else []
            )
            metrics = session.execute(
                select(
                    SqlLatestMetric.run_uuid,
                    SqlLatestMetric.key,
                    SqlLatestMetric.value,
                    SqlLatestMetric.is_nan,
                ).where(SqlLatestMetric.run_uuid.in_(runs))
            ).all()
    except Exception as exc:  # e.g. MLflow's tables changed: MLflow's own search instead
        raise BulkUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    by_run: dict[str, LeanData] = {r.run_uuid: LeanData({}, {}, {}) for r in infos}
    for run_id, k, v in tags:
        if run_id in by_run:
            by_run[run_id].tags[k] = v
    for run_id, k, v in params:  # type: ignore[misc]
        if run_id in by_run:
            by_run[run_id].params[k] = v
    for run_id, k, v, is_nan in metrics:
        if run_id in by_run:
            by_run[run_id].metrics[k] = float("nan") if is_nan else v
    return [
        LeanRun(LeanInfo(r.run_uuid, r.status, r.start_time, r.end_time), by_run[r.run_uuid])
        for r in infos
    ]


def insert_row_runs(
    store: Any,
    experiment_id: str,
    rows: list[Row],
    executor: str,
    parent_run_id: str | None,
) -> dict[str, str]:
    """The rows' SCHEDULED runs with their tags, in one transaction: row id -> run id. (The
    params and row.yaml are the job's to write when it starts: `RowRun.log_row`.)"""
    runs = [(row.run_name, row_tags(row, executor, parent_run_id)) for row in rows]
    run_ids = insert_runs(store, experiment_id, runs)
    return {row.id: run_id for row, run_id in zip(rows, run_ids, strict=True)}


def insert_runs(
    store: Any, experiment_id: str, runs: list[tuple[str, Mapping[str, str]]]
) -> list[str]:
    """SCHEDULED runs (name, tags) in one transaction, through MLflow's own tables and
    validation (what `SqlAlchemyStore.create_run` writes); their ids, in order. Run by the
    launcher on a database store, and by a kdgrid tracking server (kd/tracking/server_app.py)
    for a launch that posts its runs."""
    try:
        from mlflow.entities import LifecycleStage, SourceType
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.uri import append_to_uri_path
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH, _validate_tag  # noqa: F401
        from sqlalchemy import insert
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    _database_store(store)
    experiment = store.get_experiment(experiment_id)
    if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
        raise ValueError(f"experiment {experiment_id} is {experiment.lifecycle_stage}")
    now = int(time.time() * 1000)
    validate_tag = _tag_validator(_validate_tag)
    records: list[tuple] = []  # RUN_COLUMNS
    tags: list[tuple] = []  # (key, value, run_uuid)
    source_type = SourceType.to_string(SourceType.UNKNOWN)
    # random ids as ever, given out in ascending order: each index then grows at its end
    # instead of at a random page (10,000 rows: ~3x less time in SQLite)
    run_ids = sorted(uuid.uuid4().hex for _ in runs)
    for (name, run_tags), run_id in zip(runs, run_ids, strict=True):
        run_tags = {**run_tags, MLFLOW_RUN_NAME: name}
        records.append(
            (
                run_id,
                name,
                append_to_uri_path(experiment.artifact_location, run_id, "artifacts"),
                int(experiment_id),
                source_type,
                "",
                "",
                run_tags.get(MLFLOW_USER, "unknown"),
                "SCHEDULED",
                now,
                None,
                None,
                "",
                LifecycleStage.ACTIVE,
            )
        )
        for key, value in run_tags.items():
            tag = validate_tag(key, value)
            tags.append((tag.key, tag.value, run_id))
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            for table, columns, rows in (
                (SqlRun, RUN_COLUMNS, records),
                (SqlTag, ("key", "value", "run_uuid"), tags),
            ):
                _insert_many(session, table.__table__, columns, rows, insert)
    except Exception as exc:  # e.g. MLflow's tables changed; the transaction was rolled back
        raise BulkUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return run_ids


def _tag_validator(validate: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    """MLflow's `_validate_tag` (the key's name and length checked; a value over MLflow's limit
    truncated), with each key checked once: 10,000 rows give ~190,000 tags under ~20 keys, and
    the key checks were ~1 s of a 10,000-row launch. A value is passed to MLflow's check only
    when it is too long, which truncates it as MLflow does."""
    from mlflow.entities import RunTag
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    checked = functools.lru_cache(maxsize=None)(lambda key: validate(key, "").key)

    def validate_tag(key: str, value: str) -> Any:
        if len(value) > MAX_TAG_VAL_LENGTH:
            return validate(key, value)
        return RunTag(checked(key), value)

    return validate_tag


# the columns of MLflow's `runs` table that `SqlAlchemyStore.create_run` sets, in this order
RUN_COLUMNS = (
    "run_uuid",
    "name",
    "artifact_uri",
    "experiment_id",
    "source_type",
    "source_name",
    "entry_point_name",
    "user_id",
    "status",
    "start_time",
    "end_time",
    "deleted_time",
    "source_version",
    "lifecycle_stage",
)
SQLITE_CACHE_KIB = 262144  # SQLite's page cache while inserting (a maximum, used as needed)


def _insert_many(
    session: Any, table: Any, columns: tuple[str, ...], records: list[tuple], insert: Any
) -> None:
    """INSERT every record (values of `columns`, each a column of `table`) in the session's
    transaction. On SQLite straight through the driver's executemany: SQLAlchemy's per-row
    parameter processing was ~5 s of a 10,000-row launch (a million tags and params), and a
    large page cache keeps the indexes in memory meanwhile. Core's insert elsewhere."""
    if not records:
        return
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        session.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in records])
        return
    unknown = [c for c in columns if c not in table.c]
    if unknown:
        raise ValueError(f"table {table.name} has no column(s) {unknown}")
    quote = connection.dialect.identifier_preparer.quote
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    cursor = connection.connection.cursor()  # the same connection: the same transaction
    try:
        (cache,) = cursor.execute("PRAGMA cache_size").fetchone()
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        try:
            cursor.executemany(sql, records)
        finally:
            cursor.execute(f"PRAGMA cache_size = {int(cache)}")
    finally:
        cursor.close()


def replace_tags(store: Any, tags_by_run: Mapping[str, Mapping[str, str]]) -> None:
    """Set the tags of many runs in one transaction (a tag already there is replaced)."""
    _database_store(store)
    try:
        from mlflow.store.tracking.dbmodels.models import SqlTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH, _validate_tag  # noqa: F401
        from sqlalchemy import delete, insert
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    validate_tag = _tag_validator(_validate_tag)
    new = [
        {"key": tag.key, "value": tag.value, "run_uuid": run_id}
        for run_id, tags in tags_by_run.items()
        for tag in (validate_tag(k, v) for k, v in tags.items())
    ]
    keys = {t["key"] for t in new}
    with store.ManagedSessionMaker(read_only=False) as session:
        ids = list(tags_by_run)
        for start in range(0, len(ids), 500):  # bound the IN (...) lists
            session.execute(
                delete(SqlTag).where(
                    SqlTag.run_uuid.in_(ids[start : start + 500]),
                    SqlTag.key.in_(keys),
                )
            )
        session.execute(insert(SqlTag.__table__), new)


def end_runs(store: Any, run_ids: list[str], status: str) -> None:
    """End many runs in one transaction, as `set_terminated` does: the status and end time."""
    try:
        from mlflow.store.tracking.dbmodels.models import SqlRun
        from sqlalchemy import update
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    now = int(time.time() * 1000)
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            for start in range(0, len(run_ids), 500):  # bound the IN (...) lists
                session.execute(
                    update(SqlRun)
                    .where(SqlRun.run_uuid.in_(run_ids[start : start + 500]))
                    .values(status=status, end_time=now)
                    .execution_options(synchronize_session=False)
                )
    except Exception as exc:  # the transaction was rolled back
        raise BulkUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None


def cancel_runs(store: Any, run_ids: list[str], tags: Mapping[str, str]) -> set[str]:
    """What `--cancel` does to many runs, in one transaction: each run that has not finished
    gets `tags` (the cancel tag and the reason) and is closed KILLED with an end time; a run
    that finished meanwhile is left as it is. The ids of the runs closed."""
    try:
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from sqlalchemy import delete, insert, select, update
    except ImportError as exc:
        raise BulkUnsupported(exc) from None
    _database_store(store)
    now = int(time.time() * 1000)
    closed: set[str] = set()
    with store.ManagedSessionMaker(read_only=False) as session:
        for start in range(0, len(run_ids), 500):  # bound the IN (...) lists
            chunk = run_ids[start : start + 500]
            open_ids = list(
                session.execute(
                    select(SqlRun.run_uuid).where(
                        SqlRun.run_uuid.in_(chunk), SqlRun.status != "FINISHED"
                    )
                ).scalars()
            )
            if not open_ids:
                continue
            session.execute(
                delete(SqlTag).where(SqlTag.run_uuid.in_(open_ids), SqlTag.key.in_(list(tags)))
            )
            session.execute(
                insert(SqlTag.__table__),
                [{"key": k, "value": v, "run_uuid": r} for r in open_ids for k, v in tags.items()],
            )
            session.execute(
                update(SqlRun)
                .where(SqlRun.run_uuid.in_(open_ids))
                .values(status="KILLED", end_time=now)
            )
            closed.update(open_ids)
    return closed
