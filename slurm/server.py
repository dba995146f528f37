"""An MLflow tracking server for a cluster: one database, one artifact root, many jobs.

Many SLURM jobs writing one SQLite file on a shared filesystem lock it; a tracking server
serialises their writes. `start` runs `mlflow server` with a database backend and an artifact
root under one folder (on a shared path), on this host or as a long-running SLURM job, waits
until it answers, and records where it runs in `<folder>/server.json`; grids then log to the
printed URI (`--tracking-uri` or `tracking_uri:`). It binds 127.0.0.1 unless told otherwise.

The SQLite database it creates is put in WAL mode first (kept in the file): readers no longer
wait for a writer, and a commit writes less. WAL needs every process that opens the file to be
on one host (they share memory), which holds: only the server's own processes open it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_FILE = "server.json"


def default_database(folder: Path) -> Path:
    return folder / "mlflow.db"


def prepare_database(folder: Path, backend_uri: str | None) -> None:
    """Put the SQLite database this script owns (not a --backend-store-uri) in WAL mode, before
    `mlflow server` creates its tables in it (measured in docs/PERFORMANCE.md, "Launching a
    grid")."""
    if backend_uri is not None:
        return
    with contextlib.closing(sqlite3.connect(default_database(folder))) as db:
        db.execute("PRAGMA journal_mode=WAL")


KDGRID_APP = "kdgrid"


def server_env() -> dict[str, str]:
    """The server's environment: MLflow's background job execution (a job runner and eight
    huey consumers, ~240 MB each, for GenAI features kdgrid does not use) is off unless the
    user turned it on; they also kept spinning at full CPU for minutes after a stop."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)


def server_command(
    folder: Path, host: str, port: int, backend_uri: str | None, workers: int
) -> list[str]:
    backend = backend_uri or f"sqlite:///{default_database(folder).resolve()}"
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str((folder / "artifacts").resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(["--app-name", KDGRID_APP] if kdgrid_app_installed() else []),
    ]


def kdgrid_app_installed() -> bool:
    """MLflow finds `--app-name kdgrid` (kd/tracking/server_app.py: the bulk routes a launch
    posts its runs to) through the entry point `pip install -e .` registers; without it the
    server is MLflow's own, and a launch sends a few requests per row instead."""
    from importlib.metadata import entry_points

    return any(e.name == KDGRID_APP for e in entry_points(group="mlflow.app"))


def wait_healthy(uri: str, timeout_s: float = 120.0) -> bool:
    """Poll the server's /health until it answers (or time runs out)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def read_server(folder: Path) -> dict | None:
    path = folder / SERVER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_server(folder: Path, info: dict) -> None:
    tmp = folder / f".{SERVER_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder / SERVER_FILE)


def client_host(host: str) -> str:
    """The address clients use: the node's name when bound to every interface."""
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


def start_local(
    folder: Path, host: str, port: int, backend_uri: str | None = None, workers: int = 4
) -> dict:
    """Start the server on this host, detached; return its record (uri, pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = read_server(folder)
    if (
        existing
        and existing.get("pid")
        and _alive(existing["pid"])
        and wait_healthy(existing["uri"], 5)
    ):
        return existing | {"already_running": True}
    uri = f"http://{client_host(host)}:{port}"
    if port_taken(host, port):
        # a server started now would fail to bind, while whatever holds the port (an older
        # server, say) answered our health checks: the start would report another's success
        raise RuntimeError(
            f"port {port} on {host} is already in use: stop what listens there (an earlier "
            f"server: launch/server.py stop --dir ITS_DIR) or pass another --port"
        )
    prepare_database(folder, backend_uri)
    log = open(folder / "server.log", "ab")  # noqa: SIM115 - handed to the detached server
    process = subprocess.Popen(
        server_command(folder, host, port, backend_uri, workers),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=server_env(),
    )
    info = {
        "uri": uri,
        "pid": process.pid,
        "host": socket.gethostname(),
        "port": port,
        "folder": str(folder),
    }
    if not wait_healthy(uri) or process.poll() is not None:
        process.terminate()
        raise RuntimeError(
            f"the MLflow server did not answer at {uri}, or exited; see {folder / 'server.log'}"
        )
    _write_server(folder, info)
    return info


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on (host, port): binding it fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not taken
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def serve_in_job(folder: str, host: str, port: int, backend_uri: str | None, workers: int) -> None:
    """The body of the SLURM job: run the server until the job ends, record where it runs."""
    folder_path = Path(folder)
    prepare_database(folder_path, backend_uri)
    process = subprocess.Popen(
        server_command(folder_path, host, port, backend_uri, workers), env=server_env()
    )
    uri = f"http://{client_host(host)}:{port}"
    if wait_healthy(uri):
        _write_server(
            folder_path,
            {
                "uri": uri,
                "host": socket.gethostname(),
                "port": port,
                "job_id": os.environ.get("SLURM_JOB_ID"),
            },
        )
    process.wait()


def start_slurm(
    folder: Path,
    host: str,
    port: int,
    *,
    partition: str | None,
    time_min: int,
    backend_uri: str | None = None,
    workers: int = 4,
) -> dict:
    """Submit the server as a long-running SLURM job; wait until it answers; return its record."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / SERVER_FILE
    if stale.exists():
        stale.unlink()
    executor = submitit.AutoExecutor(folder=folder / "slurm")
    params = {"timeout_min": time_min, "name": "mlflow-server", "cpus_per_task": 2, "mem_gb": 4}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    job = executor.submit(serve_in_job, str(folder.resolve()), host, port, backend_uri, workers)
    deadline = time.time() + 300
    while time.time() < deadline:
        info = read_server(folder)
        if info and wait_healthy(info["uri"], 5):
            return info | {"job_id": job.job_id}
        if job.done():
            raise RuntimeError(f"the server job {job.job_id} ended; see {folder / 'slurm'}")
        time.sleep(1)
    raise RuntimeError(f"the server job {job.job_id} did not answer within 5 minutes")


def stop(folder: Path) -> bool:
    info = read_server(folder)
    if not info:
        return False
    if info.get("job_id"):
        subprocess.run(["scancel", str(info["job_id"])], check=False)
    elif info.get("pid") and _alive(info["pid"]):
        _stop_group(info["pid"])
    (folder / SERVER_FILE).unlink(missing_ok=True)
    return True


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (it leads a session of its own), and SIGKILL what is
    left of it after `grace_s`: a stop leaves no server process behind."""
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):  # reap the leader if it is our own child
        os.waitpid(pgid, os.WNOHANG)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
