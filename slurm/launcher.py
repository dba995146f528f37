"""One launch of a grid: plan against MLflow, create the row runs, hand the rows to an executor.

Order matters for "nothing run twice, nothing half-done": the plan is made (and can fail)
before the experiment or any run is created; runs are created for every row of the launch
before the first row starts; the launch record is written beside the rows' outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kd.grid import Grid, GridError, Row, dependency_checkpoint
from kd.plan import (
    Decision,
    locate_checkpoints,
    plan_launch,
    running_ids,
    stale_after_launch,
)
from kd.rowfiles import LAUNCH_LOCK, SLURM_DIR
from kd.tracking import RunRecord, Tracker, store_exists, tracking_uri_for
from slurm.feed import feed_held, hold_rows, undo_submission
from slurm.held import CLUSTER_LIMIT, FEED_INTERVAL_S, FeedFailed, is_held, start_feeder
from slurm.interrupted import never_queued, recover
from slurm.jobenv import check_launch_weights, exported, job_environment
from slurm.journal import queued_recorder, record_launch
from slurm.limits import read_limits
from slurm.submit import SlurmUnavailable, check_rows, read_partitions, submit_rows


@dataclass(frozen=True)
class LaunchOptions:
    executor: str = "local"  # "local" or "slurm"
    rows: list[str] | None = None
    rerun_failed: bool = False
    force: bool = False
    max_parallel: int = 2  # local executor
    array_parallelism: int = 256  # SLURM: tasks of one array running at once
    tracking_uri: str | None = None
    live: bool | None = None  # redraw progress in place (default: when stdout is a terminal)
    prefetch: bool = False  # download missing pretrained weights into the cache first
    feeder: bool = True  # SLURM: start a feeder for rows held by cluster limits
    feed_interval_s: float = FEED_INTERVAL_S


class Liveness:
    """Will a run still run? Local runs by pid, SLURM runs by their job (one sacct call and
    one squeue call for all of them)."""

    def __init__(self, latest: dict[str, RunRecord]):
        from slurm.state import slurm_jobs

        self.states = slurm_jobs(r for r in latest.values() if r.status != "FINISHED")

    def alive(self, record: RunRecord) -> bool:
        """An open (SCHEDULED/RUNNING) run whose process or job is still there, or that is held
        for room on the cluster (a later launch or the feeder submits it)."""
        from slurm.local import local_run_alive

        if is_held(record):
            return True
        if record.tags.get("kdgrid.executor") in ("local", "inline"):
            return local_run_alive(record.tags)
        state = self.states.get(record.job_id or "")
        return state is None or not state.terminal

    def requeued(self, record: RunRecord) -> bool:
        """A failed SLURM run whose job SLURM still holds (`held_after_failure`): a second job
        must not start on the row yet."""
        from slurm.state import held_after_failure

        if record.tags.get("kdgrid.executor") != "slurm" or not record.job_id:
            return False
        return held_after_failure(record.status, self.states.get(record.job_id))


def describe(decisions: list[Decision], resumes: dict[str, str]) -> None:
    for d in decisions:
        if d.action == "run":
            resume = "; resumes its saved state" if d.row.id in resumes else ""
            print(f"  run      {d.row.id:<28} {d.row.label:<12} {d.reason}{resume}")
        elif d.action in ("skip_finished", "skip_active"):
            print(f"  skipped  {d.row.id:<28} {d.row.label:<12} {d.reason}")


@contextlib.contextmanager
def grid_lock(grid: Grid, timeout_s: float = 600.0) -> Iterator[None]:
    """One launch of a grid at a time, from planning until every row's run exists (and, on SLURM,
    is submitted): a second launch started at the same moment then sees the first one's runs as
    scheduled and submits nothing twice. Status reads never take it."""
    root = Path(grid.rows[0].config.output_dir) if grid.rows else Path("outputs")
    root.mkdir(parents=True, exist_ok=True)
    path = root / LAUNCH_LOCK
    with open(path, "a+") as handle:
        deadline = time.time() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(
                        f"another launch of grid '{grid.name}' is planning or submitting ({path}); waiting"
                    )
                    told = True
                if time.time() > deadline:
                    raise TimeoutError(
                        f"another launch of grid '{grid.name}' holds {path} for over {timeout_s:.0f}s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Prepared:
    """A planned launch whose runs exist: what an executor needs."""

    grid: Grid
    rows: list  # the rows to run, dependencies first
    run_ids: dict[str, str]
    tracker: Tracker
    uri: str
    active_deps: dict[str, str]  # dependency row -> job id still queued from an earlier launch
    parent_run_id: str
    # SLURM: the cluster's limits, read while the runs are recorded (five commands, ~0.4 s)
    limits: Future | None = None


def launch(grid: Grid, options: LaunchOptions) -> int:
    """Plan, record and run or submit a grid. Returns the exit status (0 ok, 1 a row failed, 2 bad input)."""
    # bad input (rows, SLURM fields, pretrained weights) is found before the lock writes anything
    weights = preflight(grid, options) or check_launch_weights(
        grid,
        options.rows,
        force=options.force,
        prefetch=options.prefetch,
        tracking_uri=options.tracking_uri,
    )
    if isinstance(weights, str):
        print(weights, file=sys.stderr)
        return 2
    try:
        with grid_lock(grid):
            # the code every job of this launch imports, and their requeues too
            env, _ = job_environment(
                Path(grid.rows[0].config.output_dir), hub_offline=weights.all_cached
            )
            if options.executor == "slurm":
                with exported(env):  # rows an earlier launch held go with this launch's code
                    try:
                        feed_held(grid, tracking_uri_for(options.tracking_uri, grid.tracking_uri))
                    except FeedFailed as exc:  # the rows stay held; this launch goes on
                        print(f"launch/grid.py: {exc}", file=sys.stderr)
            prepared = _prepare(grid, options)
            if isinstance(prepared, int):
                return prepared
            if options.executor == "slurm":
                return _finish(prepared, _submit(prepared, options, env))
    except TimeoutError as exc:
        print(f"launch/grid.py: {exc}", file=sys.stderr)
        return 2
    # Local rows run outside the lock: their runs exist, so another launch sees them as active.
    return _finish(prepared, _run_local(prepared, options, env))


def feed_forever(
    grid: Grid, tracking_uri: str | None, interval_s: float, array_parallelism: int = 256
) -> int:
    """The feeder (slurm/held.py): held rows submitted under the grid's lock, pass by pass."""
    from slurm.held import feed_loop

    # The feeder runs with the environment of the launch that started it (start_feeder): what
    # it submits imports that launch's code snapshot.
    uri = tracking_uri_for(tracking_uri, grid.tracking_uri)

    def feed_once() -> int:
        with grid_lock(grid):
            return feed_held(grid, uri, array_parallelism)

    return feed_loop(grid, feed_once, interval_s)


