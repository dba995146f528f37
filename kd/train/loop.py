"""The epoch loop of one row: train, evaluate, checkpoint, log; it reads top to bottom in `train`.

Every epoch the full training state is written atomically to `<row dir>/state.pt` together with
the MLflow run id, so a killed or requeued job resumes at the next epoch into the same MLflow
run. The loop copies the state to the CPU and trains on while a background thread writes it
(`kd.checkpoint`); the epoch's metrics reach MLflow once its state is on disk. Randomness is
re-seeded from (seed, epoch) at the start of every epoch, which makes a resumed run
bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
import torch

from kd import data as D
from kd import provenance, rowfiles
from kd.checkpoint import BackgroundWriter, remove_stale_temp_files
from kd.cluster import log_clustering
from kd.config import first_of
from kd.evaluate import evaluate
from kd.grid import Row
from kd.train.build import Built
from kd.train.state import (
    Resumed,
    check_same_dependencies,
    load_state,
    log_missing_epochs,
    repair_epoch_files,
    restore_state,
    snapshot_epoch,
    write_epoch_files,
)
from kd.train.step import (
    NAN_CHECK_EVERY,
    StepParts,
    build_scheduler,
    check_finite,
    epoch_length,
    prepare_step,
    seed_epoch,
    train_step,
)

_IMPORTED_AT = time.time()


class StopRequested(Exception):
    """Raised between epochs when the job was asked to stop (preemption, time limit)."""


@dataclass
class RowTraining:
    """What every part of one row's training shares: the row, its prepared step and MLflow run."""

    row: Row
    built: Built
    parts: StepParts
    mlrun: Any  # kd.tracking.RowRun on the main process, else None
    run_id: str | None
    log: Callable[[str], None]

    @property
    def main(self) -> bool:
        return self.parts.accelerator.is_main_process


