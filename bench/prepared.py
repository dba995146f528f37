"""A row's training step for the step and checkpoint benchmarks: its models (random weights:
speed does not depend on them) prepared by `kd.train.prepare_step` exactly as the training loop
prepares them, and synthetic batches of the row's image size (so data loading is excluded)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from bench.common import row_num_classes
from kd.data import build_mixup
from kd.grid import Row
from kd.train import (
    Built,
    batch_normalizers,
    build_models,
    build_scheduler,
    mixed_precision,
    prepare_step,
)


def prepared_step(
    row: Row, dev: torch.device, updates: int, batch_size: int, log: Callable[[str], None]
):
    """The row's models (random weights: speed does not depend on them, and no downloads or
    teacher checkpoints are needed) prepared by `kd.train.prepare_step` as the loop prepares
    them, with a schedule of `updates` updates, for batches of `batch_size`. Returns (models,
    parts, normalize): `normalize` turns the loader's uint8 batches into the student's input."""
    cfg, tcfg = row.config, row.config.train
    num_classes = row_num_classes(row)
    mixup = build_mixup(num_classes, tcfg.mixup, tcfg.cutmix, tcfg.label_smoothing)
    if mixup is not None and batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch size, got {batch_size}")
    torch.manual_seed(tcfg.seed)
    log(f"building {cfg.student.model} + {cfg.teacher.model if cfg.teacher else 'no teacher'}")
    models = build_models(row, num_classes, weights=False)
    precision = mixed_precision(tcfg.precision, dev.type == "cuda")
    accelerator = Accelerator(cpu=dev.type != "cuda", mixed_precision=precision)
    # uint8 images, as the loader hands them over; both loops normalise them on the device
    normalize, test_normalize = batch_normalizers(row.config, models.student_data)
    built = Built(
        student=models.student,
        teacher=models.teacher,
        step_module=models.step_module,
        train_loader=None,
        test_loader=None,
        loader_generator=torch.Generator(),
        mixup=mixup,
        teacher_renorm=models.teacher_renorm,
        num_classes=num_classes,
        train_normalize=normalize,
        test_normalize=test_normalize,
    )
    parts = prepare_step(tcfg, accelerator, built)
    parts.scheduler = build_scheduler(tcfg, parts.raw_optimizer, updates)
    return models, parts, normalize


def synthetic_batches(
    row: Row, dev: torch.device, batch_size: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of random uint8 images of the row's size (as the loader hands them
    over) and random targets, on `dev`; the same ones every call."""
    size, num_classes = row.config.data.img_size, row_num_classes(row)
    shape = (batch_size, 3, size, size)
    gen = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(dev),
            torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev),
        )
        for _ in range(count)
    ]