def preflight(grid: Grid, options: LaunchOptions) -> str | None:
    """The checks made before the grid's launch lock is taken (the lock writes the output
    folder), so that bad input leaves nothing behind: a `--rows` selection missing a dependency
    (exactly, while the tracking store does not exist yet: then nothing has run; with a store
    the plan under the lock makes this check against what has run), and, for SLURM, every
    selected row's SLURM fields against `sinfo`. Returns the message for stderr, or None."""
    try:
        folders = output_folder_problems(grid)
        if folders:
            raise GridError(folders)
        uri = tracking_uri_for(options.tracking_uri, grid.tracking_uri)
        if not store_exists(uri):
            plan_launch(
                grid,
                {},
                rows=options.rows,
                rerun_failed=options.rerun_failed,
                force=options.force,
                allow_active_dependencies=options.executor == "slurm",
            )
        if options.executor != "slurm":
            return None
        try:
            partitions = read_partitions()
        except SlurmUnavailable as exc:
            return f"launch/grid.py: {exc}; nothing was submitted"
        rows = grid.select(options.rows) if options.rows else list(grid.rows)
        problems = check_rows(rows, partitions)
        if problems:
            raise GridError(problems)
    except GridError as exc:
        return str(exc)
    return None


def output_folder_problems(grid: Grid) -> list[str]:
    """Each `output_dir` the launch would write (its lock, journal and row folders) is, or can
    be made in, a writable folder: found before anything is created."""
    problems = []
    for output_dir in dict.fromkeys(row.config.output_dir for row in grid.rows):
        folder = Path(output_dir).resolve()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            problems.append(
                f"{grid.file}: output_dir '{output_dir}': {folder} is not a writable folder; "
                "fix output_dir or the folder's permissions"
            )
    return problems


