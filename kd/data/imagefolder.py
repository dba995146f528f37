"""ImageFolder: <root>/train/<class>/*, <root>/test/<class>/* (or val/), and generated copies.

Classes are the train split's folders, so train and test share one label numbering.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kd.data.index_files import SplitIndex, require_root
from kd.data.spec import DatasetError, DatasetSpec
from kd.data.synthetic import Recipe, plan, synthetic_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _split_dir(root: Path, split: str) -> Path:
    if split == "train":
        return root / "train"
    return root / "test" if (root / "test").is_dir() else root / "val"


def check(spec: DatasetSpec) -> list[str]:
    """The missing split folders of an ImageFolder root."""
    problems = require_root(spec.root, "ImageFolder")
    if problems:
        return problems
    root = Path(spec.root)
    if not (root / "train").is_dir():
        problems.append(
            f"ImageFolder: {root / 'train'} is missing; put one folder per class there."
        )
    if not (root / "test").is_dir() and not (root / "val").is_dir():
        problems.append(
            f"ImageFolder: neither {root / 'test'} nor {root / 'val'} exists; "
            "put the evaluation images there, one folder per class."
        )
    return problems


def _class_dirs(folder: Path) -> list[str]:
    try:
        return sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
        )
    except OSError as err:
        raise DatasetError(f"cannot list {folder}: {err}; check the dataset root.") from err


def read_classes(spec: DatasetSpec) -> list[str]:
    """Classes are the train split's folders, so train and test share one label numbering."""
    classes = _class_dirs(Path(spec.root) / "train")
    if not classes:
        raise DatasetError(f"{Path(spec.root) / 'train'} has no class folders; add one per class.")
    return classes


def read_index(spec: DatasetSpec, split: str) -> SplitIndex:
    """One split's images, labelled by their folder."""
    classes = read_classes(spec)
    folder = _split_dir(Path(spec.root), split)
    label_of = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in _class_dirs(folder):
        if name not in label_of:
            raise DatasetError(
                f"{folder / name} is a class that {Path(spec.root) / 'train'} does not have; "
                "every evaluation class needs a training folder of the same name."
            )
        for entry in sorted(os.scandir(folder / name), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                samples.append((entry.path, label_of[name]))
    if not samples:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return SplitIndex(samples, classes)


def write(root: Path, recipe: Recipe, num_classes: int, rng: np.random.Generator) -> None:
    """`train/<class>/*.png` and `test/<class>/*.png` (PNG, so both codecs are exercised)."""
    for split, label, i in plan(recipe, num_classes):
        target = root / split / f"class_{label}" / f"{split}_{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(label, recipe.image_size, rng).save(target)
