"""MLflow bookkeeping: the only package that imports mlflow (and only inside functions, so
importing it stays light; `server_app` is the server's, and imports MLflow's server at once).

    uri        which store a command talks to (`tracking_uri_for`), no mlflow
    records    the tag names rows are found by, and `RunRecord`
    redaction  secrets kept out of params, tags and artifacts
    metadata   what a row's run records: tags, flat params, row.yaml
    tracker    the launcher's side: experiments, row runs (with their tags) created before
               the rows start; each job logs its params and row.yaml when it starts
    bulk       many runs at once straight through MLflow's SQL tables
    server_app  `mlflow server --app-name kdgrid`: MLflow's server plus two bulk routes
    server_bulk the launcher's side of those routes
    row_run    a job's side: retried calls, buffered metrics, the final status
    grid_runs  a whole grid's latest runs, and its table run
    cancel     what --cancel reads and closes (sqlite3 on a SQLite file, no MLflow import)
"""

from kd.tracking.cancel import CancelRuns
from kd.tracking.grid_runs import RunSummary, latest_grid_runs, log_grid_artifacts
from kd.tracking.metadata import (
    PARAM_MAX_CHARS,
    code_tags,
    launcher_identity,
    project_commit,
    row_params,
    row_tags,
    row_yaml,
)
from kd.tracking.records import (
    ACTIVE,
    CANCEL_REASON,
    CANCELLED,
    FAILED,
    JOB_TAGS,
    TAG,
    RunRecord,
    run_record,
)
from kd.tracking.redaction import REDACTED, SECRET_NAME, redact, secret_values
from kd.tracking.row_run import (
    JOB_HTTP_RETRIES,
    MAX_BACKOFF_S,
    METRICS_PER_REQUEST,
    PERMANENT_ERRORS,
    PERMANENT_OS_ERRORS,
    SYSTEM_METRICS_INTERVAL_S,
    RowRun,
    TrackingUnavailable,
)
from kd.tracking.tracker import BULK_THREADS, Tracker
from kd.tracking.uri import (
    DEFAULT_TRACKING_URI,
    absolute_uri,
    is_server_uri,
    resolve_tracking_uri,
    sqlite_path,
    store_exists,
    tracking_uri_for,
)

__all__ = [
    "ACTIVE",
    "BULK_THREADS",
    "CancelRuns",
    "CANCELLED",
    "CANCEL_REASON",
    "DEFAULT_TRACKING_URI",
    "FAILED",
    "JOB_HTTP_RETRIES",
    "JOB_TAGS",
    "MAX_BACKOFF_S",
    "METRICS_PER_REQUEST",
    "PARAM_MAX_CHARS",
    "PERMANENT_ERRORS",
    "PERMANENT_OS_ERRORS",
    "REDACTED",
    "SECRET_NAME",
    "SYSTEM_METRICS_INTERVAL_S",
    "TAG",
    "RowRun",
    "RunRecord",
    "RunSummary",
    "Tracker",
    "TrackingUnavailable",
    "absolute_uri",
    "code_tags",
    "is_server_uri",
    "latest_grid_runs",
    "launcher_identity",
    "log_grid_artifacts",
    "project_commit",
    "redact",
    "resolve_tracking_uri",
    "row_params",
    "row_tags",
    "row_yaml",
    "run_record",
    "secret_values",
    "sqlite_path",
    "store_exists",
    "tracking_uri_for",
]
