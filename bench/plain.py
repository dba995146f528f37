"""The row's training step as a minimal plain-PyTorch loop: on copies of the same models, with
the same batch, precision, memory format and compilation, the teacher forward in inference mode,
the student forward, every KD term of the row computed inline, backward, optimizer step. The
step benchmark divides its throughput by the project's: the ratio is the loop's overhead."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

from kd import losses as L
from kd.grid import Row
from kd.models import forward_with_embedding
from kd.train import mixed_precision


def _plain_outputs(model: torch.nn.Module, x: torch.Tensor, need_emb: bool):
    """(logits, dist_logits, embedding) of a timm model without hooks or wrappers."""
    if need_emb:
        feats = model.forward_features(x)
        emb = model.forward_head(feats, pre_logits=True)
        out = model.forward_head(feats)
    else:
        out, emb = model(x), None
    logits, dist = out if isinstance(out, (tuple, list)) else (out, out)
    return logits, dist, emb


def _plain_terms(
    weights: dict[str, float],
    options: Any,
    projection: torch.nn.Module | None,
    logits: torch.Tensor,
    dist: torch.Tensor,
    targets: torch.Tensor,
    t_logits: torch.Tensor | None,
    s_emb: torch.Tensor | None,
    t_emb: torch.Tensor | None,
) -> torch.Tensor:
    """The row's weighted KD terms written out inline (DESIGN.md section 4)."""
    tau = options.tau
    total = logits.new_zeros(())
    for name, w in weights.items():
        if name == "ce":
            if targets.dtype.is_floating_point:
                value = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            else:
                value = F.cross_entropy(logits, targets, label_smoothing=options.label_smoothing)
        elif name == "deit_hard":
            value = F.cross_entropy(dist, t_logits.argmax(dim=-1))
        elif name in ("deit_soft", "ikd"):
            s = dist if name == "deit_soft" else logits
            kl = F.kl_div(
                F.log_softmax(s / tau, dim=-1),
                F.log_softmax(t_logits / tau, dim=-1),
                reduction="sum",
                log_target=True,
            )
            per = s.numel() if name == "deit_soft" and options.soft_reduction == "deit" else len(s)
            value = kl * (tau * tau) / per
        elif name == "rkd_distance":
            value = L.rkd_distance(s_emb, t_emb)
        elif name == "rkd_angle":
            value = L.rkd_angle(s_emb, t_emb)
        elif name == "embed_mse":
            value = F.mse_loss(projection(s_emb) if projection is not None else s_emb, t_emb)
        else:  # a term added to kd.losses but not here
            raise NotImplementedError(f"the plain loop has no inline version of term {name!r}")
        total = total + w * value
    return total


class PlainLoop:
    """The row's step in a dozen lines of plain PyTorch, on copies of the same models."""

    def __init__(
        self,
        row: Row,
        models: Any,
        mixup: Callable | None,
        device: torch.device,
        groups: list[dict[str, Any]],
    ):
        """`groups` are the project optimizer's parameter groups: the plain AdamW gets the same
        groups (weight decay off for norms and biases, layer-decayed learning rates) over the
        copies' parameters, so both optimizers do the same arithmetic."""
        tcfg = row.config.train
        kd_loss = models.step_module.kd_loss
        self.student = copy.deepcopy(models.student).to(device)
        self.teacher = copy.deepcopy(models.teacher).to(device) if models.teacher else None
        self.projection = (
            copy.deepcopy(kd_loss.projection).to(device) if kd_loss.projection else None
        )
        self.weights, self.options = dict(kd_loss.weights), kd_loss.options
        self.need_emb = kd_loss.needs_embeddings
        self.feature_layer = row.config.student.feature_layer
        self.renorm = (
            tuple(t.to(device) for t in models.teacher_renorm) if models.teacher_renorm else None
        )
        self.mixup = mixup
        self._set_input(models.student_data, tcfg, device)
        self._set_optimizer(models, groups, tcfg, device)
        self._set_precision(tcfg.precision, device)
        self.student.train()
        if self.teacher is not None:
            self.teacher.eval()
        self.compiled = False

    def _set_input(self, normal: dict[str, Any], tcfg: Any, device: torch.device) -> None:
        """Normalisation of the loader's uint8 batches, random erasing, memory format."""
        self.mean = torch.tensor(normal["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(normal["std"], device=device).view(1, 3, 1, 1) * 255
        self.erase = None
        if tcfg.re_prob > 0:
            self.erase = RandomErasing(tcfg.re_prob, mode="pixel", device=device)
        self.channels_last = tcfg.channels_last
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)

    def _set_optimizer(
        self, models: Any, groups: list[dict[str, Any]], tcfg: Any, device: torch.device
    ) -> None:
        """An AdamW over the copies' parameters with the project optimizer's groups."""
        kd_loss = models.step_module.kd_loss
        originals = list(models.student.parameters())
        params = list(self.student.parameters())
        if self.projection is not None:
            originals += list(kd_loss.projection.parameters())
            params += list(self.projection.parameters())
        index = {id(p): i for i, p in enumerate(originals)}
        plain_groups = [
            {
                "params": [params[index[id(p)]] for p in g["params"]],
                "lr": g["lr"],
                "weight_decay": g["weight_decay"],
            }
            for g in groups
        ]
        cuda = device.type == "cuda"
        extra = {"fused": True} if cuda and tcfg.opt.lower() in ("adamw", "adam") else {}
        self.optimizer = torch.optim.AdamW(plain_groups, lr=tcfg.lr, **extra)
        self.params = params
        self.clip_grad = tcfg.clip_grad

    def _set_precision(self, precision: str, device: torch.device) -> None:
        """Autocast and (fp16) a gradient scaler, as the row's precision asks."""
        precision = mixed_precision(precision, device.type == "cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype))
            if dtype is not None
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def compile(self) -> None:
        self.student = torch.compile(self.student)
        if self.teacher is not None:
            self.teacher = torch.compile(self.teacher)
        self.compiled = True

    def teacher_forward(self, images: torch.Tensor):
        with torch.inference_mode(), self.autocast():
            x = images * self.renorm[0] + self.renorm[1] if self.renorm is not None else images
            t_logits, _, t_emb = _plain_outputs(self.teacher, x, self.need_emb)
        return t_logits.clone(), (t_emb.clone() if t_emb is not None else None)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if self.erase is not None:
            images = self.erase(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        t_logits = t_emb = None
        if self.teacher is not None:
            t_logits, t_emb = self.teacher_forward(images)
        with self.autocast():
            if self.feature_layer is not None:  # a hooked layer: the project's helper
                out = forward_with_embedding(self.student, images, feature_layer=self.feature_layer)
                logits, dist, s_emb = out.logits, out.dist_logits, out.embedding
            else:
                logits, dist, s_emb = _plain_outputs(self.student, images, self.need_emb)
            loss = _plain_terms(
                self.weights,
                self.options,
                self.projection,
                logits,
                dist,
                targets,
                t_logits,
                s_emb,
                t_emb,
            )
        self._backward_and_update(loss)
        return loss.detach()

    def _backward_and_update(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
