"""Faults: nothing finished is lost, nothing is run twice, and the user is told what happened.

- a row killed with SIGKILL mid-training is rerun by `--rerun-failed` from its last saved
  epoch, into the same MLflow run, with every epoch logged exactly once;
- a process killed while writing a checkpoint leaves the previous one whole (and its temporary
  file is removed at the next start); a write that fails does the same, at once;
- a disk that fills up between epochs fails the row with "the disk is full" and the file, keeps
  the last epoch's checkpoints, and the row resumes from them once there is space;
- a tracking server that does not answer when a row starts: retries with backoff, then the row
  fails naming the URI; one that restarts mid-run: no metric is lost (they are queued);
- a truncated image fails the row naming the file, or, with `data.skip_corrupt`, is left out
  and counted in `data/skipped_images`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from kd import checkpoint, rowfiles, train
from kd.data import DatasetError, generate_dataset
from kd.grid import load_grid
from kd.tracking import RowRun, Tracker, TrackingUnavailable
from kd.train import loop as train_loop
from slurm.job import write_row_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
EPOCHS = 12  # the kill lands 0-2 epochs after epoch 2 is seen: room to spare

GRID = """\
name: faults
experiment: kd-faults
defaults:
  student: {{model: deit_tiny_patch16_224, drop_path: 0.0}}
  init: scratch
  data: {{dataset: imagefolder, root: {root}, img_size: 32, num_workers: 0}}
  train: {{epochs: {epochs}, batch_size: 4, warmup_epochs: 0, auto_augment: null}}
  resources: {{gpus_per_node: 0}}
  output_dir: {out}
rows:
  - {{id: victim, label: V}}
"""


def launch(workdir: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "grid.py"),
            "grid.yaml",
            *args,
            "--executor",
            "local",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkilled_row_resumes_into_the_same_run(tmp_path, fault):
    spec = generate_dataset(
        "imagefolder", tmp_path / "data", num_classes=2, train_per_class=8, image_size=32
    )
    out = tmp_path / "out"
    (tmp_path / "grid.yaml").write_text(GRID.format(root=spec.root, out=out, epochs=EPOCHS))
    first = launch(tmp_path)
    state_info = out / "victim" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state_info.exists() and json.loads(state_info.read_text())["epoch"] >= 2:
            break
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kd-faults")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    os.kill(int(run.data.tags["kdgrid.pid"]), signal.SIGKILL)  # the row's process, mid-training
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 1, output
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    saved = json.loads(state_info.read_text())["epoch"]
    assert 2 <= saved < EPOCHS

    rerun = launch(tmp_path, "--rerun-failed")
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    assert "resumes its saved state" in output
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kdgrid.key` != ''")
    assert [r.info.run_id for r in runs] == [run.info.run_id], "the rerun must land in the same run"
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    assert final.data.tags["kdgrid.resumed"] == "1"
    assert "exited with code" in final.data.tags["kdgrid.previous_failure"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc1"))
    assert steps == list(range(1, EPOCHS + 1)), "every epoch logged exactly once"
    log = (out / "victim" / "train.log").read_text()
    assert f"resuming after epoch {saved}/{EPOCHS}" in log
    fault.lost = 0  # every check of the data above passed
    fault.detail = (
        f"killed after epoch {saved}/{EPOCHS}; --rerun-failed resumed it into the same run"
    )


# ---------------------------------------------------------------------------------------------
# Shared helpers: a tiny row on generated data, run in this process (as a job runs it) or as
# `python -m slurm.job` (the job's own entry point)

TINY = "test_resnet"  # timm's 0.4M-parameter ResNet: 1.5 MB checkpoints


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: one intra-op thread per training process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_row(folder: Path, data_root: Path, *, epochs: int = 2, out: Path | None = None, **data):
    """A one-row grid on `data_root` (an ImageFolder copy), loaded and validated."""
    text = yaml.safe_dump(
        {
            "name": "f",
            "experiment": f"kd-faults-{folder.name}",
            "defaults": {
                "student": {"model": TINY, "drop_path": 0.0},
                "init": "scratch",
                "data": {
                    "dataset": "imagefolder",
                    "root": str(data_root),
                    "img_size": 32,
                    "num_workers": 0,
                    **data,
                },
                "train": {"epochs": epochs, "batch_size": 4, "warmup_epochs": 0, "lr": 1e-3,
                          "auto_augment": None},
                "resources": {"gpus_per_node": 0},
                "output_dir": str(out or folder / "out"),
            },
            "rows": [{"id": "r", "label": "R"}],
        }
    )  # fmt: skip
    (folder / "grid.yaml").write_text(text)
    return load_grid(folder / "grid.yaml").rows[0]


def new_run(uri: str, row, artifacts: Path | None = None) -> str:
    """The row's MLflow run, created as the launcher creates it (SCHEDULED, before the job)."""
    tracker = Tracker(uri)
    if tracker.experiment_id(row.experiment) is None:
        location = str(artifacts) if artifacts else None  # a server keeps its own artifacts
        tracker.client.create_experiment(row.experiment, artifact_location=location)
    return tracker.create_row_run(tracker.experiment_id(row.experiment), row, executor="local")


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra


