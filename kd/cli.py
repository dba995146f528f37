"""The command line of the commands that read a grid's runs (launch/status.py, launch/table.py):
the grid file, the overrides it was launched with, `--smoke`, `--seeds` and `--tracking-uri`."""

from __future__ import annotations

import argparse
import sys

from kd.grid import Grid, GridError, load_grid


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid")
    parser.add_argument(
        "overrides", nargs="*", help="the same overrides the grid was launched with"
    )
    parser.add_argument("--smoke", action="store_true", help="the grid's --smoke rows")
    parser.add_argument("--seeds", type=int, help="the --seeds the grid was launched with")
    parser.add_argument("--tracking-uri")


def grid_from_args(args: argparse.Namespace) -> Grid | None:
    """The grid `add_grid_arguments` named (dataset copies are not read), or None after its
    problems were printed to stderr: the command then exits with status 2."""
    try:
        return load_grid(
            args.grid, args.overrides, smoke=args.smoke, check_data=False, seeds=args.seeds
        )
    except GridError as exc:
        print(exc, file=sys.stderr)
        return None
