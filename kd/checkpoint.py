"""Writing a row's files safely, and without stopping training while they are written.

Every file goes to a temporary name in the same folder, is fsynced and renamed into place, so a
crash mid-write leaves the previous file whole. An epoch's checkpoints are written by a
`BackgroundWriter` from a CPU copy of the state (`cpu_snapshot`): the loop copies the weights
(a fraction of a second) and trains on while the files, 1.7-2.1 GB per epoch for a DeiT-B
row, are serialised, written and fsynced. On CUB-sized epochs (seconds to tens of seconds on
a GPU) writing them in the loop took as long as a good part of the epoch.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEMP_MARK = ".tmp-"  # `.<name>.tmp-<pid>`: a file being written, renamed into place when whole
LOW_SPACE_BYTES = 64 << 20  # less free space than this after a failed write: the disk is full


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is
    kept, and the message says which file, why, and what to do."""


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def write_json(path: Path, data: dict) -> None:
    """As `atomic_save`, for the small JSON beside a checkpoint (state.json: the launcher reads
    it to decide whether a row resumes, so it must survive a node crash as state.pt does)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as handle:
            handle.write(json.dumps(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise CheckpointWriteError(write_failure(path, exc)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash mid-write
    leaves the previous file intact. A failed write (disk full, quota, I/O error) removes the
    temporary file and raises `CheckpointWriteError`, which says so; the previous file stays.
    A process killed mid-write leaves its temporary file behind: the next start of the row
    removes it (`remove_stale_temp_files`)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise CheckpointWriteError(write_failure(path, exc)) from exc
    except RuntimeError as exc:  # torch's zip writer reports a failed write as RuntimeError
        if "PytorchStreamWriter" not in str(exc) and "write" not in str(exc).lower():
            raise
        raise CheckpointWriteError(write_failure(path, exc)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make a rename into `folder` durable."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_failure(path: Path, exc: BaseException) -> str:
    """What went wrong writing `path`, what is left, and what to do."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "PytorchStreamWriter" in detail:
        detail = detail[detail.index("PytorchStreamWriter") :]
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = (
        getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left" in detail
        or (free is not None and free < LOW_SPACE_BYTES)
    )
    kept = (
        f"the previous {path.name} is kept"
        if path.exists()
        else f"there was no earlier {path.name}"
    )
    left = f", {free / 2**20:.1f} MiB free" if free is not None else ""
    return (
        f"could not write {path}: {'the disk is full: ' if full else ''}{detail}{left}; {kept}. "
        f"Free space in {path.parent} (df -h {path.parent}) or move output_dir, then rerun the "
        "row (launch/grid.py GRID --rerun-failed): it resumes from its last saved epoch"
    )


def remove_stale_temp_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """Temporary files of `names` left by an earlier process of this row that was killed
    mid-write (SIGKILL, node lost): the whole files beside them are what counts."""
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}{TEMP_MARK}*"):
            if tmp.name != temp_path(folder / name).name:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def cpu_snapshot(obj: Any) -> Any:
    """`obj` (state dicts, lists, RNG states) with every tensor copied to the CPU and every
    container copied, so training can go on changing the originals while the copy is written.

    Containers keep their type and attributes (a state_dict's `_metadata`, module versions
    that `load_state_dict` reads); other objects that are not plain values are deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same type and attributes; the values are replaced below
        for key, value in obj.items():
            out[key] = cpu_snapshot(value)
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [cpu_snapshot(value) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Runs write jobs in a thread, one at a time and in order, while the caller goes on.

    `submit` waits for the job before it (so the files of epoch N land before those of epoch
    N+1) and raises that job's error, if it failed; `wait` does the same for the last job.
    The caller calls `wait` before taking the next snapshot, so one copy is held at a time.

    Waiting is on an Event, not `Thread.join`: on CPython 3.10-3.12 a signal handler that
    raises while `join` waits (submitit's requeue on USR2 raises SystemExit) marks the thread
    as stopped, and neither a second `join` nor the interpreter's exit waits for it any more.
    `finish_quietly` waits through such interruptions until the write in flight has landed.
    """

    def __init__(self, name: str = "kdgrid-checkpoint") -> None:
        self._name = name
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._done.clear()
        thread = threading.Thread(target=self._run, args=(job,), name=self._name)
        thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # handed to the caller by wait()
            self._error = exc
        finally:
            self._done.set()

    @property
    def busy(self) -> bool:
        return not self._done.is_set()

    def wait(self) -> None:
        """Block until the job in flight is done; raise its error if it failed."""
        self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def finish_quietly(self) -> None:
        """`wait`, for a caller already failing or exiting: the write in flight still lands,
        through further interruptions (a second USR2, Ctrl-C), and its own error, if any, is
        printed rather than raised over the first one."""
        while True:
            try:
                self.wait()
                return
            except (KeyboardInterrupt, SystemExit) as exc:
                if self.busy:
                    print(
                        f"[checkpoint] {type(exc).__name__} while a checkpoint is being "
                        "written: waiting for it to land",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                print(f"[checkpoint] writing failed as well: {exc!r}", file=sys.stderr)
                return
            except BaseException as exc:  # noqa: BLE001 - reported, the caller's error goes on
                print(f"[checkpoint] writing failed as well: {exc}", file=sys.stderr, flush=True)
                return
