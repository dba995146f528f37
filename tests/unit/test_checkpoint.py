"""kd.checkpoint: atomic writes, CPU snapshots of a training state, the background writer."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd import checkpoint

# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def test_atomic_save_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 0}, path)
    checkpoint.atomic_save({"epoch": 1}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_save_keeps_the_previous_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"weights": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def crash_mid_write(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left"):
        checkpoint.atomic_save({"weights": torch.zeros(4)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(torch.load(path)["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


# --------------------------------------------------------------------------------------------
# CPU snapshots
# --------------------------------------------------------------------------------------------


def test_snapshot_is_unchanged_by_training_that_goes_on() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": [{"epoch": 0, "metrics": {"loss": 1.0}}],
        "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    snap = checkpoint.cpu_snapshot(state)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    for _ in range(2):  # training goes on: weights, optimizer moments, BN statistics change
        optimizer.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
    state["history"].append({"epoch": 1})
    state["history"][0]["metrics"]["loss"] = 9.0

    for key, value in expected.items():
        assert torch.equal(snap["model"][key], value), key
        assert not snap["model"][key].is_set_to(model.state_dict()[key])
    assert not torch.equal(snap["model"]["0.weight"], model.state_dict()["0.weight"])
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert snap["history"] == [{"epoch": 0, "metrics": {"loss": 1.0}}]
    # What load_state_dict reads besides the tensors comes along, and the copy loads.
    assert snap["model"]._metadata == model.state_dict()._metadata
    assert isinstance(snap["model"], collections.OrderedDict)
    assert isinstance(snap["rng"]["numpy"], tuple) and snap["rng"]["numpy"][0] == "MT19937"
    restored = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    restored.load_state_dict(snap["model"])
    torch.optim.AdamW(restored.parameters(), lr=0.1).load_state_dict(snap["optimizer"])


# --------------------------------------------------------------------------------------------
# The background writer
# --------------------------------------------------------------------------------------------


def test_writer_runs_jobs_in_order_one_at_a_time_while_the_caller_goes_on() -> None:
    writer = checkpoint.BackgroundWriter()
    release = threading.Event()
    events: list[str] = []

    def slow(name: str) -> None:
        release.wait(timeout=30)
        events.append(name)

    writer.submit(lambda: slow("epoch 1"))
    assert writer.busy  # the caller is back while the job waits
    events.append("caller")
    assert threading.current_thread() is threading.main_thread()
    thread = next(t for t in threading.enumerate() if t.name == "kdgrid-checkpoint")
    assert not thread.daemon  # an exiting process finishes the write in flight
    release.set()
    writer.submit(lambda: events.append("epoch 2"))  # waits for epoch 1 first
    writer.wait()
    assert events == ["caller", "epoch 1", "epoch 2"]
    assert not writer.busy


def test_writer_raises_a_failed_job_at_the_next_wait_or_submit() -> None:
    writer = checkpoint.BackgroundWriter()

    def fail() -> None:
        raise checkpoint.CheckpointWriteError("could not write state.pt: the disk is full")

    writer.submit(fail)
    with pytest.raises(checkpoint.CheckpointWriteError, match="the disk is full"):
        writer.wait()
    writer.wait()  # raised once
    writer.submit(fail)
    ran: list[int] = []
    with pytest.raises(checkpoint.CheckpointWriteError):
        writer.submit(lambda: ran.append(1))  # the failure is reported before the next job
    assert ran == []


def test_finish_quietly_lands_the_write_and_reports_its_error(capsys) -> None:
    writer = checkpoint.BackgroundWriter()
    done: list[str] = []

    def slow_then_fail() -> None:
        time.sleep(0.2)
        done.append("written")
        raise OSError("I/O error")

    writer.submit(slow_then_fail)
    writer.finish_quietly()
    assert done == ["written"]
    assert "writing failed as well: I/O error" in capsys.readouterr().err


SIGNAL_DURING_WAIT = r"""
import os, signal, sys, threading, time
from pathlib import Path
from kd.checkpoint import BackgroundWriter

out = Path(sys.argv[1])
def requeue(signum, frame):  # what submitit's USR2 handler does after requeueing the job
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)

def write():
    time.sleep(1.0)
    out.write_text("epoch 3")

writer = BackgroundWriter()
writer.submit(write)
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2)).start()
threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGUSR2)).start()  # a second one
try:
    writer.wait()  # the training loop waiting for the previous epoch's files
except SystemExit:
    writer.finish_quietly()
    print("landed before exit:", out.exists(), flush=True)
    raise
"""


def test_a_requeue_signal_while_waiting_still_lets_the_write_land(tmp_path) -> None:
    """SystemExit raised by a signal handler while the loop waits for the write in flight
    (submitit's requeue on USR2): the file is written before the process exits."""
    import subprocess
    import sys

    out = tmp_path / "state.txt"
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_WAIT, str(out)],
        cwd=repo, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 255, done.stderr
    assert "landed before exit: True" in done.stdout, (done.stdout, done.stderr)
    assert out.read_text() == "epoch 3"
    assert "waiting for it to land" in done.stderr  # the second signal came while it wrote
