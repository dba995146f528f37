"""`mlflow server --app-name kdgrid`: MLflow's own tracking server, plus two routes that take a
whole launch at once. `launch/server.py start` runs it.

Through MLflow's REST API a launch costs a few requests per row (create the run, set it
SCHEDULED, then its job id tag), ~10 ms of server CPU each: a 10,000-row grid took minutes. With
these routes the launcher posts the launch's runs in one request and the job id tags of each
sbatch call in another; the server inserts them with the same code the launcher uses on a
database store (kd/tracking/bulk.py: MLflow's own tables, its tag checks, one transaction).
Everything else is MLflow's server, unchanged (this module only adds Flask routes to MLflow's
Flask app, which MLflow's ASGI app serves). A stock MLflow server answers 404 on these paths and
the launcher falls back to the REST API, so kdgrid works against any MLflow server.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, request
from mlflow.exceptions import MlflowException
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app  # noqa: F401  (what uvicorn serves: flask_app at "/")

from kd.tracking import bulk
from kd.tracking.server_bulk import CREATE_RUNS, SET_TAGS


def _store() -> Any:
    from mlflow.server.handlers import _get_tracking_store

    return _get_tracking_store()


def _answer(work: Any) -> Any:
    """Run `work()` and answer its result as JSON; 501 when the store cannot take it in bulk
    (nothing was written: the launcher falls back to MLflow's REST API), MLflow's own status
    for a request MLflow refuses (a bad tag, a deleted experiment)."""
    try:
        return jsonify(work())
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
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = _store()
        if not isinstance(store, SqlAlchemyStore):
            raise bulk.BulkUnsupported(f"{type(store).__name__} is not a database store")
        bulk.replace_tags(store, tags)
        return {}

    return _answer(work)


flask_app.add_url_rule(CREATE_RUNS, "kdgrid_create_runs", create_runs, methods=["POST"])
flask_app.add_url_rule(SET_TAGS, "kdgrid_set_tags", set_tags, methods=["POST"])
