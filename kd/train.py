"""run(row): build -> Accelerate prepare -> train/evaluate each epoch -> checkpoint; resumable.

One loop that reads top to bottom. Every epoch the full training state is written atomically
to `<row dir>/state.pt` together with the MLflow run id, so a killed or requeued job resumes
at the next epoch into the same MLflow run. The loop copies the state to the CPU and trains on
while a background thread writes it (`kd.checkpoint`); the epoch's metrics reach MLflow once
its state is on disk. Randomness is re-seeded from (seed, epoch) at the
start of every epoch, which makes a resumed run bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kd import config as C
from kd import provenance
from kd.checkpoint import (
    BackgroundWriter,
    atomic_save,
    cpu_snapshot,
    remove_stale_temp_files,
    write_json,
)
from kd.grid import Row, dependency_checkpoint

STATE_FILE = "state.pt"
STATE_INFO_FILE = "state.json"  # run id, key and epoch of state.pt, readable without torch
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
PROGRESS_FILE = "progress.json"
ROW_FILES = (STATE_FILE, STATE_INFO_FILE, BEST_FILE, LAST_FILE, PROGRESS_FILE)
_IMPORTED_AT = time.time()
NAN_CHECK_EVERY = 10  # steps between finiteness checks (each check syncs the GPU)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the row fails, with the reason recorded in MLflow."""


class StopRequested(Exception):
    """Raised between epochs when the job was asked to stop (preemption, time limit)."""


