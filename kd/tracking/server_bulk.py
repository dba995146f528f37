"""The launcher's side of a kdgrid tracking server's bulk routes (kd/tracking/server_app.py):
a launch's runs in one request, a sbatch call's job id tags in another, a grid's runs read
back in one.

Sent with MLflow's own REST helper and credentials (its token, user and password, TLS options).
None back means the server does not have the route (a stock MLflow server answers 404), may
not be asked it (401, 403), or its store cannot take it (501): nothing was written, and the caller goes through MLflow's REST API.
Creating runs is never retried: a request that timed out may have written them, and a second
one would create every run twice; the launch fails and says so instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kd.tracking.records import LeanData, LeanInfo, LeanRun

CREATE_RUNS = "/kdgrid/api/1/runs/create-many"  # the routes kd/tracking/server_app.py adds
SET_TAGS = "/kdgrid/api/1/runs/set-tags-many"
SEARCH_TAGGED = "/kdgrid/api/1/runs/search-tagged"
CANCEL_RUNS = "/kdgrid/api/1/runs/cancel-many"
# no such route (a stock MLflow server), or one this user may not call (an auth proxy): the
# caller goes through MLflow's REST API, which then says what is wrong, if anything
NOT_THERE = (401, 403, 404, 405, 501)


class ServerBulkFailed(RuntimeError):
    """The server took the request but did not do it (a refused tag, a deleted experiment)."""


def shared_items(mappings: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The items every mapping holds alike: sent once instead of once per run."""
    common = dict(mappings[0]) if mappings else {}
    for mapping in mappings[1:]:
        common = {k: v for k, v in common.items() if k in mapping and mapping[k] == v}
    return common


def _post(client: Any, path: str, payload: dict, retries: int) -> dict | None:
    from mlflow.utils.rest_utils import http_request

    store = client._tracking_client.store
    host_creds = store.get_host_creds()
    response = http_request(
        host_creds, path, "POST", json=payload, max_retries=retries, raise_on_status=False
    )
    if response.status_code in NOT_THERE:
        return None
    if response.status_code != 200:
        raise ServerBulkFailed(
            f"{host_creds.host}{path} answered {response.status_code}: {response.text[:500]}"
        )
    return response.json()


def post_runs(
    client: Any, experiment_id: str, runs: Sequence[tuple[str, Mapping[str, str]]]
) -> list[str] | None:
    """SCHEDULED runs (name, tags) created by the server in one transaction: their ids, in
    order; or None (the server has no bulk route). Tags every run shares are sent once."""
    common = shared_items([tags for _, tags in runs])
    payload = {
        "experiment_id": experiment_id,
        "common_tags": common,
        "runs": [
            {"name": name, "tags": {k: v for k, v in tags.items() if k not in common}}
            for name, tags in runs
        ],
    }
    answer = _post(client, CREATE_RUNS, payload, retries=0)
    if answer is None:
        return None
    run_ids = list(answer["run_ids"])
    if len(run_ids) != len(runs):
        raise ServerBulkFailed(f"asked for {len(runs)} runs, the server made {len(run_ids)}")
    return run_ids


def post_tags(client: Any, tags_by_run: Mapping[str, Mapping[str, str]]) -> bool:
    """The tags set by the server in one transaction (setting them again is harmless, so the
    request is retried as MLflow retries its own); False when the server has no bulk route."""
    payload = {"tags": {run_id: dict(tags) for run_id, tags in tags_by_run.items()}}
    return _post(client, SET_TAGS, payload, retries=5) is not None


def newest_per_tag(runs: Sequence[LeanRun], tag: str) -> list[LeanRun]:
    """The first (newest) run of each value of `tag`, of runs given newest first."""
    seen: set[str | None] = set()
    kept = []
    for run in runs:
        value = run.data.tags.get(tag)
        if value not in seen:
            seen.add(value)
            kept.append(run)
    return kept


def runs_to_json(runs: Sequence[LeanRun]) -> dict:
    """The search's answer: each run's info, tags, params and metrics, with the tags every run
    has alike sent once (~13 of the ~19 a launch sets: the answer for 10,000 runs is a third
    of the size). NaN metrics travel as JSON's NaN, which Python's json reads back."""
    common = shared_items([run.data.tags for run in runs])
    return {
        "common_tags": common,
        "runs": [
            {
                "run_id": r.info.run_id,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "end_time": r.info.end_time,
                "tags": {k: v for k, v in r.data.tags.items() if k not in common},
                "params": r.data.params,
                "metrics": r.data.metrics,
            }
            for r in runs
        ],
    }


def search_tagged_light(
    uri: str, experiment: str, key: str, value: str | None, latest_by: str | None = None
) -> list[LeanRun] | None:
    """`search_tagged` of the experiment named `experiment` without MLflow's client, whose
    import is ~2 s of `launch/status.py`: one POST with Python's urllib, for a plain http://
    server used without credentials or TLS settings. None whenever that does not apply or
    does not work (a stock server, a refused or failed request): the caller asks MLflow."""
    import json
    import os
    import urllib.error
    import urllib.request

    settings = [
        k for k in os.environ if k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI"
    ]
    if not uri.startswith("http://") or settings:
        return None
    payload = {
        "experiment_name": experiment,
        "key": key,
        "value": value,
        "params": False,
        "latest_by": latest_by,  # only the newest run of each value of this tag
    }
    request = urllib.request.Request(
        uri.rstrip("/") + SEARCH_TAGGED,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError):  # urllib's errors (HTTP ones included) are OSErrors
        return None
    return _lean_runs(answer)


def search_tagged(
    client: Any, experiment_id: str, key: str, value: str | None, params: bool
) -> list[LeanRun] | None:
    """`Tracker.search_tagged` in one request (retried: it only reads); None when the server
    has no bulk route."""
    payload = {"experiment_id": experiment_id, "key": key, "value": value, "params": params}
    answer = _post(client, SEARCH_TAGGED, payload, retries=5)
    return None if answer is None else _lean_runs(answer)


def _lean_runs(answer: dict) -> list[LeanRun]:
    common = answer["common_tags"]
    return [
        LeanRun(
            LeanInfo(r["run_id"], r["status"], r["start_time"], r["end_time"]),
            LeanData({**common, **r["tags"]}, r["params"], r["metrics"]),
        )
        for r in answer["runs"]
    ]


def cancel_runs(client: Any, run_ids: list[str], tags: Mapping[str, str]) -> set[str] | None:
    """`--cancel` of many runs in one request (kd.tracking.bulk.cancel_runs on the server; safe
    to retry: a run closed already is left so): the ids closed, or None (no bulk route)."""
    payload = {"run_ids": list(run_ids), "tags": dict(tags)}
    answer = _post(client, CANCEL_RUNS, payload, retries=5)
    return None if answer is None else set(answer["closed"])