def start_job(row, run_id: str, uri: str, **env: str) -> subprocess.Popen:
    """`python -m slurm.job`: what the local executor and every SLURM job run for a row."""
    return subprocess.Popen(
        [sys.executable, "-m", "slurm.job", str(write_row_file(row)), "--run-id", run_id,
         "--tracking-uri", uri],
        cwd=REPO, env=job_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{checkpoint.TEMP_MARK}*"))


# ---------------------------------------------------------------------------------------------
# A crash while a checkpoint is being written

SLOW_SAVE = r"""
import sys, time
from pathlib import Path
import torch
from kd import checkpoint

path = Path(sys.argv[1])
checkpoint.atomic_save({"epoch": 1, "weights": torch.arange(8.0)}, path)

class SlowFile:
    '''A file whose writes trickle: the process is still inside torch.save when it is killed.'''
    def __init__(self, name, mode):
        self.handle = open(name, mode)
    def write(self, data):
        written = self.handle.write(data)
        self.handle.flush()
        time.sleep(0.02)
        return written
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

checkpoint.open = SlowFile  # what atomic_save opens its temporary file with
print("saving epoch 2", flush=True)
checkpoint.atomic_save({"epoch": 2, "weights": torch.zeros(2_000_000)}, path)
print("saved epoch 2", flush=True)
"""


def test_process_killed_mid_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, fault):
    path = tmp_path / rowfiles.STATE
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(path)], cwd=REPO, env=job_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "saving epoch 2"
    temp = tmp_path / f".{path.name}{checkpoint.TEMP_MARK}{child.pid}"
    deadline = time.time() + 60
    while not (temp.exists() and temp.stat().st_size > 100_000):  # well into the write
        assert child.poll() is None and time.time() < deadline, child.communicate()[0]
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # The previous checkpoint is whole and is what a resume reads (weights only, as a foreign
    # file would be read); the half-written one is only the killed process's temporary file.
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(8.0))
    assert train.load_state(path, None)["epoch"] == 1
    assert temp_files(tmp_path) == [temp.name]
    # The next start of the row removes what the killed process left, and saves again.
    assert checkpoint.remove_stale_temp_files(tmp_path, rowfiles.CHECKPOINTS) == [temp]
    assert temp_files(tmp_path) == []
    checkpoint.atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    fault.lost = 0  # every check of the data above passed
    fault.detail = "SIGKILL mid torch.save: the previous state.pt loads (weights_only); the temp file is removed"