@dataclass
class Built:
    """Everything a row trains with, before Accelerate wraps it."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    step_module: torch.nn.Module
    train_loader: Any
    test_loader: Any
    loader_generator: torch.Generator
    mixup: Callable | None
    teacher_renorm: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    # The loaders give uint8 batches; these make them the student's input on the device.
    train_normalize: Callable[[torch.Tensor], torch.Tensor]
    test_normalize: Callable[[torch.Tensor], torch.Tensor]
    # Dependency row id -> the MLflow run whose checkpoint the teacher or init was read from.
    dependency_runs: dict[str, str] = field(default_factory=dict)


class DistillationStep(torch.nn.Module):
    """Student + KD loss in one module, so DDP sees every trainable parameter (the student and
    the embed_mse projection) in one forward and synchronises all their gradients."""

    def __init__(
        self, student: torch.nn.Module, kd_loss: torch.nn.Module, feature_layer: str | None
    ):
        super().__init__()
        self.student = student
        self.kd_loss = kd_loss
        self.feature_layer = feature_layer

    def forward(
        self, images, targets, teacher_logits=None, teacher_emb=None
    ) -> dict[str, torch.Tensor]:
        from kd.losses import LossInputs
        from kd.models import forward_with_embedding

        out = forward_with_embedding(self.student, images, feature_layer=self.feature_layer)
        inputs = LossInputs(
            logits=out.logits,
            dist_logits=out.dist_logits,
            targets=targets,
            teacher_logits=teacher_logits,
            student_emb=out.embedding,
            teacher_emb=teacher_emb,
        )
        return self.kd_loss(inputs)


def run(
    row: Row,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    stop_requested: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train one row to the end (or resume it) and return its final metrics.

    `run_id` is the row's MLflow run (created by the launcher); None means create one here.
    `stop_requested` is polled between epochs, once the epoch's files are written; when it
    returns True `StopRequested` is raised so the caller can requeue.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        broadcast_object_list,
        set_seed,
    )

    from kd import tracking

    cfg = row.config
    log = log or _print
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision(cfg.train.precision, cuda),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        # Pinned batches are copied to the GPU while the previous step still runs.
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=not loss_reads_class_head(cfg))
        ],
    )
    main = accelerator.is_main_process
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if run_id is None and main:
        tracker = tracking.Tracker(uri)
        run_id = tracker.create_row_run(
            tracker.ensure_experiment(row.experiment), row, executor="inline"
        )
    if accelerator.num_processes > 1:
        # Only the main process created the run; every process needs its id, since whether a
        # saved state is resumed depends on it, and all must make the same decision.
        run_id = broadcast_object_list([run_id], from_process=0)[0]
    mlrun = tracking.RowRun(uri, run_id) if main and run_id else None
    out_dir = row.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _finished_already(row, run_id, mlrun) if main else None
    if accelerator.num_processes > 1:
        done = broadcast_object_list([done], from_process=0)[0]
    if done is not None:
        log(f"[{row.id}] already finished in run {run_id}; nothing to do")
        accelerator.end_training()
        return done
    try:
        if mlrun:
            mlrun.start(
                {
                    "kdgrid.started_at_ms": str(
                        int(time.time() * 1000)
                    ),  # start_time is the launch
                    "kdgrid.world_size": str(accelerator.num_processes),
                    "kdgrid.device": str(accelerator.device),
                },
                system_metrics=True,
            )
        set_seed(cfg.train.seed)
        built = build(row, accelerator)
        if mlrun:
            from kd.models import count_params

            sizes = {"model/params": count_params(built.student)}
            if built.teacher is not None:
                sizes["model/teacher_params"] = count_params(built.teacher)
            mlrun.log_metrics(sizes, step=0)
        result = _train(row, accelerator, built, mlrun, run_id, stop_requested, log)
    except (StopRequested, SystemExit):
        # Stopping to be requeued (submitit exits with SystemExit after `scontrol requeue`):
        # the run stays open, and the requeued job resumes into it from the saved state.
        raise
    except BaseException as exc:
        if mlrun and isinstance(exc, tracking.TrackingUnavailable):
            # The store is the problem: recording the failure there would only wait as long again.
            print(f"[{row.id}] the failure could not be recorded in MLflow: {exc}", file=sys.stderr)
        elif mlrun:
            reason = failure_reason(exc)
            try:
                mlrun.finish(
                    "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", reason=reason
                )
            except Exception as log_exc:  # the tracking server may be the problem itself
                print(
                    f"[{row.id}] could not record the failure in MLflow: {log_exc}", file=sys.stderr
                )
        raise
    if mlrun:
        mlrun.finish("FINISHED")
    accelerator.end_training()
    return result


def loss_reads_class_head(cfg: C.RowConfig) -> bool:
    """Does a term of the row's loss read the student's class head (`ce`, `ikd`)? Without one,
    some student parameters get no gradient: the class head of a distilled DeiT trained by
    `deit_hard`/`deit_soft` alone, every head (and, with `feature_layer`, the layers after it)
    when only embedding terms train. Under several processes DDP must then look for unused
    parameters at every step (a graph traversal; left off otherwise), or the second step fails."""
    return any(cfg.kd.get(term, 0) > 0 for term in ("ce", "ikd"))


def saved_state_info(row: Row, run_id: str | None) -> dict[str, Any] | None:
    """What the row's folder says of its saved state (state.json: run id, key, epoch), when
    that state is this run's and this row's (same content key); else None. Read without torch."""
    try:
        info = json.loads((row.output_dir / STATE_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if info.get("run_id") != run_id or info.get("key") != row.key:
        return None
    return info


def _finished_already(row: Row, run_id: str | None, mlrun: Any) -> dict[str, float] | None:
    """The final metrics when this row's run is FINISHED and its saved state is the last
    epoch's, else None. A job killed after finishing can be started again by SLURM (a
    requeue's SIGTERM is ignored by submitit until SLURM's kill wait is over, time enough to
    finish a short row): it must not reopen the run nor train again."""
    if mlrun is None:
        return None
    info = saved_state_info(row, run_id)
    if info is None or info.get("epoch") != row.config.train.epochs:
        return None
    try:
        metrics = mlrun.finished_metrics()
    except Exception:  # noqa: BLE001 - the store away: carry on, the normal path reports it
        return None
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if not k.startswith(("system/", "model/"))}


def _print(message: str) -> None:
    print(message, flush=True)


def failure_reason(exc: BaseException) -> str:
    """`Type: message` for MLflow's failure_reason tag. An error raised in a DataLoader worker
    (e.g. a corrupt image) reaches the loop with the worker's traceback in its message: keep
    only the error itself, which names the file."""
    text, kind = str(exc), type(exc).__name__
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        name, _, message = (lines[-1] if lines else text).partition(": ")
        if name.split(".")[-1] == kind:  # the worker's `kd.data.DatasetError: ...` line
            return f"{kind}: {message}"
    return f"{kind}: {text}"


def mixed_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def resolve_weights(
    row: Row, ref: C.InitConfig | C.TeacherConfig, pretrained_ok: bool
) -> dict[str, Any]:
    """`build_model` arguments for where a student's or teacher's weights come from."""
    if getattr(ref, "row", None):
        path = dependency_checkpoint(row, ref.row)
        if not path.is_file():
            raise FileNotFoundError(
                f"row '{row.id}': needs the best checkpoint of row '{ref.row}' at {path}, which does not "
                f"exist; run row '{ref.row}' first (launch/grid.py runs dependencies before dependents)"
            )
        return {"source": "row", "checkpoint": path, "trusted_checkpoint": True}
    if getattr(ref, "file", None):
        return {"source": "file", "checkpoint": ref.file}
    if isinstance(ref, C.InitConfig):
        if ref.source == "pretrained":
            return {"source": "pretrained", "pretrained_tag": ref.tag}
        return {"source": "scratch"}
    return {"source": "pretrained" if pretrained_ok else "scratch"}


@dataclass
class Models:
    """A row's models: what `build_models` returns."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None  # None when no term with a weight needs it
    step_module: DistillationStep
    teacher_renorm: tuple[torch.Tensor, torch.Tensor] | None
    student_data: dict[str, Any]  # input size and normalisation the student expects
    dependency_runs: dict[str, str]  # dependency row id -> run that wrote the checkpoint read


