"""MLflow bookkeeping: the only module that imports mlflow.

The launcher creates one run per row *before* the row starts (status SCHEDULED), so the run id
is known at submission, a requeued job lands back in the same run, and a second launch can see
what is scheduled, running, finished or failed. Rows are found again by their content key tag.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kd.grid import Row

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "kdgrid"  # tag namespace
# A row run's tags about its process or job (`kdgrid.<name>`), dropped when the run is reopened
JOB_TAGS = ("pid", "pid_started", "job_id", "slurm_job_name", "slurm_cluster", "slurm_user")
ACTIVE = ("SCHEDULED", "RUNNING")
FAILED = ("FAILED", "KILLED")
PARAM_MAX_CHARS = 6000
BULK_THREADS = 8  # parallel requests to a tracking server when creating many runs
SYSTEM_METRICS_INTERVAL_S = 10


def resolve_tracking_uri(explicit: str | None = None, grid_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the grid's `tracking_uri`, else MLflow's
    default SQLite file in the working directory (where `mlflow ui` looks)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or grid_uri or DEFAULT_TRACKING_URI


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is not there yet: nothing to look up, and looking
    would create the file (a launch that fails validation must leave no trace)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).exists()
    return True


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


@functools.cache
def project_commit() -> str:
    """The kdgrid git commit the row ran with ('unknown' outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _BulkUnsupported(RuntimeError):
    """This MLflow's tables do not take the bulk insert; nothing was written."""


@dataclass(frozen=True)
class _LeanInfo:
    run_id: str
    status: str
    start_time: int | None
    end_time: int | None


@dataclass(frozen=True)
class _LeanData:
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class _LeanRun:
    """The parts of an `mlflow.entities.Run` this project reads."""

    info: _LeanInfo
    data: _LeanData


def _search_tagged_sql(store: Any, experiment_id: str, key: str, value: str | None) -> list:
    try:
        from mlflow.entities import LifecycleStage
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy import select
    except ImportError as exc:
        raise _BulkUnsupported(exc) from None
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
            params = session.execute(
                select(SqlParam.run_uuid, SqlParam.key, SqlParam.value).where(
                    SqlParam.run_uuid.in_(runs)
                )
            ).all()
            metrics = session.execute(
                select(
                    SqlLatestMetric.run_uuid,
                    SqlLatestMetric.key,
                    SqlLatestMetric.value,
                    SqlLatestMetric.is_nan,
                ).where(SqlLatestMetric.run_uuid.in_(runs))
            ).all()
    except Exception as exc:  # e.g. MLflow's tables changed: MLflow's own search instead
        raise _BulkUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    by_run: dict[str, _LeanData] = {r.run_uuid: _LeanData({}, {}, {}) for r in infos}
    for run_id, k, v in tags:
        if run_id in by_run:
            by_run[run_id].tags[k] = v
    for run_id, k, v in params:
        if run_id in by_run:
            by_run[run_id].params[k] = v
    for run_id, k, v, is_nan in metrics:
        if run_id in by_run:
            by_run[run_id].metrics[k] = float("nan") if is_nan else v
    return [
        _LeanRun(_LeanInfo(r.run_uuid, r.status, r.start_time, r.end_time), by_run[r.run_uuid])
        for r in infos
    ]


@dataclass(frozen=True)
class RunRecord:
    """What a launch needs to know about an existing run."""

    run_id: str
    key: str
    row_id: str
    status: str  # MLflow status: SCHEDULED, RUNNING, FINISHED, FAILED, KILLED
    start_time: int
    tags: Mapping[str, str]

    @property
    def job_id(self) -> str | None:
        return self.tags.get(f"{TAG}.job_id")


def _launcher_identity() -> dict[str, str]:
    """`kdgrid.launcher_started`: tells this launcher from a later process with its pid."""
    identity = _process_identity_once(os.getpid())
    return {f"{TAG}.launcher_started": identity} if identity else {}


@functools.cache
def _process_identity_once(pid: int) -> str | None:
    """This process's identity, read from /proc once, not once per row of a 1000-row grid
    (keyed by pid: a forked child reads its own)."""
    from kd.processes import process_identity

    return process_identity(pid)


SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I
)
REDACTED = "<redacted>"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (tokens, passwords, keys)."""
    environ = os.environ if environ is None else environ
    return sorted(
        {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 6},
        key=len,
        reverse=True,
    )


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value replaced, so that a secret interpolated into a
    row (`${oc.env:HF_TOKEN}`) never reaches MLflow as a param, tag or artifact."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def run_record(run: Any) -> RunRecord:
    """An MLflow run as the launcher sees it."""
    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        key=tags.get(f"{TAG}.key", ""),
        row_id=tags.get(f"{TAG}.id", ""),
        status=run.info.status,
        start_time=run.info.start_time or 0,
        tags=dict(tags),
    )


def row_params(
    row: Row, *, tree: dict[str, Any] | None = None, secrets: list[str] | None = None
) -> dict[str, str]:
    """The resolved row config as flat dotted params, the same keys in every row.

    Every registered KD term appears (weight 0 when unused) and an absent teacher is spelled
    out with null fields, so MLflow's compare view lines rows up key by key. `tree` (the
    config as `C.to_dict` gives it) and `secrets` spare a many-row caller recomputing them.
    """
    from kd import config as C
    from kd.losses import TERMS

    tree = dict(C.to_dict(row.config) if tree is None else tree)  # top-level keys replaced below
    tree["kd"] = {name: float(row.config.kd.get(name, 0.0)) for name in TERMS}
    if tree["teacher"] is None:
        tree["teacher"] = C.to_dict(C.TeacherConfig())
    flat = C.flatten(tree)
    flat["key"] = row.key
    flat["smoke"] = row.smoke
    secrets = secret_values() if secrets is None else secrets
    return {
        k: redact("" if v is None else str(v), secrets)[:PARAM_MAX_CHARS]
        for k, v in sorted(flat.items())
    }


def row_yaml(
    row: Row, *, data: dict[str, Any] | None = None, secrets: list[str] | None = None
) -> str:
    """The resolved row (`row.to_dict()`, or `data`) as YAML, secrets redacted."""
    # libyaml's emitter when PyYAML has it: the same text, faster (1000-row launches)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = yaml.dump(row.to_dict() if data is None else data, Dumper=dumper, sort_keys=False)
    return redact(text, secrets)


class Tracker:
    """Launcher-side view of a tracking store."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        if not tracking_uri.startswith("sqlite:///"):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            return
        # MLflow creates (or migrates) a database's tables when a process first opens it, and
        # two processes doing so at once (a first launch, and a status read as the file
        # appears) fail ("table ... already exists"): one at a time, under a lock on its folder.
        with _folder_locked(Path(tracking_uri.removeprefix("sqlite:///")).parent):
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
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///")).resolve()
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

    def search_tagged(self, experiment_id: str, key: str, value: str | None = None) -> list[Any]:
        """The active runs of the experiment whose tag `key` is `value` (None: set, not empty),
        newest first, with their tags, params and latest metrics: what `search` returns for
        that tag filter. On a database store they are read with plain SELECTs: MLflow's search
        builds an ORM object per param and tag, 2.6 s for a 1000-row grid (0.3 s this way)."""
        store = self._sql_store()
        if store is not None:
            try:
                return _search_tagged_sql(store, experiment_id, key, value)
            except _BulkUnsupported:
                pass
        where = f"tags.`{key}` = '{value}'" if value is not None else f"tags.`{key}` != ''"
        return list(self.search(experiment_id, where))

    def row_runs(self, experiment_id: str) -> list[RunRecord]:
        """Every row run of the experiment, newest first."""
        return [run_record(run) for run in self.search_tagged(experiment_id, f"{TAG}.key")]

    def latest_by_key(self, experiment_id: str) -> dict[str, RunRecord]:
        latest: dict[str, RunRecord] = {}
        for record in self.row_runs(experiment_id):
            latest.setdefault(record.key, record)
        return latest

    @staticmethod
    def _row_tags(row: Row, executor: str, parent_run_id: str | None) -> dict[str, str]:
        tags = {
            f"{TAG}.grid": row.grid,
            f"{TAG}.grid_file": row.grid_file,
            f"{TAG}.id": row.id,
            f"{TAG}.label": row.label,
            f"{TAG}.key": row.key,
            f"{TAG}.commit": project_commit(),
            f"{TAG}.executor": executor,
            f"{TAG}.launch_host": socket.gethostname(),
            f"{TAG}.launcher_pid": str(os.getpid()),
            **_launcher_identity(),
            f"{TAG}.smoke": str(row.smoke).lower(),
            # where the row writes: rows that read its checkpoint find it here (kd.plan)
            f"{TAG}.output_dir": str(row.output_dir.resolve()),
            "mlflow.source.git.commit": project_commit(),
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return tags

    def create_row_run(
        self, experiment_id: str, row: Row, *, executor: str, parent_run_id: str | None = None
    ) -> str:
        """A SCHEDULED run with the row's tags, params and resolved config, before it starts.

        Four requests to a tracking server: the run with its tags, its params, row.yaml, the
        status (MLflow's `log_text` and `update_run` would each fetch the whole run first).
        """
        from mlflow.entities import Param

        tags = self._row_tags(row, executor, parent_run_id)
        run = self.client.create_run(experiment_id, run_name=row.run_name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in row_params(row).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])
        self._log_text(run.info.artifact_uri, row_yaml(row), "row.yaml")
        self._set_status(run_id, "SCHEDULED", run.info.end_time)
        return run_id

    def _log_text(self, artifact_uri: str, text: str, name: str) -> None:
        """`client.log_text` into a run whose artifact URI is known: MLflow's client first
        fetches the whole run (a `get_run` request) only to read that URI."""
        import tempfile

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        uri = add_databricks_profile_info_to_artifact_uri(artifact_uri, self.uri)
        repo = get_artifact_repository(uri, tracking_uri=self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            repo.log_artifact(str(path))

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
        """`create_row_run` for many rows at once: row id -> run id, the same runs, tags,
        params and row.yaml.

        One by one, a run costs five store calls (create, params, row.yaml, status, and the job
        id tag later), about 50 ms each against SQLite: a 1000-row grid took 50 s to launch. On
        a database store (SQLite, PostgreSQL, MySQL) every run, tag and param is inserted in
        one transaction instead; a tracking server gets the per-row calls from a thread pool.
        """
        rows = list(rows)
        store = self._sql_store()
        if store is not None and len(rows) > 1:
            try:
                run_ids, yamls = self._insert_row_runs(
                    store, experiment_id, rows, executor, parent_run_id
                )
            except _BulkUnsupported as exc:  # nothing was written: one by one, as before
                print(f"kd.tracking: bulk run creation unavailable ({exc}); one run at a time")
            else:
                self._log_row_yamls(store, experiment_id, yamls)
                return run_ids
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
        if self.uri.startswith(("http://", "https://")):
            return None  # a tracking server (and no 0.7 s import of MLflow's SQL store)
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = self.client._tracking_client.store
        except Exception:
            return None
        return store if isinstance(store, SqlAlchemyStore) else None

    def _insert_row_runs(
        self,
        store: Any,
        experiment_id: str,
        rows: list[Row],
        executor: str,
        parent_run_id: str | None,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The SCHEDULED runs with their tags and params, in one transaction, through MLflow's
        own tables and validation (what `SqlAlchemyStore.create_run` and `log_batch` write).
        Returns row id -> run id, and run id -> the text of its row.yaml."""
        import uuid

        try:
            from mlflow.entities import LifecycleStage, SourceType
            from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
            from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
            from mlflow.utils.uri import append_to_uri_path
            from mlflow.utils.validation import _validate_param, _validate_tag
            from sqlalchemy import insert
        except ImportError as exc:
            raise _BulkUnsupported(exc) from None
        experiment = store.get_experiment(experiment_id)
        if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
            raise ValueError(f"experiment {experiment_id} is {experiment.lifecycle_stage}")
        now = int(time.time() * 1000)
        validate_tag = functools.lru_cache(maxsize=None)(_validate_tag)  # rows share most values
        validate_param = functools.lru_cache(maxsize=None)(_validate_param)
        secrets = secret_values()
        runs: list[dict[str, Any]] = []
        tags: list[dict[str, Any]] = []
        params: list[dict[str, Any]] = []
        run_ids: dict[str, str] = {}
        yamls: dict[str, str] = {}
        for row in rows:
            run_id = uuid.uuid4().hex
            run_ids[row.id] = run_id
            row_tags = self._row_tags(row, executor, parent_run_id)
            row_tags[MLFLOW_RUN_NAME] = row.run_name
            runs.append(
                {
                    "run_uuid": run_id,
                    "name": row.run_name,
                    "artifact_uri": append_to_uri_path(
                        experiment.artifact_location, run_id, "artifacts"
                    ),
                    "experiment_id": int(experiment_id),
                    "source_type": SourceType.to_string(SourceType.UNKNOWN),
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": row_tags.get(MLFLOW_USER, "unknown"),
                    "status": "SCHEDULED",
                    "start_time": now,
                    "end_time": None,
                    "deleted_time": None,
                    "source_version": "",
                    "lifecycle_stage": LifecycleStage.ACTIVE,
                }
            )
            for key, value in row_tags.items():
                tag = validate_tag(key, value)
                tags.append({"key": tag.key, "value": tag.value, "run_uuid": run_id})
            data = row.to_dict()
            yamls[run_id] = row_yaml(row, data=data, secrets=secrets)
            for key, value in row_params(row, tree=data["config"], secrets=secrets).items():
                param = validate_param(key, value)
                params.append({"key": param.key, "value": param.value, "run_uuid": run_id})
        try:
            with store.ManagedSessionMaker(read_only=False) as session:
                # Core inserts (executemany) into MLflow's own tables: no ORM bookkeeping
                session.execute(insert(SqlRun.__table__), runs)
                session.execute(insert(SqlTag.__table__), tags)
                session.execute(insert(SqlParam.__table__), params)
        except Exception as exc:  # e.g. MLflow's tables changed; the transaction was rolled back
            raise _BulkUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
        return run_ids, yamls

    def _log_row_yamls(self, store: Any, experiment_id: str, yamls: Mapping[str, str]) -> None:
        """Each run's row.yaml: written straight into its folder under a local artifact root
        (what MLflow's local repository does, without a temporary copy); uploaded in parallel
        through MLflow's artifact repository otherwise."""
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        from mlflow.utils.uri import append_to_uri_path

        location = store.get_experiment(experiment_id).artifact_location
        parsed = urlparse(location)
        if parsed.scheme in ("", "file"):
            root = Path(url2pathname(parsed.path) if parsed.scheme else location)
            for run_id, text in yamls.items():
                folder = root / run_id / "artifacts"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "row.yaml").write_text(text)
            return
        with ThreadPoolExecutor(BULK_THREADS) as pool:
            uploads = [
                pool.submit(
                    self._log_text,
                    append_to_uri_path(location, run_id, "artifacts"),
                    text,
                    "row.yaml",
                )
                for run_id, text in yamls.items()
            ]
            for future in uploads:
                future.result()

    def set_tags_many(self, tags_by_run: Mapping[str, Mapping[str, str]]) -> None:
        """`set_tags` for many runs: one transaction on a database store, else in parallel."""
        store = self._sql_store()
        if store is not None and len(tags_by_run) > 1:
            try:
                from mlflow.store.tracking.dbmodels.models import SqlTag
                from mlflow.utils.validation import _validate_tag
                from sqlalchemy import delete, insert
            except ImportError:
                pass
            else:
                new = [
                    {"key": tag.key, "value": tag.value, "run_uuid": run_id}
                    for run_id, tags in tags_by_run.items()
                    for tag in (_validate_tag(k, v) for k, v in tags.items())
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
                return
        workers = 1 if store is not None else BULK_THREADS
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(self.set_tags, r, t) for r, t in tags_by_run.items()]:
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
            f"{TAG}.commit": project_commit(),
            f"{TAG}.launch_host": socket.gethostname(),
            "mlflow.source.git.commit": project_commit(),
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
            **_launcher_identity(),
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
            self.client.set_tag(run_id, f"{TAG}.failure_reason", reason[:5000])
        self.client.set_terminated(run_id, status=status)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer within the retry window; the message names its URI."""


# MLflow error codes that retrying cannot fix (a bad request, a missing run): raised at once.
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "ENDPOINT_NOT_FOUND",
    "NOT_IMPLEMENTED",
}
MAX_BACKOFF_S = 60.0
METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
# MLflow's own per-request retries for a row job talking to a server (its default, 7, waits
# ~4 minutes inside one call): RowRun retries around each call itself, with a clear error.
JOB_HTTP_RETRIES = "2"


# Local failures that waiting does not mend: raised at once, as themselves, not after minutes
# of retries as "the store did not answer" (a full disk under a file artifact store, say).
PERMANENT_OS_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
}


def _transient(exc: BaseException) -> bool:
    """Worth retrying: anything but a request the store refused (PERMANENT_ERRORS), a local
    file error that stays (PERMANENT_OS_ERRORS) or a bug. Unknown errors are retried: a server
    restarting mid-run fails in many ways (refused, reset, a half-sent reply)."""
    if isinstance(exc, OSError) and exc.errno in PERMANENT_OS_ERRORS:
        return False
    if isinstance(exc, (TypeError, AttributeError, NameError)):
        return False
    return getattr(exc, "error_code", None) not in PERMANENT_ERRORS


def _error_detail(exc: BaseException) -> str:
    """The gist of a failed request: `[Errno 111] Connection refused` rather than a page of
    urllib3 retry bookkeeping."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class RowRun:
    """Job-side handle on the row's MLflow run: metrics, artifacts, the final status.

    Every call is retried with exponential backoff: `retries` attempts (env
    `KDGRID_TRACKING_RETRIES`, default 10), the first wait `backoff_s` (env
    `KDGRID_TRACKING_BACKOFF_S`, default 1 s), doubling up to 60 s: about 5 minutes in all.
    Then `TrackingUnavailable` says which store did not answer and what to do. Errors that a
    retry cannot fix (a bad request, a missing run) are raised at once.

    Metrics are buffered: a batch the store does not take at once is kept and sent, oldest
    first and with its original timestamps, with the next batch or at `finish`, so a tracking
    server that restarts mid-run loses no metric and does not hold up training. The system
    metrics sampler (which stops for good when the server does not answer it) is restarted.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        retries: int | None = None,
        backoff_s: float | None = None,
    ):
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", JOB_HTTP_RETRIES)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retries = max(1, int(retries or _env_number("KDGRID_TRACKING_RETRIES", 10)))
        self.backoff_s = (
            _env_number("KDGRID_TRACKING_BACKOFF_S", 1.0) if backoff_s is None else backoff_s
        )
        self._pending: list[Any] = []  # metrics not yet taken by the store, oldest first
        self._outage: str | None = None  # why the last send failed, while metrics wait
        self._monitor: Any = None

    def _retry(self, fn, *args, **kwargs) -> Any:
        delay, started = self.backoff_s, time.time()
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == self.retries:
                    raise TrackingUnavailable(
                        f"the MLflow tracking store {self.tracking_uri} did not answer: "
                        f"{getattr(fn, '__name__', 'a request')} failed {attempt} times over "
                        f"{time.time() - started:.0f} s ({_error_detail(exc)}). Check that the "
                        "server runs (python launch/server.py status --dir DIR) and that the "
                        "URI is right (--tracking-uri, $MLFLOW_TRACKING_URI, the grid's "
                        "tracking_uri), then rerun the row with launch/grid.py GRID --rerun-failed"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        return None

    def finished_metrics(self) -> dict[str, float] | None:
        """The run's latest metrics when it is FINISHED, else None."""
        run = self._retry(self.client.get_run, self.run_id)
        return dict(run.data.metrics) if run.info.status == "FINISHED" else None

    def start(self, tags: Mapping[str, str] | None = None, *, system_metrics: bool = False) -> None:
        """Mark the run RUNNING; with `system_metrics`, sample CPU, memory, disk, network and (with
        NVML) GPU utilisation and memory into `system/*` metrics until `finish`."""
        self._retry(self.client.update_run, self.run_id, status="RUNNING")
        if tags:
            self.set_tags(tags)
        if system_metrics:
            self._start_monitor()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """The tags in one request, not one per tag."""
        from mlflow.entities import RunTag

        self._retry(
            self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
        )

    def _start_monitor(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=True,  # a requeued job continues the steps of the same run
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as exc:  # system metrics are a bonus: never fail a row for them
            print(f"kd.tracking: system metrics not sampled: {_error_detail(exc)}", flush=True)
            self._monitor = None

    def _revive_monitor(self) -> None:
        """MLflow's sampler ends for good when one request fails: start it again."""
        thread = getattr(self._monitor, "_process", None)
        if self._monitor is not None and (thread is None or not thread.is_alive()):
            self._start_monitor()

    def status(self) -> str:
        return self._retry(self.client.get_run, self.run_id).info.status

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one step's metrics and send whatever is queued; never waits for an outage."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()
        ]
        if self.flush(wait=False):
            self._revive_monitor()

    def flush(self, *, wait: bool = True) -> bool:
        """Send the queued metrics, oldest first. With `wait`, each request is retried (and
        `TrackingUnavailable` raised at the end); without, one try: what the store does not
        take stays queued. True when the queue is empty."""
        while self._pending:
            chunk = self._pending[:METRICS_PER_REQUEST]
            try:
                if wait:
                    self._retry(self.client.log_batch, self.run_id, metrics=chunk)
                else:
                    self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:
                if wait or not _transient(exc):
                    raise
                if self._outage is None:
                    print(
                        f"kd.tracking: {self.tracking_uri} did not take {len(self._pending)} "
                        f"metrics ({_error_detail(exc)}); they are kept and sent when it answers",
                        flush=True,
                    )
                self._outage = _error_detail(exc)
                return False
            del self._pending[: len(chunk)]
        if self._outage is not None:
            print(
                f"kd.tracking: {self.tracking_uri} answers again; queued metrics sent", flush=True
            )
            self._outage = None
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._retry(self.client.set_tag, self.run_id, key, value)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Send the queued metrics (waiting for the store), then the reason and the status."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()
        self.flush(wait=True)
        if reason:
            self.set_tag(f"{TAG}.failure_reason", reason[:5000])
        self._retry(self.client.set_terminated, self.run_id, status=status)


@dataclass(frozen=True)
class RunSummary:
    """A row's latest run with its latest metric values and params (from one search)."""

    record: RunRecord
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    start_time: int
    end_time: int | None


def latest_grid_runs(tracking_uri: str, experiment: str, grid_name: str) -> dict[str, RunSummary]:
    """Content key -> the latest run of that key in the grid, with metrics: one query for the
    whole grid (status and tables call this; no per-row requests)."""
    if not store_exists(tracking_uri):
        return {}
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment_id(experiment)
    if experiment_id is None:
        return {}
    latest: dict[str, RunSummary] = {}
    for run in tracker.search_tagged(experiment_id, f"{TAG}.grid", grid_name):
        record = run_record(run)
        if record.key and record.key not in latest:
            latest[record.key] = RunSummary(
                record=record,
                metrics=dict(run.data.metrics),
                params=dict(run.data.params),
                start_time=run.info.start_time or 0,
                end_time=run.info.end_time,
            )
    return latest


def log_grid_artifacts(
    tracking_uri: str, experiment: str, grid_name: str, files: Iterable[str | Path]
) -> str:
    """Log the grid's table and plot to its grid-level run (one per grid, updated in place)."""
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.ensure_experiment(experiment)
    found = tracker.client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG}.table_of` = '{grid_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {f"{TAG}.table_of": grid_name, f"{TAG}.commit": project_commit()}
        run_id = tracker.client.create_run(
            experiment_id, run_name=f"table {grid_name}", tags=tags
        ).info.run_id
    for path in files:
        tracker.client.log_artifact(run_id, str(path), "table")
    tracker.client.set_terminated(run_id, status="FINISHED")
    return run_id
