"""What the generated copies are made of: their parameters (`Recipe`) and learnable images.

Each layout writes a copy in its real on-disk form from these (see `kd.data.generate`), so that
tests and `--smoke` runs read it through the exact code that reads the real data.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Recipe:
    """The parameters of a generated copy; saved in the marker to make generation idempotent."""

    name: str
    num_classes: int
    train_per_class: int
    test_per_class: int
    image_size: int
    seed: int

    def per_split(self) -> dict[str, int]:
        return {"train": self.train_per_class, "test": self.test_per_class}


def class_colour(label: int) -> np.ndarray:
    """Well-spread hues (golden-ratio steps) so that classes differ by colour."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.8, 0.9)
    return np.array([r, g, b]) * 255.0


def synthetic_image(
    label: int, size: int, rng: np.random.Generator, grey: bool = False
) -> Image.Image:
    """A class colour times class-specific stripes, plus noise: a tiny model separates the classes
    in one epoch, also from greyscale copies (the stripes carry the class as well)."""
    axis = np.arange(size) / size
    frequency, vertical = 1 + label % 4, (label // 4) % 2 == 1
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * axis + rng.uniform(0, 0.5))
    stripes = np.tile(
        wave[None, :] if vertical else wave[:, None], (size, 1) if vertical else (1, size)
    )
    pixels = stripes[..., None] * class_colour(label)[None, None, :] * 0.8 + 30.0
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("L") if grey else image


def write_lines(path: Path, lines: list[str]) -> None:
    """A text index file, one line each, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def plan(recipe: Recipe, num_classes: int) -> Iterator[tuple[str, int, int]]:
    """(split, class, index within class) for every image of a generated copy."""
    for split, count in recipe.per_split().items():
        for label in range(num_classes):
            for i in range(count):
                yield split, label, i