def build_models(row: Row, num_classes: int, *, weights: bool = True) -> Models:
    """Student, frozen teacher, KD loss and the step module of a row.

    `weights=False` builds every model from scratch: the speed of a step does not depend on
    the weights, so benchmarks need neither downloads nor the checkpoints of other rows.
    """
    from kd import models as M
    from kd.losses import KDLoss, KDOptions

    cfg = row.config
    where = f"row '{row.id}' ({row.grid_file})"
    scratch = {"source": "scratch"}
    # Read before the weights: which run wrote each dependency checkpoint about to be loaded.
    dependency_runs = provenance.dependency_runs(row) if weights else {}
    student = M.build_model(
        cfg.student.model,
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        drop_path_rate=cfg.student.drop_path,
        where=where,
        **(resolve_weights(row, cfg.init, pretrained_ok=True) if weights else scratch),
    )
    if M.is_distilled(student):
        # Two heads in training only when a term trains the distillation head; otherwise timm
        # returns the mean of both heads, so both learn the labels and evaluation (the mean of
        # the heads) scores a trained classifier.
        uses_dist_head = any(cfg.kd.get(t, 0) > 0 for t in ("deit_hard", "deit_soft"))
        student.set_distilled_training(uses_dist_head)
    if cfg.train.trainable == "head":
        freeze_backbone(student)
    teacher = None
    if cfg.teacher is not None:
        teacher = M.build_model(
            cfg.teacher.model,
            num_classes=num_classes,
            img_size=cfg.data.img_size,
            where=where + " teacher",
            **(
                resolve_weights(row, cfg.teacher, pretrained_ok=cfg.teacher.pretrained)
                if weights
                else scratch
            ),
        )
        M.freeze_teacher(teacher)
        teacher.kdgrid_feature_layer = cfg.teacher.feature_layer  # read by teacher_forward
    kd_loss = KDLoss(
        cfg.kd,
        KDOptions(
            tau=cfg.kd_options.tau,
            soft_reduction=cfg.kd_options.soft_reduction,
            label_smoothing=cfg.train.label_smoothing,
        ),
        student_dim=M.embedding_dim(student, feature_layer=cfg.student.feature_layer),
        teacher_dim=(
            M.embedding_dim(teacher, feature_layer=cfg.teacher.feature_layer)
            if teacher is not None
            else None
        ),
    )
    if teacher is not None and not kd_loss.needs_teacher:
        teacher = None  # only used for terms with weight 0: don't pay for its forward pass
    student_data = M.data_config(student)
    renorm = None
    if teacher is not None:
        teacher_data = M.data_config(teacher)
        if tuple(teacher_data["mean"]) != tuple(student_data["mean"]) or tuple(
            teacher_data["std"]
        ) != tuple(student_data["std"]):
            renorm = _renorm_tensors(student_data, teacher_data)
    step_module = DistillationStep(student, kd_loss, cfg.student.feature_layer)
    return Models(student, teacher, step_module, renorm, student_data, dependency_runs)


def build(row: Row, accelerator: Any) -> Built:
    """Models, loss, data and loaders for a row (not yet wrapped by Accelerate)."""
    from kd import data as D

    cfg = row.config
    spec = D.DatasetSpec(cfg.data.dataset, cfg.data.root, cfg.data.dogs_root)
    num_classes = D.num_classes(spec)
    models = build_models(row, num_classes)
    train_loader, test_loader = build_loaders(row, spec, models.student_data)
    generator = getattr(train_loader.sampler, "generator", None) or torch.Generator()
    mixup = D.build_mixup(num_classes, cfg.train.mixup, cfg.train.cutmix, cfg.train.label_smoothing)
    train_normalize, test_normalize = batch_normalizers(cfg, models.student_data)
    return Built(
        student=models.student,
        teacher=models.teacher,
        step_module=models.step_module,
        train_loader=train_loader,
        test_loader=test_loader,
        loader_generator=generator,
        mixup=mixup,
        teacher_renorm=models.teacher_renorm,
        num_classes=num_classes,
        train_normalize=train_normalize,
        test_normalize=test_normalize,
        dependency_runs=models.dependency_runs,
    )


