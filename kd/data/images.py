"""Decoding one image of a split to RGB: from a file, or from an in-memory uint8 array (CIFAR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kd.data.spec import DatasetError


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image fully and convert it to RGB (CUB has greyscale, CMYK and palette images)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            f"cannot decode image {path}: {err}. The file is corrupt or truncated; "
            "replace it from the original archive (or re-extract the dataset), or set "
            "`data.skip_corrupt: true` to leave such images out (they are counted)."
        ) from err


class ArrayImages:
    """Picklable loader for datasets kept in memory as a uint8 [N, H, W, 3] array (CIFAR), or
    [N, H, W] grey (Fashion-MNIST), which is read as RGB like every other image."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __call__(self, index: int) -> Image.Image:
        image = Image.fromarray(self.array[index])  # uint8 [H, W, 3] reads as RGB
        return image.convert("RGB") if image.mode != "RGB" else image
