"""The paper's table, rebuilt from MLflow, beside the paper's own numbers.

    python launch/table.py grids/table2b.yaml                      # markdown
    python launch/table.py grids/table2b.yaml --format csv
    python launch/table.py grids/table2b.yaml --smoke --plot table2b.png

Rows in the paper's order with their labels and descriptive columns; measured acc@1, acc@5,
test loss and parameter count beside the paper's values and the acc@1 difference; rows not
finished are shown with their state. A grid with replicates (`seeds: N`, `--seeds N`) has one
line per row instead: acc@1 mean ± std over its finished replicates, n, the 95 % t interval and
whether the paper's number lies in it (`--per-seed`: one line per replicate). The table (and plot) are also logged as artifacts of the
grid's table run in the same MLflow experiment. Exit status 2 for a bad grid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.cli import add_grid_arguments, grid_from_args, plot_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/table.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_grid_arguments(parser)
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md")
    parser.add_argument(
        "--plot", metavar="PNG", help="also draw measured against paper acc@1 per row"
    )
    parser.add_argument(
        "--metrics", default="", help="extra metric columns, comma-separated (e.g. cluster/cub/nmi)"
    )
    parser.add_argument(
        "--per-seed",
        action="store_true",
        help="with replicates: one line per replicate instead of per row",
    )
    parser.add_argument("--no-log", action="store_true", help="do not log the table to MLflow")
    args = parser.parse_intermixed_args(argv)
    grid = grid_from_args(args, {"plot": plot_file})
    if grid is None:
        return 2
    from kd import results
    from kd.tracking import latest_grid_runs, log_grid_artifacts, store_exists, tracking_uri_for

    uri = tracking_uri_for(args.tracking_uri, grid.tracking_uri)
    extra = [m for m in args.metrics.split(",") if m] or results.cluster_columns(grid)
    table = results.build_table(grid, latest_grid_runs(uri, grid.experiment, grid.name), extra)
    if grid.replicate_of and not args.per_seed:
        text, files = replicate_table(grid, table, args.format, args.plot)
    else:
        text = {
            "md": lambda: results.to_markdown(table, extra),
            "csv": lambda: results.to_csv(table, extra),
            "json": lambda: results.to_json(table),
        }[args.format]()
        files = []
        if args.plot:
            title = f"{grid.name}: measured vs paper acc@1"
            files.append(results.plot(table, args.plot, title))
    print(text, end="")
    from kd.codesnap import other_code_lines

    for row in table:
        if row.stale:
            print(f"warning: row '{row.id}' ({row.label}): {row.stale}", file=sys.stderr)
    trained_by = [(f"{row.id} ({row.label})", row.other_code) for row in table if row.other_code]
    for line in other_code_lines(trained_by):
        print(f"note: {line}", file=sys.stderr)
    other = len(trained_by)
    if other:
        print(
            f"note: {other} finished row(s) were trained by other code than this checkout "
            "(each run's commit, code hash and uncommitted diff are in MLflow: tags "
            "kdgrid.commit, kdgrid.code_hash, artifact code/uncommitted.diff)",
            file=sys.stderr,
        )
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)
    if not args.no_log and store_exists(uri):
        with tempfile.TemporaryDirectory() as tmp:
            name = Path(tmp) / f"{grid.name}.{args.format}"
            name.write_text(text)
            run_id = log_grid_artifacts(uri, grid.experiment, grid.name, [name, *files])
        print(f"logged to MLflow run {run_id} (experiment '{grid.experiment}')", file=sys.stderr)
    return 0


def replicate_table(grid, table, fmt: str, plot: str | None) -> tuple[str, list[Path]]:
    """One line per row of a grid with replicates (kd/aggregate.py), and its plot."""
    from kd import aggregate

    rows = aggregate.aggregate(grid, table)
    text = {"md": aggregate.to_markdown, "csv": aggregate.to_csv, "json": aggregate.to_json}[fmt](
        rows
    )
    files = []
    if plot:
        title = f"{grid.name}: acc@1, mean and 95% interval over seeds"
        files.append(aggregate.plot(rows, plot, title))
    return text, files


if __name__ == "__main__":
    sys.exit(main())
