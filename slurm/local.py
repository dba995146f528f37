"""The local executor: rows as separate processes on this machine, in dependency order.

Used when there is no SLURM (or with `--executor local`). Each row runs `python -m slurm.job`
in its own process, so a crash in one row cannot take the others or the launcher down; at most
`max_parallel` run at once and CPU threads are shared out between them. A row whose dependency
failed is not started: its MLflow run is marked KILLED with the reason, so `--rerun-failed`
picks it up later. Progress (rows done/running/pending; epoch and ETA per running row) is
redrawn in place on a terminal and printed as plain lines in a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kd.grid import Row
from kd.tracking import TAG, Tracker
from kd.train import PROGRESS_FILE
from slurm.job import write_row_file

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.5


@dataclass
class RowProcess:
    row: Row
    run_id: str
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)


@dataclass
class LocalResult:
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # a dependency failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


class LocalExecutor:
    def __init__(
        self,
        tracker: Tracker,
        *,
        max_parallel: int = 2,
        out: Callable[[str], None] | None = None,
        live: bool | None = None,
    ):
        self.tracker = tracker
        self.max_parallel = max(1, max_parallel)
        self.out = out or (lambda text: print(text, flush=True))
        self.live = sys.stdout.isatty() if live is None else live
        self._drawn_lines = 0

    def run(self, rows: Sequence[Row], run_ids: Mapping[str, str]) -> LocalResult:
        """Run `rows` (dependencies first) and wait for all of them."""
        pending = _critical_first(rows)
        in_launch = {r.id for r in rows}
        running: dict[str, RowProcess] = {}
        result = LocalResult()
        threads = max(1, (os.cpu_count() or 1) // min(self.max_parallel, max(len(rows), 1)))
        try:
            while pending or running:
                for row in list(pending):
                    blocked = [
                        d for d in row.depends_on if d in in_launch and d not in result.finished
                    ]
                    failed_deps = [d for d in blocked if d in result.failed or d in result.skipped]
                    if failed_deps:
                        pending.remove(row)
                        reason = f"not started: dependency row(s) {', '.join(failed_deps)} did not finish"
                        self.tracker.mark(run_ids[row.id], "KILLED", reason)
                        result.skipped.append(row.id)
                        self._event(f"[{row.id}] {reason}")
                    elif not blocked and len(running) < self.max_parallel:
                        pending.remove(row)
                        running[row.id] = self._start(row, run_ids[row.id], threads)
                for row_id, proc in list(running.items()):
                    code = proc.process.poll()
                    if code is None:
                        continue
                    del running[row_id]
                    status = self._final_status(proc, code)
                    (result.finished if status == "FINISHED" else result.failed).append(row_id)
                    took = time.time() - proc.started
                    detail = "" if status == "FINISHED" else f" (exit {code}; log: {proc.log_path})"
                    self._event(f"[{row_id}] {status.lower()} in {took:.0f}s{detail}")
                self._draw(rows, pending, running, result)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop_all(running, "launcher interrupted (Ctrl-C)")
            for row in pending:
                self.tracker.mark(
                    run_ids[row.id], "KILLED", "launcher interrupted before the row started"
                )
            raise
        self._draw(rows, pending, running, result, final=True)
        return result

    def _start(self, row: Row, run_id: str, threads: int) -> RowProcess:
        row_file = write_row_file(row)
        log_path = row.output_dir / "train.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "slurm.job",
            str(row_file),
            "--run-id",
            run_id,
            "--tracking-uri",
            self.tracker.uri,
        ]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.tracker.set_tags(
            run_id, {f"{TAG}.pid": str(process.pid), f"{TAG}.job_id": f"local-{process.pid}"}
        )
        self._event(f"[{row.id}] started (pid {process.pid}, log {log_path})")
        return RowProcess(row, run_id, process, log_path)

    def _final_status(self, proc: RowProcess, code: int) -> str:
        """The MLflow run is the truth; a process killed before it could record its end is failed."""
        status = self.tracker.run_status(proc.run_id)
        if status in ("SCHEDULED", "RUNNING"):
            reason = f"process exited with code {code} before the run ended; see {proc.log_path}"
            self.tracker.mark(proc.run_id, "FAILED", reason)
            return "FAILED"
        if code != 0 and status == "FINISHED":
            return "FAILED"
        return status

    def _stop_all(self, running: Mapping[str, RowProcess], reason: str) -> None:
        for proc in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.process.pid, signal.SIGTERM)
        for proc in running.values():
            try:
                proc.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.process.pid, signal.SIGKILL)
            if self.tracker.run_status(proc.run_id) in ("SCHEDULED", "RUNNING"):
                self.tracker.mark(proc.run_id, "KILLED", reason)

    # -- progress ----------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        self._clear()
        self.out(text)

    def _clear(self) -> None:
        if self.live and self._drawn_lines:
            sys.stdout.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _draw(self, rows, pending, running, result: LocalResult, final: bool = False) -> None:
        if not self.live:
            return
        self._clear()
        lines = [
            f"rows: {len(result.finished)} finished, {len(result.failed)} failed, "
            f"{len(result.skipped)} skipped, {len(running)} running, {len(pending)} pending"
        ]
        if not final:
            for proc in running.values():
                lines.append("  " + _progress_line(proc))
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._drawn_lines = 0 if final else len(lines)


def _critical_first(rows: Sequence[Row]) -> list[Row]:
    """Rows that more rows (transitively) wait on start first; otherwise grid order."""
    waiting: dict[str, set[str]] = {r.id: set() for r in rows}
    for row in rows:
        stack = list(row.depends_on)
        while stack:
            dep = stack.pop()
            if dep in waiting and row.id not in waiting[dep]:
                waiting[dep].add(row.id)
                stack.extend(next((r.depends_on for r in rows if r.id == dep), ()))
    order = {r.id: i for i, r in enumerate(rows)}
    return sorted(rows, key=lambda r: (-len(waiting[r.id]), order[r.id]))


def _progress_line(proc: RowProcess) -> str:
    path = proc.row.output_dir / PROGRESS_FILE
    elapsed = time.time() - proc.started
    try:
        progress = json.loads(path.read_text())
        if progress.get("time", 0) < proc.started:
            raise ValueError("stale")
        return (
            f"{proc.row.id}: epoch {progress['epoch']}/{progress['epochs']} acc1 {progress['acc1']:.1f} "
            f"eta {progress['eta_s']:.0f}s"
        )
    except (OSError, ValueError, KeyError):
        return f"{proc.row.id}: starting ({elapsed:.0f}s)"


def local_run_alive(tags: Mapping[str, str]) -> bool:
    """Is the local process of a SCHEDULED/RUNNING run still there? (False for a crashed launcher.)"""
    import socket

    if tags.get(f"{TAG}.launch_host") != socket.gethostname():
        return True  # another machine's run: assume it is alive
    pid = tags.get(f"{TAG}.pid")
    if pid is None:
        launcher = tags.get(f"{TAG}.launcher_pid")
        pid = launcher
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
