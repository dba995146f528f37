"""What a row saves each epoch and reads back to resume: best.pt, last.pt, state.pt and
state.json in the row's folder (names from kd.rowfiles), written atomically, in that order of
need: a dependent reads best.pt, a resume reads state.pt, the launcher reads state.json."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd import rowfiles
from kd.checkpoint import atomic_save, cpu_snapshot, write_json
from kd.grid import Row, dependency_checkpoint
from kd.train.step import StepParts


def model_checkpoint(
    row: Row,
    student: dict,
    kd_loss: dict,
    epoch: int,
    val: dict | None,
    num_classes: int,
    run_id: str | None,
) -> dict:
    """A timm/DeiT-style checkpoint ({"model": state_dict}) plus what produced it: the run id
    lets the rows that read it record which run's weights they used (kd/provenance.py)."""
    return {
        "model": student,
        "kd_loss": kd_loss,  # the embed_mse projection, if any
        "arch": row.config.student.model,
        "num_classes": num_classes,
        "img_size": row.config.data.img_size,
        "epoch": epoch,
        "acc1": val["acc1"] if val is not None else None,  # None: not scored (eval_every)
        "row": row.to_dict(),
        "key": row.key,
        "run_id": run_id,
    }


@dataclass
class EpochFiles:
    """What an epoch writes: best.pt (when `improved`) and last.pt hold `model`, state.pt holds
    `state`. Taken by `snapshot_epoch`; written by `write_epoch_files`."""

    epoch: int  # 0-based, as in state.pt
    epochs: int
    model: dict
    state: dict
    improved: bool


def snapshot_epoch(
    row: Row,
    parts: StepParts,
    *,
    epoch: int,
    val: dict | None,
    num_classes: int,
    improved: bool,
    best_acc1: float,
    run_id: str | None,
    history: list[dict],
    dependency_runs: dict[str, str] | None = None,
    copy: bool = True,
) -> EpochFiles:
    """The epoch's checkpoint contents, copied to the CPU (`copy=False`: the live tensors, for
    a write that blocks training anyway), so the next epoch can train while they are written.

    The student's weights are copied once: last.pt and best.pt share state.pt's copy."""
    snapshot = cpu_snapshot if copy else (lambda obj: obj)
    step_module = parts.accelerator.unwrap_model(parts.step_module)
    weights = snapshot(step_module.state_dict())
    model = model_checkpoint(
        row,
        _same_keys(step_module.student.state_dict(), weights, "student."),
        _same_keys(step_module.kd_loss.state_dict(), weights, "kd_loss."),
        epoch,
        val,
        num_classes,
        run_id,
    )
    state = {
        "model": weights,
        "optimizer": snapshot(parts.optimizer.state_dict()),
        "scheduler": snapshot(parts.scheduler.state_dict()),
        "ema": snapshot(parts.ema.state_dict()) if parts.ema is not None else None,
        # fp16's loss scale (None otherwise): a resume restarting it at 65536 would skip steps
        "scaler": scaler_state(parts.accelerator),
        "epoch": epoch,
        "global_step": parts.global_step,
        "best_acc1": best_acc1,
        "run_id": run_id,
        "key": row.key,
        "dependency_runs": dict(dependency_runs or {}),
        "history": snapshot(history),
        "rng": _rng_state(),
    }
    return EpochFiles(epoch, row.config.train.epochs, model, state, improved)


