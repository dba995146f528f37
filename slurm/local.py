"""The local executor: rows as separate processes on this machine, in dependency order.

Used when there is no SLURM (or with `--executor local`). Each row runs `python -m slurm.job`
in its own process, so a crash in one row cannot take the others or the launcher down; at most
`max_parallel` run at once and CPU threads are shared out between them (at most a row's
`resources.cpus_per_task` each). A row whose dependency
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kd.grid import Row
from kd.inject import LOCAL_START_PAUSE, pause
from kd.processes import process_identity, signals_handled, still_running
from kd.rowfiles import PROGRESS, TRAIN_LOG
from kd.tracking import TAG, Tracker
from slurm.job import write_row_file

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.5
# What every row process imports before its first step: about 5 s of a tiny row's 6 s from
# process start to first step on 2 CPU cores. A fork server imports them once per launch and
# forks each row process from itself (`python -m slurm.local` is that server).
PRELOAD = (
    "torch",
    "timm",
    "accelerate",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "kd.train",
    "kd.models.build",  # kd.models imports timm lazily: its heavy modules by name
    "kd.models.weights",
    "kd.evaluate",
    "kd.data",
    "slurm.job",
)
FORKSERVER_ENV = "KDGRID_LOCAL_FORKSERVER"  # "0": every row starts a fresh interpreter
# A row's exit code when it ended after the fork server was gone (nobody reaped it to tell):
# its MLflow run says how it went.
EXIT_UNKNOWN = -1000


class ForkServer:
    """Launcher side of the fork server: `start(argv, log, env)` forks a row process running
    `python -m slurm.job ARGV` and returns a Popen-like handle (`pid`, `poll`, `wait`)."""

    def __init__(self, env: Mapping[str, str]):
        import threading

        self._server = subprocess.Popen(
            [sys.executable, "-m", "slurm.local"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(env),
            text=True,
            bufsize=1,
        )
        # By request number, not pid: pids are reused (32768 of them by default), and a row
        # forked on an earlier row's pid must not inherit its exit code.
        self._exits: dict[int, int] = {}
        self._started: list[int] = []  # pid of each request, in request order
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._server.stdout:
            words = line.split()
            if len(words) != 3 or not all(w.lstrip("-").isdigit() for w in words[1:]):
                continue  # not the protocol (a library printing as it was imported)
            what, number, value = words[0], int(words[1]), int(words[2])
            with self._changed:
                if what == "started":  # requests are answered in order: `number` is the next
                    self._started.append(value)
                elif what == "exited":
                    self._exits[number] = value
                self._changed.notify_all()
        with self._changed:  # the server is gone
            self._changed.notify_all()

    def start(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> ForkedRow:
        request = {"argv": list(argv), "log": str(log_path), "env": dict(env)}
        with self._changed:
            count = len(self._started)
            self._server.stdin.write(json.dumps(request) + "\n")
            self._server.stdin.flush()
            while len(self._started) == count:
                if self._server.poll() is not None:
                    raise RuntimeError("the local fork server exited; see the launcher's output")
                self._changed.wait(1.0)
            return ForkedRow(self, count, self._started[count])

    def exit_code(self, number: int) -> int | None:
        """The exit code of the `number`th row started (None while it runs; EXIT_UNKNOWN when
        it ended after the server was gone)."""
        with self._changed:
            if number in self._exits:
                return self._exits[number]
            if self._server.poll() is None:
                return None
            pid = self._started[number]
        try:  # the server is gone: the row process runs on, without anyone to report it
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return EXIT_UNKNOWN
        except PermissionError:
            return None

    def wait_exit(self, number: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.time() + timeout
        while True:
            code = self.exit_code(number)
            if code is not None or (deadline is not None and time.time() >= deadline):
                return code
            with self._changed:
                self._changed.wait(0.2)

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.stdin.close()  # the server exits when its input ends
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()


class ForkedRow:
    """A row process forked by the fork server, with Popen's `pid`, `poll` and `wait`."""

    def __init__(self, server: ForkServer, number: int, pid: int):
        self._server = server
        self._number = number  # the server's request number
        self.pid = pid

    def poll(self) -> int | None:
        return self._server.exit_code(self._number)

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self._number, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"row process {self.pid}", timeout or 0)
        return code


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait for the end of the block, then raise KeyboardInterrupt:
    a row process forked in it is then known to the launcher, which stops it. (Not in the main
    thread, signals cannot be handled here, and nothing is deferred.)"""
    caught: list[int] = []
    with signals_handled(
        lambda signum, frame: caught.append(signum),
        (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
        replaces=lambda current: current not in (signal.SIG_IGN, None),  # `nohup` stays
    ):
        yield
    if caught:
        raise KeyboardInterrupt(signal.Signals(caught[0]).name)


def serve() -> None:
    """The fork server (`python -m slurm.local`): import PRELOAD once, then for each JSON
    request on stdin fork a row process and print `started N PID`; print `exited N CODE` when
    it ends (N: the request's number, from 0; CODE < 0: killed by that signal); exit when stdin
    closes."""
    import importlib
    import selectors

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    for name in PRELOAD:
        importlib.import_module(name)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    children: dict[int, int] = {}  # pid -> request number
    requests = 0
    open_input = True
    while open_input or children:
        if open_input and selector.select(timeout=0.2):
            line = sys.stdin.readline()
            if not line:
                open_input = False
                selector.unregister(sys.stdin)
            elif line.strip():
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _forked_row(request["argv"], request["log"], request["env"])
                children[pid] = requests
                print(f"started {requests} {pid}", flush=True)
                requests += 1
        elif not open_input:
            time.sleep(0.2)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                number = children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if open_input:
                    print(f"exited {number} {code}", flush=True)


def _forked_row(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    """In the forked row process: its own session (so that it is killed as a group), the
    executor's environment, output into the row's log, then the row job's entry point."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(env)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process ends below)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if env.get("OMP_NUM_THREADS", "").isdigit():  # torch was imported before it was set
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from slurm.job import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@dataclass
class RowProcess:
    row: Row
    run_id: str
    process: subprocess.Popen | ForkedRow
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
        env: Mapping[str, str] | None = None,
    ):
        self.tracker = tracker
        # the launch's job environment: its code snapshot on PYTHONPATH (slurm.jobenv)
        self.env = dict(env or {})
        self.max_parallel = max(1, max_parallel)
        self.out = out or (lambda text: print(text, flush=True))
        self.live = sys.stdout.isatty() if live is None else live
        self._drawn_lines = 0
        self._fork_server: ForkServer | None = None

    def run(self, rows: Sequence[Row], run_ids: Mapping[str, str]) -> LocalResult:
        """Run `rows` (dependencies first) and wait for all of them."""
        pending = _critical_first(rows)
        in_launch = {r.id for r in rows}
        running: dict[str, RowProcess] = {}
        result = LocalResult()
        threads = max(1, (os.cpu_count() or 1) // min(self.max_parallel, max(len(rows), 1)))
        if rows and hasattr(os, "fork") and os.environ.get(FORKSERVER_ENV, "1") != "0":
            # imports while we plan, from the launch's code snapshot
            self._fork_server = ForkServer(row_env(threads, self.env))
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
                        if self.tracker.run_status(run_ids[row.id]) != "SCHEDULED":
                            # `launch/grid.py --cancel` while it waited: KILLED, not started
                            result.skipped.append(row.id)
                            self._event(f"[{row.id}] not started: its run was cancelled")
                            continue
                        self._inject_start_pause(row, run_ids[row.id])
                        # an interrupt waits until the row's process is known, to be stopped
                        with _interrupts_deferred():
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
        except BaseException as exc:  # Ctrl-C, SIGTERM/SIGHUP (raised as one), any error
            what = (
                f"launcher interrupted ({exc or 'Ctrl-C'})"
                if isinstance(exc, KeyboardInterrupt)
                else f"launcher failed: {type(exc).__name__}: {exc}"
            )
            self._stop_all(running, what)
            for row in pending:
                self.tracker.mark(run_ids[row.id], "KILLED", f"{what} before the row started")
            raise
        finally:
            if self._fork_server is not None:
                self._fork_server.close()
                self._fork_server = None
        self._draw(rows, pending, running, result, final=True)
        return result

    def _inject_start_pause(self, row: Row, run_id: str) -> None:
        """Fault injection (tests): the window between the check above and the row's start."""
        pause(
            LOCAL_START_PAUSE,
            until=lambda: self.tracker.run_status(run_id) != "SCHEDULED",
            log=lambda text: self._event(f"[{row.id}] {text}"),
        )

    def _start(self, row: Row, run_id: str, threads: int) -> RowProcess:
        row_file = write_row_file(row)
        log_path = row.output_dir / TRAIN_LOG
        env = row_env(row_threads(threads, row), self.env)
        args = [str(row_file), "--run-id", run_id, "--tracking-uri", self.tracker.uri]
        process: subprocess.Popen | ForkedRow
        if self._fork_server is not None:
            process = self._fork_server.start(args, log_path, env)
        else:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "slurm.job", *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        tags = {f"{TAG}.pid": str(process.pid), f"{TAG}.job_id": f"local-{process.pid}"}
        if (identity := process_identity(process.pid)) is not None:
            tags[f"{TAG}.pid_started"] = identity  # tells this process from a later one
        self.tracker.set_tags(run_id, tags)
        self._event(f"[{row.id}] started (pid {process.pid}, log {log_path})")
        if self.tracker.cancelled(run_id):
            # `--cancel` since the check before the start, and it may have read the run before
            # its pid was there: stopped here (a process not yet in its own group checks the
            # cancel itself when it opens its run)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        return RowProcess(row, run_id, process, log_path)

    def _final_status(self, proc: RowProcess, code: int) -> str:
        """The MLflow run is the truth; a process killed before it could record its end is failed."""
        status = self.tracker.run_status(proc.run_id)
        if status in ("SCHEDULED", "RUNNING"):
            reason = f"process exited with code {code} before the run ended; see {proc.log_path}"
            self.tracker.mark(proc.run_id, "FAILED", reason)
            return "FAILED"
        if code not in (0, EXIT_UNKNOWN) and status == "FINISHED":
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
                with contextlib.suppress(ProcessLookupError):
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


def row_threads(shared: int, row: Row) -> int:
    """The CPU threads a row gets: its share of the cores, but no more than it asks for
    (`resources.cpus_per_task`), as on SLURM (slurm.job). A 1-CPU row run with 2 OpenMP threads
    on a busy 2-core machine spent 7-20x the CPU time spinning."""
    return max(1, min(shared, row.config.resources.cpus_per_task))


def row_env(threads: int, launch_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a row process: the project importable (from the launch's code
    snapshot when `launch_env` names one, else from this checkout), CPU threads shared out."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(launch_env or {})
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
    path = proc.row.output_dir / PROGRESS
    elapsed = time.time() - proc.started
    try:
        progress = json.loads(path.read_text())
        if progress.get("time", 0) < proc.started:
            raise ValueError("stale")
        acc1 = progress["acc1"]  # None after an epoch that was not scored (train.eval_every)
        return (
            f"{proc.row.id}: epoch {progress['epoch']}/{progress['epochs']} "
            f"acc1 {'-' if acc1 is None else format(acc1, '.1f')} eta {progress['eta_s']:.0f}s"
        )
    except (OSError, ValueError, KeyError):
        return f"{proc.row.id}: starting ({elapsed:.0f}s)"


def local_run_alive(tags: Mapping[str, str]) -> bool:
    """Is the local process of a SCHEDULED/RUNNING run still there? (False for a crashed
    launcher, or for a pid that another process has taken since.)"""
    import socket

    if tags.get(f"{TAG}.launch_host") != socket.gethostname():
        return True  # another machine's run: assume it is alive
    pid, identity = tags.get(f"{TAG}.pid"), tags.get(f"{TAG}.pid_started")
    if pid is None:  # not started yet: its launcher starts it, if alive
        pid, identity = tags.get(f"{TAG}.launcher_pid"), tags.get(f"{TAG}.launcher_started")
    if pid is None or not pid.isdigit():
        return False
    return still_running(int(pid), identity)


if __name__ == "__main__":
    serve()