def test_write_error_inside_torch_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / rowfiles.LAST
    checkpoint.atomic_save({"model": {"w": torch.ones(3)}}, path)

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.atomic_save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert str(path) in message and "PytorchStreamWriter failed writing" in message
    assert "the previous last.pt is kept" in message and "--rerun-failed" in message
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Disk full while checkpointing


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 16 MiB tmpfs, and `fill()` to leave it no free byte. Where tmpfs cannot be
    mounted (not root), `fill()` makes every later checkpoint write (kd.checkpoint) fail with ENOSPC instead."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
            capture_output=True, check=False,
        ).returncode
        == 0
    )  # fmt: skip
    patches = pytest.MonkeyPatch()

    def fill() -> None:
        if mounted:
            fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                for chunk in (1 << 20, 4096):  # MiBs, then the last pages
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, b"\0" * chunk)
            finally:
                os.close(fd)
            return

        def full_open(name, mode="r", *args, **kwargs):
            if "w" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
            return open(name, mode, *args, **kwargs)

        patches.setattr(checkpoint, "open", full_open, raising=False)

    def free() -> None:
        (folder / "filler").unlink(missing_ok=True)
        patches.undo()

    yield folder, fill, free
    patches.undo()
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_disk_full_while_checkpointing_fails_clearly_and_keeps_the_last_epoch(
    tmp_path, small_disk, one_thread, fault
):
    folder, fill, free = small_disk
    data = generate_dataset("imagefolder", tmp_path / "data", num_classes=2, image_size=16)
    row = tiny_row(tmp_path, Path(data.root), epochs=3, out=folder / "out")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = new_run(uri, row, tmp_path / "artifacts")
    epochs_done = []

    def after_epoch() -> bool:  # polled by the loop after each epoch is saved
        epochs_done.append(json.loads((row.output_dir / rowfiles.STATE_INFO).read_text()))
        if len(epochs_done) == 1:
            fill()  # the disk fills up between epoch 1 and epoch 2's checkpoint
        return False

    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        train.run(row, run_id=run_id, tracking_uri=uri, stop_requested=after_epoch, log=print)
    message = str(info.value)
    assert "the disk is full" in message and str(row.output_dir) in message
    assert "is kept" in message and "--rerun-failed" in message
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "CheckpointWriteError" in run.data.tags["kdgrid.failure_reason"]
    assert "the disk is full" in run.data.tags["kdgrid.failure_reason"]
    # Epoch 1's checkpoints are whole and loadable; nothing half-written is left.
    assert train.load_state(row.output_dir / rowfiles.STATE, run_id)["epoch"] == 0
    for name in (rowfiles.BEST, rowfiles.LAST):
        assert torch.load(row.output_dir / name, weights_only=False)["epoch"] in (0, 1)
    assert temp_files(folder) == []

    free()  # space again: the row resumes after epoch 1, into the same run, and finishes
    train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val/acc1"))
    assert steps == [1, 2, 3]
    fault.lost = 0  # every check of the data above passed
    fault.detail = (
        "a 1 MB tmpfs filled between epochs: CheckpointWriteError, epoch 1 kept, resumed once freed"
    )


def test_disk_full_under_the_background_writer_fails_the_row_and_keeps_the_last_epoch(
    tmp_path, small_disk, one_thread, monkeypatch, fault
):
    """As a row runs in production (no stop_requested): epoch 2's files, written while epoch 3
    trains, hit a full disk; the error is raised at epoch 3's end, epoch 1 is what is kept, and
    epoch 2's metrics never reach MLflow (its state did not land)."""
    folder, fill, free = small_disk
    data = generate_dataset("imagefolder", tmp_path / "data", num_classes=2, image_size=16)
    row = tiny_row(tmp_path, Path(data.root), epochs=3, out=folder / "out")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = new_run(uri, row, tmp_path / "artifacts")
    real_write = train.write_epoch_files

    def write_then_fill(row_, files, *args, **kwargs):
        real_write(row_, files, *args, **kwargs)
        if files.epoch == 0:
            fill()  # the disk fills up right after epoch 1's files landed

    monkeypatch.setattr(train_loop, "write_epoch_files", write_then_fill)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    message = str(info.value)
    assert "the disk is full" in message and "is kept" in message
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "the disk is full" in run.data.tags["kdgrid.failure_reason"]
    assert train.load_state(row.output_dir / rowfiles.STATE, run_id)["epoch"] == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/acc1")) == [1]
    assert temp_files(folder) == []

    free()
    monkeypatch.undo()
    train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/acc1")) == [1, 2, 3]
    fault.lost = 0  # every check of the data above passed
    fault.detail = "background write hit a full disk: FAILED at the next epoch end, epoch 1 kept"


