"""Building a row's model: a timm architecture with weights from scratch, timm's pretrained
tags, a local file or another row's checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from kd.models import small_image, smoke_bit  # noqa: F401  (register their models with timm)
from kd.models.names import SOURCES, ModelLoadError, check_model_name, pretrained_tags, split_tag
from kd.models.weights import accepts_img_size, load_checkpoint


def _validate_build_args(
    name: str, source: str, pretrained_tag: str | None, checkpoint: str | Path | None, where: str
) -> str:
    """The full timm name (``arch.tag``) after checking the arguments agree; errors name the row."""
    at = f"{where}: " if where else ""
    if source not in SOURCES:
        raise ModelLoadError(f"{at}unknown source '{source}'; expected one of {', '.join(SOURCES)}")
    arch, tag = split_tag(name)
    if tag and pretrained_tag and tag != pretrained_tag:
        raise ModelLoadError(
            f"{at}model '{name}' has tag '{tag}' but pretrained_tag is '{pretrained_tag}'"
        )
    full = f"{arch}.{tag or pretrained_tag}" if (tag or pretrained_tag) else arch
    problem = check_model_name(full)
    if problem:
        raise ModelLoadError(at + problem)
    if source == "pretrained" and not pretrained_tags().get(arch):
        raise ModelLoadError(
            f"{at}timm has no pretrained weights for '{arch}'; use source 'scratch'"
        )
    if source in ("file", "row") and checkpoint is None:
        raise ModelLoadError(f"{at}source '{source}' needs a checkpoint path")
    if source in ("scratch", "pretrained") and checkpoint is not None:
        raise ModelLoadError(
            f"{at}source '{source}' takes no checkpoint (got {checkpoint}); use source 'file'"
        )
    return full


def build_model(
    name: str,
    *,
    num_classes: int,
    img_size: int | None = None,
    source: str = "scratch",
    pretrained_tag: str | None = None,
    checkpoint: str | Path | None = None,
    trusted_checkpoint: bool = False,
    drop_path_rate: float = 0.0,
    where: str = "",
) -> nn.Module:
    """A timm model with ``num_classes`` outputs and weights from ``source``.

    A distilled DeiT comes with timm's distilled training on: in train mode it returns
    ``(cls_logits, dist_logits)``, in eval their mean, as DeiT trains and evaluates.
    ``img_size`` is passed only to fixed-size models (ViT/DeiT); CNNs take any size. ``where``
    (e.g. "row 'deit_b_dist_hard' (grids/table2b.yaml)") prefixes every error message.
    """
    full = _validate_build_args(name, source, pretrained_tag, checkpoint, where)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size is not None and accepts_img_size(full):
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    pretrained = source == "pretrained"
    try:
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    except Exception as exc:
        hint = (
            "; compute nodes without network: download the weights into the Hugging Face cache"
            " (HF_HOME) on a login node and set HF_HUB_OFFLINE=1, or use source 'file'"
            if pretrained
            else ""
        )
        at = f"{where}: " if where else ""
        raise ModelLoadError(
            f"{at}cannot create timm model '{full}' ({kwargs}): {exc}{hint}"
        ) from exc
    if source in ("file", "row"):
        load_checkpoint(
            model, Path(checkpoint), source=source, trusted=trusted_checkpoint, where=where
        )
    if isinstance(model, VisionTransformerDistilled):
        model.set_distilled_training(True)  # DeiT: cls and distillation heads apart in training
    return model
