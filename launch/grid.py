"""Expand, validate and run (or submit) every row of a grid.

    python launch/grid.py grids/table2b.yaml --smoke                 # the whole table on this CPU
    python launch/grid.py grids/table2b.yaml train.epochs=2 --dry-run
    python launch/grid.py grids/table2b.yaml --rows 2b-7 --rerun-failed

Overrides after the grid path use Hydra's grammar: `train.epochs=2` (every row), `+key=value`
(add a new key), `++key=value` (add or set), `~key` (remove), `train.lr=1e-4,5e-4` (a sweep:
one more axis of the grid).
Exit status: 0 all done (or nothing to do), 1 a row failed, 2 bad input (nothing was run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd import cli  # noqa: E402
from kd.config import first_of  # noqa: E402
from kd.grid import Grid, GridError  # noqa: E402

MAX_TIME_MIN = 366 * 24 * 60
ENV_URI = "MLFLOW_TRACKING_URI"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/grid.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid", help="the grid YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra-style overrides: key=value, +key=value, ++key=value, ~key, key=a,b",
    )
    parser.add_argument(
        "--executor",
        choices=("auto", "slurm", "local"),
        default="auto",
        help="auto: SLURM when sbatch is on PATH, else local",
    )
    parser.add_argument("--partition", help="SLURM partition for every row")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM QOS")
    parser.add_argument("--time", dest="time_min", help="SLURM time limit in minutes")
    parser.add_argument(
        "--rows",
        help="comma-separated row ids or labels (default: all); after a sweep override, a row's "
        "id or label selects all its variants",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help="N replicates of every row (ids <id>@s0..), replacing the grid's `seeds:`",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the rows; run and record nothing"
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON list of rows")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models of the same families, generated data, 32 px, 2 epochs",
    )
    parser.add_argument(
        "--rerun-failed",
        action="store_true",
        help="run only rows whose latest run failed or was killed (and their dependents)",
    )
    parser.add_argument("--force", action="store_true", help="rerun rows that already finished")
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="download the pretrained weights the rows need into the Hugging Face cache first "
        "(run where there is network); jobs then run with the hub offline",
    )
    parser.add_argument(
        "--cancel",
        action="store_true",
        help="cancel the pending/running jobs of the grid (or of --rows) and mark their runs KILLED",
    )
    parser.add_argument("--max-parallel", default=2, help="local executor: rows at once")
    parser.add_argument(
        "--array-parallelism",
        default=256,
        help="SLURM: tasks of one job array running at once",
    )
    parser.add_argument(
        "--no-feeder",
        action="store_true",
        help="SLURM: rows held by cluster limits wait for the next launch (no feeder process)",
    )
    parser.add_argument(
        "--feed-held",
        action="store_true",
        help="be the grid's feeder: submit its held rows as the cluster accepts them, until none "
        "is left (a launch starts it; see README, 'More rows than the cluster accepts')",
    )
    parser.add_argument("--feed-interval", default="30", help="seconds between the feeder's passes")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
        "else the grid's tracking_uri, else sqlite:///mlflow.db)",
    )
    return parser.parse_intermixed_args(argv)


def placement_overrides(args: argparse.Namespace) -> list[str]:
    """--partition/--account/--qos/--time are overrides of each row's resources."""
    out = []
    for flag, key in (
        ("partition", "partition"),
        ("account", "account"),
        ("qos", "qos"),
        ("time_min", "time_min"),
    ):
        value = getattr(args, flag)
        if isinstance(value, str):  # a plain string, not Hydra syntax: quoted, quotes escaped
            value = "'" + value.replace("'", "\\'") + "'"
        if value is not None:
            out.append(f"resources.{key}={value}")
    return out


def print_rows(grid: Grid, rows: list[str] | None, as_json: bool) -> None:
    summaries = [row.summary() for row in (grid.select(rows) if rows else grid.rows)]
    if as_json:
        print(json.dumps(summaries, indent=1))
        return
    headers = ["id", "label", "student", "teacher", "kd", "init", "depends on", "resources"]
    table = []
    for s in summaries:
        teacher = (
            "-"
            if s["teacher"] is None
            else (f"row:{s['teacher']['row']}" if s["teacher"]["row"] else s["teacher"]["model"])
        )
        init = s["init"]["source"] + (f":{s['init']['row']}" if "row" in s["init"] else "")
        res = s["resources"]
        table.append(
            [
                s["id"],
                s["label"],
                s["student"],
                teacher,
                " + ".join(f"{w:g}*{t}" for t, w in s["kd"].items()),
                init,
                ",".join(s["depends_on"]) or "-",
                f"{res['nodes']}x{res['gpus_per_node']}gpu {res['time_min']}min",
            ]
        )
    widths = [max(len(str(r[i])) for r in [headers, *table]) for i in range(len(headers))]
    for line in [headers, *table]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print(f"\n{len(table)} rows; grid '{grid.name}', experiment '{grid.experiment}'")


