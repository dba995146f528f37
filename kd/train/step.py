"""One training step, prepared once and shared by the loop and `bench`: optimizer, scheduler,
Accelerate wrapping, teacher forward, every KD term, the backward, and the finiteness check."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.layers import Linear as TimmLinear
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from kd import config as C
from kd.models import forward_with_embedding, unwrap_model
from kd.train.build import Built, DistillationStep

NAN_CHECK_EVERY = 10  # steps between finiteness checks (each check syncs the GPU)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the row fails, with the reason recorded in MLflow."""


def build_optimizer(cfg: C.TrainConfig, step_module: DistillationStep, cuda: bool):
    """timm's optimizer for the student (weight decay and layer decay groups), plus the
    projection of embed_mse as one more group."""
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
    `bench` both step through `train_step` with it)."""

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
    cuda = accelerator.device.type == "cuda"
    # on CPU too: oneDNN's convolutions train small CNNs ~1.3x faster in channels_last
    # (docs/PERFORMANCE.md); a ViT, all matmuls after its patch embedding, is unchanged
    channels_last = tcfg.channels_last
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


def teacher_forward(teacher, images, renorm, accelerator):
    """Teacher logits and embedding on the same augmented batch, frozen, in inference mode.
    The outputs are cloned so autograd may save them for the student's backward."""
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
