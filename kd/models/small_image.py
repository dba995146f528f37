"""Small models for small images (Fashion-MNIST's 28-32 px), registered with timm like the smoke
BiT, so that rows name them as any timm model and a whole study trains on a laptop CPU:

    small_cnn              ResNet of one BasicBlock per stage, 16-128 channels (~0.3 M params)
    small_cnn_wide         the same, 24-192 channels (~0.7 M): the Fashion-MNIST teacher
    small_deit_distilled   a DeiT with a distillation token: 4 x 4 patches of 28 px images (7 x 7
                           tokens), width 96, depth 4, 3 heads (~0.3 M)
    small_deit_p7_distilled  the same with 7 x 7 patches (4 x 4 tokens): a third of the compute,
                           the Fashion-MNIST grid's DeiT-style student

The CNNs' stem halves the resolution once (one 3 x 3 stride-2 convolution, no max-pool) where
ImageNet ResNets divide it by 4: images of 28-32 px need the detail. No pretrained weights. Their names match no `--smoke` family pattern, so
`--smoke` keeps them as they are.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet

from kd.models.names import ModelLoadError


def _cfg(name: str, first_conv: str, classifier: str, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": name,
        "num_classes": 1000,
        "input_size": (3, 28, 28),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": first_conv,
        "classifier": classifier,
        **extra,
    }


def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ModelLoadError(f"'{name}' has no pretrained weights: use init scratch, row or file")


class SmallResNet(ResNet):
    """timm's ResNet with one 3 x 3 stride-2 stem convolution and no max-pool (28 px -> 14)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # a 'deep' stem of stem_width: stage 1 takes 2 x stem_width
        width = 2 * kwargs["stem_width"]
        self.conv1 = nn.Conv2d(
            kwargs.get("in_chans", 3), width, kernel_size=3, stride=2, padding=1, bias=False
        )
        self.maxpool = nn.Identity()


def _small_resnet(name: str, channels: tuple[int, ...], pretrained: bool, **kwargs: Any) -> ResNet:
    _no_weights(name, pretrained)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _cfg(name, "conv1", "fc")
    args = dict(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=channels,
        stem_type="deep",
        stem_width=channels[0] // 2,
    )
    return build_model_with_cfg(SmallResNet, name, False, **{**args, **kwargs})


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The Fashion-MNIST CNN student."""
    return _small_resnet("small_cnn", (16, 32, 64, 128), pretrained, **kwargs)


@register_model
def small_cnn_wide(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The Fashion-MNIST teacher."""
    return _small_resnet("small_cnn_wide", (24, 48, 96, 192), pretrained, **kwargs)


def _small_deit(name: str, patch_size: int, pretrained: bool, **kwargs: Any):
    _no_weights(name, pretrained)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _cfg(
        name, "patch_embed.proj", ("head", "head_dist")
    )
    args = dict(
        img_size=28,
        patch_size=patch_size,
        embed_dim=96,
        depth=4,
        num_heads=3,
        mlp_ratio=2.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return build_model_with_cfg(
        VisionTransformerDistilled,
        name,
        False,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **{**args, **kwargs},
    )


@register_model
def small_deit_distilled(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """A DeiT-style student with a distillation token for 28 px images, 4 x 4 patches."""
    return _small_deit("small_deit_distilled", 4, pretrained, **kwargs)


@register_model
def small_deit_p7_distilled(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """The same with 7 x 7 patches: 16 tokens instead of 49, a third of the compute."""
    return _small_deit("small_deit_p7_distilled", 7, pretrained, **kwargs)