def plan_inline(grid: Grid, row_id: str, tracking_uri: str | None = None) -> tuple[Row, list[str]]:
    """launch/train.py's checks before it trains a row in its own process (a new run, as with
    `--force`): its dependencies have finished, and no row that reads its checkpoint is queued
    or running. Raises GridError; returns the row, told where its dependencies' checkpoints
    are, and the notes a launch would print."""
    uri = tracking_uri_for(tracking_uri, grid.tracking_uri)
    latest = _latest_runs(grid, uri)[1]
    liveness = Liveness(latest)
    decisions = plan_launch(
        grid, latest, rows=[row_id], force=True, is_alive=liveness.alive, requeued=liveness.requeued
    )
    (decision,) = (d for d in decisions if d.row.id == row_id)
    if decision.action != "run":  # SCHEDULED or RUNNING, and alive
        raise GridError(
            [
                f"{grid.file}: row '{decision.row.id}' ({decision.row.label}): {decision.reason}; "
                "launch/train.py would train it a second time beside it: wait for it to finish, "
                "or cancel it first: "
                + grid.command("launch/grid.py", "--cancel", "--rows", row_id)
            ]
        )
    decisions = locate_checkpoints(grid, decisions, latest)
    (row,) = (d.row for d in decisions if d.row.id == row_id)
    return row, stale_after_launch(grid, decisions, latest)


def _latest_runs(grid: Grid, uri: str) -> tuple[Tracker | None, dict[str, RunRecord]]:
    """The store's tracker (None when there is no store yet: nothing is created) and the
    latest run of each content key in the grid's experiment."""
    if not store_exists(uri):
        return None, {}
    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id(grid.experiment)
    return tracker, tracker.latest_by_key(experiment_id) if experiment_id else {}


def _finish(prepared: Prepared, status: int) -> int:
    """The launch run ends with the launch: for SLURM, once every row is queued."""
    prepared.tracker.mark(prepared.parent_run_id, "FINISHED" if status == 0 else "FAILED")
    return status


