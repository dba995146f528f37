"""The command lines of launch/grid.py, launch/status.py, launch/table.py and launch/train.py:
the arguments they share, and checks of every option's value that collect all problems before
anything happens, so that a bad command line exits with status 2 and one list of problems
(naming the option, the grid file, the row and the key) and leaves nothing behind. The commands
that read a grid's runs (status, table) take the grid as it was launched: its overrides,
`--smoke` and `--seeds`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kd.grid import Grid, GridError, load_grid, split_row_names

# Upper bounds that catch a typo (an extra digit or two) before it reaches SLURM or a scheduler.
MAX_PARALLEL = 4096
MAX_ARRAY_PARALLELISM = 1_000_000
MAX_WATCH_S = 24 * 3600.0
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")

Check = Callable[[str], Any]  # value -> converted value; raises ValueError with the reason


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid")
    parser.add_argument(
        "overrides", nargs="*", help="the same overrides the grid was launched with"
    )
    parser.add_argument("--smoke", action="store_true", help="the grid's --smoke rows")
    parser.add_argument("--seeds", type=int, help="the --seeds the grid was launched with")
    parser.add_argument("--tracking-uri")


def text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty; give a value or leave the option out")
    if "\x00" in value:
        raise ValueError("holds a NUL character")
    return value


def row_names(value: str) -> list[str]:
    names = split_row_names(text(value))
    if not names:
        raise ValueError("no row name; give comma-separated row ids or labels")
    return names


def int_between(low: int, high: int) -> Check:
    def check(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return check


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(number) and 0.1 <= number <= MAX_WATCH_S):
        raise ValueError(f"must be between 0.1 and {MAX_WATCH_S:.0f} seconds, got {value!r}")
    return number


def plot_file(value: str) -> str:
    path = Path(text(value))
    if path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise ValueError(f"must end in .{', .'.join(PLOT_FORMATS)}, got {value!r}")
    folder = path.parent.resolve()
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"folder {folder} does not exist or is not writable")
    if path.is_dir():
        raise ValueError(f"{path} is a folder")
    return value


def check_options(
    args: argparse.Namespace, checks: dict[str, Check], flags: dict[str, str] | None = None
) -> list[str]:
    """Convert each option given as text (`checks`: dest -> check) in place; one problem per
    bad value, naming the option as typed (`flags`: dest -> flag where they differ). A bad
    value is set to None, so that later checks do not trip over it."""
    problems = []
    for dest, check in checks.items():
        value = getattr(args, dest, None)
        if value is None or not isinstance(value, str):
            continue
        try:
            setattr(args, dest, check(value))
        except ValueError as exc:
            flag = (flags or {}).get(dest) or "--" + dest.replace("_", "-")
            problems.append(f"{flag} {value!r}: {exc}")
            setattr(args, dest, None)
    return problems


def load_checked_grid(
    args: argparse.Namespace,
    problems: list[str],
    overrides: Sequence[str] | None = None,
    *,
    cached: bool = False,
    **load_options: Any,
) -> Grid | None:
    """The grid named on the command line, or None with its problems added to `problems`.
    `cached`: read it from the grid cache (kd/grid/cache.py) when it was loaded before."""
    from kd.grid.cache import load_grid_cached

    load = load_grid_cached if cached else load_grid
    try:
        return load(args.grid, args.overrides if overrides is None else overrides, **load_options)
    except GridError as exc:
        problems.extend(exc.problems)
        return None


def store_problems(args: argparse.Namespace, grid: Grid | None, writes: bool) -> list[str]:
    """The tracking store's problem (`kd.tracking.uri.tracking_uri_problem`), as a list."""
    from kd.tracking.uri import tracking_uri_problem

    grid_uri = grid.tracking_uri if grid is not None else None
    problem = tracking_uri_problem(
        args.tracking_uri, grid_uri, grid.file if grid else None, writes=writes
    )
    return [problem] if problem else []


def report(problems: Sequence[str], outcome: str = "nothing was run") -> int:
    """Print every problem at once on stderr; the exit status of bad input."""
    count = len(problems)
    print(
        "\n".join(
            [
                f"{count} problem{'s' if count != 1 else ''}; {outcome}:",
                *("  - " + p for p in problems),
            ]
        ),
        file=sys.stderr,
    )
    return 2


def grid_from_args(args: argparse.Namespace, checks: dict[str, Check] | None = None) -> Grid | None:
    """The grid `add_grid_arguments` named (dataset copies are not read), its options and its
    tracking store checked, or None after every problem was printed to stderr: the command
    then exits with status 2."""
    problems = check_options(args, {"tracking_uri": text, **(checks or {})})
    # status and table read runs: no dataset copies read, no model names checked (no timm);
    # a large grid loaded before is read back from the grid cache
    grid = load_checked_grid(
        args,
        problems,
        cached=True,
        smoke=args.smoke,
        check_data=False,
        check_models=False,
        seeds=args.seeds,
    )
    if grid is not None or args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        problems.extend(store_problems(args, grid, writes=False))
    if problems:
        report(problems, "nothing was read")
        return None
    return grid
