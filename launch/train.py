"""Train one row of a grid in this process, for debugging (breakpoints, profilers, prints).

    python launch/train.py grids/table2b.yaml --row deit_b_dist_hard --smoke train.epochs=1

The row is validated exactly as `launch/grid.py` does and logs a new MLflow run; dependency
rows must have finished already (their best checkpoints are read from the output folder), and
a finished row is not retrained while a row that reads its checkpoint is queued or running.
Exit status: 0 finished, 1 the row failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd import cli  # noqa: E402
from kd.grid import GridError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid")
    parser.add_argument("overrides", nargs="*", help="Hydra-style overrides, as for launch/grid.py")
    parser.add_argument("--row", required=True, help="row id or label (a replicate's: id@s1)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seeds", type=int, help="as given to launch/grid.py")
    parser.add_argument("--tracking-uri")
    args = parser.parse_intermixed_args(argv)
    problems = cli.check_options(args, {"row": cli.text, "tracking_uri": cli.text})
    grid = cli.load_checked_grid(args, problems, smoke=args.smoke, seeds=args.seeds)
    if grid is not None and args.row is not None:
        try:
            row = grid.select_one(args.row)
        except GridError as exc:
            problems.extend(exc.problems)
    if grid is not None or args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        problems.extend(cli.store_problems(args, grid, writes=True))
    if problems:
        return cli.report(problems)
    from kd.tracking import tracking_uri_for
    from kd.train import run
    from slurm.launcher import plan_inline

    try:
        row, notes = plan_inline(grid, row.id, args.tracking_uri)
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    for line in notes:
        print(f"note: {line}")
    from kd.preflight import check_weights

    weights = check_weights([row])  # missing pretrained weights: exit 2, as a launch says
    if weights.problems:
        print(GridError(weights.problems), file=sys.stderr)
        return 2
    if grid.smoke:
        from kd.smoke import prepare_smoke_data

        prepare_smoke_data([row])
    try:
        metrics = run(row, tracking_uri=tracking_uri_for(args.tracking_uri, grid.tracking_uri))
    except Exception as exc:
        print(f"[{row.id}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"[{row.id}] finished: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
