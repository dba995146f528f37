"""Which rows a launch runs: the grid, the command-line flags, and what MLflow already holds.

The rules that keep a row from running twice by accident:
  - a row whose content key has a FINISHED run is skipped (`--force` reruns it);
  - a row whose latest run is SCHEDULED or RUNNING, and alive, is not started again; nor is
    one whose run failed but whose job SLURM requeued (a lost node), since it will run again;
  - `--rerun-failed` runs only rows whose latest run FAILED or was KILLED, and the unfinished
    rows that depend on them;
  - every dependency of a row that runs must be finished or run in the same launch;
  - a finished row is not rerun while a row that reads its checkpoint is queued or running
    from an earlier launch (the rerun replaces that checkpoint under it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kd.grid import Grid, GridError, Row
from kd.rowfiles import best_checkpoint
from kd.tracking import ACTIVE, FAILED, RunRecord

Action = Literal["run", "skip_finished", "skip_active", "not_selected"]


@dataclass(frozen=True)
class Decision:
    row: Row
    action: Action
    reason: str
    previous: RunRecord | None = None


def plan_launch(
    grid: Grid,
    latest: Mapping[str, RunRecord],
    *,
    rows: Iterable[str] | None = None,
    rerun_failed: bool = False,
    force: bool = False,
    is_alive: Callable[[RunRecord], bool] = lambda record: True,
    requeued: Callable[[RunRecord], bool] = lambda record: False,
    allow_active_dependencies: bool = False,
) -> list[Decision]:
    """One decision per grid row, in grid order. Raises GridError when a row to run has a
    dependency that is neither finished nor part of this launch."""
    selected = {r.id for r in grid.select(rows)} if rows else {r.id for r in grid.rows}
    if rerun_failed:
        failed = {
            r.id
            for r in grid.rows
            if r.id in selected
            and r.key in latest
            and _is_failed(latest[r.key], is_alive, requeued)
        }
        candidates = grid.dependents(failed)
    else:
        candidates = selected

    decisions = []
    for row in grid.rows:
        previous = latest.get(row.key)
        if row.id not in candidates:
            reason = "not selected" if not rerun_failed else "did not fail"
            if previous is not None:
                reason += f"; latest run {previous.status.lower()}"
            decisions.append(Decision(row, "not_selected", reason, previous))
        elif previous is not None and previous.status in FAILED and requeued(previous):
            decisions.append(
                Decision(
                    row,
                    "skip_active",
                    f"{previous.status.lower()}, but SLURM requeued its job {previous.job_id}",
                    previous,
                )
            )
        elif previous is not None and previous.status in ACTIVE and is_alive(previous):
            job = f" (job {previous.job_id})" if previous.job_id else ""
            decisions.append(
                Decision(row, "skip_active", f"already {previous.status.lower()}{job}", previous)
            )
        elif previous is not None and previous.status == "FINISHED" and not force:
            decisions.append(
                Decision(
                    row,
                    "skip_finished",
                    f"finished in run {previous.run_id} (use --force to rerun)",
                    previous,
                )
            )
        else:
            reason = (
                "forced rerun" if previous is not None and previous.status == "FINISHED" else "new"
            )
            if previous is not None and previous.status != "FINISHED":
                reason = f"rerun (latest run {previous.status.lower()})"
            decisions.append(Decision(row, "run", reason, previous))
    _check_dependencies(grid, decisions, latest, allow_active_dependencies)
    _check_readers(grid, decisions, latest, is_alive, requeued)
    return decisions


def running_ids(decisions: Iterable[Decision]) -> set[str]:
    """Ids of the rows that run in this launch."""
    return {d.row.id for d in decisions if d.action == "run"}


def forced(decision: Decision) -> bool:
    """A finished row run again: its new run replaces the checkpoint other rows read."""
    return (
        decision.action == "run"
        and decision.previous is not None
        and decision.previous.status == "FINISHED"
    )


def _readers(grid: Grid, row_id: str) -> list[Row]:
    """Rows that read this row's checkpoint (its direct dependents)."""
    return [r for r in grid.rows if row_id in r.depends_on]


def _check_readers(
    grid: Grid,
    decisions: list[Decision],
    latest: Mapping[str, RunRecord],
    is_alive: Callable[[RunRecord], bool],
    requeued: Callable[[RunRecord], bool],
) -> None:
    running = running_ids(decisions)
    problems = []
    for decision in filter(forced, decisions):
        for reader in _readers(grid, decision.row.id):
            record = latest.get(reader.key)
            if reader.id in running or record is None:
                continue
            active = (record.status in ACTIVE and is_alive(record)) or (
                record.status in FAILED and requeued(record)
            )
            if active:
                job = f" (job {record.job_id})" if record.job_id else ""
                problems.append(
                    f"{grid.file}: row '{decision.row.id}' ({decision.row.label}): cannot be rerun "
                    f"while row '{reader.id}', which reads its checkpoint, is "
                    f"{record.status.lower()}{job}; wait for it to finish, or cancel it first: "
                    + grid.command("launch/grid.py", "--cancel", "--rows", reader.id)
                )
    if problems:
        raise GridError(problems)


