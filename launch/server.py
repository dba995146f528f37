"""Start, show or stop the MLflow tracking server that a cluster's jobs log to.

    python launch/server.py start --dir /shared/mlflow                  # on this host, 127.0.0.1:5000
    python launch/server.py start --dir /shared/mlflow --host 0.0.0.0   # reachable from the nodes
    python launch/server.py start --dir /shared/mlflow --slurm --partition cpu --time 10080
    python launch/server.py status --dir /shared/mlflow
    python launch/server.py stop --dir /shared/mlflow

`start` prints the tracking URI; pass it to grids with --tracking-uri (or `tracking_uri:` in the
grid, or export MLFLOW_TRACKING_URI). The database is `<dir>/mlflow.db` (or --backend-store-uri,
e.g. a PostgreSQL URI) and artifacts go under `<dir>/artifacts`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/server.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("start", "status", "stop"))
    parser.add_argument(
        "--dir", required=True, type=Path, help="folder for the database, artifacts and logs"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri", help="database URI (default: SQLite in --dir)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--slurm", action="store_true", help="run the server as a long-running SLURM job"
    )
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, default=7 * 24 * 60, help="SLURM time limit in minutes")
    args = parser.parse_args(argv)
    from slurm import server

    if args.action == "status":
        info = server.read_server(args.dir)
        if info and server.wait_healthy(info["uri"], 5):
            print(
                f"up: {info['uri']} (host {info.get('host')}, "
                + (f"job {info['job_id']})" if info.get("job_id") else f"pid {info.get('pid')})")
            )
            return 0
        print("down")
        return 1
    if args.action == "stop":
        print("stopped" if server.stop(args.dir) else "no server recorded in " + str(args.dir))
        return 0
    try:
        if args.slurm:
            info = server.start_slurm(
                args.dir,
                args.host,
                args.port,
                partition=args.partition,
                time_min=args.time,
                backend_uri=args.backend_store_uri,
                workers=args.workers,
            )
        else:
            info = server.start_local(
                args.dir, args.host, args.port, args.backend_store_uri, args.workers
            )
    except RuntimeError as exc:
        print(f"launch/server.py: {exc}", file=sys.stderr)
        return 1
    state = "already running" if info.get("already_running") else "started"
    print(f"MLflow tracking server {state}: {info['uri']}")
    print(
        f"use it with: --tracking-uri {info['uri']}   (or: export MLFLOW_TRACKING_URI={info['uri']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
