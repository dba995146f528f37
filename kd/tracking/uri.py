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


# Stores a grid can use, by URI scheme (a `+driver` suffix allowed: postgresql+psycopg2://).
SERVER_SCHEMES = {"http": 80, "https": 443}
DATABASE_SCHEMES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
CONNECT_TIMEOUT_S = 5.0  # a store that does not answer in this time is reported, not waited on
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_FORMS = (
    "use sqlite:///PATH.db or http(s)://HOST:PORT of an MLflow server (launch/server.py) "
    "(or postgresql|mysql|mssql://...)"
)


def uri_source(explicit: str | None, grid_uri: str | None, grid_file: str | None) -> str:
    """Where the URI `resolve_tracking_uri` picks comes from, for messages."""
    if explicit:
        return "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    if grid_uri:
        return f"{grid_file or 'the grid'}: tracking_uri"
    return "the default tracking URI"


def tracking_uri_problem(
    explicit: str | None,
    grid_uri: str | None = None,
    grid_file: str | None = None,
    *,
    writes: bool = True,
) -> str | None:
    """Why the store a command would use cannot work, checked without creating anything (and
    within CONNECT_TIMEOUT_S for a server): an unknown scheme, a missing or unwritable folder,
    a file that is not SQLite, a server or database that does not answer. None when it can.
    `writes`: the command creates runs (a launch), not only reads them (status, table)."""
    uri = resolve_tracking_uri(explicit, grid_uri)
    try:
        if "\x00" in uri or uri != uri.strip():
            raise ValueError("a NUL character or blanks around it")
        problem = store_problem(uri, writes)
    except ValueError as exc:  # a malformed URL (port, IPv6 brackets) or a NUL in a path
        problem = f"not a usable URI ({exc}); {STORE_FORMS}"
    if problem is None:
        return None
    return f"{uri_source(explicit, grid_uri, grid_file)} {uri!r}: {problem}"


def store_problem(uri: str, writes: bool) -> str | None:
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None or str(path) in ("", ".", ":memory:") or uri.endswith("/"):
            return "not a SQLite file URI; write sqlite:///PATH.db (relative) or sqlite:////PATH.db"
        return sqlite_problem(path.resolve(), writes)
    if scheme in SERVER_SCHEMES or scheme in DATABASE_SCHEMES:
        port = parts.port or {**SERVER_SCHEMES, **DATABASE_SCHEMES}[scheme]
        if not parts.hostname:
            return f"no host in the URI; {STORE_FORMS}"
        return connect_problem(parts.hostname, port)
    if scheme and scheme != "file":
        return f"unknown scheme '{parts.scheme}'; {STORE_FORMS}"
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        return (
            "a folder (MLflow file store), which MLflow refuses unless "
            f"MLFLOW_ALLOW_FILE_STORE=true; {STORE_FORMS}"
        )
    folder = Path(url2pathname(parts.path)) if scheme == "file" else Path(uri)
    return store_folder_problem(folder, writes)


def connect_problem(host: str, port: int) -> str | None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        return (
            f"cannot reach {host}:{port} ({why}, within {CONNECT_TIMEOUT_S:.0f} s): start the "
            "server (python launch/server.py start) or fix the URI"
        )


def sqlite_problem(path: Path, writes: bool) -> str | None:
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file; give the path of a SQLite database file"
        if not os.access(path, os.R_OK | (os.W_OK if writes else 0)):
            return f"{path} is not {'writable' if writes else 'readable'}; fix its permissions"
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            return f"{path} is not a SQLite database; fix the path"
        return None
    return folder_problem(path.parent, writes) if writes else None


def store_folder_problem(folder: Path, writes: bool) -> str | None:
    """A folder store (MLflow's file store): made by the launch inside an existing folder."""
    folder = folder.resolve()
    if folder.exists() or not writes:
        return folder_problem(folder, writes)
    return folder_problem(folder.parent, writes)


def folder_problem(folder: Path, writes: bool) -> str | None:
    """A store folder (or a SQLite file's folder) that a launch could write into."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is not a folder; fix the path"
        if writes and not os.access(folder, os.W_OK | os.X_OK):
            return f"folder {folder} is not writable; fix its permissions or the path"
        return None
    if writes:
        return f"folder {folder} does not exist; create it or fix the path"
    return None