def _prepare(grid: Grid, options: LaunchOptions) -> Prepared | int:
    """Plan against MLflow and create the runs; an int is an exit status (nothing to run, bad input)."""
    uri = tracking_uri_for(options.tracking_uri, grid.tracking_uri)
    tracker, latest = _latest_runs(grid, uri)
    if tracker is not None and any(never_queued(r) for r in latest.values()):
        latest = recover(grid, latest, tracker)
    liveness = Liveness(latest)
    try:
        decisions = plan_launch(
            grid,
            latest,
            rows=options.rows,
            rerun_failed=options.rerun_failed,
            force=options.force,
            is_alive=liveness.alive,
            requeued=liveness.requeued,
            allow_active_dependencies=options.executor == "slurm",
        )
        decisions = locate_checkpoints(grid, decisions, latest)
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    to_run = [d.row for d in decisions if d.action == "run"]
    print(
        f"grid '{grid.name}' ({grid.file}): {len(to_run)} to run, "
        f"{sum(d.action.startswith('skip') for d in decisions)} skipped; tracking {uri}, "
        f"experiment '{grid.experiment}'"
    )
    resumes = {} if options.force else resumable_runs(decisions)
    describe(decisions, resumes)
    for line in stale_after_launch(grid, decisions, latest):
        print(f"note: {line}")
    if not to_run:
        return 0
    tracker = Tracker(uri)
    for d in decisions:  # a run left open by a dead launcher or job is closed first
        if (
            d.action == "run"
            and d.previous is not None
            and d.previous.status in ("SCHEDULED", "RUNNING")
        ):
            tracker.mark(d.previous.run_id, "KILLED", "its process or job is gone")
    limits = None
    if options.executor == "slurm":
        limits = ThreadPoolExecutor(max_workers=1).submit(
            read_limits, [row.config.resources.qos for row in to_run]
        )
    if grid.smoke:
        from kd.smoke import prepare_smoke_data

        prepare_smoke_data(to_run)
    experiment_id = tracker.ensure_experiment(grid.experiment)
    parent = tracker.create_launch_run(
        experiment_id, grid.name, grid.file, options.executor, len(to_run)
    )
    run_ids: dict[str, str] = {}
    fresh = []
    for d in decisions:
        if d.action != "run":
            continue
        resumable = resumes.get(d.row.id)
        if resumable is not None:
            tracker.reopen_row_run(resumable, executor=options.executor, parent_run_id=parent)
            run_ids[d.row.id] = resumable
        else:
            fresh.append(d.row)
    # All new runs at once: one transaction on a database store (a 1000-row grid in ~1 s,
    # not ~50 s one by one), parallel requests to a tracking server.
    run_ids |= tracker.create_row_runs(
        experiment_id, fresh, executor=options.executor, parent_run_id=parent
    )
    active_deps = {
        d.row.id: d.previous.job_id
        for d in decisions
        if d.action == "skip_active" and d.previous is not None and d.previous.job_id
    }
    return Prepared(grid, to_run, run_ids, tracker, uri, active_deps, parent, limits)


def resumable_runs(decisions: list[Decision]) -> dict[str, str]:
    """Row id -> the run each row of this launch resumes into (rows that start over are left out)."""
    running = running_ids(decisions)
    resumes = {}
    for d in decisions:
        run_id = resumable_run(d, running) if d.action == "run" else None
        if run_id is not None:
            resumes[d.row.id] = run_id
    return resumes


def resumable_run(decision: Decision, running: set[str]) -> str | None:
    """The run of a row that crashed (killed, node lost, time out of requeues) after saving
    state: rerunning it resumes from that state into the same run instead of starting over.
    `--force` starts over, and so does a row whose saved epochs were trained from another run
    of a dependency than the checkpoint it would read now: one the dependency's folder holds
    (the trainer checks the same), or a new one, when the dependency is in `running`."""
    from kd.provenance import checkpoint_run_id
    from kd.rowfiles import saved_state_info

    previous = decision.previous
    if previous is None or previous.status == "FINISHED":
        return None
    info = saved_state_info(decision.row, previous.run_id)
    if info is None:
        return None
    for dep, used in info.get("dependency_runs", {}).items():
        if dep in running:
            return None
        if checkpoint_run_id(dependency_checkpoint(decision.row, dep)) != used:
            return None
    return previous.run_id


def _run_local(prepared: Prepared, options: LaunchOptions, env: dict[str, str]) -> int:
    from slurm.local import LocalExecutor

    grid, to_run, run_ids = prepared.grid, prepared.rows, prepared.run_ids
    record_launch(grid, to_run, run_ids, "local")
    executor = LocalExecutor(
        prepared.tracker, max_parallel=options.max_parallel, live=options.live, env=env
    )
    uri_args = ["--tracking-uri", options.tracking_uri] if options.tracking_uri else []
    try:
        with _interrupts_raise():  # SIGTERM/SIGHUP stop the rows as Ctrl-C does
            result = executor.run(to_run, run_ids)
    except KeyboardInterrupt as exc:  # the executor has stopped the rows and closed their runs
        print(
            f"launch/grid.py: interrupted ({exc or 'Ctrl-C'}): the running rows were stopped; "
            f"rerun with: {grid.command('launch/grid.py', '--rerun-failed', *uri_args)}",
            file=sys.stderr,
        )
        return 130
    print(
        f"done: {len(result.finished)} finished, {len(result.failed)} failed, {len(result.skipped)} not started"
        + (
            f"; rerun with: {grid.command('launch/grid.py', '--rerun-failed', *uri_args)}"
            if not result.ok
            else ""
        )
    )
    return 0 if result.ok else 1


