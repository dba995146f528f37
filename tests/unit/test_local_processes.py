"""Unit tests of how the local executor knows its row processes: by request number in the fork
server's protocol, by pid *and* start time in MLflow tags (pids are reused), and an interrupt
that lands while a row starts. The end-to-end cases are in tests/test_launch_local.py."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from kd.processes import process_identity, still_running
from kd.tracking import RunRecord
from kd.tracking.row_run import _transient
from slurm.local import ForkedRow, ForkServer, _interrupts_deferred, local_run_alive
from slurm.status import _local_process_here


def test_a_pid_taken_by_another_process_is_not_the_recorded_one() -> None:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        identity = process_identity(child.pid)
        assert identity is not None and still_running(child.pid, identity)
        earlier = identity.rsplit(":", 1)[0] + ":1"  # the same pid, a process started at boot
        assert not still_running(child.pid, earlier)
        here = {"kdgrid.launch_host": socket.gethostname(), "kdgrid.pid": str(child.pid)}
        assert local_run_alive({**here, "kdgrid.pid_started": identity})
        assert not local_run_alive({**here, "kdgrid.pid_started": earlier})
        assert local_run_alive(here)  # an older record without the start time: the pid alone
        # --cancel signals only the recorded process, and only on its own machine
        record = RunRecord(
            "run", "key", "row", "RUNNING", 0, {**here, "kdgrid.pid_started": identity}
        )
        assert _local_process_here(record)
        assert not _local_process_here(
            RunRecord("run", "key", "row", "RUNNING", 0, {**here, "kdgrid.pid_started": earlier})
        )
        elsewhere = {**record.tags, "kdgrid.launch_host": "login-2"}
        assert not _local_process_here(RunRecord("run", "key", "row", "RUNNING", 0, elsewhere))
    finally:
        child.kill()
        child.wait()
    assert not still_running(child.pid, None)


def test_fork_server_exit_codes_go_by_request_not_by_pid() -> None:
    """Request 1 forked on the pid request 0 had: it runs until its own exit is reported."""
    server = ForkServer.__new__(ForkServer)  # the launcher's side only, reading these lines
    server._exits, server._started, server._changed = {}, [], threading.Condition()
    lines = "started 0 4242\nexited 0 0\n\na library's line at import\nstarted 1 4242\n"
    server._server = SimpleNamespace(stdout=io.StringIO(lines), poll=lambda: None)
    server._read()
    first, second = ForkedRow(server, 0, 4242), ForkedRow(server, 1, 4242)
    assert (first.poll(), second.poll()) == (0, None)
    server._server.stdout = io.StringIO("exited 1 -9\n")
    server._read()
    assert second.poll() == -9


def test_an_interrupt_while_a_row_starts_is_raised_once_it_has_started() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), _interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler has run by now
        steps.append("started")  # the row's process is recorded before the interrupt
    assert steps == ["started"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_full_disk_is_raised_at_once_not_retried_as_an_unanswering_store() -> None:
    assert not _transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not _transient(PermissionError(errno.EACCES, "Permission denied"))
    assert not _transient(TypeError("a bug"))
    assert not _transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert _transient(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert _transient(MlflowException("API request failed", error_code=INTERNAL_ERROR))
    assert _transient(ValueError("a half-sent reply from a restarting server"))
