"""Which tracking store a command talks to, and the facts about its URI.

Every command (launch, status, table, the inline trainer, the row job) finds its store through
`tracking_uri_for`, so --tracking-uri, $MLFLOW_TRACKING_URI and the grid's `tracking_uri` mean
the same everywhere. No mlflow here: the light commands read these without importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(explicit: str | None = None, grid_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the grid's `tracking_uri`, else MLflow's
    default SQLite file in the working directory (where `mlflow ui` looks)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or grid_uri or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A relative SQLite path would point elsewhere from a job's working directory."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith("sqlite:////"):
        return SQLITE_PREFIX + str(Path(uri.removeprefix(SQLITE_PREFIX)).resolve())
    return uri


def tracking_uri_for(explicit: str | None = None, grid_uri: str | None = None) -> str:
    """The store a command uses (`resolve_tracking_uri`), a SQLite path made absolute."""
    return absolute_uri(resolve_tracking_uri(explicit, grid_uri))


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a SQLite store (as written in the URI), or None for another store."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        return Path(tracking_uri.removeprefix(SQLITE_PREFIX))
    return None


def is_server_uri(tracking_uri: str) -> bool:
    """A tracking server (HTTP), not a database or file store opened by this process."""
    return tracking_uri.startswith(("http://", "https://"))


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is not there yet: nothing to look up, and looking
    would create the file (a launch that fails validation must leave no trace)."""
    path = sqlite_path(tracking_uri)
    return path is None or path.exists()