def train(
    row: Row,
    accelerator: Any,
    built: Built,
    mlrun: Any,
    run_id: str | None,
    stop_requested: Callable[[], bool] | None,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Train `row` from its saved state (or from scratch) to its last epoch; the final metrics."""
    tcfg = row.config.train
    parts = prepare_step(tcfg, accelerator, built)
    t = RowTraining(row, built, parts, mlrun, run_id, log)
    train_loader, test_loader = prepare_loaders(t)
    # Counted on the prepared loader: with several processes each one iterates its shard only.
    steps_per_epoch, updates_per_epoch = epoch_length(len(train_loader), tcfg)
    parts.scheduler = build_scheduler(tcfg, parts.raw_optimizer, updates_per_epoch)
    resumed = resume(t)
    best_acc1, history = resumed.best_acc1, resumed.history
    startup = Startup(t)
    skipped = SkippedImages(t)
    started = time.time()
    writer = BackgroundWriter()
    try:
        for epoch in range(resumed.start_epoch, tcfg.epochs):
            epoch_start = time.time()
            seed_epoch(tcfg.seed, epoch, accelerator.process_index, built.loader_generator)
            built.train_loader.dataset.seed_augmentations(tcfg.seed, epoch)
            metrics = train_one_epoch(t, train_loader, steps_per_epoch, epoch, startup)
            parts.scheduler.step(epoch + 1)
            if epoch == resumed.start_epoch and startup.seconds is not None:
                metrics["time/startup_s"] = startup.seconds
            val = evaluate_epoch(t, test_loader, metrics) if scored(tcfg, epoch) else None
            if row.config.data.skip_corrupt:
                metrics["data/skipped_images"] = skipped.count_and_report()
            metrics["epoch"] = epoch + 1
            improved = val is not None and val["acc1"] > best_acc1
            if val is not None:
                best_acc1 = max(best_acc1, val["acc1"])
                metrics["val/best_acc1"] = best_acc1
            history.append({"epoch": epoch, "metrics": metrics})
            if t.main:
                eta = (time.time() - started) / (epoch + 1 - resumed.start_epoch)
                eta *= tcfg.epochs - epoch - 1
                save_epoch(t, writer, epoch, val, improved, best_acc1, history, epoch_start, eta)
                if stop_requested is not None:
                    writer.wait()  # before the barrier: no process stops while this one writes
            accelerator.wait_for_everyone()
            if stop_requested is not None and stop_requested() and epoch + 1 < tcfg.epochs:
                state_path = row.output_dir / rowfiles.STATE
                raise StopRequested(f"stopped after epoch {epoch + 1}; state saved at {state_path}")
        writer.wait()  # the last epoch's files land before the run is finished
    except BaseException:
        writer.finish_quietly()  # the epoch in flight still lands; the first error goes on
        raise
    after_training(t)
    final = history[-1]["metrics"] if history else {}
    return {k: v for k, v in final.items() if isinstance(v, (int, float))}


def prepare_loaders(t: RowTraining) -> tuple[Any, Any]:
    """The loaders wrapped by Accelerate, normalised on the device, the test split cached."""
    cfg, accelerator = t.row.config, t.parts.accelerator
    train_loader, test_loader = accelerator.prepare(t.built.train_loader, t.built.test_loader)
    # The test split is read every epoch (twice with EMA) through the same deterministic
    # transform: this process's shard of its uint8 images is kept after the first pass.
    D.cache_split(
        test_loader, (3, cfg.data.img_size, cfg.data.img_size), limit_gb=cfg.data.eval_cache_gb
    )
    return (
        D.NormalizedBatches(train_loader, t.built.train_normalize),
        D.NormalizedBatches(test_loader, t.built.test_normalize),
    )


def resume(t: RowTraining) -> Resumed:
    """Restore the row's saved state when it is this run's, after checking that it was trained
    from the same dependency checkpoints; tag the run with the dependencies it reads."""
    row, accelerator = t.row, t.parts.accelerator
    if accelerator.is_main_process:
        remove_stale_temp_files(row.output_dir, rowfiles.CHECKPOINTS)
    state_path = row.output_dir / rowfiles.STATE
    state = load_state(state_path, t.run_id)
    if state is not None:
        check_same_dependencies(row, state, t.built.dependency_runs)
    if t.mlrun and t.built.dependency_runs:  # once a resume is known not to mix two teachers
        t.mlrun.set_tags(
            {provenance.dependency_tag(d): r for d, r in t.built.dependency_runs.items()}
        )
    resumed = restore_state(t.parts, state)
    if state is not None:
        if accelerator.is_main_process:
            for name in repair_epoch_files(row, state):
                t.log(f"[{row.id}] {name} rewritten from {state_path}: the last save was cut short")
        epochs = row.config.train.epochs
        t.log(f"[{row.id}] resuming after epoch {state['epoch'] + 1}/{epochs} from {state_path}")
        if t.mlrun and resumed.history:
            log_missing_epochs(t.mlrun, resumed.history)
    return resumed


def train_one_epoch(
    t: RowTraining, loader: Any, steps: int, epoch: int, startup: Startup
) -> dict[str, float]:
    """One pass over (at most `steps` batches of) the training loader: the mean of each loss
    term over every process's steps, the learning rate and the throughput."""
    parts = t.parts
    accelerator = parts.accelerator
    parts.step_module.train()
    sums: dict[str, torch.Tensor] = {}
    seen, start = 0, time.time()
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        startup.first_step()
        losses = train_step(parts, images, targets)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value
        seen += images.shape[0]
        if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == steps:
            check_finite(sums, epoch, step, accelerator)
    check_finite(sums, epoch, steps - 1, accelerator)
    train_time = time.time() - start
    metrics = mean_over_processes(sums, steps, accelerator)
    # The peak group's lr: with layer decay, group 0 is the most scaled-down layer.
    metrics["train/lr"] = max(group["lr"] for group in parts.optimizer.param_groups)
    metrics["train/img_per_s"] = seen * accelerator.num_processes / max(train_time, 1e-9)
    metrics["time/train_s"] = train_time
    return metrics


def mean_over_processes(
    sums: dict[str, torch.Tensor], steps: int, accelerator: Any
) -> dict[str, float]:
    """`train/<term>`: each summed term's mean per step, over every process's steps."""
    names = sorted(sums)
    local = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64, device=accelerator.device) for k in names]
    )
    totals = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
    return {
        f"train/{k}": float(v) / max(steps, 1) for k, v in zip(names, totals.tolist(), strict=True)
    }