# ---------------------------------------------------------------------------------------------
# The tracking server: unreachable when a row starts, restarted mid-run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tracking_server_unreachable_at_start_fails_the_row_after_retries(tmp_path, fault):
    data = generate_dataset("imagefolder", tmp_path / "data", num_classes=2, image_size=16)
    row = tiny_row(tmp_path, Path(data.root))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    job = start_job(
        row, "0123456789abcdef0123456789abcdef", uri,
        KDGRID_TRACKING_RETRIES="4", KDGRID_TRACKING_BACKOFF_S="0.5",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )  # fmt: skip
    output = job.communicate(timeout=300)[0]
    took = time.time() - started
    assert job.returncode == 1, output
    assert "Traceback" not in output, output
    failure = next(line for line in output.splitlines() if "FAILED" in line)
    assert "TrackingUnavailable" in failure and uri in failure
    assert "failed 4 times over" in failure and "Connection refused" in failure
    assert "launch/server.py status" in failure and "--rerun-failed" in failure
    assert took >= 0.5 + 1 + 2  # it waited: 0.5 s, then 1 s, then 2 s between the 4 attempts
    assert not (row.output_dir / rowfiles.STATE).exists(), "nothing trained"
    fault.lost = 0  # every check of the data above passed
    fault.detail = f"4 attempts over {took:.1f}s, then FAILED naming {uri}; nothing trained"


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_tracking_server_restart_mid_run_loses_no_metric(tmp_path, fault):
    from slurm import server

    data = generate_dataset(
        "imagefolder", tmp_path / "data", num_classes=2, train_per_class=40, image_size=16
    )
    epochs = 6
    row = tiny_row(tmp_path, Path(data.root), epochs=epochs)
    folder, port = tmp_path / "mlflow-server", free_port()
    uri = server.start_local(folder, "127.0.0.1", port, workers=1)["uri"]
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = new_run(uri, row)
        job = start_job(row, run_id, uri, KDGRID_TRACKING_BACKOFF_S="0.5")
        state_info = row.output_dir / rowfiles.STATE_INFO

        def saved_epoch() -> int:
            return json.loads(state_info.read_text())["epoch"] if state_info.exists() else 0

        def wait_for(done, what: str) -> None:
            deadline = time.time() + 300
            while not done():
                assert job.poll() is None, f"the job ended while waiting for {what}: " + str(
                    job.communicate()[0]
                )
                assert time.time() < deadline, what
                time.sleep(0.05)

        # The run has started and the models are built (their sizes are logged): training.
        wait_for(lambda: client.get_metric_history(run_id, "model/params"), "the models")
        server.stop(folder)  # the server goes away as the row starts training ...
        wait_for(lambda: port_closed(port), "the server to stop")
        down_at = saved_epoch()
        wait_for(lambda: saved_epoch() >= down_at + 1, "an epoch to end while it is down")
        assert saved_epoch() < epochs
        server.start_local(folder, "127.0.0.1", port, workers=1)  # ... and comes back
        output = job.communicate(timeout=600)[0]
        assert job.returncode == 0, output
        assert "did not take" in output and "answers again" in output, output
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for name in ("val/acc1", "train/loss", "epoch"):
            history = client.get_metric_history(run_id, name)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), name
        fault.lost = 0  # every check of the data above passed
        fault.detail = f"server down from epoch {down_at}; metrics queued and sent: epochs 1..{epochs} each once"
    finally:
        server.stop(folder)


class FlakyClient:
    """An MlflowClient stand-in whose log_batch fails while `down`."""

    def __init__(self):
        self.down = False
        self.batches: list[list] = []

    def log_batch(self, run_id, metrics=()):
        if self.down:
            raise MlflowException("API request failed: [Errno 111] Connection refused")
        self.batches.append(list(metrics))

    def set_tag(self, *args):
        if self.down:
            raise MlflowException("API request failed: [Errno 111] Connection refused")

    def set_terminated(self, *args, **kwargs):
        pass


def test_row_run_queues_metrics_while_the_store_is_away_and_sends_them_in_order(capsys):
    run = RowRun("http://127.0.0.1:9", "run", retries=2, backoff_s=0.01)
    run.client = FlakyClient()
    run.log_metrics({"val/acc1": 1.0}, step=1)
    run.client.down = True
    run.log_metrics({"val/acc1": 2.0}, step=2)  # returns at once: kept
    run.log_metrics({"val/acc1": 3.0}, step=3)
    assert "did not take" in capsys.readouterr().out
    run.client.down = False
    run.log_metrics({"val/acc1": 4.0}, step=4)
    assert "answers again" in capsys.readouterr().out
    sent = [(m.step, m.value) for batch in run.client.batches for m in batch]
    assert sent == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    stamps = [m.timestamp for batch in run.client.batches for m in batch]
    assert stamps == sorted(stamps)  # each metric keeps the time it was logged at