def scaler_state(accelerator: Any) -> dict | None:
    """The fp16 gradient scaler's state (scale, growth tracker), a small dict of numbers."""
    scaler = getattr(accelerator, "scaler", None)
    return dict(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None


def _same_keys(module_state: dict, weights: dict, prefix: str) -> dict:
    """`module_state` (a submodule's state_dict, metadata included) with its tensors taken from
    `weights`, the state_dict of the module that holds it under `prefix`."""
    out = type(module_state)((key, weights[prefix + key]) for key in module_state)
    if hasattr(module_state, "_metadata"):
        out._metadata = module_state._metadata  # type: ignore[attr-defined]
    return out


def write_epoch_files(
    row: Row,
    files: EpochFiles,
    mlrun: Any = None,
    metrics: dict | None = None,
    eta_s: float = math.nan,
    log: Callable[[str], None] | None = None,
    line: str | None = None,
) -> None:
    """state.pt, best.pt (if improved), last.pt, state.json, then the epoch's metrics,
    progress.json and its log `line`: metrics reach MLflow only once the state that holds them
    is on disk, so a resumed run never logs an epoch twice, and the log says an epoch is done
    only once a resume would start after it.

    state.pt is the epoch's commit point, written first: it holds the epoch's checkpoint and
    whether it improved, so a kill before best.pt and last.pt are written leaves files that
    `repair_epoch_files` completes on resume. (Written the other way round, a kill between
    best.pt and state.pt left a best.pt from an epoch the resume then trained again.)"""
    out = row.output_dir
    atomic_save(
        {**files.state, "checkpoint": files.model, "improved": files.improved}, out / rowfiles.STATE
    )  # the checkpoint's tensors are the state's own: torch.save stores them once
    if files.improved:
        atomic_save(files.model, out / rowfiles.BEST)
    atomic_save(files.model, out / rowfiles.LAST)
    write_state_info(row, files.state, files.epochs)
    if mlrun and metrics is not None:
        mlrun.log_metrics(metrics, step=files.epoch + 1)
    write_progress(row, files.epoch + 1, files.epochs, files.model["acc1"], eta_s)
    if log is not None and line is not None:
        log(line)


def write_state_info(row: Row, state: dict, epochs: int) -> None:
    """state.json: what the launcher reads (without torch) to resume a crashed row into its run."""
    write_json(
        row.output_dir / rowfiles.STATE_INFO,
        {
            "run_id": state["run_id"],
            "key": row.key,
            "epoch": state["epoch"] + 1,
            "epochs": epochs,
            "dependency_runs": state.get("dependency_runs", {}),
        },
    )


def saved_epoch(path: Path) -> int | None:
    """The epoch a best.pt or last.pt was saved at (None: missing or unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("epoch")
    except Exception:  # a missing, truncated or foreign file is rewritten from the state
        return None


def repair_epoch_files(row: Row, state: dict) -> list[str]:
    """After a kill inside `write_epoch_files`: rewrite from state.pt the best.pt, last.pt and
    state.json of its epoch that were not written yet, so that the files agree with the
    state a resume starts from. Returns the names rewritten."""
    checkpoint = state.get("checkpoint")
    if checkpoint is None:  # a state.pt of an older version: nothing to repair from
        return []
    out, epoch, fixed = row.output_dir, state["epoch"], []
    if state.get("improved") and saved_epoch(out / rowfiles.BEST) != epoch:
        atomic_save(checkpoint, out / rowfiles.BEST)
        fixed.append(rowfiles.BEST)
    if saved_epoch(out / rowfiles.LAST) != epoch:
        atomic_save(checkpoint, out / rowfiles.LAST)
        fixed.append(rowfiles.LAST)
    write_state_info(row, state, row.config.train.epochs)
    return fixed


def load_state(path: Path, run_id: str | None) -> dict | None:
    """The saved state, if it belongs to this MLflow run (a --force rerun starts afresh)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # written by this project
    if run_id is not None and state.get("run_id") != run_id:
        return None
    return state


class DependencyChanged(RuntimeError):
    """The saved state was trained from another run's checkpoint of a dependency row."""


def check_same_dependencies(row: Row, state: dict, now: dict[str, str]) -> None:
    """A resume must read the teacher (or init) the saved epochs were trained from: a resume
    across a rerun of the dependency would mix two teachers in one run. The launcher starts such
    a row over instead (`resumable_run`); this catches any other way of getting here."""
    for dep, used in state.get("dependency_runs", {}).items():
        # An older file ("unknown") only gets a run id by being written again: a change too.
        if now.get(dep, used) != used:
            raise DependencyChanged(
                f"row '{row.id}': its saved state (epoch {state['epoch'] + 1}) was trained from row "
                f"'{dep}' run {used}, but {dependency_checkpoint(row, dep)} now comes from run "
                f"{now[dep]}; resuming would mix the two. Start the row over: launch/grid.py "
                f"{row.grid_file} (with its overrides{', --smoke' if row.smoke else ''}) "
                f"--rows {row.id} --force"
            )


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def log_missing_epochs(mlrun, history: list[dict]) -> None:
    """Epochs in the saved state whose metrics never reached MLflow: the job died after saving
    an epoch but before logging it, or while metrics waited for an unreachable tracking server.
    They are logged now, so the run's history has every epoch once."""
    try:
        logged = {m.step for m in mlrun.client.get_metric_history(mlrun.run_id, "epoch")}
    except Exception:
        return
    for entry in history:
        if entry["epoch"] + 1 not in logged:
            mlrun.log_metrics(entry["metrics"], step=entry["epoch"] + 1)


def write_progress(row: Row, epoch: int, epochs: int, acc1: float | None, eta_s: float) -> None:
    progress = {"epoch": epoch, "epochs": epochs, "acc1": acc1, "eta_s": eta_s, "time": time.time()}
    write_json(row.output_dir / rowfiles.PROGRESS, progress)


@dataclass
class Resumed:
    """Where training starts: after the saved epoch, or at epoch 0 with nothing saved."""

    start_epoch: int = 0
    best_acc1: float = -1.0
    history: list[dict] = field(default_factory=list)


def restore_state(parts: StepParts, state: dict | None) -> Resumed:
    """Load a saved state into the prepared step (weights, optimizer, scheduler, EMA, fp16
    scale, step count) and say where training goes on; `None` starts from scratch."""
    if state is None:
        return Resumed()
    accelerator = parts.accelerator
    accelerator.unwrap_model(parts.step_module).load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    parts.global_step = state["global_step"]
    return Resumed(state["epoch"] + 1, state["best_acc1"], state.get("history", []))
