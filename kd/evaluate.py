"""Measurement: acc@1, acc@5 and mean test cross-entropy; embeddings for clustering.

A DeiT distilled student in eval mode returns the mean of its two heads (timm's behaviour),
so it is scored exactly as timm and the DeiT paper score it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kd import config as C
from kd import data as D


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Any, accelerator: Any, limit: int | None = None
) -> dict[str, float]:
    """acc1/acc5 in percent and mean CE over the whole (possibly sharded) test set."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1, top5, count
    for index, (images, targets) in enumerate(loader):
        if limit is not None and index >= limit:
            break
        with accelerator.autocast():
            logits = model(images)
        if isinstance(logits, tuple):  # a distilled model left in training mode
            logits = (logits[0] + logits[1]) / 2
        logits = logits.float()
        # A negative label stands in for a corrupt test image (data.skip_corrupt): not scored.
        scored = (targets >= 0).float()
        targets = targets.clamp(min=0)
        per_sample = torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="none"),
                *_correct(logits, targets, ks=(1, 5)),
            ],
            dim=1,
        )
        per_sample = torch.cat([per_sample * scored[:, None], scored[:, None]], dim=1)
        per_sample = accelerator.gather_for_metrics(per_sample)  # drops padding duplicates
        totals += per_sample.sum(dim=0).double()
    model.train(was_training)
    count = max(totals[3].item(), 1.0)
    return {
        "loss": totals[0].item() / count,
        "acc1": 100.0 * totals[1].item() / count,
        "acc5": 100.0 * totals[2].item() / count,
        "count": int(totals[3].item()),
    }


def _correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]
) -> list[torch.Tensor]:
    """Per-sample 0/1 for target in top-k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [hits[:, : min(k, logits.shape[1])].any(dim=1).float() for k in ks]


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device | str = "cpu",
    feature_layer: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (or a tapped layer) and labels of a whole dataset."""
    from kd.models import forward_with_embedding

    model.eval()
    embeddings, labels = [], []
    for images, targets in loader:
        out = forward_with_embedding(model, images.to(device), feature_layer=feature_layer)
        scored = targets.cpu() >= 0  # not a stand-in for a corrupt image (data.skip_corrupt)
        embeddings.append(out.embedding.float().cpu()[scored])
        labels.append(targets.cpu()[scored])
    return torch.cat(embeddings), torch.cat(labels)


def eval_transform(cfg: C.RowConfig, normal: dict[str, Any], *, uint8: bool = False) -> Any:
    """The row's evaluation transform for a model with normalisation `normal` (kd.models.data_config):
    resize and centre crop (or squash) as the recipe says. Used for test sets and clustering.
    `uint8`: see `kd.data.build_transforms`."""
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
