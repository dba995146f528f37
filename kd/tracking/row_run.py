"""A row job's side of its MLflow run (`RowRun`): metrics, artifacts, tags and the final status,
every call retried with backoff while the store does not answer, metrics buffered meanwhile.

A job must neither fail at the first hiccup of a tracking server that restarts nor wait
minutes for a request the store refused: errors are told apart (`PERMANENT_ERRORS`), and
after the retry window `TrackingUnavailable` says which store did not answer and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd.rowfiles import ROW_YAML
from kd.tracking.metadata import row_params, row_yaml
from kd.tracking.records import CANCELLED, REASON_MAX_CHARS, TAG
from kd.tracking.uri import is_server_uri

if TYPE_CHECKING:
    from kd.grid import Row

SYSTEM_METRICS_INTERVAL_S = 10


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

        if is_server_uri(tracking_uri):
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

    def cancelled(self) -> bool:
        """Has `launch/grid.py --cancel` closed this run? (Its tag stays until a launch
        schedules the run again.)"""
        return CANCELLED in self._retry(self.client.get_run, self.run_id).data.tags

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

    def log_code_diff(self) -> None:
        """The uncommitted changes of the code this job runs, as `code/uncommitted.diff`
        (nothing for clean code); its commit and hash are tags (`code_tags`)."""
        from kd.codesnap import DIFF, running_code

        diff = running_code().diff
        if diff:
            self._retry(self.client.log_text, self.run_id, diff, f"code/{DIFF}")

    def log_row(self, row: Row) -> None:
        """The row's resolved config as flat params and as `row.yaml`, written by the job when
        it starts: the launch records only the run and its tags (a 10,000-row launch would
        otherwise write a million params before its first sbatch). A resumed run keeps the
        params it has (MLflow does not let a param change; only placement fields such as
        `resources` can differ under the same content key); row.yaml is this start's row."""
        from mlflow.entities import Param

        have = self._retry(self.client.get_run, self.run_id).data.params
        params = [Param(k, v) for k, v in row_params(row).items() if k not in have]
        for start in range(0, len(params), 100):
            self._retry(self.client.log_batch, self.run_id, params=params[start : start + 100])
        self._retry(self.client.log_text, self.run_id, row_yaml(row), ROW_YAML)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Send the queued metrics (waiting for the store), then the reason and the status."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()
        self.flush(wait=True)
        if reason:
            self.set_tag(f"{TAG}.failure_reason", reason[:REASON_MAX_CHARS])
        self._retry(self.client.set_terminated, self.run_id, status=status)
