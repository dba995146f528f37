"""Training one row: `run(row)` builds it, trains it epoch by epoch, checkpoints and resumes.

build.py   student, frozen teacher, KD loss and loaders of a row (before Accelerate)
step.py    one training step (shared with `bench`): optimizer, scheduler, KD terms, backward
state.py   the epoch's files (best.pt, last.pt, state.pt, state.json) and resuming from them
loop.py    the epoch loop, top to bottom: train, evaluate, checkpoint, log
runner.py  run(row): Accelerate, the row's MLflow run, the loop, the run's final status
"""

from kd.train.build import (
    Built,
    DistillationStep,
    Models,
    batch_normalizers,
    build,
    build_loaders,
    build_models,
    freeze_backbone,
    loss_reads_class_head,
    mixed_precision,
    resolve_weights,
)
from kd.train.loop import StopRequested, process_started_at, train
from kd.train.runner import RunCancelled, failure_reason, run, start_row_run
from kd.train.state import (
    DependencyChanged,
    EpochFiles,
    check_same_dependencies,
    load_state,
    model_checkpoint,
    scaler_state,
    snapshot_epoch,
    write_epoch_files,
)
from kd.train.step import (
    NAN_CHECK_EVERY,
    NonFiniteLossError,
    StepParts,
    build_optimizer,
    build_scheduler,
    check_finite,
    epoch_length,
    prepare_step,
    seed_epoch,
    teacher_forward,
    teacher_weights_bf16,
    train_step,
)

__all__ = [
    "NAN_CHECK_EVERY",
    "Built",
    "DependencyChanged",
    "DistillationStep",
    "EpochFiles",
    "Models",
    "NonFiniteLossError",
    "RunCancelled",
    "StepParts",
    "StopRequested",
    "batch_normalizers",
    "build",
    "build_loaders",
    "build_models",
    "build_optimizer",
    "build_scheduler",
    "check_finite",
    "check_same_dependencies",
    "epoch_length",
    "failure_reason",
    "freeze_backbone",
    "load_state",
    "loss_reads_class_head",
    "mixed_precision",
    "model_checkpoint",
    "prepare_step",
    "process_started_at",
    "resolve_weights",
    "run",
    "scaler_state",
    "seed_epoch",
    "snapshot_epoch",
    "start_row_run",
    "teacher_forward",
    "teacher_weights_bf16",
    "train",
    "train_step",
    "write_epoch_files",
]