def _submit(prepared: Prepared, options: LaunchOptions, env: dict[str, str]) -> int:
    """Submit every row the cluster accepts now and return at once; hold the others for the
    feeder (slurm/held.py). Each sbatch call's job ids are recorded as soon as it returns; on an
    error or an interrupt (Ctrl-C, SIGTERM, SIGHUP) what was queued is cancelled and the runs
    closed, so no grid is left half-submitted. (A SIGKILL cannot be caught: the next launch
    settles it, see slurm/interrupted.py.)"""
    grid, to_run, run_ids, tracker = (
        prepared.grid,
        prepared.rows,
        prepared.run_ids,
        prepared.tracker,
    )
    folder = Path(to_run[0].config.output_dir).resolve() / SLURM_DIR
    submitted: dict[str, str] = {}
    held: set[str] = set()
    try:
        # sbatch copies this environment into each job: the snapshot on PYTHONPATH
        with _interrupts_raise(), exported(env):
            limits = (
                prepared.limits.result()
                if prepared.limits is not None
                else read_limits(row.config.resources.qos for row in to_run)
            )
            submit_rows(
                to_run,
                run_ids,
                prepared.uri,
                folder=folder,
                existing_jobs=prepared.active_deps,
                array_parallelism=options.array_parallelism,
                submitted=submitted,
                on_queued=queued_recorder(grid, to_run, run_ids, tracker, was_held=False),
                limits=limits,
                held=held,
            )
            if held:
                hold_rows(grid, [r for r in to_run if r.id in held], run_ids, tracker)
    except BaseException as exc:  # KeyboardInterrupt included: nothing may stay half-queued
        return undo_submission(grid, to_run, run_ids, tracker, submitted, exc, prepared.active_deps)
    print(f"submitted {len(submitted)} rows (logs in {folder}):")
    for row in to_run:
        deps = ",".join(row.depends_on) or "-"
        job = submitted.get(row.id) or f"held: {CLUSTER_LIMIT}"
        print(f"  {row.id:<28} {row.label:<12} job {job:<12} after {deps}")
    if held:
        print(
            f"{len(held)} row(s) held: the cluster accepts no more jobs now ({limits.why}, "
            f"{limits.free} free when read); they are submitted as room frees up"
        )
        if options.feeder:
            pid = start_feeder(grid, prepared.uri, options.feed_interval_s, env)
            print(f"  by the feeder, pid {pid} (log {folder / 'feeder.log'}; stop it: kill {pid});")
        print(f"  or by launching the grid again: {grid.command('launch/grid.py')}")
    print(f"follow them with: {status_command(grid, options.tracking_uri)}")
    return 0


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal or SSH session) raise KeyboardInterrupt, as Ctrl-C
    does, so that a submission cut short cleans up after itself. A signal the user chose to
    ignore (`nohup`) stays ignored."""
    from kd.processes import signals_handled

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with signals_handled(
        interrupt, (signal.SIGTERM, signal.SIGHUP), replaces=lambda h: h is signal.SIG_DFL
    ):
        yield


def status_command(grid: Grid, tracking_uri: str | None = None) -> str:
    """The `launch/status.py` command line that shows this grid as it was launched: with the
    same overrides (they change row keys), --smoke and --tracking-uri, quoted for a shell."""
    return grid.command(
        "launch/status.py", *(["--tracking-uri", tracking_uri] if tracking_uri else [])
    )
