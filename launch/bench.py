"""Speed figures: the training step, the data loader, launching a grid, a local row's start-up.

    python launch/bench.py step grids/table2b.yaml --row 2b-6 --smoke          # CPU, tiny models
    python launch/bench.py step grids/table2b.yaml --row 2b-6 --batch-size 64  # on a GPU: + MFU
    python launch/bench.py data grids/table2b.yaml --row 2b-6 --smoke --generate 512 --workers 2
    python launch/bench.py checkpoint grids/table2b.yaml --row 2b-6            # epoch-end files
    python launch/bench.py launch 1000 --partition gpu                         # needs SLURM
    python launch/bench.py record 10000                                        # no cluster
    python launch/bench.py local grids/table2b.yaml --row 2b-2 --smoke         # local executor

`step`: images/s of the row's step through the project's loop (kd.train.train_step) and through
a minimal plain-PyTorch loop doing the same arithmetic; their ratio; the teacher's share.
`data`: images/s of decode + augment + collate through the row's loader, against the step's
demand (measured with `step` unless --demand is given).
`checkpoint`: seconds an epoch end keeps training waiting for the row's checkpoint files, written
in the loop and in the background (what the loop does), with the bytes written per epoch.
`launch`: seconds to expand + validate, submit (MLflow runs and sbatch apart) and read the
status of an N-row grid on the SLURM cluster; every job it submitted is cancelled afterwards.
`record`: seconds (wall and CPU) to validate an N-row grid, record its runs in a fresh SQLite
MLflow store and read its status back, in this process; no cluster (sacct/squeue left out).
`local`: a row run by the local executor: from process start to its first training step.
Every command prints one JSON object with --json. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.grid import GridError, load_grid  # noqa: E402


def _row(args: argparse.Namespace):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    grid = load_grid(args.grid, args.overrides, smoke=args.smoke, check_data=False)
    row = grid.select_one(args.row)
    if grid.smoke:
        from kd.smoke import prepare_smoke_data

        prepare_smoke_data([row])
    return row


def _log(args: argparse.Namespace):
    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    return log


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    print(json.dumps(result, indent=1) if args.json else text, flush=True)


def cmd_step(args: argparse.Namespace) -> int:
    from bench.step import format_step, step_benchmark

    result = step_benchmark(
        _row(args),
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        compile=args.compile,
        log=_log(args),
    )
    _emit(args, result, format_step(result))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from bench.data import data_benchmark, format_data
    from bench.step import step_benchmark

    row = _row(args)
    demand = args.demand
    if demand is None:
        _log(args)("measuring the step's demand (pass --demand IMG_PER_S to skip)")
        demand = step_benchmark(
            row, steps=args.demand_steps, warmup=2, repeats=1, plain=False, log=_log(args)
        )["project_img_per_s"]
    result = data_benchmark(
        row,
        workers=args.workers,
        batches=args.batches,
        generate=args.generate,
        image_px=args.image_px,
        demand=demand,
        test=args.test,
        log=_log(args),
    )
    _emit(args, result, format_data(result))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from bench.checkpoint import checkpoint_benchmark, format_checkpoint

    result = checkpoint_benchmark(
        _row(args),
        repeats=args.repeats,
        batch_size=args.batch_size,
        folder=args.dir,
        device=args.device,
        log=_log(args),
    )
    _emit(args, result, format_checkpoint(result))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from bench.launch import format_launch, launch_benchmark

    result = launch_benchmark(
        args.rows,
        partition=args.partition,
        tracking_uri=args.tracking_uri,
        workdir=args.workdir,
        keep=args.keep,
        log=_log(args),
    )
    _emit(args, result, format_launch(result))
    return 0 if result["cancelled_ok"] else 1


def cmd_record(args: argparse.Namespace) -> int:
    from bench.record import format_record, record_benchmark

    result = record_benchmark(args.rows, workdir=args.workdir, keep=args.keep, log=_log(args))
    _emit(args, result, format_record(result))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from bench.local import format_local, local_benchmark

    grid = load_grid(args.grid, args.overrides, smoke=args.smoke, check_data=False)
    row = grid.select_one(args.row)
    result = local_benchmark(
        grid, row, repeats=args.repeats, tracking_uri=args.tracking_uri, log=_log(args)
    )
    _emit(args, result, format_local(result))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    row = argparse.ArgumentParser(add_help=False)
    row.add_argument("grid")
    row.add_argument("overrides", nargs="*", help="Hydra-style overrides, as for launch/grid.py")
    row.add_argument("--row", required=True, help="row id or label")
    row.add_argument("--smoke", action="store_true", help="the grid's --smoke row")
    row.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; on a busy machine 1 avoids OpenMP spinning)",
    )

    step = sub.add_parser("step", parents=[common, row], help="training step: project vs plain")
    step.add_argument("--batch-size", type=int, help="default: the row's train.batch_size")
    step.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    step.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    step.add_argument("--repeats", type=int, default=3, help="alternations; the median is kept")
    step.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    step.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile student and teacher (CUDA only; default: the row's train.compile)",
    )
    step.set_defaults(func=cmd_step)

    data = sub.add_parser("data", parents=[common, row], help="data loader vs the step's demand")
    data.add_argument("--workers", type=int, help="default: the row's data.num_workers")
    data.add_argument("--batches", type=int, default=20, help="batches to read")
    data.add_argument(
        "--generate", type=int, metavar="N", help="read a generated copy of about N images"
    )
    data.add_argument("--image-px", type=int, default=500, help="side of generated images")
    data.add_argument("--demand", type=float, help="the step's img/s (default: measure it)")
    data.add_argument(
        "--test", action="store_true", help="also the test loader: first pass, then cached"
    )
    data.add_argument("--demand-steps", type=int, default=10, help=argparse.SUPPRESS)
    data.set_defaults(func=cmd_data)

    ckpt = sub.add_parser(
        "checkpoint", parents=[common, row], help="epoch-end checkpoint files: training's wait"
    )
    ckpt.add_argument("--repeats", type=int, default=3, help="alternations; the median is kept")
    ckpt.add_argument(
        "--dir", help="where to write (default: a scratch folder beside the row's output folder)"
    )
    ckpt.add_argument(
        "--batch-size", type=int, default=2, help="images per training step run during the write"
    )
    ckpt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ckpt.set_defaults(func=cmd_checkpoint)

    launch = sub.add_parser("launch", parents=[common], help="submit + status of an N-row grid")
    launch.add_argument("rows", nargs="?", type=int, default=1000)
    launch.add_argument("--partition", default=None, help="SLURM partition (default: the default)")
    launch.add_argument("--tracking-uri", help="MLflow store (default: a fresh SQLite file)")
    launch.add_argument(
        "--workdir", help="where the grid, outputs and store go (default: a temp dir)"
    )
    launch.add_argument(
        "--keep", action="store_true", help="keep the work folder (jobs are cancelled anyway)"
    )
    launch.set_defaults(func=cmd_launch)

    record = sub.add_parser(
        "record", parents=[common], help="validate, record runs, status of N rows: no cluster"
    )
    record.add_argument("rows", nargs="?", type=int, default=10000)
    record.add_argument("--workdir", help="where the grid and store go (default: a temp dir)")
    record.add_argument("--keep", action="store_true", help="keep the work folder")
    record.set_defaults(func=cmd_record)

    local = sub.add_parser("local", parents=[common, row], help="local executor start-up per row")
    local.add_argument("--repeats", type=int, default=2, help="rows per mode")
    local.add_argument("--tracking-uri", help="MLflow store (default: a fresh SQLite file)")
    local.set_defaults(func=cmd_local)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"launch/bench.py: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
