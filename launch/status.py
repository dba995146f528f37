"""Where every row of a grid stands: state, job, nodes, elapsed time, last epoch, val acc@1.

    python launch/status.py grids/table2b.yaml
    python launch/status.py grids/table2b.yaml --smoke --json
    python launch/status.py grids/table2b.yaml --watch          # refresh every 10 s

States: not_submitted, held (cluster limit: waits for room, see README), pending (with SLURM's reason), running, finished, failed, timeout,
preempted, cancelled, skipped (a dependency failed). From MLflow and sacct/squeue together,
one query each for the whole grid. Exit status 2 for a bad grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.cli import add_grid_arguments, grid_from_args, seconds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/status.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_grid_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON list of rows")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=10.0,
        metavar="SECONDS",
        help="refresh until every row is done (default every 10 s)",
    )
    # intermixed: `status.py GRID --smoke train.epochs=3` (overrides after options) works too
    args = parser.parse_intermixed_args(argv)
    grid = grid_from_args(args, {"watch": seconds})
    if grid is None:
        return 2
    from kd.tracking import tracking_uri_for
    from slurm.status import format_table, grid_status

    uri = tracking_uri_for(args.tracking_uri, grid.tracking_uri)
    while True:
        rows = grid_status(grid, uri)
        if args.json:
            print(json.dumps([r.to_dict() for r in rows], indent=1), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            counts = {}
            for r in rows:
                counts[r.state] = counts.get(r.state, 0) + 1
            summary = ", ".join(f"{n} {state}" for state, n in counts.items())
            print(f"grid '{grid.name}' ({grid.file}), experiment '{grid.experiment}': {summary}")
            print(format_table(rows), flush=True)
            other = [r.id for r in rows if r.other_code]
            if other:
                from kd.config import first_of

                print(
                    f"note: {len(other)} finished row(s) were trained by other code than this "
                    f"checkout: {first_of(other)} (`--json` says which code)",
                    flush=True,
                )
        active = any(r.state in ("pending", "running", "preempted") for r in rows)
        if not args.watch or not active:
            return 0
        time.sleep(args.watch)
        if not args.json:
            print()


if __name__ == "__main__":
    sys.exit(main())
