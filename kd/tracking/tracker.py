"""The launcher's side of a tracking store (`Tracker`): the grid's experiment, one run per row
created before the row starts, a launch's parent run, and the runs found again by their tags.

The launcher creates one run per row *before* the row starts (status SCHEDULED), so the run id
is known at submission, a requeued job lands back in the same run, and a second launch can see
what is scheduled, running, finished or failed. Rows are found again by their content key tag.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd.tracking import bulk, server_bulk
from kd.tracking.metadata import (
    code_tags,
    launcher_identity,
    row_tags,
)
from kd.tracking.records import (
    CANCELLED,
    JOB_TAGS,
    REASON_MAX_CHARS,
    TAG,
    RunRecord,
    cancel_tags,
    latest_by_key,
    run_record,
)
from kd.tracking.uri import is_server_uri, sqlite_path

if TYPE_CHECKING:
    from kd.grid import Row

BULK_THREADS = 8  # parallel requests to a tracking server when creating many runs


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file left beside the database)."""
    import fcntl

    fd = os.open(folder if folder.is_dir() else Path("."), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class Tracker:
    """Launcher-side view of a tracking store."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        db = sqlite_path(tracking_uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            return
        # MLflow creates (or migrates) a database's tables when a process first opens it, and
        # two processes doing so at once (a first launch, and a status read as the file
        # appears) fail ("table ... already exists"): one at a time, under a lock on its folder.
        with _folder_locked(db.parent):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.client._tracking_client.store  # noqa: B018 (opens it: its tables are made here)

    def ensure_experiment(self, name: str) -> str:
        """Create the experiment once, here, before any job can race to create it."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=self._artifact_location(name)
            )
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _artifact_location(self, name: str) -> str | None:
        """For a SQLite store, artifacts beside the database file (not in whatever folder the
        launcher happened to run in); a server decides for itself."""
        db = sqlite_path(self.uri)
        if db is not None:
            db = db.resolve()
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            return (db.parent / "mlartifacts" / safe).as_uri()
        return None

    def experiment_id(self, name: str) -> str | None:
        found = self.client.get_experiment_by_name(name)
        return None if found is None else found.experiment_id

    def search(self, experiment_id: str, filter_string: str) -> Iterator[Any]:
        """Every matching run, newest first, page by page (no per-row requests)."""
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                order_by=["attributes.start_time DESC"],
                max_results=1000,
                page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                return

    def search_tagged(
        self, experiment_id: str, key: str, value: str | None = None, params: bool = False
    ) -> list[Any]:
        """The active runs of the experiment whose tag `key` is `value` (None: set, not empty),
        newest first, with their tags, params and latest metrics: what `search` returns for
        that tag filter. On a database store they are read with plain SELECTs: MLflow's search
        builds an ORM object per param and tag, 2.6 s for a 1000-row grid (0.3 s this way).
        Params are read only with `params` (MLflow's own search returns them anyway)."""
        store = self._sql_store()
        if store is not None:
            try:
                return bulk.search_tagged_sql(store, experiment_id, key, value, params)
            except bulk.BulkUnsupported:
                pass
        elif is_server_uri(self.uri):  # a kdgrid server answers in one request
            runs = server_bulk.search_tagged(self.client, experiment_id, key, value, params)
            if runs is not None:
                return runs
        where = f"tags.`{key}` = '{value}'" if value is not None else f"tags.`{key}` != ''"
        return list(self.search(experiment_id, where))

    def row_runs(self, experiment_id: str) -> list[RunRecord]:
        """Every row run of the experiment, newest first."""
        return [run_record(run) for run in self.search_tagged(experiment_id, f"{TAG}.key")]

    def latest_by_key(self, experiment_id: str) -> dict[str, RunRecord]:
        """Content key -> the newest row run of that key."""
        return latest_by_key(self.search_tagged(experiment_id, f"{TAG}.key"))

    def create_row_run(
        self, experiment_id: str, row: Row, *, executor: str, parent_run_id: str | None = None
    ) -> str:
        """A SCHEDULED run with the row's tags, before it starts: two requests to a tracking
        server (the run with its tags, then the status; MLflow's `update_run` would fetch the
        whole run first). The job logs the row's params and row.yaml when it starts
        (`RowRun.log_row`): a 10,000-row launch does not write a million params."""
        tags = row_tags(row, executor, parent_run_id)
        run = self.client.create_run(experiment_id, run_name=row.run_name, tags=tags)
        self._set_status(run.info.run_id, "SCHEDULED", run.info.end_time)
        return run.info.run_id

    def _set_status(self, run_id: str, status: str, end_time: int | None) -> None:
        """`client.update_run(run_id, status=...)` for a run whose end time is known: MLflow's
        client first fetches the whole run (a `get_run` request) only to read it."""
        from mlflow.entities import RunStatus

        self.client._tracking_client.store.update_run_info(
            run_id, run_status=RunStatus.from_string(status), end_time=end_time, run_name=None
        )

    def create_row_runs(
        self,
        experiment_id: str,
        rows: Iterable[Row],
        *,
        executor: str,
        parent_run_id: str | None = None,
    ) -> dict[str, str]:
        """`create_row_run` for many rows at once: row id -> run id, the same runs and tags.

        One by one, a run costs three store calls (create, status, and the job id tag later),
        about 50 ms each against SQLite. On a database store (SQLite, PostgreSQL, MySQL) every
        run and tag is inserted in one transaction instead; a kdgrid tracking server
        (`launch/server.py start`) does the same for one request; any other server gets the
        per-row calls from a thread pool.
        """
        rows = list(rows)
        store = self._sql_store()
        if store is not None and len(rows) > 1:
            try:
                return bulk.insert_row_runs(store, experiment_id, rows, executor, parent_run_id)
            except bulk.BulkUnsupported as exc:  # nothing was written: one by one, as before
                print(f"kd.tracking: bulk run creation unavailable ({exc}); one run at a time")
        if is_server_uri(self.uri) and len(rows) > 1:
            runs = [(row.run_name, row_tags(row, executor, parent_run_id)) for row in rows]
            run_ids = server_bulk.post_runs(self.client, experiment_id, runs)
            if run_ids is not None:
                return {row.id: run_id for row, run_id in zip(rows, run_ids, strict=True)}
        workers = 1 if store is not None else min(BULK_THREADS, max(len(rows), 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {
                row.id: pool.submit(
                    self.create_row_run,
                    experiment_id,
                    row,
                    executor=executor,
                    parent_run_id=parent_run_id,
                )
                for row in rows
            }
            return {row_id: future.result() for row_id, future in futures.items()}

    def _sql_store(self) -> Any:
        """MLflow's database store behind the client, or None (a tracking server, a file store)."""
        if is_server_uri(self.uri):
            return None  # a tracking server (and no 0.7 s import of MLflow's SQL store)
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = self.client._tracking_client.store
        except Exception:
            return None
        return store if isinstance(store, SqlAlchemyStore) else None

    def set_tags_many(self, tags_by_run: Mapping[str, Mapping[str, str]]) -> None:
        """`set_tags` for many runs: one transaction on a database store or a kdgrid tracking
        server, else in parallel."""
        bulk_route = is_server_uri(self.uri) and len(tags_by_run) > 1
        if bulk_route and server_bulk.post_tags(self.client, tags_by_run):
            return
        self._for_many(
            tags_by_run,
            lambda store: bulk.replace_tags(store, tags_by_run),
            lambda run_id: self.set_tags(run_id, tags_by_run[run_id]),
        )

    def _for_many(
        self,
        run_ids: Iterable[str],
        in_one_transaction: Callable[[Any], None],
        for_one_run: Callable[[str], None],
    ) -> None:
        """One bulk SQL transaction on a database store (`kd.tracking.bulk`), else (a server,
        or a store the bulk path does not support) one call per run, in parallel on a server."""
        run_ids = list(run_ids)
        store = self._sql_store()
        if store is not None and len(run_ids) > 1:
            try:
                in_one_transaction(store)
            except bulk.BulkUnsupported:
                pass
            else:
                return
        workers = 1 if store is not None else BULK_THREADS
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(for_one_run, r) for r in run_ids]:
                future.result()

    def create_launch_run(
        self, experiment_id: str, grid_name: str, grid_file: str, executor: str, rows: int
    ) -> str:
        """The parent of one launch's row runs, so the MLflow UI groups a launch's rows."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        tags = {
            f"{TAG}.launch_of": grid_name,
            f"{TAG}.grid_file": grid_file,
            f"{TAG}.executor": executor,
            **code_tags(),
            f"{TAG}.launch_host": socket.gethostname(),
        }
        run = self.client.create_run(
            experiment_id, run_name=f"launch {grid_name} {stamp}", tags=tags
        )
        self.client.log_param(run.info.run_id, "rows", rows)
        return run.info.run_id

    def reopen_row_run(
        self, run_id: str, *, executor: str, parent_run_id: str | None = None
    ) -> None:
        """Schedule a failed row run again, to resume from its saved state (same run, same
        metric history); its failure reason is kept as `kdgrid.previous_failure`."""
        run = self.client.get_run(run_id)
        tags = {
            f"{TAG}.executor": executor,
            f"{TAG}.launcher_pid": str(os.getpid()),
            **launcher_identity(),
            f"{TAG}.launch_host": socket.gethostname(),
            f"{TAG}.resumed": str(int(run.data.tags.get(f"{TAG}.resumed", "0")) + 1),
        }
        reason = run.data.tags.get(f"{TAG}.failure_reason")
        if reason:
            tags[f"{TAG}.previous_failure"] = reason
            self.client.delete_tag(run_id, f"{TAG}.failure_reason")
        for stale in (f"{TAG}.{name}" for name in JOB_TAGS):
            if stale in run.data.tags:
                self.client.delete_tag(run_id, stale)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.set_tags(run_id, tags)
        self._set_status(run_id, "SCHEDULED", run.info.end_time)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """The tags in one request: `log_batch` for several (not one `set_tag` per key), and
        `set_tag` for one (the server handles it in less time than a one-tag `log_batch`)."""
        from mlflow.entities import RunTag

        if len(tags) == 1:
            [(key, value)] = tags.items()
            self.client.set_tag(run_id, key, value)
        elif tags:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def mark(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run that will not (or did not) finish by itself."""
        if reason:
            self.client.set_tag(run_id, f"{TAG}.failure_reason", reason[:REASON_MAX_CHARS])
        self.client.set_terminated(run_id, status=status)

    def cancel_run(self, run_id: str, reason: str) -> None:
        """Close a run as `--cancel` does: the cancel tag first (a job that opens the run from
        now on sees it and does not train: `RowRun.cancelled`), then KILLED."""
        self.set_tags(run_id, cancel_tags(reason, int(time.time() * 1000)))
        self.client.set_terminated(run_id, status="KILLED")

    def cancelled(self, run_id: str) -> bool:
        """Has `--cancel` closed this run (since it was last scheduled)?"""
        return CANCELLED in self.client.get_run(run_id).data.tags

    def mark_many(self, run_ids: Iterable[str], status: str, reason: str | None = None) -> None:
        """`mark` for many runs (a 10,000-row submission undone): one transaction for the tags
        and one for the status on a database store, else in parallel."""
        run_ids = list(run_ids)
        if reason:
            self.set_tags_many(
                {r: {f"{TAG}.failure_reason": reason[:REASON_MAX_CHARS]} for r in run_ids}
            )
        self._for_many(
            run_ids,
            lambda store: bulk.end_runs(store, run_ids, status),
            lambda run_id: self.client.set_terminated(run_id, status=status),
        )

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status