def test_row_run_gives_up_with_the_uri_and_raises_bad_requests_at_once():
    run = RowRun("http://127.0.0.1:9", "run", retries=3, backoff_s=0.01)
    run.client = FlakyClient()
    run.client.down = True
    run.log_metrics({"a": 1.0}, step=1)
    with pytest.raises(TrackingUnavailable, match=r"http://127.0.0.1:9 did not answer: log_batch"):
        run.finish("FINISHED")  # finishing waits for the queued metrics, then gives up
    calls = []

    def bad_request(*args, **kwargs):
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="no such run"):
        run._retry(bad_request)
    assert len(calls) == 1, "retrying cannot fix a bad request"


# ---------------------------------------------------------------------------------------------
# A truncated or corrupt image


@pytest.fixture
def damaged_copy(tmp_path):
    """An ImageFolder copy with one truncated training image."""
    spec = generate_dataset(
        "imagefolder", tmp_path / "data", num_classes=2, train_per_class=6, image_size=16
    )
    victim = sorted((Path(spec.root) / "train" / "class_1").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return Path(spec.root), victim


def test_corrupt_image_fails_the_row_naming_the_file(tmp_path, damaged_copy, one_thread, fault):
    root, victim = damaged_copy
    row = tiny_row(tmp_path, root, num_workers=2)  # raised in a loader worker process
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = new_run(uri, row, tmp_path / "artifacts")
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    assert str(victim) in str(info.value)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    reason = run.data.tags["kdgrid.failure_reason"]
    assert run.info.status == "FAILED"
    assert reason.startswith("DatasetError: cannot decode image") and str(victim) in reason
    assert "data.skip_corrupt: true" in reason and "Traceback" not in reason
    fault.lost = 0  # every check of the data above passed
    fault.detail = f"FAILED naming {victim.name}; reason recorded in MLflow"


def test_corrupt_image_is_skipped_and_counted_when_the_grid_says_so(
    tmp_path, damaged_copy, one_thread, capfd, fault
):
    root, victim = damaged_copy
    row = tiny_row(tmp_path, root, num_workers=2, skip_corrupt=True)
    plain = tiny_row(tmp_path, root)
    assert row.key == plain.key, "skip_corrupt is not part of the content key"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = new_run(uri, row, tmp_path / "artifacts")
    train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    skipped = client.get_metric_history(run_id, "data/skipped_images")
    assert sorted((m.step, m.value) for m in skipped) == [(1, 1.0), (2, 1.0)]
    output = capfd.readouterr()
    assert "1 corrupt image(s) left out so far" in output.out and str(victim) in output.out
    assert output.err.count(f"skipped (data.skip_corrupt): cannot decode image {victim}") >= 1
    fault.lost = 0  # every check of the data above passed
    fault.detail = (
        "data.skip_corrupt: the image left out and counted (data/skipped_images), the row finished"
    )


def test_a_finished_row_started_again_leaves_its_run_alone(tmp_path, one_thread, capsys, fault):
    """A finished row's job started again: the run, its state and history are left alone.

    SLURM may start a job again after it finished (a requeue's SIGTERM is ignored by submitit
    until the kill wait ends, long enough to finish a short row): the second start must
    neither reopen the run nor train."""
    data = generate_dataset("imagefolder", tmp_path / "data", num_classes=2, image_size=16)
    row = tiny_row(tmp_path, Path(data.root), epochs=2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = new_run(uri, row, tmp_path / "artifacts")
    first = train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    client = MlflowClient(tracking_uri=uri)
    before = client.get_run(run_id)
    state_written = (row.output_dir / rowfiles.STATE).stat().st_mtime_ns
    capsys.readouterr()

    again = train.run(row, run_id=run_id, tracking_uri=uri, log=print)
    assert "already finished in run" in capsys.readouterr().out
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags["kdgrid.started_at_ms"] == before.data.tags["kdgrid.started_at_ms"]
    assert (row.output_dir / rowfiles.STATE).stat().st_mtime_ns == state_written
    assert again["val/acc1"] == first["val/acc1"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val/acc1"))
    assert steps == [1, 2]
    fault.lost = 0  # every check of the data above passed
    fault.detail = "the second start returned the run's metrics; run, state and history untouched"