def choose_executor(name: str) -> str:
    if name == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return name


OPTION_CHECKS: dict[str, cli.Check] = {
    "partition": cli.text,
    "account": cli.text,
    "qos": cli.text,
    "time_min": cli.int_between(1, MAX_TIME_MIN),
    "rows": cli.row_names,
    "max_parallel": cli.int_between(1, cli.MAX_PARALLEL),
    "array_parallelism": cli.int_between(1, cli.MAX_ARRAY_PARALLELISM),
    "tracking_uri": cli.text,
    "feed_interval": cli.seconds,
}


def checked_grid(args: argparse.Namespace) -> Grid | None:
    """The grid and every option checked before anything happens: all problems are printed
    at once (options, grid file, rows, tracking store) and None returned."""
    problems = cli.check_options(args, OPTION_CHECKS, {"time_min": "--time"})
    if args.json and not args.dry_run:
        problems.append("--json: only with --dry-run (a launch prints its progress)")
    overrides = [*args.overrides, *placement_overrides(args)]  # the valid ones
    # --cancel and the feeder read runs, as status does: no dataset copies read, no model names
    # checked. --dry-run checks everything a launch does; model names from the name cache of
    # the installed timm (kd/models/name_cache.py), so it imports no torch once that exists.
    reads_runs = args.cancel or args.feed_held
    grid = cli.load_checked_grid(
        args,
        problems,
        overrides,
        cached=reads_runs,  # a large grid from the grid cache, as status reads it
        smoke=args.smoke,
        check_data=not reads_runs,
        check_models=not reads_runs,
        seeds=args.seeds,
    )
    if grid is not None and args.rows:
        try:
            grid.select(args.rows)  # report unknown names before anything else
        except GridError as exc:
            problems.extend(exc.problems)
    if not args.dry_run and (grid is not None or args.tracking_uri or os.environ.get(ENV_URI)):
        problems.extend(cli.store_problems(args, grid, writes=not args.cancel))
    if problems:
        cli.report(problems)
        return None
    return grid


CANCELLED_SHOWN = 50  # row ids printed by --cancel; a 10,000-row grid's would fill the screen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = checked_grid(args)
    if grid is None:
        return 2
    if args.dry_run:
        print_rows(grid, args.rows or None, args.json)
        return 0
    if args.cancel:
        from kd.tracking import tracking_uri_for
        from slurm.launcher import grid_lock  # not beside a launch or feeder that submits
        from slurm.status import cancel_rows

        rows = grid.select(args.rows) if args.rows else list(grid.rows)
        uri = tracking_uri_for(args.tracking_uri, grid.tracking_uri)
        with grid_lock(grid):
            cancelled = cancel_rows(grid, rows, uri)
        print(
            f"cancelled {len(cancelled)} row(s)"
            + (f": {first_of(cancelled, CANCELLED_SHOWN)}" if cancelled else "")
            + (" (launch/status.py lists them)" if len(cancelled) > CANCELLED_SHOWN else "")
        )
        return 0
    if args.feed_held:
        from slurm.launcher import feed_forever

        return feed_forever(grid, args.tracking_uri, args.feed_interval, args.array_parallelism)
    executor = choose_executor(args.executor)
    from slurm.launcher import LaunchOptions, launch

    options = LaunchOptions(
        executor=executor,
        array_parallelism=args.array_parallelism,
        rows=args.rows or None,
        rerun_failed=args.rerun_failed,
        force=args.force,
        max_parallel=args.max_parallel,
        tracking_uri=args.tracking_uri,
        prefetch=args.prefetch,
        feeder=not args.no_feeder,
        feed_interval_s=args.feed_interval,
    )
    status = launch(grid, options)
    if status != 2:  # launched (bad input leaves nothing behind, not even a cache entry)
        from kd.grid.cache import keep_for_readers  # status's first read of a large grid: fast

        keep_for_readers(grid, args.grid, grid.overrides, smoke=args.smoke, seeds=args.seeds)
    return status


if __name__ == "__main__":
    sys.exit(main())