def eval_transform(cfg: C.RowConfig, normal: dict[str, Any], *, uint8: bool = False) -> Any:
    """The row's evaluation transform for a model with normalisation `normal` (kd.models.data_config):
    resize and centre crop (or squash) as the recipe says. Used for test sets and clustering.
    `uint8`: see `kd.data.build_transforms`."""
    from kd import data as D

    return D.build_transforms(
        train=False,
        img_size=cfg.data.img_size,
        mean=normal["mean"],
        std=normal["std"],
        crop_pct=cfg.train.eval_crop_pct,
        crop_mode=cfg.train.eval_crop_mode,
        interpolation=normal.get("interpolation", "bicubic"),
        uint8=uint8,
    )


def batch_normalizers(cfg: C.RowConfig, student_data: dict[str, Any]) -> tuple[Any, Any]:
    """(train, test): what the uint8 batches of `build_loaders` go through once on the device,
    the student's normalisation and, for training, the recipe's random erasing."""
    from kd import data as D

    mean, std = student_data["mean"], student_data["std"]
    return D.BatchNormalize(mean, std, re_prob=cfg.train.re_prob), D.BatchNormalize(mean, std)


def build_loaders(
    row: Row, spec: Any, student_data: dict[str, Any]
) -> tuple[DataLoader, DataLoader]:
    """The training and test loaders of a row. Their batches are uint8 images: normalisation
    and random erasing happen on the device (`batch_normalizers`)."""
    from kd import data as D

    cfg = row.config
    train_tf = D.build_transforms(
        train=True,
        img_size=cfg.data.img_size,
        mean=student_data["mean"],
        std=student_data["std"],
        auto_augment=cfg.train.auto_augment,
        hflip=cfg.train.hflip,
        interpolation=student_data.get("interpolation", "bicubic"),
        uint8=True,
    )
    transforms = {"train": train_tf, "test": eval_transform(cfg, student_data, uint8=True)}
    datasets = {  # both splits are read before either loader is built
        split: D.load_split(spec, split, transform=tf, skip_corrupt=cfg.data.skip_corrupt)
        for split, tf in transforms.items()
    }
    train_loader, test_loader = (
        D.build_loader(
            datasets[split],
            batch_size=cfg.train.batch_size,
            train=split == "train",
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
        )
        for split in ("train", "test")
    )
    # epoch 0 for whoever reads the loader before the loop seeds each epoch (bench.py data)
    datasets["train"].seed_augmentations(cfg.train.seed, 0)
    return train_loader, test_loader


