"""`mlflow server --app-name kdgrid`: MLflow's own tracking server, plus four routes that take
a whole grid at once. `launch/server.py start` runs it.

Through MLflow's REST API a launch costs a few requests per row (create the run, set it
SCHEDULED, then its job id tag), ~10 ms of server CPU each: a 10,000-row grid took minutes, and
reading its runs back (status, table, the next launch's plan) took 13-15 s of paged searches.
With these routes the launcher posts the launch's runs in one request and the job id tags of
each sbatch call in another, a grid's runs come back in one answer, and `--cancel` closes its
runs in one request (one by one, 10,000 rows took 8 minutes); the server uses the same
code the launcher uses on a database store (kd/tracking/bulk.py: MLflow's own tables, its tag
checks, one transaction; plain SELECTs to read).
Everything else is MLflow's server, unchanged (this module only adds Flask routes to MLflow's
Flask app, which MLflow's ASGI app serves). A stock MLflow server answers 404 on these paths and
the launcher falls back to the REST API, so kdgrid works against any MLflow server.
"""

from __future__ import annotations

import json
from typing import Any

from flask import jsonify, request
from mlflow.exceptions import MlflowException
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app  # noqa: F401  (what uvicorn serves: flask_app at "/")

from kd.tracking import bulk
from kd.tracking.server_bulk import (
    CANCEL_RUNS,
    CREATE_RUNS,
    SEARCH_TAGGED,
    SET_TAGS,
    newest_per_tag,
    runs_to_json,
)


def _store() -> Any:
    from mlflow.server.handlers import _get_tracking_store

    return _get_tracking_store()


def _json(result: Any) -> Any:
    """JSON as is: Flask's `jsonify` sorts every key, a third of the time for 10,000 runs."""
    return flask_app.response_class(json.dumps(result), mimetype="application/json")


def _answer(work: Any) -> Any:
    """Run `work()` and answer its result as JSON; 501 when the store cannot take it in bulk
    (nothing was written: the launcher falls back to MLflow's REST API), MLflow's own status
    for a request MLflow refuses (a bad tag, a deleted experiment)."""
    try:
        return _json(work())
    except bulk.BulkUnsupported as exc:
        return jsonify(error_code="NOT_IMPLEMENTED", message=str(exc)), 501
    except MlflowException as exc:
        return jsonify(error_code=exc.error_code, message=exc.message), exc.get_http_status_code()
    except (KeyError, TypeError, ValueError) as exc:
        return jsonify(error_code="INVALID_PARAMETER_VALUE", message=repr(exc)), 400


def create_runs() -> Any:
    """{"experiment_id", "common_tags", "runs": [{"name", "tags"}]} -> {"run_ids": [...]}: the
    SCHEDULED runs, in order, each with the common tags and its own."""
    body = request.get_json(force=True)
    common = dict(body.get("common_tags") or {})
    runs = [(str(r["name"]), {**common, **r["tags"]}) for r in body["runs"]]
    return _answer(
        lambda: {"run_ids": bulk.insert_runs(_store(), str(body["experiment_id"]), runs)}
    )


def set_tags() -> Any:
    """{"tags": {run_id: {key: value}}} -> {}: the tags set (a tag already there replaced)."""
    body = request.get_json(force=True)
    tags = {str(run_id): dict(t) for run_id, t in body["tags"].items()}

    def work() -> dict:
        bulk.replace_tags(_store(), tags)
        return {}

    return _answer(work)


def search_tagged() -> Any:
    """{"experiment_id" or "experiment_name", "key", "value", "params", "latest_by"} ->
    {"runs": [...]}: the active runs whose tag `key` is `value` (None: set), newest first, with
    tags, latest metrics and (when asked) params, as `Tracker.search_tagged` returns them (with
    `latest_by`, a tag name: only the newest run of each of its values); none for an experiment
    name that does not exist."""
    body = request.get_json(force=True)

    def work() -> dict:
        store = _store()
        experiment_id = body.get("experiment_id")
        if experiment_id is None:
            experiment = store.get_experiment_by_name(str(body["experiment_name"]))
            if experiment is None:
                return runs_to_json([])
            experiment_id = experiment.experiment_id
        runs = bulk.search_tagged_sql(
            store,
            str(experiment_id),
            str(body["key"]),
            body.get("value"),
            bool(body.get("params")),
        )
        if body.get("latest_by"):
            runs = newest_per_tag(runs, str(body["latest_by"]))
        return runs_to_json(runs)

    return _answer(work)


def cancel_runs() -> Any:
    """{"run_ids", "tags"} -> {"closed": [...]}: `--cancel` of many runs (kd/tracking/bulk.py)."""
    body = request.get_json(force=True)
    run_ids = [str(r) for r in body["run_ids"]]
    tags = {str(k): str(v) for k, v in body["tags"].items()}
    return _answer(lambda: {"closed": sorted(bulk.cancel_runs(_store(), run_ids, tags))})


flask_app.add_url_rule(CREATE_RUNS, "kdgrid_create_runs", create_runs, methods=["POST"])
flask_app.add_url_rule(SET_TAGS, "kdgrid_set_tags", set_tags, methods=["POST"])
flask_app.add_url_rule(SEARCH_TAGGED, "kdgrid_search_tagged", search_tagged, methods=["POST"])
flask_app.add_url_rule(CANCEL_RUNS, "kdgrid_cancel_runs", cancel_runs, methods=["POST"])
