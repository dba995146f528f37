"""What a built model is: unwrapping DDP/compile wrappers, its heads, its data config, and one
forward pass that also returns the pooled embedding the feature-level KD terms need."""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The timm model inside DDP / torch.compile wrappers (their attributes live on the inner one)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_distilled(model: nn.Module) -> bool:
    """True for a DeiT with a distillation token and head (two classifier outputs in training)."""
    return isinstance(unwrap_model(model), VisionTransformerDistilled)


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no gradients, so KD never updates or perturbs it.

    Run its forward passes under ``torch.inference_mode()`` (the caller's job: this only sets
    state). A later ``.train()`` on a parent module would undo ``eval()``, so keep the teacher
    outside the student's module tree.
    """
    model.eval()
    model.requires_grad_(False)
    return model


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s) from timm's pretrained_cfg (a tuple for DeiT-dist)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size and normalisation the model expects (teacher and student may differ).

    timm's ``resolve_data_config`` reads the pretrained cfg, which keeps the default input size;
    for fixed-size models (ViT/DeiT) built with another ``img_size`` the real size is used.
    """
    inner = unwrap_model(model)
    cfg = timm.data.resolve_data_config({}, model=inner)
    img_size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: cfg[k] for k in keys if k in cfg}


# --------------------------------------------------------------------------------------------
# Forward with embeddings
# --------------------------------------------------------------------------------------------


class ModelOutputs(NamedTuple):
    """One forward pass of a classifier, with what the KD terms need."""

    logits: torch.Tensor  # class head (distilled DeiT in training: the cls-token head)
    dist_logits: torch.Tensor  # distillation head in training, else the same as logits
    embedding: torch.Tensor  # pooled pre-logit features [B, D] (or the pooled feature_layer)


def _pool(output: Any, num_prefix_tokens: int) -> torch.Tensor:
    """Global-average-pool a layer output: NCHW maps over H, W; ViT tokens over patch tokens."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output[:, num_prefix_tokens:].mean(dim=1)
    return output.flatten(1)


def _find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    examples = close or [n for n, _ in model.named_children()][:10]
    raise ValueError(
        f"unknown feature_layer '{name}' for {type(model).__name__}; "
        f"valid names include: {', '.join(examples)} (see model.named_modules())"
    )


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    heads = model.get_classifier()
    return list(heads) if isinstance(heads, (tuple, list)) else [heads]


def forward_with_embedding(
    model: nn.Module, x: torch.Tensor, *, feature_layer: str | None = None
) -> ModelOutputs:
    """Logits and embedding from one forward pass, identical to ``model(x)``.

    The pass goes through ``model(x)`` itself, so DDP/Accelerate wrappers still synchronise
    gradients; hooks on the timm model inside capture the classifier input (timm's pre-logits:
    what ``forward_head(..., pre_logits=True)`` returns; for a distilled DeiT the mean of the two
    tokens) or, with ``feature_layer``, the output of that submodule, average-pooled.
    A distilled DeiT returns both heads in training when timm's distilled training is on (as
    ``build_model`` leaves it; ``set_distilled_training(False)`` trains the mean of the heads) and
    their mean in eval; whenever the model gives one output, ``dist_logits`` equals ``logits``.
    """
    inner = unwrap_model(model)
    captured: list[torch.Tensor] = []
    if feature_layer is None:
        hooks = [
            head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
            for head in _classifier_modules(inner)
        ]
    else:
        prefix = getattr(inner, "num_prefix_tokens", 0)
        layer = _find_layer(inner, feature_layer)
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out: captured.append(_pool(out, prefix)))
        ]
    try:
        out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    logits, dist_logits = out if isinstance(out, (tuple, list)) else (out, out)
    embedding = captured[0] if len(captured) == 1 else sum(captured) / len(captured)
    return ModelOutputs(logits, dist_logits, embedding)


def _probe_size(model: nn.Module) -> tuple[int, int, int]:
    """Input for a shape probe: a fixed-size model's own size, else a cheap 64 px image."""
    chans, height, width = data_config(model)["input_size"]
    if getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        return chans, height, width
    return chans, min(height, 64), min(width, 64)


def embedding_dim(model: nn.Module, *, feature_layer: str | None = None) -> int:
    """Width of ``forward_with_embedding(...).embedding``: timm's pre-logits size, else measured."""
    inner = unwrap_model(model)
    if feature_layer is None:
        dim = getattr(inner, "head_hidden_size", None) or getattr(inner, "num_features", None)
        if dim:
            return int(dim)
    param = next(inner.parameters())
    x = torch.zeros(2, *_probe_size(inner), device=param.device, dtype=param.dtype)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            out = forward_with_embedding(inner, x, feature_layer=feature_layer)
    finally:
        inner.train(was_training)
    return int(out.embedding.shape[1])


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------