def freeze_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """`train.trainable: head`: only the classifier head(s) learn (a linear probe).

    Every other parameter stops requiring gradients (timm's optimizer factory leaves such
    parameters out), and the backbone stays in eval mode whatever `.train()` says, so its
    BatchNorm statistics, dropout and stochastic depth do not move either. The override is a
    bound method, so copies of the model (EMA, clustering) keep the behaviour for themselves.
    """
    import types

    heads = model.get_classifier()
    heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    head_params = {id(p) for head in heads for p in head.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in head_params)

    def train_head_only(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        torch.nn.Module.train(self, False)
        self.training = mode
        classifier = self.get_classifier()
        for head in classifier if isinstance(classifier, (tuple, list)) else [classifier]:
            head.train(mode)
        return self

    model.train = types.MethodType(train_head_only, model)
    return model.train(model.training)


def _renorm_tensors(student_data: dict, teacher_data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift that turn the student's normalised batch into the teacher's:
    x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * a + b."""
    ms, ss = torch.tensor(student_data["mean"]), torch.tensor(student_data["std"])
    mt, st = torch.tensor(teacher_data["mean"]), torch.tensor(teacher_data["std"])
    a = (ss / st).view(1, 3, 1, 1)
    b = ((ms - mt) / st).view(1, 3, 1, 1)
    return a, b


def build_optimizer(cfg: C.TrainConfig, step_module: DistillationStep, cuda: bool):
    """timm's optimizer for the student (weight decay and layer decay groups), plus the
    projection of embed_mse as one more group."""
    from timm.optim import create_optimizer_v2

    extra: dict[str, Any] = {}
    if cuda and cfg.opt.lower() in ("adamw", "adam"):
        extra["fused"] = True
    optimizer = create_optimizer_v2(
        step_module.student,
        opt=cfg.opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        **extra,
    )
    projection = [p for p in step_module.kd_loss.parameters() if p.requires_grad]
    if projection:
        optimizer.add_param_group(
            {"params": projection, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        )
    return optimizer


def build_scheduler(cfg: C.TrainConfig, optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def epoch_length(loader_batches: int, cfg: C.TrainConfig) -> tuple[int, int]:
    """(micro-batches, optimizer updates) per epoch for one process.

    Accelerate updates after every `grad_accum_steps` micro-batches and after the last batch of
    the loader. An epoch cut short by `limit_train_batches` therefore ends on an update
    boundary: cut inside an accumulation, its gradients (and Accelerate's step count) would
    leak into the next epoch, and a resumed run, which starts without them, would diverge.
    """
    accum = cfg.grad_accum_steps
    steps = loader_batches
    if cfg.limit_train_batches and cfg.limit_train_batches < loader_batches:
        steps = min(loader_batches, max(accum, cfg.limit_train_batches // accum * accum))
    return steps, max(1, math.ceil(steps / accum))


def seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    """All randomness of an epoch derives from (seed, epoch, rank): resume is exact."""
    base = seed * 100_003 + epoch * 1_009
    random.seed(base + rank)
    np.random.seed((base + rank) % 2**32)
    torch.manual_seed(base + rank)
    generator.manual_seed(base)  # same shuffle on every rank; Accelerate shards it


@dataclass
class StepParts:
    """What one training step uses, prepared once by `prepare_step` (the loop and
    `kd.bench` both step through `train_step` with it)."""

    accelerator: Any
    step_module: torch.nn.Module  # prepared by Accelerate (and compiled when asked)
    optimizer: Any  # Accelerate's wrapper around `raw_optimizer`
    raw_optimizer: Any
    teacher: torch.nn.Module | None
    renorm: tuple[torch.Tensor, torch.Tensor] | None
    mixup: Callable | None
    student: torch.nn.Module  # the unwrapped student (EMA, evaluation, checkpoints)
    ema: Any
    channels_last: bool
    clip_grad: float | None
    scheduler: Any = None  # set once the epoch length is known
    global_step: int = 0  # optimizer updates so far


def prepare_step(tcfg: C.TrainConfig, accelerator: Any, built: Built) -> StepParts:
    """Memory format, optimizer, Accelerate wrapping, compilation and EMA for `train_step`."""
    from timm.utils import ModelEmaV3

    cuda = accelerator.device.type == "cuda"
    channels_last = cuda and tcfg.channels_last
    if channels_last:
        built.step_module.to(memory_format=torch.channels_last)
        if built.teacher is not None:
            built.teacher.to(memory_format=torch.channels_last)
    raw_optimizer = build_optimizer(tcfg, built.step_module, cuda)
    step_module, optimizer = accelerator.prepare(built.step_module, raw_optimizer)
    teacher = built.teacher.to(accelerator.device) if built.teacher is not None else None
    if teacher is not None and accelerator.mixed_precision == "bf16":
        teacher_weights_bf16(teacher)
    if cuda and tcfg.compile:
        step_module = torch.compile(step_module)
        teacher = torch.compile(teacher) if teacher is not None else None
    student = accelerator.unwrap_model(step_module).student
    renorm = (
        tuple(t.to(accelerator.device) for t in built.teacher_renorm)
        if built.teacher_renorm
        else None
    )
    return StepParts(
        accelerator=accelerator,
        step_module=step_module,
        optimizer=optimizer,
        raw_optimizer=raw_optimizer,
        teacher=teacher,
        renorm=renorm,
        mixup=built.mixup,
        student=student,
        ema=ModelEmaV3(student, decay=tcfg.ema_decay) if tcfg.ema else None,
        channels_last=channels_last,
        clip_grad=tcfg.clip_grad,
    )


def teacher_weights_bf16(teacher: torch.nn.Module) -> torch.nn.Module:
    """Store the frozen teacher's convolution and linear weights in bf16, once.

    Under bf16 autocast those layers run in bf16 anyway, but autocast caches its casts only for
    weights that require grad: a frozen teacher's weights were cast again at every step. Norm
    layers (and weight-standardised convolutions, which normalise their weight in the forward)
    keep fp32, so the teacher computes exactly what autocast computed before, with half the
    weight memory.
    """
    from timm.layers import Linear as TimmLinear

    kinds = (torch.nn.Conv2d, torch.nn.Linear, TimmLinear)
    for module in teacher.modules():
        if type(module) in kinds:
            module.to(torch.bfloat16)
    return teacher


def train_step(parts: StepParts, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """One micro-batch: mixup, teacher forward, student forward and backward with every KD
    term, and (on an accumulation boundary) clipping, the optimizer, the scheduler and EMA.

    Returns each term's value and the total (`loss`), detached and left on the device: reading
    them would wait for the GPU at every step.
    """
    accelerator = parts.accelerator
    if parts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if parts.mixup is not None:
        images, targets = parts.mixup(images, targets)
    teacher_logits = teacher_emb = None
    if parts.teacher is not None:
        teacher_logits, teacher_emb = teacher_forward(
            parts.teacher, images, parts.renorm, accelerator
        )
    with accelerator.accumulate(parts.step_module):
        with accelerator.autocast():
            losses = parts.step_module(images, targets, teacher_logits, teacher_emb)
        loss = losses["loss"]
        if _inject_nan(parts.global_step):
            loss = loss * float("nan")
        accelerator.backward(loss)
        if accelerator.sync_gradients and parts.clip_grad:
            accelerator.clip_grad_norm_(parts.step_module.parameters(), parts.clip_grad)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        parts.global_step += 1
        if parts.scheduler is not None:
            parts.scheduler.step_update(num_updates=parts.global_step)
        if parts.ema is not None:
            parts.ema.update(parts.student, step=parts.global_step)
    out = {name: value.detach() for name, value in losses.items()}
    out["loss"] = loss.detach()
    return out


def _train(row, accelerator, built: Built, mlrun, run_id, stop_requested, log) -> dict[str, float]:
    from kd import data as D
    from kd.evaluate import evaluate

    cfg = row.config
    tcfg = cfg.train
    parts = prepare_step(tcfg, accelerator, built)
    step_module, optimizer, student, ema = (
        parts.step_module,
        parts.optimizer,
        parts.student,
        parts.ema,
    )
    train_loader, test_loader = accelerator.prepare(built.train_loader, built.test_loader)
    # The test split is read every epoch (twice with EMA) through the same deterministic
    # transform: this process's shard of its uint8 images is kept after the first pass.
    D.cache_split(
        test_loader, (3, cfg.data.img_size, cfg.data.img_size), limit_gb=cfg.data.eval_cache_gb
    )
    train_loader = D.NormalizedBatches(train_loader, built.train_normalize)
    test_loader = D.NormalizedBatches(test_loader, built.test_normalize)
    # Counted on the prepared loader: with several processes each one iterates its shard only.
    steps_per_epoch, updates_per_epoch = epoch_length(len(train_loader), tcfg)
    scheduler = parts.scheduler = build_scheduler(tcfg, parts.raw_optimizer, updates_per_epoch)

    state_path = row.output_dir / STATE_FILE
    if accelerator.is_main_process:
        remove_stale_temp_files(row.output_dir, ROW_FILES)
    start_epoch, best_acc1, history = 0, -1.0, []
    state = load_state(state_path, run_id)
    if state is not None:
        _check_same_dependencies(row, state, built.dependency_runs)
    if mlrun and built.dependency_runs:  # once a resume is known not to mix two teachers
        mlrun.set_tags({provenance.dependency_tag(d): r for d, r in built.dependency_runs.items()})
    if state is not None:
        accelerator.unwrap_model(step_module).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        start_epoch, parts.global_step, best_acc1 = (
            state["epoch"] + 1,
            state["global_step"],
            state["best_acc1"],
        )
        history = state.get("history", [])
        log(f"[{row.id}] resuming after epoch {state['epoch'] + 1}/{tcfg.epochs} from {state_path}")
        if mlrun and history:
            _log_missing_epochs(mlrun, history)
    started = time.time()
    skipped_before = 0  # corrupt images left out so far (data.skip_corrupt)
    startup_s = None  # process start -> first training step
    writer = BackgroundWriter()
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            seed_epoch(tcfg.seed, epoch, accelerator.process_index, built.loader_generator)
            built.train_loader.dataset.seed_augmentations(tcfg.seed, epoch)
            step_module.train()
            sums: dict[str, torch.Tensor] = {}
            seen, epoch_start = 0, time.time()
            for step, (images, targets) in enumerate(train_loader):
                if step >= steps_per_epoch:
                    break
                if startup_s is None:
                    startup_s = time.time() - process_started_at()
                    if accelerator.is_main_process:
                        log(f"[{row.id}] first step {startup_s:.1f} s after the process started")
                losses = train_step(parts, images, targets)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                seen += images.shape[0]
                if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == steps_per_epoch:
                    check_finite(sums, epoch, step, accelerator)
            check_finite(sums, epoch, steps_per_epoch - 1, accelerator)
            scheduler.step(epoch + 1)
            train_time = time.time() - epoch_start
            img_per_s = seen * accelerator.num_processes / max(train_time, 1e-9)
            # Mean over every process's steps, not just the main process's share.
            names = sorted(sums)
            local = torch.stack(
                [
                    torch.as_tensor(sums[k], dtype=torch.float64, device=accelerator.device)
                    for k in names
                ]
            )
            totals = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
            metrics = {
                f"train/{k}": float(v) / max(steps_per_epoch, 1)
                for k, v in zip(names, totals.tolist(), strict=True)
            }
            # The peak group's lr: with layer decay, group 0 is the most scaled-down layer.
            metrics["train/lr"] = max(group["lr"] for group in optimizer.param_groups)
            metrics["train/img_per_s"] = img_per_s
            if epoch == start_epoch and startup_s is not None:
                metrics["time/startup_s"] = startup_s
            eval_start = time.time()
            val = evaluate(student, test_loader, accelerator, limit=tcfg.limit_eval_batches)
            metrics |= {"val/acc1": val["acc1"], "val/acc5": val["acc5"], "val/loss": val["loss"]}
            if ema is not None:
                val_ema = evaluate(
                    ema.module, test_loader, accelerator, limit=tcfg.limit_eval_batches
                )
                metrics |= {"val_ema/acc1": val_ema["acc1"], "val_ema/acc5": val_ema["acc5"]}
            metrics["time/train_s"] = train_time
            metrics["time/eval_s"] = time.time() - eval_start
            if cfg.data.skip_corrupt:
                skipped = _skipped_images(built, accelerator)
                metrics["data/skipped_images"] = len(skipped)
                if accelerator.is_main_process and len(skipped) > skipped_before:
                    log(
                        f"[{row.id}] {len(skipped)} corrupt image(s) left out so far "
                        f"(data.skip_corrupt): {', '.join(skipped[:10])}"
                        + (f", ... (+{len(skipped) - 10})" if len(skipped) > 10 else "")
                    )
                skipped_before = len(skipped)
            metrics["epoch"] = epoch + 1
            improved = val["acc1"] > best_acc1
            best_acc1 = max(best_acc1, val["acc1"])
            metrics["val/best_acc1"] = best_acc1
            history.append({"epoch": epoch, "metrics": metrics})
            if accelerator.is_main_process:
                checkpoint_start = time.time()
                writer.wait()  # the previous epoch's files: one copy in memory at a time
                # Copied to the CPU now (a fraction of a second); written while the next epoch trains.
                files = snapshot_epoch(
                    row,
                    parts,
                    epoch=epoch,
                    val=val,
                    num_classes=built.num_classes,
                    improved=improved,
                    best_acc1=best_acc1,
                    run_id=run_id,
                    history=history,
                    dependency_runs=built.dependency_runs,
                )
                # Where the epoch's time went: what training waited for its checkpoint, and
                # the whole epoch (training, evaluation, checkpoint, the rest).
                timing = {
                    "time/checkpoint_s": time.time() - checkpoint_start,
                    "time/epoch_s": time.time() - epoch_start,
                }
                metrics |= timing
                files.state["history"][-1]["metrics"] |= timing  # the copy being written
                elapsed = time.time() - started
                done = epoch + 1 - start_epoch
                eta = elapsed / done * (tcfg.epochs - epoch - 1)
                line = (
                    f"[{row.id}] epoch {epoch + 1}/{tcfg.epochs} loss {metrics['train/loss']:.4f} "
                    f"acc1 {val['acc1']:.2f} acc5 {val['acc5']:.2f} val_loss {val['loss']:.4f} "
                    f"{img_per_s:.1f} img/s eta {_hms(eta)}"
                )
                writer.submit(
                    partial(write_epoch_files, row, files, mlrun, metrics, eta, log, line)
                )
                del files  # the writer's now: the next snapshot is made once it is written
                if stop_requested is not None:
                    writer.wait()  # before the barrier: no process stops while this one writes
            accelerator.wait_for_everyone()
            if stop_requested is not None and stop_requested() and epoch + 1 < tcfg.epochs:
                raise StopRequested(f"stopped after epoch {epoch + 1}; state saved at {state_path}")
        writer.wait()  # the last epoch's files land before the run is finished
    except BaseException:
        writer.finish_quietly()  # the epoch in flight still lands; the first error goes on
        raise
    if accelerator.is_main_process and cfg.evaluate.cluster:
        from kd.cluster import log_clustering

        log_clustering(row, student, mlrun, device=accelerator.device, log=log)
    if accelerator.is_main_process and mlrun:
        for name in (BEST_FILE, LAST_FILE):
            if (row.output_dir / name).is_file():
                mlrun.log_artifact(row.output_dir / name, "checkpoints")
    final = history[-1]["metrics"] if history else {}
    return {k: v for k, v in final.items() if isinstance(v, (int, float))}


def process_started_at() -> float:
    """When this process started (epoch seconds): start-up costs include the imports."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: count from the import of kd.train
        return _IMPORTED_AT


def teacher_forward(teacher, images, renorm, accelerator):
    """Teacher logits and embedding on the same augmented batch, frozen, in inference mode.
    The outputs are cloned so autograd may save them for the student's backward."""
    from kd.models import forward_with_embedding, unwrap_model

    layer = getattr(unwrap_model(teacher), "kdgrid_feature_layer", None)  # teacher.feature_layer
    with torch.inference_mode(), accelerator.autocast():
        x = images * renorm[0] + renorm[1] if renorm is not None else images
        out = forward_with_embedding(teacher, x, feature_layer=layer)
    return out.logits.clone(), out.embedding.clone()


def check_finite(
    sums: dict[str, torch.Tensor], epoch: int, step: int, accelerator: Any = None
) -> None:
    """Raise NonFiniteLossError when a process's loss went non-finite, on every process at once:
    a process failing alone would leave the others waiting for it in their next collective
    until the job's time limit."""
    total = sums.get("loss")
    here = total is not None and not torch.isfinite(total).item()
    anywhere = here
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(here)], device=accelerator.device)
        anywhere = accelerator.reduce(flag, reduction="sum").item() > 0
    if anywhere:
        terms = {k: float(v.item()) for k, v in sums.items()}
        where = "" if here else " on another process (this one's running sums are finite)"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch + 1}, by step {step + 1}{where} (running sums: "
            f"{terms}); lower train.lr, set train.clip_grad, or check the data"
        )


