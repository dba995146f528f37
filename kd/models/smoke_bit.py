"""A tiny BiT for smoke runs, registered with timm under the name kd.models.names.SMOKE_BIT.

timm's smallest ResNetV2 with GroupNorm + weight-standardised convs (what BiT is) is
resnetv2_50x1_bit (23.5M params, ~5x slower than resnet18 on CPU); resnetv2_18 is small but uses
BatchNorm and plain convs, so BiT-specific behaviour (GroupNorm with tiny batches, StdConv) would
go untested. This registers resnetv2_18's layout with BiT's layers.
"""

from __future__ import annotations

import functools
from typing import Any

from timm.layers import GroupNormAct, StdConv2d
from timm.models import build_model_with_cfg, register_model
from timm.models.resnetv2 import ResNetV2

from kd.models.names import SMOKE_BIT, ModelLoadError

_SMOKE_BIT_CFG = {
    "architecture": SMOKE_BIT,
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": (7, 7),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),  # BiT normalisation, as timm's resnetv2_*_bit
    "std": (0.5, 0.5, 0.5),
    "first_conv": "stem.conv",
    "classifier": "head.fc",
}


@register_model
def resnetv2_18x1_bit_smoke(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
    """ResNetV2-18 with BiT's GroupNorm + StdConv and fixed stem; smoke tests only (no weights)."""
    if pretrained:
        raise ModelLoadError(f"'{SMOKE_BIT}' is a smoke-test model and has no pretrained weights")
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or dict(_SMOKE_BIT_CFG)
    args = dict(
        layers=[2, 2, 2, 2],
        channels=(64, 128, 256, 512),
        basic=True,
        bottle_ratio=1.0,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        norm_layer=GroupNormAct,
    )
    return build_model_with_cfg(
        ResNetV2, SMOKE_BIT, False, feature_cfg=dict(flatten_sequential=True), **{**args, **kwargs}
    )