def stale_after_launch(
    grid: Grid, decisions: list[Decision], latest: Mapping[str, RunRecord]
) -> list[str]:
    """A line for each forced row whose finished readers this launch leaves as they are: their
    results come from the checkpoint being replaced (status and the table mark them stale),
    and the launch that reruns them from the new one."""
    running = running_ids(decisions)
    lines = []
    for decision in filter(forced, decisions):
        kept = [
            r.id
            for r in _readers(grid, decision.row.id)
            if r.id not in running and r.key in latest and latest[r.key].status == "FINISHED"
        ]
        if kept:
            rerun = grid.command("launch/grid.py", "--rows", ",".join(kept), "--force")
            lines.append(
                f"row '{decision.row.id}' is rerun; {', '.join(kept)} finished from its earlier "
                f"checkpoint and are kept (status and the table mark them stale). To rerun them "
                f"from the new one once it has finished (on SLURM, at once: they wait for its "
                f"job): {rerun}"
            )
    return lines


def _is_failed(
    record: RunRecord,
    is_alive: Callable[[RunRecord], bool],
    requeued: Callable[[RunRecord], bool],
) -> bool:
    if record.status in FAILED:
        return not requeued(record)
    return record.status in ACTIVE and not is_alive(record)


def _check_dependencies(
    grid: Grid,
    decisions: list[Decision],
    latest: Mapping[str, RunRecord],
    allow_active: bool = False,
) -> None:
    """A row that runs needs each dependency finished or in this launch; on SLURM a dependency
    still queued or running from an earlier launch also does (the new job waits on its job)."""
    running = running_ids(decisions)
    if allow_active:
        running |= {d.row.id for d in decisions if d.action == "skip_active"}
    problems = []
    for decision in decisions:
        if decision.action != "run":
            continue
        for dep_id in decision.row.depends_on:
            dep = grid.row(dep_id)
            record = latest.get(dep.key)
            if dep_id in running or (record is not None and record.status == "FINISHED"):
                continue
            state = "has never run" if record is None else f"is {record.status.lower()}"
            problems.append(
                f"{grid.file}: row '{decision.row.id}' ({decision.row.label}): depends on row '{dep_id}', "
                f"which {state} and is not part of this launch; "
                + (
                    "wait for it to finish"
                    if record is not None and record.status in ACTIVE
                    else f"add it with --rows {','.join(sorted({decision.row.id, dep_id}))} or run it first"
                )
            )
    if problems:
        raise GridError(problems)


def locate_checkpoints(
    grid: Grid, decisions: list[Decision], latest: Mapping[str, RunRecord]
) -> list[Decision]:
    """The decisions, each row to run told where to read its dependencies' best checkpoints:
    a dependency that runs in this launch writes in its own folder; one that does not, in the
    folder of the run that holds its content key (tag kdgrid.output_dir; for older runs, the
    folder of the row id that run was written as, under the dependency's output root). So a
    sweep variant equal to its grid row (the same key) reads the grid row's finished
    checkpoint, and a row reads a dependency with another `output_dir` from there. A finished
    dependency whose checkpoint is gone is a GridError, before anything is submitted: the row
    would fail as it starts."""
    running = running_ids(decisions)
    problems, out = [], []
    for decision in decisions:
        row, dirs = decision.row, {}
        for dep_id in row.depends_on if decision.action == "run" else ():
            dep = grid.row(dep_id)
            record = None if dep_id in running else latest.get(dep.key)
            folder = dep.output_dir
            if record is not None:
                owner = record.row_id or dep_id
                folder = Path(
                    record.tags.get("kdgrid.output_dir") or Path(dep.config.output_dir) / owner
                )
                path = best_checkpoint(folder)
                if record.status == "FINISHED" and not path.is_file():
                    as_row = f" as row '{owner}'" if owner != dep_id else ""
                    problems.append(
                        f"{grid.file}: row '{row.id}' ({row.label}): needs the best checkpoint of "
                        f"row '{dep_id}', which finished in run {record.run_id}{as_row}, at {path}, "
                        f"which does not exist (moved or deleted?); put back the run's MLflow "
                        f"artifact checkpoints/best.pt there, or rerun both: "
                        + grid.command("launch/grid.py", "--rows", f"{dep_id},{row.id}", "--force")
                    )
            if folder != Path(row.config.output_dir) / dep_id:
                dirs[dep_id] = str(folder)
        if dirs:
            row = dataclasses.replace(row, dependency_dirs=tuple(sorted(dirs.items())))
            decision = dataclasses.replace(decision, row=row)
        out.append(decision)
    if problems:
        raise GridError(problems)
    return out