def scored(tcfg: Any, epoch: int) -> bool:
    """Is the 0-based `epoch` evaluated? Every `train.eval_every`-th one, and always the last,
    whose metrics are the row's result."""
    return (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == tcfg.epochs


def evaluate_epoch(t: RowTraining, test_loader: Any, metrics: dict[str, float]) -> dict:
    """Score the student (and its EMA) on the test split; adds `val/*` to `metrics`."""
    accelerator, tcfg = t.parts.accelerator, t.row.config.train
    start = time.time()
    val = evaluate(t.parts.student, test_loader, accelerator, limit=tcfg.limit_eval_batches)
    metrics |= {"val/acc1": val["acc1"], "val/acc5": val["acc5"], "val/loss": val["loss"]}
    if t.parts.ema is not None:
        ema = evaluate(t.parts.ema.module, test_loader, accelerator, limit=tcfg.limit_eval_batches)
        metrics |= {"val_ema/acc1": ema["acc1"], "val_ema/acc5": ema["acc5"]}
    metrics["time/eval_s"] = time.time() - start
    return val


def save_epoch(
    t: RowTraining,
    writer: BackgroundWriter,
    epoch: int,
    val: dict | None,
    improved: bool,
    best_acc1: float,
    history: list[dict],
    epoch_start: float,
    eta_s: float,
) -> None:
    """Copy the epoch's checkpoint to the CPU now (a fraction of a second) and hand it to the
    writer, which writes it, then logs the epoch's metrics, while the next epoch trains.
    `val` is None for an epoch that was not scored (`train.eval_every`)."""
    checkpoint_start = time.time()
    writer.wait()  # the previous epoch's files: one copy in memory at a time
    files = snapshot_epoch(
        t.row,
        t.parts,
        epoch=epoch,
        val=val,
        num_classes=t.built.num_classes,
        improved=improved,
        best_acc1=best_acc1,
        run_id=t.run_id,
        history=history,
        dependency_runs=t.built.dependency_runs,
    )
    metrics = history[-1]["metrics"]
    # Where the epoch's time went: what training waited for its checkpoint, and the whole
    # epoch (training, evaluation, checkpoint, the rest).
    timing = {
        "time/checkpoint_s": time.time() - checkpoint_start,
        "time/epoch_s": time.time() - epoch_start,
    }
    metrics |= timing
    files.state["history"][-1]["metrics"] |= timing  # the copy being written
    epochs = t.row.config.train.epochs
    scores = (
        f"acc1 {val['acc1']:.2f} acc5 {val['acc5']:.2f} val_loss {val['loss']:.4f}"
        if val is not None
        else "not evaluated (train.eval_every)"
    )
    line = (
        f"[{t.row.id}] epoch {epoch + 1}/{epochs} loss {metrics['train/loss']:.4f} {scores} "
        f"{metrics['train/img_per_s']:.1f} img/s eta {hms(eta_s)}"
    )
    writer.submit(partial(write_epoch_files, t.row, files, t.mlrun, metrics, eta_s, t.log, line))


def after_training(t: RowTraining) -> None:
    """Cluster the embeddings when the row asks for it; attach best.pt and last.pt to the run."""
    row, accelerator = t.row, t.parts.accelerator
    if not accelerator.is_main_process:
        return
    if row.config.evaluate.cluster:
        log_clustering(row, t.parts.student, t.mlrun, device=accelerator.device, log=t.log)
    if t.mlrun:
        for name in (rowfiles.BEST, rowfiles.LAST):
            if (row.output_dir / name).is_file():
                t.mlrun.log_artifact(row.output_dir / name, "checkpoints")


class Startup:
    """Seconds from the process start to the first training step, measured and logged once."""

    def __init__(self, t: RowTraining):
        self.seconds: float | None = None
        self._t = t

    def first_step(self) -> None:
        if self.seconds is not None:
            return
        self.seconds = time.time() - process_started_at()
        if self._t.main:
            self._t.log(
                f"[{self._t.row.id}] first step {self.seconds:.1f} s after the process started"
            )


class SkippedImages:
    """Corrupt images left out so far (`data.skip_corrupt`), by any process, both splits; the
    log names new ones as they are met."""

    def __init__(self, t: RowTraining):
        self._t = t
        self._reported = 0

    def count_and_report(self) -> int:
        skipped = self.paths()
        if self._t.main and len(skipped) > self._reported:
            self._t.log(
                f"[{self._t.row.id}] {len(skipped)} corrupt image(s) left out so far "
                f"(data.skip_corrupt): {first_of(skipped)}"
            )
        self._reported = len(skipped)
        return len(skipped)

    def paths(self) -> list[str]:
        accelerator = self._t.parts.accelerator
        skipped = []
        for loader in (self._t.built.train_loader, self._t.built.test_loader):
            dataset = loader.dataset
            flags = getattr(dataset, "corrupt", None)
            if flags is None:
                continue
            if accelerator.num_processes > 1:  # each process flags what its own shard met
                flags = accelerator.gather(flags.int().to(accelerator.device)[None]).amax(0).cpu()
            skipped += [str(dataset.samples[i][0]) for i in flags.nonzero().flatten().tolist()]
        return skipped


def process_started_at() -> float:
    """When this process started (epoch seconds): start-up costs include the imports."""
    try:
        return psutil.Process().create_time()
    except Exception:  # /proc unreadable: count from the import of kd.train
        return _IMPORTED_AT


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