def _inject_nan(global_step: int) -> bool:
    """Fault injection for tests: KDGRID_INJECT_NAN_AT_STEP=N makes step N's loss NaN."""
    value = os.environ.get("KDGRID_INJECT_NAN_AT_STEP")
    return value is not None and int(value) == global_step


def _model_checkpoint(
    row: Row,
    student: dict,
    kd_loss: dict,
    epoch: int,
    val: dict,
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
        "acc1": val["acc1"],
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
    val: dict,
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
    model = _model_checkpoint(
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
    """best.pt (if improved), last.pt, state.pt, state.json, then the epoch's metrics,
    progress.json and its log `line`: metrics reach MLflow only once the state that holds them
    is on disk, so a resumed run never logs an epoch twice, and the log says an epoch is done
    only once a resume would start after it."""
    out = row.output_dir
    if files.improved:
        atomic_save(files.model, out / BEST_FILE)
    atomic_save(files.model, out / LAST_FILE)
    atomic_save(files.state, out / STATE_FILE)
    # What the launcher reads (without torch) to resume a crashed row into its run.
    write_json(
        out / STATE_INFO_FILE,
        {
            "run_id": files.state["run_id"],
            "key": row.key,
            "epoch": files.epoch + 1,
            "epochs": files.epochs,
            "dependency_runs": files.state.get("dependency_runs", {}),
        },
    )
    if mlrun and metrics is not None:
        mlrun.log_metrics(metrics, step=files.epoch + 1)
    _write_progress(row, files.epoch + 1, files.epochs, files.model["acc1"], eta_s)
    if log is not None and line is not None:
        log(line)


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


def _check_same_dependencies(row: Row, state: dict, now: dict[str, str]) -> None:
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


def _log_missing_epochs(mlrun, history: list[dict]) -> None:
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


def _skipped_images(built: Built, accelerator: Any) -> list[str]:
    """Images left out as corrupt so far by any process, both splits (`data.skip_corrupt`)."""
    skipped = []
    for loader in (built.train_loader, built.test_loader):
        dataset = loader.dataset
        flags = getattr(dataset, "corrupt", None)
        if flags is None:
            continue
        if accelerator.num_processes > 1:  # each process flags what its own shard met
            flags = accelerator.gather(flags.int().to(accelerator.device)[None]).amax(0).cpu()
        skipped += [str(dataset.samples[i][0]) for i in flags.nonzero().flatten().tolist()]
    return skipped


def _write_progress(row: Row, epoch: int, epochs: int, acc1: float, eta_s: float) -> None:
    progress = {"epoch": epoch, "epochs": epochs, "acc1": acc1, "eta_s": eta_s, "time": time.time()}
    write_json(row.output_dir / PROGRESS_FILE, progress)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
