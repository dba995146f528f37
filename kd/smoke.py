"""`--smoke`: any grid, shrunk to run on a laptop CPU in minutes, with the same row graph.

Every model becomes a tiny model of the same family (`kd.models.SMOKE_MODELS`), built from
scratch (no downloads); every dataset becomes a small copy generated in its real on-disk layout;
images are 32 px, 2 epochs, batch 8, no data-loading workers. The datasets clustered after
training (`evaluate.cluster`) become generated copies too (the training data's own copy when it
is the same dataset). The KD terms, the dependency edges, the recipes' optimiser settings and
everything else stay as the grid says, so a smoke run exercises the same code paths as the real
one. Smoke rows log to `<experiment>-smoke`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kd import config as C
from kd.data.registry import DATASETS

SMOKE_IMG_SIZE = 32
SMOKE_EPOCHS = 2
SMOKE_BATCH_SIZE = 8
SMOKE_CLASSES = 4


def smoke_data_root(output_dir: str, dataset: str) -> Path:
    return Path(output_dir) / "smoke-data" / dataset


def smoke_row(cfg: C.RowConfig, grid_name: str) -> C.RowConfig:
    """The smoke version of one row config."""
    from kd.models import smoke_model_name

    output_dir = str(Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + "-smoke"))
    # where generate_dataset puts the copy's root (and dogs_root) in its folder
    root, dogs_root = DATASETS[cfg.data.dataset].roots_in(
        smoke_data_root(output_dir, cfg.data.dataset)
    )
    data = dataclasses.replace(
        cfg.data,
        root=root,
        dogs_root=dogs_root,
        img_size=SMOKE_IMG_SIZE,
        num_workers=0,
    )
    train = dataclasses.replace(
        cfg.train,
        epochs=min(cfg.train.epochs, SMOKE_EPOCHS),
        batch_size=SMOKE_BATCH_SIZE,
        grad_accum_steps=1,
        warmup_epochs=min(cfg.train.warmup_epochs, 1.0),
        compile=False,
    )
    student = dataclasses.replace(cfg.student, model=smoke_model_name(cfg.student.model))
    init = cfg.init
    if init.source in ("pretrained", "file"):
        init = C.InitConfig(source="scratch")
    teacher = cfg.teacher
    if teacher is not None:
        teacher = dataclasses.replace(
            teacher,
            model=smoke_model_name(teacher.model) if teacher.model else None,
            file=None,
            pretrained=False,
        )
    evaluate = dataclasses.replace(
        cfg.evaluate,
        cluster={name: str(smoke_data_root(output_dir, name)) for name in cfg.evaluate.cluster},
    )
    resources = dataclasses.replace(
        cfg.resources, gpus_per_node=0, cpus_per_task=1, mem_gb=2, time_min=30
    )
    return dataclasses.replace(
        cfg,
        student=student,
        init=init,
        teacher=teacher,
        data=data,
        train=train,
        evaluate=evaluate,
        resources=resources,
        output_dir=output_dir,
    )


def prepare_smoke_data(rows) -> None:
    """Generate each smoke dataset once, before any row starts (rows then only read it)."""
    from kd.data import generate_dataset

    done: set[tuple[str, str]] = set()
    for row in rows:
        # the training dataset, and the datasets clustered after training (`evaluate.cluster`)
        for name in (row.config.data.dataset, *row.config.evaluate.cluster):
            target = smoke_data_root(row.config.output_dir, name)
            if (name, str(target)) in done:
                continue
            generate_dataset(name, target, num_classes=SMOKE_CLASSES, image_size=48, seed=0)
            done.add((name, str(target)))
